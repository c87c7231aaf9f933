"""``wherefrom tune``: pick a method's damping (and LiSSA / Arnoldi knobs) by LDS on held-out queries.

:func:`tune` loads a ground-truth folder (:class:`wherefrom.studies.groundtruth.build.GroundTruth`, which must
hold LDS subsets), splits its queries once into a **selection** share and a **held-out** rest (seeded),
runs the method once over all queries for every point of the grid (the cartesian product of the
grid's lists, in the order given), and scores each point by LDS
(:func:`wherefrom.studies.groundtruth.evaluate.evaluate_scores`) on both halves. The chosen point is the one
with the highest selection LDS (the first of ties); its **held-out** LDS is the number to quote, since
the selection LDS is biased upwards by the choice itself. The method's default point (no grid
setting: ``damping_factor = 0.1``, default options) is run and scored the same way for comparison.

Every grid key is an option of the method passed to :func:`wherefrom.methods.registry.make_method`: its setting
options ``damping`` (absolute), ``damping_factor`` (relative) and ``fisher``, which set those
:class:`wherefrom.engine.api.AttributionConfig` fields, and its own (``depth``, ``scale``, ``batch_size`` of ``lissa``;
``rank`` of ``arnoldi``; ``max_iter`` of ``cg``; ...). A key the method does not read (``damping_factor`` of
``bm25``, ``gradsim`` or ``repsim``: every point scored alike and one was "chosen") or a bad value is refused
before any point runs, naming it; a value is read as the option's type (``fisher=true`` is ``"true"``).
``damping=None`` in a grid means "use the relative ``damping_factor``".

Outputs under ``out`` (default ``<gt folder>/tune-<method>``), all written atomically:
``points/<nnn>/`` the scores of each point and its row (reused by a rerun with the same settings,
model and data, so an interrupted tuning resumes), ``tune.json`` (command, versions, hardware,
split, every point's LDS on both halves, chosen and default points) and ``tune.md`` (the table).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from wherefrom.core.commandline import command_line as render_command
from wherefrom.core.option_pairs import format_option_pairs
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import METHODS, options_off_default
from wherefrom.studies.bench import check_method_options
from wherefrom.studies.groundtruth.build import GroundTruth
from wherefrom.studies.groundtruth.evaluate import load_method_scores, measured_metrics, scored_row
from wherefrom.studies.metrics import FEWEST_CORRELATED
from wherefrom.studies.toolkit import (
    failure_cell,
    failure_notes,
    free_memory,
    interval_cell,
    key_digest,
    markdown_table,
    number,
    provenance,
    warning_notes,
    write_report,
)

__all__ = ["SELECTION_SHARE", "SPLIT_SEED", "grid_points", "split_queries", "tune"]

SELECTION_SHARE = 0.5
"""The default share of the queries a tuning choice is made on (``--selection-share``); the rest are held out."""
SPLIT_SEED = 0
"""The default seed of the selection / held-out split (``--split-seed``)."""
MIN_HALF = 2
"""The fewest queries either half of the split may have (:func:`split_queries`)."""

_FORMAT_VERSION = 1


def split_queries(
    n_queries: int, selection_share: float = SELECTION_SHARE, seed: int = SPLIT_SEED
) -> tuple[list[int], list[int]]:
    """Seeded split of query indices ``0..n_queries-1`` into ``(selection, held_out)``, each sorted; the first
    ``round(selection_share x n_queries)`` of a seeded permutation select. ``ValueError`` unless each half has at
    least :data:`MIN_HALF` queries (userJ: one selection query gave every point an interval ``[0.902, 0.902]``
    and "chose" one; the share was raised to one query before)."""
    if not 0 < selection_share < 1:
        raise ValueError(f"selection_share must be in (0, 1), got {selection_share}")
    if n_queries < 2 * MIN_HALF:
        raise ValueError(
            f"tuning needs at least {2 * MIN_HALF} queries ({MIN_HALF} to select on, {MIN_HALF} held out: an "
            f"interval over one query is a point), got {n_queries}"
        )
    size = round(selection_share * n_queries)
    if min(size, n_queries - size) < MIN_HALF:
        low, high = (MIN_HALF - 0.5) / n_queries, (n_queries - MIN_HALF + 0.5) / n_queries
        raise ValueError(
            f"selection_share {selection_share} (--selection-share) selects on {size} of the {n_queries} queries and "
            f"holds out {n_queries - size}; each half needs at least {MIN_HALF} (an interval over one query is a "
            f"point): give a share above {low:.3g} and below {high:.3g}"
        )
    order = np.random.default_rng([seed, 5]).permutation(n_queries)
    return sorted(order[:size].tolist()), sorted(order[size:].tolist())


def grid_points(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid``'s lists as ``[{key: value}, ...]`` (keys in the given order,
    the last key varying fastest). Raises ``ValueError`` for an empty grid, an empty or repeated list."""
    if not grid:
        raise ValueError(
            "the grid is empty: give at least one key with a list of values, e.g. damping_factor=[0.01, 0.1, 1]"
        )
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ValueError(f"grid[{key!r}] repeats a value: {list(values)}")
    keys = list(grid)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(grid[k] for k in keys))]


def _options(point: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """The method options of one grid point: ``fixed`` under the point's. Every grid key is an option of the method,
    its setting options (``damping``, ``damping_factor``, ``fisher``) included, so a key the method does not read
    is refused by name and a value is read as the option's type (``fisher=true`` is the text ``"true"``)."""
    return {**fixed, **point}


def _lds(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The LDS entry without its per-query list (kept in the point's row)."""
    return None if summary is None else {k: v for k, v in summary.items() if k != "per_query"}


def _point_folder(out: Path, point: dict[str, Any]) -> Path:
    return out / "points" / key_digest(point, 12)


def command_line(
    gt_folder: str | Path,
    method: str,
    grid: dict[str, Sequence[Any]],
    split_seed: int,
    selection_share: float,
    method_options: dict[str, Any],
    out: str | Path | None,
    device: str | None = None,
) -> str:
    """A ``wherefrom tune`` command line equivalent to the arguments."""
    return render_command(
        "tune",
        [
            (None, gt_folder),
            ("--method", method),
            ("--grid", [f"{key}=" + ",".join(json.dumps(v) for v in values) for key, values in grid.items()]),
            ("--option", format_option_pairs({"*": method_options})),
            ("--split-seed", split_seed),
            ("--selection-share", float(selection_share)),
            ("--out", out),
            ("--device", device),
        ],
    )


def markdown(report: dict[str, Any]) -> str:
    """``tune.md``: one row per grid point (LDS on both halves, time), then the chosen and default points, then each
    point's recorded warnings (:func:`wherefrom.studies.toolkit.warning_notes`: userJ's LiSSA points that did not
    converge)."""
    keys = list(report["config"]["grid"])
    chosen = report["chosen"]["index"] if report["chosen"] else None
    table = []
    for i, row in enumerate(report["points"]):
        values = [json.dumps(row["point"][k]) for k in keys]
        if row["error"]:
            table.append([*values, failure_cell(row["error"], 160)])
            continue
        table.append(
            [
                *values,
                interval_cell(row["selection"]),
                interval_cell(row["held_out"]),
                number(row["seconds"], ".2f"),
                "**chosen**" if i == chosen else "",
            ]
        )
    header = [*keys, "LDS selection", "LDS held-out", "time, s", "chosen"]  # userP: an empty header cell
    lines = [markdown_table(header, table, ["---"] * len(keys) + ["---:", "---:", "---:", "---"])]
    split = report["split"]
    text = [
        f"# wherefrom tune: {report['config']['method']} on {report['config']['groundtruth']}",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"Queries: {len(split['selection'])} select, {len(split['held_out'])} held out (split seed "
            f"{report['config']['split_seed']}). LDS: mean [95% bootstrap interval over queries]."
        ),
        "",
        *lines,
        "",
    ]
    if report["chosen"]:
        c, d = report["chosen"], report["default"]
        tied = [json.dumps(report["points"][i]["point"]) for i in c.get("ties", [])]
        text += [
            (
                f"Chosen: `{json.dumps(c['point'])}`: held-out LDS **{interval_cell(c['held_out'])}** "
                f"(selection {interval_cell(c['selection'])}; the held-out number is the one to quote)."
            )
            + (
                f" It ties {len(tied)} other point(s) on the selection LDS ({', '.join(f'`{t}`' for t in tied)}): "
                "the first in grid order is taken; the selection cannot tell them apart (a setting that changes "
                "no score, or an estimator that did not converge, scores alike)."
                if tied
                else ""
            ),
            f"Default (`{json.dumps(d['point'])}`): held-out LDS {interval_cell(d['held_out'])}"
            + (f" (failed: {d['error']})" if d.get("error") else "")
            + ".",
        ]
    else:
        text.append("No grid point produced an LDS on the selection queries.")
    warned = [(f"`{json.dumps(row['point'])}`", row.get("warnings", [])) for row in report["points"]]
    if report["default"].get("grid_point") is None:  # run apart from the grid
        warned.append(("the default point", report["default"].get("warnings", [])))
    failed = [(f"`{json.dumps(row['point'])}`", row.get("error")) for row in report["points"]]
    return "\n".join(text) + "\n" + failure_notes(failed) + warning_notes(warned)


def tune(
    gt_folder: str | Path,
    method: str,
    grid: dict[str, Sequence[Any]],
    split_seed: int = SPLIT_SEED,
    selection_share: float = SELECTION_SHARE,
    out: str | Path | None = None,
    method_options: dict[str, Any] | None = None,
    attribution: AttributionConfig | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Tune ``method`` over ``grid`` by LDS on the ground truth in ``gt_folder``; returns what ``tune.json`` holds.
    ``device``: where the model is loaded and the points run (default: the ground truth's own).

    ``method_options``: fixed options of every point (``ValueError`` for a key also in ``grid``); ``attribution``:
    base settings (default: the ground truth's, :meth:`GroundTruthConfig.attribution`). The returned
    dict has ``points`` (``point``, ``seconds``, ``error``, ``warnings`` (``None``: a row cached before they were kept), ``selection`` / ``held_out`` LDS
    ``{mean, low, high, n, ...}`` and ``per_query`` LDS of all queries), ``chosen`` (``index`` into
    ``points``, ``point``, both LDS) and ``default`` (the method's default point, both LDS, its ``error``, and
    ``grid_point``: the index into ``points`` of the grid point it equals, which it reuses, or ``None``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    points = grid_points(grid)
    method_options = dict(method_options or {})
    both = sorted(set(method_options) & set(grid))
    if both:  # a fixed option won over the grid's value at every point, while the table named the grid's
        raise ValueError(
            f"{', '.join(both)}: given both as a grid key (--grid) and as a fixed option (--option); the grid sets "
            "it at each point, so leave it out of --option"
        )
    say = log or (lambda _line: None)
    gt = GroundTruth.load(gt_folder, device)
    if gt.lds_masks is None or len(gt.lds_masks) < FEWEST_CORRELATED:
        raise ValueError(
            f"{gt_folder}: the ground truth has {0 if gt.lds_masks is None else len(gt.lds_masks)} LDS subsets; tuning "
            f"needs at least {FEWEST_CORRELATED} (the LDS is a correlation across them)"
        )
    selection, held_out = split_queries(len(gt.query_ids), selection_share, split_seed)
    base = attribution or gt.config.attribution()
    for point in [{}, *points]:  # every point's options and settings, before any point runs
        check_method_options(method, base, _options(point, method_options))
    folder = Path(out) if out is not None else gt.folder / f"tune-{method}"
    models = cache(gt.load_model)  # loaded once, when the first point runs

    def run(point: dict[str, Any]) -> dict[str, Any]:
        key_options = options_off_default(method, method_options)
        where = _point_folder(folder, {"method": method, "point": point, "options": key_options})
        options = _options(point, method_options)
        row = scored_row(gt, method, options, base, where, where / "row.json", models, say, json.dumps(point), progress)
        result = {
            "point": point,
            "seconds": row["seconds"],
            "peak_mib": row["peak_mib"],
            "error": row["error"],
            "warnings": row.get("warnings"),  # None: a row cached by an earlier version, which kept none
            "selection": None,
            "held_out": None,
            "per_query": None,
        }
        measured = (
            None
            if row["error"]
            else measured_metrics(gt, load_method_scores(where, method), result, None, selection, held_out)
        )
        if measured is not None:
            everything, chosen, kept = (metrics["lds"] for metrics in measured)
            result["per_query"] = everything["per_query"]
            result["selection"], result["held_out"] = _lds(chosen), _lds(kept)
        return result

    rows = [run(point) for point in progress(points, f"tune {method}")]  # type: ignore[arg-type]
    ranked = [
        (i, r["selection"]["mean"]) for i, r in enumerate(rows) if r["selection"] and r["selection"]["mean"] is not None
    ]
    best = max(ranked, key=lambda pair: pair[1])[0] if ranked else None  # max keeps the first of ties

    def runs_with(point: dict[str, Any]) -> tuple[AttributionConfig, dict[str, Any]]:
        """What ``point`` runs with (settings, constructor options), an option at its default the same as the option
        left out."""
        config, constructor = check_method_options(method, base, _options(point, method_options))
        return config, options_off_default(method, constructor)

    plain = runs_with({})  # the default point: reuse a grid point that equals it
    same = [i for i, p in enumerate(points) if runs_with(p) == plain]
    default = {**rows[same[0]], "point": {}} if same else run({})
    default["grid_point"] = same[0] if same else None
    chosen = None
    if best is not None:  # the points whose selection LDS equals the best's, beside it (userJ: three tied, unsaid)
        ties = [i for i, mean in ranked if mean == rows[best]["selection"]["mean"] and i != best]
        chosen = {"index": best, **{k: rows[best][k] for k in ("point", "selection", "held_out")}, "ties": ties}
    models = None
    free_memory()

    command = command or command_line(gt_folder, method, grid, split_seed, selection_share, method_options, out, device)
    report = {
        "format": _FORMAT_VERSION,
        **provenance(command),
        "config": {
            "groundtruth": str(gt.folder),
            "method": method,
            "grid": {k: list(v) for k, v in grid.items()},
            "split_seed": split_seed,
            "selection_share": selection_share,
            "method_options": method_options,
            "attribution": base.to_dict(),
        },
        "split": {"selection": [gt.query_ids[q] for q in selection], "held_out": [gt.query_ids[q] for q in held_out]},
        "points": rows,
        "chosen": chosen,
        "default": {k: default[k] for k in ("point", "selection", "held_out", "error", "warnings", "grid_point")},
    }
    write_report(folder / "tune", report, markdown(report))
    return report
