"""Report sections: results turned into headed lists of blocks that the HTML template lays out.

A section is ``{"heading": str, "blocks": [block, ...]}``; a block is one of

* ``{"type": "note", "text"}`` — a paragraph;
* ``{"type": "table", "caption", "columns", "rows"}`` — cells are strings;
* ``{"type": "figure", "caption", "svg"}`` — an inline SVG from :mod:`wherefrom.studies.report.plots`;
* ``{"type": "entries", "caption", "entries"}`` — ranked training rows with their text and, when known,
  a token heatmap (``tokens``: ``[{text, value, color}]``);
* ``{"type": "tokens", "caption", "tokens"}`` — one token heatmap (e.g. the query side);
* ``{"type": "pre", "caption", "text"}`` — preformatted text (settings, provenance).

Every number shown keeps the sign convention of :mod:`wherefrom.core.scoring` (positive = proponent).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores, end_name, sign_note
from wherefrom.methods.registry import similarity_family
from wherefrom.studies.diagnose import damping_cell
from wherefrom.studies.influence import agreement, layer_profile, short_names, tail_profile, top_name
from wherefrom.studies.influence_tables import AXES, layer_table, tail_query_table, tail_summary_table
from wherefrom.studies.report import plots
from wherefrom.studies.toolkit import failure_text, interval_cell, number
from wherefrom.studies.wordorder import GROUPS, RATIO_LABEL

SHARE_NOTE = (
    "Share of |influence|: for each query, the sum over training rows of |score part| of the modules in a group, "
    "divided by the same sum over all modules (the groups sum to 1); positive share: the same with the positive "
    "parts only. Bars are means over queries with a 95% bootstrap interval; 'top proponents' restricts each "
    "query to its highest-scoring rows."
)
TAIL_NOTE = (
    "Top 1% / 10%: share of the query's total positive influence held by its highest-scoring 1% / 10% of "
    "training rows. alpha: exponent of a power law p(x) ~ x^-alpha fitted (powerlaw package) to the positive "
    "scores above xmin, with a 95% interval; R > 0 favours the power law over a log-normal (p: significance). "
    "Grosse et al. (2023) report alpha between 2 and 4.3."
)


def token_spans(tokens: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """``[[text, value], ...]`` -> ``[{text, value, color}]`` coloured by :func:`plots.token_colors`."""
    colors = plots.token_colors([float(v) for _, v in tokens])
    return [{"text": str(t), "value": float(v), "color": c} for (t, v), c in zip(tokens, colors)]


def entries_block(entries: Sequence[Mapping[str, Any]], caption: str) -> dict[str, Any]:
    """Ranked rows (``{id, score, label?, prompt?, completion?, top_modules?, tokens?}``) as an entries block;
    module names lose the parts all the block's modules share (:func:`wherefrom.studies.influence.short_names`)."""
    shown = []
    short = short_names(sorted({name for entry in entries for name, _ in entry.get("top_modules") or []}))
    for rank, entry in enumerate(entries, 1):
        modules = "; ".join(f"{short[name]} {value:+.2g}" for name, value in entry.get("top_modules") or [])
        shown.append(
            {
                "rank": rank,
                "id": entry["id"],
                "score": number(entry["score"], "+.4g"),
                "label": entry.get("label") or "",
                "prompt": entry.get("prompt"),
                "completion": entry.get("completion"),
                "modules": modules,
                "tokens": token_spans(entry["tokens"]) if entry.get("tokens") else None,
            }
        )
    return {"type": "entries", "caption": caption, "entries": shown}


def top_entries(
    scores: Scores,
    query: int,
    k: int,
    rows: Mapping[str, Record] | None,
    opponents: bool = False,
    labels: Mapping[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` top proponents (or opponents) of one query with their text from ``rows``; a row ``rows`` lacks
    (or all, when it is ``None``) with its label from ``labels`` (those saved with the scores) when given."""
    out = []
    for row_id, score in scores.top(query, k, opponents=opponents):
        entry: dict[str, Any] = {"id": row_id, "score": score}
        if rows is not None and row_id in rows:
            row = rows[row_id]
            entry.update(label=row.label, prompt=row.prompt, completion=row.completion)
        elif labels:
            entry["label"] = labels.get(row_id)
        out.append(entry)
    return out


def layer_section(profile: Mapping[str, Any], heading: str = "Influence by layer and module type") -> dict[str, Any]:
    """Bars of the by-layer and by-type shares (all rows vs top proponents) and a table of the means."""
    blocks: list[dict[str, Any]] = [{"type": "note", "text": SHARE_NOTE}]
    for key, axis in AXES.items():
        labels = profile["all"][key]["labels"]
        for share, what in (("abs_share", "|influence|"), ("pos_share", "positive influence")):
            series = {"all rows": profile["all"][key][share], top_name(profile): profile["top"][key][share]}
            blocks.append(
                {
                    "type": "figure",
                    "caption": f"Share of {what} by {axis}",
                    "svg": plots.share_plot(series, labels, f"share of {what} by {axis}", axis),
                }
            )
        columns, rows = layer_table(profile, key)
        blocks.append(
            {
                "type": "table",
                "caption": f"Shares by {axis} (mean [95% interval] over queries)",
                "columns": columns,
                "rows": rows,
            }
        )
    return {"heading": heading, "blocks": blocks}


def tail_section(scores: Scores, max_plots: int = 3) -> dict[str, Any]:
    """Top-1%/10% shares and the power-law fit per query, their means, and CCDF plots of the first queries."""
    tail = tail_profile(scores)
    (summary_columns, summary), (columns, rows) = tail_summary_table(tail), tail_query_table(tail)
    blocks: list[dict[str, Any]] = [
        {"type": "note", "text": TAIL_NOTE},
        {"type": "table", "caption": "Means over queries [95% interval]", "columns": summary_columns, "rows": summary},
        {"type": "table", "caption": "Per query", "columns": columns, "rows": rows},
    ]
    total = scores.total.detach().cpu().double().numpy()
    for q, entry in enumerate(tail["per_query"][:max_plots]):
        blocks.append(
            {
                "type": "figure",
                "caption": f"Tail of query {entry['query']}",
                "svg": plots.tail_plot(total[q], entry["fit"], f"tail of {entry['query']}"),
            }
        )
    return {"heading": "The tail: how concentrated influence is", "blocks": blocks}


def agreement_section(named: Mapping[str, Scores]) -> dict[str, Any] | None:
    """Mean per-query Spearman between every two score sets over the same ids; ``None`` for fewer than two."""
    groups: dict[tuple, dict[str, Scores]] = {}
    for name, scores in named.items():
        groups.setdefault((tuple(scores.query_ids), tuple(scores.train_ids)), {})[name] = scores
    blocks = []
    for group in groups.values():
        if len(group) < 2:
            continue
        result = agreement(group)
        blocks.append(
            {
                "type": "figure",
                "caption": "Mean per-query Spearman correlation of the total scores across training rows",
                "svg": plots.matrix_plot(result["labels"], result["matrix"], "method agreement"),
            }
        )
    if not blocks:
        return None
    return {"heading": "Method-vs-method agreement", "blocks": blocks}


def scores_sections(
    name: str,
    scores: Scores,
    rows: Mapping[str, Record] | None,
    top_k: int = 5,
    max_queries: int = 5,
    *,
    labels: Mapping[str, str | None] | None,
    unread: str,
    origin: str | None = None,
    similarity: str | None = None,
) -> list[dict[str, Any]]:
    """Top proponents and opponents of the first queries, the layer profile and the tail of one score set. Rows
    are shown with their text from ``rows``; when ``rows`` is ``None`` the note ``unread`` says why, and a note
    counts the score set's ids ``rows`` lacks (a training file edited since); those rows are shown by id, with
    their label from ``labels`` (saved with the scores; ``{}`` when none were). ``origin``: a note saying where
    the set's training side came from (an index's rows or recomputed gradients), when known. ``similarity``: the
    family of a method whose scores are a similarity, not influence (``representation``: repsim, ``lexical``:
    bm25): said so, with no layer profile or tail fit (userI: a bm25 page read as influence by layer, all "other")."""
    sign = sign_note(similarity)
    blocks: list[dict[str, Any]] = [
        {
            "type": "note",
            "text": f"{len(scores.query_ids)} queries x {len(scores.train_ids)} training rows, "
            f"{len(scores.module_names)} module{'' if len(scores.module_names) == 1 else 's'}; {sign}.",
        }
    ]
    if origin:
        blocks.append({"type": "note", "text": origin})
    if rows is None:
        blocks.append({"type": "note", "text": unread})
    else:
        missing = sum(row_id not in rows for row_id in scores.train_ids)
        if missing:
            blocks.append(
                {
                    "type": "note",
                    "text": f"{missing} of the {len(scores.train_ids)} training ids of these scores are not in the "
                    "training file (edited since?): they are shown by id.",
                }
            )
    for q, query_id in enumerate(scores.query_ids[:max_queries]):
        for opponents, kind in ((False, "proponents"), (True, "opponents")):
            entries = top_entries(scores, q, top_k, rows, opponents, labels)
            # userM: a similarity's ends were titled proponents / "lowest scores (..., not opponents)"
            end = end_name(kind, [e["score"] for e in entries], similarity)
            blocks.append(entries_block(entries, f"Query {query_id}: {end}"))
    if len(scores.query_ids) > max_queries:
        blocks.append({"type": "note", "text": f"The first {max_queries} queries are shown."})
    tops = {"heading": f"Scores {name}: top rows", "blocks": blocks}
    if similarity:
        return [tops]
    layers = layer_section(layer_profile(scores), f"Scores {name}: influence by layer and module type")
    tail = tail_section(scores)
    tail["heading"] = f"Scores {name}: {tail['heading']}"
    return [tops, layers, tail]


SCALAR_LIST = re.compile(r"\[\n\s*((?:[^\[\]{}\n]+\n\s*)+)\]")
"""A JSON list of scalars as ``json.dumps(indent=...)`` writes it: one element a line."""


def compact_json(value: Any) -> str:
    """``value`` as indented JSON (keys sorted), with every list of scalars on one line (a module's
    ``[name, rows, columns]``, a list of seeds): a manifest of 120 modules stays 120 lines, not 600."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return SCALAR_LIST.sub(
        lambda m: "[" + " ".join(line.strip() for line in m.group(1).split("\n") if line.strip()) + "]", text
    )


def settings_section(heading: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings or provenance shown as indented JSON (:func:`compact_json`)."""
    return {"heading": heading, "blocks": [{"type": "pre", "caption": "", "text": compact_json(settings)}]}


def warning_lines(where: str, texts: Sequence[str] | None) -> list[str]:
    """The report's notes on one row's recorded warnings (:func:`wherefrom.studies.toolkit.recorded_warnings`):
    ``Warning of <where>: <text>`` each, or one saying they were not recorded (``texts`` ``None``: a row written by
    an earlier version, which kept none)."""
    if texts is None:
        return [f"Warnings of {where}: not recorded (a row written by an earlier version)"]
    return [f"Warning of {where}: {text}" for text in texts]


def metric_sections(
    per_method: Mapping[str, Mapping[str, Any]],
    heading: str,
    extra_columns: Mapping[str, str] | None = None,
    metrics: Sequence[str] | None = None,
    caption: str = "mean [95% interval]",
    fmt: str = ".3f",
    prefix: str = "",
    titles: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A table of every metric (mean [95% interval]) per method, and one interval plot per metric.

    ``per_method``: ``{method: {"metrics": {name: {mean, low, high} | None}, ...}}`` in the order shown (other
    metric entries, such as counts, are left out); ``extra_columns`` maps a key of the method's entry (e.g.
    ``seconds``) to its column title; ``metrics``: the metrics shown, in order (default every one, sorted), each
    titled ``prefix + title`` (``"Δ "`` for an ablation's changes; ``titles`` maps a name to its title, default the
    name: evaluate's ``LDS`` for ``lds``, as ``evaluate.md`` has them) with its numbers in ``fmt`` (``"+.3f"``). An entry
    counting its seeds (a bench's: ``n_ok``, ``n_seeds``, ``errors``) gets a "seeds ok" column and a method whose
    every seed failed its first error in place of its numbers, as in ``bench.md``, and each failed seed's error is
    a note (userI: the report showed a failed method as dashes and a mean over the seeds left as over all); an
    entry's own ``error`` (an evaluate row's) is shown in place of its numbers too. Its recorded ``warnings`` (a
    bench's by seed, an evaluate row's a list: :func:`wherefrom.studies.toolkit.recorded_warnings`) are notes, as the
    ``.md`` files list them.
    """
    extra_columns, titles = extra_columns or {}, titles or {}
    if metrics is None:
        metrics = sorted(
            {
                m
                for e in per_method.values()
                for m, v in (e.get("metrics") or {}).items()
                if v is None or isinstance(v, dict)
            }
        )
    counted = any("n_seeds" in e for e in per_method.values())
    rows, notes = [], []
    for method, entry in per_method.items():
        values, errors = entry.get("metrics") or {}, entry.get("errors") or {}
        notes += [f"{method}, seed {seed} failed: {error}" for seed, error in errors.items()]
        said = entry.get("warnings", [])  # a bench's by seed, an evaluate row's a list (None: not recorded)
        said = said.items() if isinstance(said, Mapping) else [(None, said)]
        for seed, texts in said:
            notes += warning_lines(f"{method}{'' if seed is None else f', seed {seed}'}", texts)
        seeds = [f"{entry.get('n_ok')}/{entry.get('n_seeds')}"] if counted else []
        failure = entry.get("error") or (
            next(iter(errors.values()), "no result") if counted and not entry["n_ok"] else None
        )
        if failure:  # an evaluate row's error, or a bench method none of whose seeds gave a result
            blank = [""] * (len(metrics) + len(extra_columns) - 1)
            rows.append([method, failure_text(failure), *blank, *seeds])
            continue
        rows.append(
            [
                method,
                *[interval_cell(values.get(m), fmt) for m in metrics],
                *[number(entry.get(key), ".3g") for key in extra_columns],
                *seeds,
            ]
        )
    blocks: list[dict[str, Any]] = [
        {
            "type": "table",
            "caption": caption,
            "columns": [
                "method",
                *(prefix + titles.get(m, m) for m in metrics),
                *extra_columns.values(),
                *(["seeds ok"] if counted else []),
            ],
            "rows": rows,
        },
        *({"type": "note", "text": note} for note in notes),
    ]
    for metric in metrics:
        stats = {m: (e.get("metrics") or {}).get(metric) for m, e in per_method.items()}
        if any(s for s in stats.values()):
            title = prefix + titles.get(metric, metric)
            blocks.append({"type": "figure", "caption": title, "svg": plots.interval_plot(stats, title)})
    return {"heading": heading, "blocks": blocks}


def diagnose_section(rows: Sequence[Mapping[str, Any]], missing: str | None = None) -> dict[str, Any]:
    """The diagnose table (each method against exact influence, with its time, peak memory and damping), each
    method's warnings (a ``cg`` or ``lissa`` that did not converge: its row is of an unconverged iHVP) and why there
    is no exact reference (``missing``), as ``diagnose.md`` has them (userF: the report left out the warnings, so an
    unconverged row looked converged, and the damping and memory), and a plot of its rank agreement."""
    columns = [
        "method",
        "iHVP rel. error vs exact",
        "Spearman vs exact",
        "mean per-query Spearman",
        "time, s",
        "peak memory, MiB",
        "damping (absolute)",
    ]
    table = [
        [
            r["method"],
            number(r.get("ihvp_rel_error"), ".3g"),
            number(r.get("spearman")),
            number(r.get("spearman_per_query")),
            number(r.get("seconds"), ".3g"),
            number(r.get("peak_mib"), ".0f"),
            damping_cell(r["method"], r.get("damping")),
        ]
        if not r.get("error")
        else [r["method"], failure_text(r["error"]), "", "", "", "", ""]
        for r in rows
    ]
    stats = {
        r["method"]: {"mean": r.get("spearman_per_query")} for r in rows if r.get("spearman_per_query") is not None
    }
    blocks: list[dict[str, Any]] = [{"type": "table", "caption": "", "columns": columns, "rows": table}]
    if missing:
        blocks.append({"type": "note", "text": f"No exact reference: {missing}"})
    blocks += [{"type": "note", "text": line} for r in rows for line in warning_lines(r["method"], r.get("warnings"))]
    if stats:
        svg = plots.interval_plot(stats, "mean per-query Spearman vs exact influence")
        blocks.append({"type": "figure", "caption": "Agreement with exact influence", "svg": svg})
    return {"heading": "Each method against exact influence", "blocks": blocks}


def word_order_section(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The word-order study (:mod:`wherefrom.studies.wordorder`; ``payload``: its ``wordorder.json``): mean
    influence per row group (in :data:`wherefrom.studies.wordorder.GROUPS` order) and the ratio reversed / same,
    each with its 95% interval over seeds, as a table and an interval plot, under the method's name (userI: the rows
    came in alphabetical order, the ratio among the influences, and no method was named); the method's recorded
    warnings on each seed as notes."""
    summary = payload["summary"]
    groups = {g: summary.get(g) for g in GROUPS}
    rows = [[group, interval_cell(stat, ".4g")] for group, stat in groups.items()]
    rows.append([RATIO_LABEL, interval_cell(summary.get("reversed/same"), ".4g")])
    method = payload.get("config", {}).get("method")
    return {
        "heading": f"Word order{f' ({method})' if method else ''}: the fact in the query's order, reversed, and "
        "unrelated rows",
        "blocks": [
            {
                "type": "table",
                "caption": "mean influence score per training row, mean over queries, then over seeds [95% t interval]",
                "columns": ["rows", "mean influence"],
                "rows": rows,
            },
            {
                "type": "figure",
                "caption": "Mean influence per row",
                "svg": plots.interval_plot(groups, "mean influence per row"),
            },
            *(
                {"type": "note", "text": line}
                for seed in payload.get("seeds", [])
                for line in warning_lines(f"{method}, seed {seed['seed']}", seed.get("warnings"))
            ),
        ],
    }


QUERY_SIDE_ROWS = 3
"""Top proponents whose query-side token heatmap the query view shows."""


def query_side_rows(proponents: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The entries whose query-side token heatmap the query view shows: the first :data:`QUERY_SIDE_ROWS` of a
    report's ``proponents`` that score above 0 (a ``null`` score, written for a non-finite one, is none)."""
    return [e for e in proponents[:QUERY_SIDE_ROWS] if isinstance(e["score"], (int, float)) and e["score"] > 0]


def query_side_tokens(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``query_tokens`` of :func:`query_sections` that a ``query --json --per-token`` report holds
    (:func:`query_side_rows`; a report of the JSON file left them out)."""
    return [
        {"id": e["id"], "tokens": e["query_tokens"]}
        for e in query_side_rows(report["proponents"])
        if "query_tokens" in e
    ]


def heatmaps(entries: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any of the ranked ``entries`` carries token values (a heatmap to show)."""
    return any(entry.get("tokens") for entry in entries)


TITLE_CHARACTERS = 80
"""The most characters of a query's prompt a query view's title shows (:func:`query_title`)."""


def query_title(prompt: str) -> str:
    """The title of a query view: ``Query: `` and the prompt, on one line, cut at :data:`TITLE_CHARACTERS` with an
    ellipsis where it is longer (userM: the title was cut mid-word with nothing to say so)."""
    line = " ".join(prompt.split())
    return "Query: " + (line if len(line) <= TITLE_CHARACTERS else line[: TITLE_CHARACTERS - 1].rstrip() + "…")


def query_sections(
    report: Mapping[str, Any], scores: Scores | None = None, query_tokens: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The view of one query: its top proponents and opponents (with token heatmaps when the report has
    them; each table titled by :func:`wherefrom.core.scoring.end_name`, so rows of the wrong sign are not called
    proponents or opponents, and a similarity method's, named by the report's ``strategy``, highest/lowest scores),
    the query-side token heatmaps, and, with the query's ``scores``, its layer profile
    over as many top proponents as the report shows, and its tail.

    ``report``: the dict ``wherefrom query --json`` prints; ``query_tokens``: ``[{"id": train_id,
    "tokens": [[text, value], ...]}]``, the query's tokens' share of its score on that row.
    """
    similarity = similarity_family(report.get("strategy"))
    ends = {
        kind: end_name(kind, [e["score"] for e in report[kind]], similarity) for kind in ("proponents", "opponents")
    }
    query = report["query"]
    blocks: list[dict[str, Any]] = [
        {  # a similarity's file written before it said so read "positive = proponent"
            "type": "note",
            "text": f"strategy {report.get('strategy')}; "
            + (sign_note(similarity) if similarity else report.get("sign", "")),
        },
        {
            "type": "table",
            "caption": "Query",
            "columns": ["prompt", "completion"],
            "rows": [[query["prompt"], query["completion"]]],
        },
        entries_block(
            report["proponents"],
            # the heatmap only where the report has token splits (`query --per-token`; userF: promised without)
            ends["proponents"].capitalize()
            + (" (heatmap: each training token's part of the score)" if heatmaps(report["proponents"]) else ""),
        ),
        entries_block(report["opponents"], ends["opponents"].capitalize()),
    ]
    for entry in query_tokens:
        blocks.append(
            {
                "type": "tokens",
                "caption": f"Query tokens' part of the score on row {entry['id']}",
                "tokens": token_spans(entry["tokens"]),
            }
        )
    sections = [{"heading": "Which training rows made the model say this?", "blocks": blocks}]
    if scores is not None:
        sections += [layer_section(layer_profile(scores, max(len(report["proponents"]), 1))), tail_section(scores)]
    return sections
