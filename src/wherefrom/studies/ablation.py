"""``wherefrom ablate``: which setting flips a finding, one switch at a time between two presets.

Starting from preset ``start`` (:data:`wherefrom.studies.presets.PRESETS`), the study methods run as a
bench (:func:`wherefrom.studies.bench.run_bench`, its cache and tables) under ``start``, then once per
switch (:data:`wherefrom.studies.presets.SWITCHES`) with that switch's settings taken from ``target``,
and once under ``target`` itself. Explicit settings (``fixed``) hold in every run, so a switch made only
of fixed settings is left out. Runs that fine-tune alike share the fine-tuned models
(``out/finetunes/``, :attr:`wherefrom.studies.bench.BenchConfig.finetune_dir`).

Outputs: ``out/runs/<run>/`` (one bench folder each: ``bench.json``, ``bench.md``, rows) and
``out/ablate.json`` / ``out/ablate.md`` (``order``: the runs in order, ``start`` first; ``sizes``: the rows every
run's task had, as in ``bench.json``) with three tables:

* each run's metrics per method, mean and 95% Student-t interval over seeds (``acc``, ``cover`` for a
  class task; ``auprc``, ``mrr`` for an identification task);
* per switch and method, the change against ``start``: the mean over seeds of the paired differences
  ``metric(switch, seed) - metric(start, seed)`` with its 95% t interval (:func:`wherefrom.studies.metrics.mean_stat`);
* short rows: per run and method, the share of queries whose top-1 training row is among the shortest
  :data:`SHORT_SHARE` of training rows (characters of prompt + completion: under left padding to a fixed
  length the most padded) and the share won by the single most frequent top-1 row, pooled over seeds.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wherefrom.core.data import DataError
from wherefrom.core.encoding import encode_records
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.models.loading import load_model
from wherefrom.studies.bench import (
    BenchConfig,
    build_task,
    by_seed,
    check_task_name,
    planned_rows,
    row_units,
    run_bench,
)
from wherefrom.studies.metrics import mean_stat
from wherefrom.studies.presets import SWITCHES, check_preset, resolve, switch_keys, switched, switches_between
from wherefrom.studies.toolkit import (
    failure_notes,
    interval_cell,
    markdown_table,
    number,
    provenance,
    refuse_replacing,
    warning_notes,
    write_report,
)

__all__ = [
    "ABLATION_METRICS",
    "SHORT_SHARE",
    "STUDY_METHODS",
    "AblationConfig",
    "ablation_runs",
    "check_rows_fit",
    "paired_change",
    "row_lengths",
    "run_ablation",
    "short_row_wins",
]

STUDY_METHODS = ["ekfac", "gradsim", "repsim"]
"""What ``ablate`` runs when ``--methods`` is not given (the reference study's EK-FAC-like influence,
gradient similarity and RepSim; add ``lissa``, ``datainf`` where affordable)."""
SHORT_SHARE = 0.1
"""The share of training rows counted as short in the short-rows table."""
ABLATION_METRICS = {"class": ("acc", "cover"), "identify": ("auprc", "mrr")}
"""The metrics an ablation compares, by task kind."""


@dataclass
class AblationConfig:
    """Settings of one ablation: ``task``, ``out``, the presets ``start`` and ``target``, ``methods``,
    ``seeds``, sizes ``n_train`` / ``n_test``, ``model``, ``device``, and ``fixed``: explicit
    :class:`wherefrom.studies.bench.BenchConfig` settings (``method_options`` included) that hold in every run."""

    task: str
    out: str
    start: str = "reference-study"
    target: str = "wherefrom"
    methods: list[str] = field(default_factory=lambda: list(STUDY_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int | None = None
    n_test: int | None = None
    model: str | None = None
    device: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` for an unknown task or preset, presets that do not differ, or a bad run
        (checked on every run's :class:`wherefrom.studies.bench.BenchConfig` before any work)."""
        check_task_name(self.task)
        check_preset(self.start)
        check_preset(self.target)
        if not switches_between(self.start, self.target, self.fixed, self.methods):
            raise ValueError(
                f"presets {self.start!r} and {self.target!r} do not differ once the explicit settings "
                f"{sorted(self.fixed)} are applied: nothing to ablate"
            )
        for _, config in ablation_runs(self):
            config.validate()


def ablation_runs(config: AblationConfig) -> list[tuple[str, BenchConfig]]:
    """``[(run name, bench config)]``: ``start``, one per switch that differs for these methods once the
    fixed settings hold, then ``target``."""
    start = resolve(config.start, config.fixed)
    plans = [("start", start)]
    plans += [
        (name, switched(start, config.target, name, config.fixed))
        for name in switches_between(config.start, config.target, config.fixed, config.methods)
    ]
    plans.append(("target", resolve(config.target, config.fixed)))
    out = Path(config.out)
    runs = []
    for name, settings in plans:
        preset = {"start": config.start, "target": config.target}.get(
            name, f"{config.start} + {name} of {config.target}"
        )
        runs.append(
            (
                name,
                BenchConfig(
                    task=config.task,
                    out=str(out / "runs" / name),
                    methods=list(config.methods),
                    seeds=list(config.seeds),
                    n_train=config.n_train,
                    n_test=config.n_test,
                    model=config.model,
                    device=config.device,
                    preset=preset,
                    finetune_dir=str(out / "finetunes"),
                    **settings,
                ),
            )
        )
    return runs


def _by_seed(report: dict[str, Any], method: str, metric: str) -> dict[int, float]:
    return {
        r["seed"]: r["metrics"][metric]
        for r in report["rows"]
        if r["method"] == method and not r["error"] and r["metrics"].get(metric) is not None
    }


def paired_change(
    base: dict[str, Any], other: dict[str, Any], method: str, metric: str, seeds: Sequence[int]
) -> dict[str, Any] | None:
    """``other - base`` for one ``method`` and ``metric`` of two bench reports (``bench.json``) of the same task,
    paired by seed over the ``seeds`` both scored: ``{mean, low, high, n}`` with the 95% Student-t interval
    (:func:`wherefrom.studies.metrics.mean_stat`, clipped to [-1, 1]: the metrics lie in [0, 1]); ``None`` when
    no seed has both."""
    a, b = _by_seed(base, method, metric), _by_seed(other, method, metric)
    return mean_stat([b[s] - a[s] for s in seeds if s in a and s in b], within=(-1.0, 1.0))


def row_lengths(bench: BenchConfig, directory: Path | None = None) -> dict[int, dict[str, int]]:
    """Per seed of ``bench``, each training row id's length in characters (prompt + completion): the
    ``lengths`` of :func:`short_row_wins`; ``directory``: where the bench ran
    (:func:`wherefrom.studies.bench.build_task`)."""
    return {
        seed: {r.id: len(r.prompt) + len(r.completion) for r in build_task(bench, seed, directory).train}
        for seed in bench.seeds
    }


def short_row_wins(
    report: dict[str, Any], method: str, lengths: dict[int, dict[str, int]], share: float = SHORT_SHARE
) -> dict[str, Any]:
    """Top-1 counts of one bench report (``bench.json``) and method, pooled over seeds: ``queries``,
    ``short_top1`` (won by one of the shortest ``share`` of training rows, at least one row; ``lengths``:
    per seed, each training row id's length) and ``most_frequent_top1`` (won by each seed's most frequent
    winner). The reference study's failure shows as both far above chance (``share`` x queries, resp. a few)."""
    queries = short = most = 0
    for row in report["rows"]:
        if row["method"] != method or row["error"] or not row.get("top1"):
            continue
        by_length = sorted(lengths[row["seed"]], key=lengths[row["seed"]].get)
        shortest = set(by_length[: max(1, math.ceil(share * len(by_length)))])
        queries += len(row["top1"])
        short += sum(1 for winner in row["top1"] if winner in shortest)
        most += Counter(row["top1"]).most_common(1)[0][1]
    return {"queries": queries, "short_top1": short, "most_frequent_top1": most}


def check_rows_fit(runs: Sequence[tuple[str, BenchConfig]]) -> None:
    """Encode every run's training and test rows, for each seed, under that run's input layout (template, EOS,
    padding, loss tokens, ``max_length``, truncation) with the runs' model, before any run starts: a row one switch's
    layout cannot take was found when that run came, after the runs before it had fine-tuned (userS: six
    fine-tunings, then ``padded-loss`` refused a 135-token row). Raises
    :class:`wherefrom.core.data.DataError` naming the run, then the file, line and record."""
    loaded = None
    checked: set[str] = set()
    tasks = {seed: build_task(runs[0][1], seed) for seed in runs[0][1].seeds}  # the same rows in every run
    for name, bench in runs:
        layout = bench.finetune_config(bench.seeds[0]).layout()
        seen = json.dumps(layout, sort_keys=True, default=str)
        if seen in checked:
            continue
        checked.add(seen)
        loaded = loaded or load_model(bench.model, device="cpu")
        for seed, task in tasks.items():
            try:
                for rows in (task.train, task.test):
                    encode_records(rows, loaded.tokenizer, model=loaded.model, **layout)
            except DataError as error:
                raise DataError(f"ablate run {name!r} ({bench.preset}), seed {seed}: {error}") from None


def run_ablation(
    config: AblationConfig,
    progress: Progress = no_progress,
    command: str = "",
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every bench of :func:`ablation_runs` (resuming each from its folder) and write ``ablate.json`` /
    ``ablate.md`` into ``config.out`` (see the module docstring); returns what ``ablate.json`` holds.
    ``overwrite=False``: a bench row made with other settings is refused, not replaced (:func:`run_bench`)."""
    config.validate()
    say = log or (lambda _line: None)
    runs = ablation_runs(config)
    check_rows_fit(runs)
    if not overwrite:  # every run's rows before the first run starts, counted together ("and 35 more")
        refuse_replacing([unit for _name, bench in runs for unit in row_units(bench, planned_rows(bench)[1])])
    reports: dict[str, dict[str, Any]] = {}
    for name, bench in runs:
        say(f"run {name}: {bench.preset}")
        reports[name] = run_bench(
            bench, progress=progress, log=lambda line, name=name: say(f"{name}: {line}"), overwrite=overwrite
        )
    kind = reports["start"]["kind"] or "class"
    names = ABLATION_METRICS[kind]
    lengths = row_lengths(next(iter(ablation_runs(config)))[1])
    changes: dict[str, dict[str, dict[str, Any]]] = {}
    for run in reports:
        if run == "start":
            continue
        changes[run] = {}
        for method in config.methods:
            changes[run][method] = {
                metric: paired_change(reports["start"], reports[run], method, metric, config.seeds) for metric in names
            }
    short = {run: {m: short_row_wins(reports[run], m, lengths) for m in config.methods} for run in reports}
    aggregates = {run: report["aggregate"] for run, report in reports.items()}
    payload = {
        **provenance(command),
        "config": asdict(config),
        "kind": kind,
        "sizes": reports["start"].get("sizes"),  # every run's task is the same rows (task, sizes, seeds)
        "order": list(reports),
        "switches": {
            run: switch_keys(config.start, config.target, run, config.fixed, config.methods) if run in SWITCHES else []
            for run in reports
        },
        "runs": aggregates,
        "changes": changes,
        "short_rows": short,
        "short_share": SHORT_SHARE,
    }
    write_report(Path(config.out) / "ablate", payload, markdown(payload, command))
    return payload


SIGNED = "+.3f"
"""The format of a change against ``start`` (a sign always: positive = the switch raised the metric)."""


def markdown(payload: dict[str, Any], command: str) -> str:
    """The three tables of an ablation (see the module docstring) as Markdown, then the warnings recorded in its
    runs' rows (:func:`wherefrom.studies.toolkit.warning_notes`)."""
    config, names = payload["config"], ABLATION_METRICS[payload["kind"]]
    sizes = payload.get("sizes") or {}
    rows_used = f" ({sizes['n_train']} training rows, {sizes['n_test']} queries)" if sizes else ""
    lines = [
        f"# wherefrom ablate: {config['task']}{rows_used}, from {config['start']} to {config['target']}",
        "",
        f"Command: `{command}`",
        "",
        runs_line(payload),
        "",
        "## Metrics per run",
        "",
    ]
    rows = []
    for run, aggregate in payload["runs"].items():
        for method in config["methods"]:
            entry = aggregate.get(method, {})
            cells = [interval_cell(entry.get("metrics", {}).get(n)) for n in names]
            rows.append([run, method, *cells, f"{entry.get('n_ok', 0)}/{entry.get('n_seeds', 0)}"])
    lines += [markdown_table(["run", "method", *names, "seeds ok"], rows, ["---", "---", *["---:"] * (len(names) + 1)])]
    lines += ["", "## Change against `start` (paired over seeds)", ""]
    rows = [
        [run, method, *(_signed(entry.get(n)) for n in names)]
        for run, methods in payload["changes"].items()
        for method, entry in methods.items()
    ]
    lines += [
        markdown_table(["run", "method", *(f"Δ {n}" for n in names)], rows, ["---", "---", *["---:"] * len(names)])
    ]
    columns, rows = short_rows_table(payload)
    lines += ["", f"## {short_rows_heading(payload)}", ""]
    lines += [markdown_table(columns, rows, ["---", "---", "---:", "---:", "---:"])]
    runs = payload["runs"].items()
    failed = [entry for run, aggregate in runs for entry in by_seed(aggregate, "errors", run)]  # its table: "–", 0/n
    warned = [entry for run, aggregate in runs for entry in by_seed(aggregate, "warnings", run)]
    return "\n".join(lines) + "\n" + failure_notes(failed) + warning_notes(warned)


def runs_line(payload: dict[str, Any]) -> str:
    """The ablation's seeds, intervals and what each run changes, in one paragraph (``ablate.md`` and the report)."""
    config = payload["config"]
    switches = "; ".join(f"{run}: {', '.join(keys)}" for run, keys in payload["switches"].items() if keys)
    return (
        f"Seeds {config['seeds']}; intervals are 95% Student-t over seeds. Runs: `start` = {config['start']}, "
        f"`target` = {config['target']}, each other run = start with that switch's settings from {config['target']} "
        f"({switches})."
    )


def short_rows_heading(payload: dict[str, Any]) -> str:
    """The title of the short-rows table."""
    return f"Short rows among the top-1 (shortest {payload['short_share']:.0%} of training rows by characters)"


def short_rows_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``(columns, rows)`` of the short-rows table: per run and method, how many top-1 proponents are short rows
    and how many are the most frequent winner (``ablate.md`` and the report)."""
    rows = []
    for run, methods in payload["short_rows"].items():
        for method, c in methods.items():
            share = lambda k, c=c: number(c[k] / c["queries"], ".2f") if c["queries"] else "–"  # noqa: E731
            rows.append(
                [
                    run,
                    method,
                    str(c["queries"]),
                    f"{c['short_top1']} ({share('short_top1')})",
                    f"{c['most_frequent_top1']} ({share('most_frequent_top1')})",
                ]
            )
    columns = ["run", "method", "queries", "top-1 is a short row", "top-1 is the most frequent winner (per seed)"]
    return columns, rows


def _signed(stat: dict[str, Any] | None) -> str:
    return interval_cell(stat, SIGNED)
