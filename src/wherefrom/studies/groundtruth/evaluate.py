"""``wherefrom evaluate``: score attribution methods against a ground-truth folder.

:func:`evaluate_scores` compares one :class:`wherefrom.core.scoring.Scores` (queries x training rows,
positive = proponent) with the targets of a :class:`wherefrom.studies.groundtruth.build.GroundTruth`:

* ``lds``: per query, Spearman across the LDS subsets of the measured (seed-mean) ``f`` and the sum
  of the query's scores over the subset (:func:`wherefrom.studies.groundtruth.lds.lds_per_query`);
* ``loo_pearson`` / ``loo_spearman``: per query, correlation across the left-out rows of the scores
  and the LOO effect ``mean_r f_full - mean_r f_without`` (positive: the row raised ``f``);
* ``pbrf_spearman``: per query, Spearman across the PBRF rows of the scores and the PBRF influence.

Each is ``{mean, low, high, n, n_undefined, per_query, interval}`` (:func:`wherefrom.studies.groundtruth.lds.summarize`:
bootstrap interval over queries) or ``None`` when the folder lacks that target.

:func:`evaluate` runs methods by name on the full-data fine-tuned model (fit on the training rows,
scores for every query; ``tracin`` gets the fine-tune's checkpoints), timing them with
:func:`wherefrom.studies.toolkit.measured`. Each method's scores are saved in ``<folder>/scores/<method>.{safetensors,json}``
(:func:`wherefrom.core.scoring.save_scores`) with a ``<method>.row.json`` row keyed by the method, its options,
the attribution settings and the model and data; a rerun reuses them (metrics are recomputed from the
saved scores, so a ground truth extended with more subsets needs no method rerun). A method that
raises gets an ``error`` in its row (and is retried by the next run); the others go on. The report
goes to ``<stem>.json`` and ``<stem>.md`` (default stem ``<folder>/evaluate``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from wherefrom.core.commandline import command_line as render_command
from wherefrom.core.option_pairs import format_option_pairs, options_for
from wherefrom.core.scoring import Scores, load_scores, save_scores
from wherefrom.core.store import read_json_object
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import check_methods, in_family, method_spec, options_off_default, similarity_family
from wherefrom.models.loading import load_model
from wherefrom.studies.bench import check_method_options, scored_method
from wherefrom.studies.groundtruth.build import GroundTruth, base_of, too_few_points
from wherefrom.studies.groundtruth.lds import lds_per_query, loo_correlations, summarize
from wherefrom.studies.metrics import spearman_rows
from wherefrom.studies.toolkit import (
    failure_cell,
    failure_notes,
    free_memory,
    interval_cell,
    markdown_table,
    number,
    provenance,
    refuse_replacing,
    resumable,
    warning_notes,
    write_report,
)

__all__ = [
    "REPORT_MARKS",
    "TARGETS",
    "TARGET_TITLES",
    "evaluate",
    "evaluate_scores",
    "load_method_scores",
    "markdown",
    "measured_metrics",
    "method_key",
    "run_method",
    "score_matrix",
    "scored_row",
]

TARGET_TITLES = {
    "lds": "LDS",
    "loo_pearson": "LOO Pearson",
    "loo_spearman": "LOO Spearman",
    "pbrf_spearman": "PBRF Spearman",
}
"""Each metric against a ground-truth target, and its title in ``evaluate.md`` and the report."""
TARGETS = tuple(TARGET_TITLES)
REPORT_TITLE = "# wherefrom evaluate:"
REPORT_MARKS = {
    ".json": r'\A\{\s*"command": "(?:[^"\\]|\\.)*",\s*"config": \{\s*"attribution": \{',
    ".md": r"\A" + re.escape(REPORT_TITLE),
}
"""How the report files ``STEM.json`` (key-sorted: its command, whatever it is, then its config, whose first key is
the attribution settings) and ``STEM.md`` (its title) start (regular expressions): a file that starts so is an
earlier report, which ``evaluate --out STEM`` may replace (:func:`wherefrom.core.store.replaceable`)."""
_FORMAT_VERSION = 1


def score_matrix(gt: GroundTruth, scores: Scores, queries: Sequence[int] | None = None) -> np.ndarray:
    """``(len(queries), n_train)`` float64 scores in the ground truth's query and training-row order.

    ``scores`` may cover every ground-truth query or exactly the selected ones (in order); its
    training rows must be the ground truth's (any order). Raises ``ValueError`` naming the ids otherwise, and
    naming a query and training row of a NaN or infinite score.
    """
    all_ids = gt.query_ids
    selected = list(range(len(all_ids))) if queries is None else [int(q) for q in queries]
    if not selected:
        raise ValueError("queries selects no query")
    bad = [q for q in selected if not 0 <= q < len(all_ids)]
    if bad:
        raise ValueError(f"query indices {bad[:5]} out of range for {len(all_ids)} ground-truth queries")
    total = scores.total.detach().double().cpu().numpy()
    if list(scores.query_ids) == all_ids:
        total = total[selected]
    elif list(scores.query_ids) != [all_ids[q] for q in selected]:
        raise ValueError(
            f"score query ids {list(scores.query_ids)[:5]}... match neither the ground truth's queries "
            f"{all_ids[:5]}... nor the selected ones"
        )
    train_ids = gt.train_ids
    if list(scores.train_ids) != train_ids:
        position = {tid: j for j, tid in enumerate(scores.train_ids)}
        missing = [t for t in train_ids if t not in position]
        extra = sorted(set(scores.train_ids) - set(train_ids))
        if missing or extra or len(position) != len(train_ids):
            repeated = sorted(t for t, count in Counter(scores.train_ids).items() if count > 1)
            raise ValueError(
                f"score train ids differ from the ground truth's: missing {missing[:5]}, extra {extra[:5]}"
                + (f", repeated {repeated[:5]}" if repeated else "")
            )
        total = total[:, [position[t] for t in train_ids]]
    bad = np.argwhere(~np.isfinite(total))
    if bad.size:  # a NaN made its query's correlations undefined, and the summary left that query out
        query, row = bad[0]
        raise ValueError(
            f"{len(bad)} scores are NaN or infinite, e.g. of training row {train_ids[row]!r} for query "
            f"{all_ids[selected[query]]!r}: they rank nothing, and no correlation is measured on them"
        )
    return total


def evaluate_scores(gt: GroundTruth, scores: Scores, queries: Sequence[int] | None = None) -> dict[str, Any]:
    """Correlations of ``scores`` with every target of ``gt`` over the selected ``queries`` (indices into
    ``gt.query_ids``; ``None``: all). Returns ``{lds, loo_pearson, loo_spearman, pbrf_spearman,
    n_queries}``; a target is ``None`` when ``gt`` lacks it."""
    total = score_matrix(gt, scores, queries)
    selected = list(range(len(gt.query_ids))) if queries is None else [int(q) for q in queries]
    result: dict[str, Any] = dict.fromkeys(TARGETS)
    result["n_queries"] = len(selected)
    if gt.lds_masks is not None:
        result["lds"] = summarize(lds_per_query(gt.lds_masks, gt.lds_outputs[:, :, selected], total))
    effect = gt.loo_effect
    if effect is not None and gt.loo_rows.size:
        pearson, spearman = loo_correlations(effect[selected], total[:, gt.loo_rows])
        result["loo_pearson"], result["loo_spearman"] = summarize(pearson), summarize(spearman)
    if gt.pbrf_influence is not None and gt.pbrf_rows.size:
        result["pbrf_spearman"] = summarize(spearman_rows(gt.pbrf_influence[selected], total[:, gt.pbrf_rows]))
    return result


def measured_metrics(gt: GroundTruth, scores: Scores, row: dict[str, Any], *queries: Sequence[int] | None) -> Any:
    """:func:`evaluate_scores` of ``scores`` (for each of ``queries``, or all queries: one result, or a tuple of
    them), or ``None`` with the ``ValueError`` it raised (non-finite scores) put in ``row["error"]``: one method or
    grid point with a broken-down solve fails alone, as a method that raises does, and the others are reported."""
    try:
        results = tuple(evaluate_scores(gt, scores, q) for q in (queries or (None,)))
    except ValueError as error:
        row["error"] = f"ValueError: {error}"
        return None
    return results if queries else results[0]


def method_key(gt: GroundTruth, method: str, options: dict[str, Any], attribution: AttributionConfig) -> dict[str, Any]:
    """What a method's scores depend on: the method, its options, the attribution settings it reads
    (:meth:`wherefrom.methods.registry.MethodSpec.read`), the fine-tuned model (its saved fine-tuning identity) and
    the rows."""
    identity = read_json_object(gt.model_dir / "finetune_config.json")
    return {
        "format": _FORMAT_VERSION,
        "method": method,
        "options": options_off_default(method, options),
        "attribution": method_spec(method).read(attribution.to_dict()),
        "model": {
            k: identity.get(k)
            for k in ("config", "data_fingerprint", "base_model_fingerprint", "tokenizer_fingerprint", "epoch_losses")
        },
        "train": gt.meta["train_fingerprint"],
        "queries": gt.meta["query_fingerprint"],
    }


def load_method_scores(folder: Path, method: str) -> Scores:
    """The scores :func:`run_method` saved for ``method`` in ``folder`` (with their ids and modules)."""
    return load_scores(folder, method)


def run_method(
    gt: GroundTruth,
    method: str,
    options: dict[str, Any],
    attribution: AttributionConfig,
    model,
    tokenizer,
    folder: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Fit and score ``method`` on the ground truth's full-data model (``tracin`` gets its checkpoints; its passes
    report to ``progress``), save the scores in ``folder`` and return the row: ``method``, ``seconds``,
    ``peak_mib``, ``error`` (a failure is recorded, not raised) and ``warnings`` (wherefrom's, said meanwhile:
    :func:`wherefrom.studies.bench.scored_method`)."""
    options = dict(options)
    config = gt.config
    if in_family(method, "checkpoint"):
        options.setdefault("checkpoints", [str(p) for p in gt.checkpoints])
        if config.lora_rank is not None:
            options.setdefault(
                "base",
                lambda: load_model(gt.model, device=config.device, base_fingerprint=base_of(gt.model_dir)).model,
            )
    scores, usage = scored_method(
        method, model, tokenizer, attribution, options, gt.task.train, gt.task.test, config.device, progress
    )
    row = {"method": method, **usage}
    if scores is not None:
        try:
            save_scores(scores, folder, method, similarity=similarity_family(method))  # <method>.safetensors + .json
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
    return row


def scored_row(
    gt: GroundTruth,
    method: str,
    options: dict[str, Any],
    attribution: AttributionConfig,
    folder: Path,
    row_path: Path,
    models: Callable[[], tuple[Any, Any]],
    log: Callable[[str], None],
    label: str,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """The row of ``method`` with ``options`` and ``attribution`` on the ground truth's model: reused from
    ``row_path`` when it was written with the same :func:`method_key` and its scores are in ``folder``
    (:func:`wherefrom.studies.toolkit.resumable`), else :func:`run_method` on ``models()`` (called only
    then: ``(model, tokenizer)``; its passes report to ``progress``) and stored. ``log`` gets one line, starting
    with ``label``."""

    def compute() -> dict[str, Any]:
        model, tokenizer = models()
        return run_method(gt, method, options, replace(attribution), model, tokenizer, folder, progress)

    key = method_key(gt, method, options, attribution)
    row, reused = resumable(row_path, key, compute, needs=[folder / f"{method}.json"])  # the set's marker
    if reused:
        log(f"{label}: reused")
    else:
        log(f"{label}: " + (f"failed: {row['error']}" if row["error"] else f"{row['seconds']:.1f} s"))
    return row


def noise_line(noise: dict[str, Any] | None) -> str:
    """The ground truth's noise floors in words (``groundtruth.json``'s ``noise``): LOO's signal-to-noise (near or
    below 1 its correlations are mostly training noise) and LDS's spread across subsets over the seed noise of a
    subset's mean; ``""`` when it recorded none. userF: ``evaluate.md`` showed LOO correlations with no word of a
    signal-to-noise of 1.1."""
    noise = noise or {}
    parts = []
    if isinstance(noise.get("loo"), dict):
        loo = noise["loo"]
        parts.append(
            f"LOO signal-to-noise {number(loo['signal_to_noise'], '.3g')} over {loo.get('seeds')} seeds (mean "
            "|effect| / its standard error; near or below 1 the LOO columns are mostly training noise)"
            if loo.get("signal_to_noise") is not None
            else "LOO signal-to-noise not measured (one seed; --loo-seeds 2 or more measures it)"
        )
    if isinstance(noise.get("lds"), dict):
        lds = noise["lds"]
        parts.append(  # userI: "spread across subsets – x the seed noise ... over 1 seeds"
            f"LDS spread across subsets {number(lds['subset_to_seed_noise'], '.3g')} x the seed noise of a "
            f"subset's mean over {lds.get('seeds')} seeds"
            if lds.get("subset_to_seed_noise") is not None
            else "LDS seed noise not measured (one seed per subset; --subset-seeds 2 or more measures it)"
        )
    return f"Noise floors: {'; '.join(parts)}.\n" if parts else ""


def markdown(
    rows: dict[str, dict[str, Any]],
    command: str,
    title: str,
    noise: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The report as a Markdown table: method x LDS / LOO Pearson / LOO Spearman / PBRF Spearman
    ("mean [low, high]", bootstrap over queries), time and peak memory, then ``notes`` (one line each: why a
    column is undefined, :func:`wherefrom.studies.groundtruth.build.too_few_points`) and the ground truth's noise
    floors (:func:`noise_line`), then each method's recorded warnings
    (:func:`wherefrom.studies.toolkit.warning_notes`)."""
    table = [
        [method, failure_cell(row["error"])]
        if row.get("error")
        else [
            method,
            *(interval_cell(row["metrics"].get(t)) for t in TARGETS),
            number(row["seconds"], ".2f"),
            number(row["peak_mib"], ".0f"),
        ]
        for method, row in rows.items()
    ]
    header = ["method", *TARGET_TITLES.values(), "time, s", "peak memory, MiB"]
    return (
        f"{REPORT_TITLE} {title}\n\nCommand: `{command}`\n\n"
        + markdown_table(header, table)
        + "\n\nIntervals: 95% percentile bootstrap over queries. Time and memory: fit + scores of the method.\n"
        + "".join(f"{note}.\n" for note in notes)
        + noise_line(noise)
        + failure_notes((method, row.get("error")) for method, row in rows.items())
        + warning_notes((method, row.get("warnings")) for method, row in rows.items())  # None: a row cached before
    )


def command_line(
    folder: Path,
    methods: Sequence[str],
    method_options: dict[str, dict[str, Any]],
    out: Path | None,
    device: str | None = None,
) -> str:
    """A ``wherefrom evaluate`` command line equivalent to the arguments."""
    return render_command(
        "evaluate",
        [
            (None, folder),
            ("--methods", ",".join(methods)),
            ("--option", format_option_pairs(method_options)),
            ("--out", out),
            ("--device", device),
        ],
    )


def evaluate(
    gt_folder: str | Path,
    methods: Sequence[str],
    method_options: dict[str, dict[str, Any]] | None = None,
    out: str | Path | None = None,
    attribution: AttributionConfig | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``methods`` on the ground truth in ``gt_folder`` and score them; returns what ``<out>.json`` holds.

    ``method_options``: ``{method: {key: value}}`` for :func:`wherefrom.methods.registry.make_method` (``"*"``:
    every method); ``out``: file stem of the report (default ``<gt_folder>/evaluate``);
    ``attribution``: batching/damping settings (default: the ground truth's batch size and maximum
    length, :meth:`GroundTruthConfig.attribution`); ``device``: where the model is loaded and the methods run
    (default: the ground truth's own, :meth:`GroundTruth.load`; cached rows are reused on any). A method's row
    made with other options or settings is recomputed and replaced with ``overwrite=True``; ``overwrite=False`` (the default, as ``wherefrom evaluate``
    without ``--overwrite``) refuses that before any method runs (:class:`wherefrom.core.store.OutputExists`).
    """
    methods = check_methods(methods)
    method_options = method_options or {}
    say = log or (lambda _line: None)
    gt = GroundTruth.load(gt_folder, device)
    attribution = attribution or gt.config.attribution()
    for method in methods:  # before any method runs
        check_method_options(method, attribution, options_for(method_options, method))
    stem = Path(out) if out is not None else gt.folder / "evaluate"
    folder = gt.folder / "scores"
    if not overwrite:
        refuse_replacing(
            (folder / f"{method}.row.json", method_key(gt, method, options_for(method_options, method), attribution))
            for method in methods
        )
    folder.mkdir(parents=True, exist_ok=True)
    models = cache(gt.load_model)  # loaded once, when the first method runs
    rows: dict[str, dict[str, Any]] = {}
    for method in progress(methods, "methods"):
        options = options_for(method_options, method)
        row_path = folder / f"{method}.row.json"
        row = scored_row(gt, method, options, attribution, folder, row_path, models, say, method, progress)
        row = {"warnings": None, **row}  # None: a row cached by an earlier version, which recorded none
        row["metrics"] = None if row["error"] else measured_metrics(gt, load_method_scores(folder, method), row)
        rows[method] = row
    models = None
    free_memory()

    command = command or command_line(
        Path(gt_folder), methods, method_options, None if out is None else Path(out), device
    )
    report = {
        "format": _FORMAT_VERSION,
        **provenance(command),
        "config": {
            "groundtruth": str(gt.folder),
            "methods": methods,
            "method_options": method_options,
            "attribution": asdict(attribution),
        },
        "groundtruth": {
            k: gt.meta.get(k) for k in ("config", "command", "noise", "timings", "retrain_reproducibility_max_abs")
        },
        "methods": {m: {k: v for k, v in r.items() if k != "key"} for m, r in rows.items()},
    }
    title = f"{gt.config.task} ({gt.task.description or gt.task.name}), {len(gt.train_ids)} rows, {len(gt.query_ids)} queries"
    write_report(
        stem,
        report,
        markdown(
            rows,
            command,
            title,
            gt.meta.get("noise"),
            too_few_points(*(0 if rows_of is None else rows_of.size for rows_of in (gt.loo_rows, gt.pbrf_rows))),
        ),
        REPORT_MARKS,
    )
    return report
