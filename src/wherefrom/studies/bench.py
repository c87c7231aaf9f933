"""``wherefrom bench``: every method on a benchmark task, over seeds, with metrics, time and memory.

For each seed: build the task (:data:`wherefrom.studies.benchtasks.TASKS`, or files with
``"path:<train>:<test>[:identify]"``), LoRA-fine-tune a fresh base model on its training rows (cached under
``out/seed-<s>/finetune`` by :func:`wherefrom.models.finetune.finetune`; skipped when every method left
to run needs no model, e.g. ``--methods bm25``), then run every method (fit +
scores, timed with :func:`wherefrom.studies.toolkit.measured`) and score it with
:func:`wherefrom.studies.metrics.class_attribution` (``kind == "class"``) or
:func:`wherefrom.studies.metrics.identification` (``kind == "identify"``). A method that raises gets an
``error`` in its row; the others go on.

Outputs (all written atomically):

* ``out/seed-<s>/<method>.json``: one row (metrics with per-query values, each query's top-1 training
  row id ``top1``, seconds, peak MiB, error) and the ``key`` of settings it was computed with (:func:`wherefrom.studies.toolkit.cached` /
  :func:`wherefrom.studies.toolkit.store`). A later run skips a (seed, method) whose file exists with the
  same key and no error, so an interrupted run resumes;
* ``out/bench.json``: config, package versions, hardware, command, the ``sizes`` the task had (``n_train``,
  ``n_test``: a file task with fewer rows than asked for uses them all), every row and the aggregate
  (per method and metric: mean and 95% Student-t interval over seeds, :func:`wherefrom.studies.metrics.mean_ci`;
  mean seconds and peak MiB);
* ``out/bench.md``: the same aggregate as a Markdown table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wherefrom.core.commandline import command_line as render_command
from wherefrom.core.commandline import field_flags
from wherefrom.core.data import DataError, data_fingerprint
from wherefrom.core.option_pairs import format_option_pairs, options_for
from wherefrom.core.store import OVERWRITE_ALLOW
from wherefrom.curvature.base import DAMPING_FACTOR, Progress, no_progress
from wherefrom.engine.api import FISHERS, AttributionConfig
from wherefrom.methods.registry import (
    check_methods,
    in_family,
    make_method,
    method_settings,
    method_spec,
    options_off_default,
)
from wherefrom.methods.tracin import weights_fingerprint
from wherefrom.models.finetune import FinetuneResult, finetune
from wherefrom.models.loading import LoadedModel, load_model, pick_device
from wherefrom.studies.benchtasks import TASKS, BenchTask, as_identification, from_path, subsampled
from wherefrom.studies.finetuning import FIRST_FINETUNING, LATER_FINETUNING, StudyFinetuning, later_flags
from wherefrom.studies.metrics import class_attribution, identification, mean_stat
from wherefrom.studies.toolkit import (
    cached,
    check_seeds,
    failure_cell,
    failure_notes,
    free_memory,
    interval_cell,
    key_digest,
    markdown_table,
    measured,
    number,
    provenance,
    recorded_warnings,
    refuse_replacing,
    store,
    warning_notes,
    write_report,
)

__all__ = [
    "DEFAULT_METHODS",
    "BenchConfig",
    "build_task",
    "by_seed",
    "check_task_name",
    "command_line",
    "finetuned",
    "make_task",
    "method_row",
    "named_from",
    "planned_rows",
    "refuse_replaced_rows",
    "row_key",
    "row_units",
    "rows_key",
    "run_bench",
    "scored_method",
    "short_of_sizes",
    "task_from",
]

DEFAULT_METHODS = ["ekfac", "kfac", "datainf", "gradsim", "tracin", "repsim", "bm25"]
_FORMAT_VERSION = 1
_LATER_RUNS_MODEL = (*LATER_FINETUNING, "lora_targets")
"""The settings of :data:`LATER` in the key of every method that runs the fine-tuned model."""
LATER = ("fisher", *_LATER_RUNS_MODEL)
"""Settings added after bench rows were first cached: in a row's key (and the command line) only when not at their default."""
_FINETUNING = ("model", *FIRST_FINETUNING)
"""The model and the first settings of the seeds' fine-tuning (:meth:`BenchConfig.finetune_config`, with
:data:`wherefrom.studies.finetuning.LATER_FINETUNING`): in the key of every method that runs the fine-tuned model."""
_NOT_AGGREGATED = {"k", "n_queries", "per_query"}
_UNIT_INTERVAL = {"acc", "cover", "cover_ceiling", "mrr", "auprc", "auroc", "recall_at_k"}
"""Metrics that lie in [0, 1]: their interval over seeds is clipped to it (with few seeds a Student-t
interval reaches past the range the metric can take)."""


@dataclass(kw_only=True)
class BenchConfig(StudyFinetuning):
    """Settings of one benchmark: task, methods, seeds, fine-tuning, attribution batching, output.

    ``task``: a name in :data:`wherefrom.studies.benchtasks.TASKS` or ``"path:<train file>:<test file>"``
    (a labelled class task, :func:`wherefrom.studies.benchtasks.from_path`; the same files for every seed;
    with ``":identify"`` appended, an identification task, :func:`make_task`).
    ``n_train`` / ``n_test``: ``None`` keeps the task's default (a file task: all its rows; a size
    draws a class-balanced subset per seed, :func:`wherefrom.studies.benchtasks.subsampled`). ``model``: local model folder
    (``None``: the default model). ``method_options``: ``{method: {key: value}}`` passed to
    :func:`wherefrom.methods.registry.make_method`; the key ``"*"`` applies to every method.
    ``damping`` / ``damping_factor`` / ``fisher``: as in :class:`wherefrom.engine.api.AttributionConfig`. The
    fine-tuning settings and the input layout (which the attribution takes too) are those of
    :class:`wherefrom.studies.finetuning.StudyFinetuning`. ``preset``: the name of the preset
    (:data:`wherefrom.studies.presets.PRESETS`) the settings were resolved from, recorded only.
    ``finetune_dir``: where the seeds' fine-tuned models live (default ``out/seed-<s>/finetune``); given,
    each fine-tuning gets the folder ``<finetune_dir>/<hash of its settings>``, so runs that fine-tune
    alike (an ablation's) share it.
    """

    task: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    n_train: int | None = None
    n_test: int | None = None
    model: str | None = None
    damping: float | None = None
    damping_factor: float = DAMPING_FACTOR
    device: str | None = None
    method_options: dict[str, dict] = field(default_factory=dict)
    fisher: str = "true"
    preset: str | None = None
    finetune_dir: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` for an unknown task or method, or an empty method / seed list, and
        :class:`wherefrom.core.options.OptionError` (a ``ValueError``) for an option a method does not have or a bad
        value of one (:func:`wherefrom.methods.registry.method_settings`), before any fine-tuning."""
        check_task_name(self.task)
        check_methods(self.methods)
        check_seeds(self.seeds)
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {list(FISHERS)}, got {self.fisher!r}")
        self.finetune_config(self.seeds[0]).validate()  # the layout's template and loss tokens too
        for method in self.methods:  # before any fine-tuning: a bad option failed every seed's row of it
            check_method_options(method, self.attribution_config(self.seeds[0]), self.options_for(method))

    def options_for(self, method: str) -> dict[str, Any]:
        return options_for(self.method_options, method)

    def attribution_config(self, seed: int) -> AttributionConfig:
        """The :class:`wherefrom.engine.api.AttributionConfig` every method of the seed runs with."""
        return self.fine_tuned_attribution(
            seed, damping=self.damping, damping_factor=self.damping_factor, fisher=self.fisher
        )


def build_task(config: BenchConfig, seed: int, directory: Path | None = None) -> BenchTask:
    """The task of ``config`` for one seed; a ``path:`` task's relative files named from ``directory`` (where the
    bench ran, :func:`task_from`; ``None``: the current directory)."""
    task = config.task if directory is None else task_from(config.task, directory)
    return make_task(task, config.n_train, config.n_test, seed)


def named_from(path: str | None, directory: Path | None) -> str | None:
    """A path setting (``model``, ``finetune_dir``, a ``path:`` task's file) named from ``directory`` where it is
    relative (``~`` expanded); as it is without one (``None``: the current directory, or the default model)."""
    if path is None or directory is None:
        return path
    return str(Path(directory) / Path(path).expanduser())


def _file_task(task: str) -> tuple[str, str, bool]:
    """``(train, test, identify)`` of a ``path:<train>:<test>[:identify]`` task; ``ValueError`` otherwise."""
    parts = task.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "identify"):
        raise ValueError(
            f"task {task!r}: expected path:<train file>:<test file> or path:<train file>:<test file>:identify"
        )
    return parts[1], parts[2], len(parts) == 4


def check_task_name(task: str) -> None:
    """Raise ``ValueError`` unless ``task`` is a name in :data:`wherefrom.studies.benchtasks.TASKS` or
    ``path:<train>:<test>[:identify]``, and :class:`wherefrom.core.data.DataError` (a ``ValueError``)
    naming the file when a path task's file does not exist (checked before any fine-tuning starts)."""
    if not task.startswith("path:"):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)} or path:<train>:<test>[:identify]")
        return
    for path in _file_task(task)[:2]:
        if not Path(path).exists():
            raise DataError(
                f"{path}: file not found (task {task!r}; the reference study's sets are in shared/datasets, "
                f"see its README)"
            )


def task_from(task: str, directory: Path) -> str:
    """``task`` with the relative files of a ``path:`` task named from ``directory`` (where it was given); a task
    by name as it is."""
    if not task.startswith("path:"):
        return task
    train, test, identify = _file_task(task)
    return ":".join(["path", *(named_from(f, directory) for f in (train, test)), *(["identify"] if identify else [])])


def make_task(task: str, n_train: int | None, n_test: int | None, seed: int) -> BenchTask:
    """A task by name (:data:`wherefrom.studies.benchtasks.TASKS`) or ``"path:<train>:<test>"`` (a class
    task from files, cut to a class-balanced ``n_train`` / ``n_test`` per seed); a ``:identify`` suffix
    reads the files as identification (:func:`wherefrom.studies.benchtasks.as_identification`: find the
    training rows with the query's label). ``None`` sizes keep the task's default."""
    if task.startswith("path:"):
        train, test, identify = _file_task(task)
        cut = subsampled(from_path(Path(train).stem, train, test), n_train, n_test, seed)
        return as_identification(cut) if identify else cut
    sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    return TASKS[task](seed=seed, **sizes)


def short_of_sizes(task: BenchTask, n_train: int | None, n_test: int | None) -> list[str]:
    """One line for each of ``n_train`` / ``n_test`` that asked for more rows than ``task`` (from
    :func:`make_task`) has: a file task then uses all its rows, which the caller says rather than record the size
    asked for. Each names the command-line flag and the config field (``--n-train 100 (n_train)``)."""
    asked = (("n_train", n_train, task.train, "training"), ("n_test", n_test, task.test, "test"))
    return [
        f"--{name.replace('_', '-')} {n} ({name}): the task has only {len(rows)} {split} rows; all of them are used"
        for name, n, rows, split in asked
        if n is not None and n > len(rows)
    ]


def command_line(config: BenchConfig) -> str:
    """A ``wherefrom bench`` command line equivalent to ``config`` (its options of methods it does not run, e.g. a
    preset's, left out: ``bench`` refuses them as unused; likewise ``damping_factor`` beside an absolute ``damping``,
    which the command line refuses together)."""
    used = {method: options for method, options in config.method_options.items() if method in {"*", *config.methods}}
    return render_command(
        "bench",
        [
            ("--task", config.task),
            ("--methods", ",".join(config.methods)),
            ("--seeds", ",".join(map(str, config.seeds))),
            *field_flags(config, ("n_train", "n_test", "model", "device")),
            *config.finetuning_flags(),
            *field_flags(config, ("damping",) if config.damping is not None else ("damping_factor",)),  # one is used
            *later_flags(config, ("fisher",)),
            ("--option", format_option_pairs(used)),
            ("--out", config.out),
        ],
    )


def rows_key(config: BenchConfig, task: BenchTask) -> dict[str, Any]:
    """``{"rows": fingerprint}`` of a file task's rows (``path:`` tasks: the files can be edited in place under the
    same name, and cached results of the old rows were reused), ``{}`` for a generated task (its rows follow from
    its name, sizes and seed, all in the keys already; so rows cached before keep matching)."""
    if not config.task.startswith("path:"):
        return {}
    return {"rows": data_fingerprint([*task.train, *task.test])}


def model_key(model: str | None) -> dict[str, str]:
    """``{"model_weights": digest}`` of a ``--model`` folder's weight and config files
    (:func:`wherefrom.methods.tracin.weights_fingerprint`): a folder saved again under the same name with other
    weights kept the path in the key, and bench reused the rows of the old weights. ``{}`` for the default model
    (``None``), which its package fixes, and a path that is no folder (loading it names the fault)."""
    return {"model_weights": weights_fingerprint(model)} if model is not None and Path(model).is_dir() else {}


def row_key(
    config: BenchConfig, seed: int, method: str, task: BenchTask, directory: Path | None = None
) -> dict[str, Any]:
    """Every setting a (seed, method) row depends on; a cached row is reused only when it matches. A method that
    runs no model (``bm25``) depends on no fine-tuning setting, and each method on only the attribution settings it
    reads (:meth:`wherefrom.methods.registry.MethodSpec.read`: a changed ``damping`` keeps the rows of ``gradsim``
    and ``repsim``); a file task's rows are in it (:func:`rows_key`), and a model folder's weights in that of a method
    that runs it (:func:`model_key`; a relative folder named from ``directory``, where the bench ran, :func:`named_from`)."""
    spec = method_spec(method)
    runs_model = bool(spec.model_settings)
    # only when set: rows cached before these settings existed keep matching
    later = {k: getattr(config, k) for k in ("damping", "damping_factor", *LATER)}
    later = {k: v for k, v in later.items() if v != getattr(BenchConfig, k)}
    return {
        "format": _FORMAT_VERSION,
        "task": config.task,
        "n_train": config.n_train,
        "n_test": config.n_test,
        "seed": seed,
        "method": method,
        "options": options_off_default(method, config.options_for(method)),
        **({k: getattr(config, k) for k in _FINETUNING} if runs_model else {}),
        **(model_key(named_from(config.model, directory)) if runs_model else {}),
        **{k: v for k, v in later.items() if k in spec.settings_read or (runs_model and k in _LATER_RUNS_MODEL)},
        **rows_key(config, task),
    }


def _row_path(out: Path, seed: int, method: str) -> Path:
    return out / f"seed-{seed}" / f"{method}.json"


def _metrics(task: BenchTask, scores) -> dict[str, Any]:
    if task.kind == "class":
        return class_attribution(scores, {r.id: r.label for r in task.train}, {r.id: r.label for r in task.test})
    return identification(scores, task.targets, k=task.recall_k)


def check_method_options(
    method: str, attribution: AttributionConfig, options: Mapping[str, Any]
) -> tuple[AttributionConfig, dict[str, Any]]:
    """Validate ``method``'s ``options`` and setting options over ``attribution`` (an influence method's damping and
    strategy options too: :func:`wherefrom.methods.registry.method_settings`) before a study does any work: a bad
    one failed each of the method's rows (seeds, grid points) after the fine-tuning, which still ended with exit 0.
    A checkpoint method's (tracin's) ``checkpoints`` are not required: the study's fine-tuning gives them
    (:func:`scored_method`'s callers). Returns ``(config, constructor options)`` as the method will run
    (:func:`method_settings`); raises :class:`wherefrom.core.options.OptionError` (a ``ValueError``) naming the
    method, the option and what it takes."""
    return method_settings(method, attribution, options, ("checkpoints",) if in_family(method, "checkpoint") else ())


def failed_methods(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``"METHOD: failed on k of n seeds (first error)"`` for each method of a bench's ``aggregate`` (:func:`aggregate`)
    with a failed seed, in method order: what a command reports, beside its table, before it exits 1."""
    return [
        f"{method}: failed on {len(entry['errors'])} of {entry['n_seeds']} seeds ({next(iter(entry['errors'].values()))})"
        for method, entry in summary.items()
        if entry.get("errors")
    ]


def scored_method(
    method: str,
    model,
    tokenizer,
    attribution: AttributionConfig,
    options: dict[str, Any],
    train: Sequence,
    test: Sequence,
    device: str | None,
    progress: Progress = no_progress,
) -> tuple[Any, dict[str, Any]]:
    """Fit ``method`` (:func:`wherefrom.methods.registry.make_method`) on ``train`` and score ``test``, timed and
    memory-measured (:func:`wherefrom.studies.toolkit.measured`); its passes over rows report to ``progress`` (a
    bench of SmolLM2 showed no bar for minutes per method). Returns ``(scores, usage)`` with ``usage``
    ``{seconds, peak_mib, error, warnings}``; a failure is recorded in ``error`` (``scores`` is then ``None``),
    not raised, so one failing method never stops the others; ``warnings``: wherefrom's warnings said meanwhile
    (:func:`wherefrom.studies.toolkit.recorded_warnings`: an iHVP that did not converge, say). The method is released
    afterwards."""
    usage: dict[str, Any] = {"seconds": None, "peak_mib": None, "error": None}
    chosen = scores = None
    with recorded_warnings() as said:
        try:
            with measured(pick_device(device)) as measurement:
                chosen = make_method(method, model, tokenizer, attribution, progress, **options)
                chosen.fit(train)
                scores = chosen.scores(test, train)
            usage["seconds"], usage["peak_mib"] = measurement["seconds"], measurement["peak_mib"]
        except Exception as error:
            usage["error"] = f"{type(error).__name__}: {error}"
            scores = None
        finally:
            chosen = None  # release it before the next method
            free_memory()
    return scores, {**usage, "warnings": said}


def finetuned(
    config: BenchConfig,
    seed: int,
    task: BenchTask,
    overwrite: bool = False,
    directory: Path | None = None,
    allow: str = OVERWRITE_ALLOW,
) -> tuple[LoadedModel, FinetuneResult]:
    """The base model (tokenizer included) and the seed's fine-tuned model: :func:`wherefrom.models.finetune.finetune`
    on ``task.train`` with :meth:`BenchConfig.finetune_config` in ``<config.out>/seed-<seed>/finetune``
    (reused when that folder holds the same run, trained otherwise; one of other settings is replaced with
    ``overwrite``, else refused: :class:`wherefrom.core.store.OutputExists`). ``directory``: where the bench ran, which
    a relative ``model`` / ``finetune_dir`` is named from (:func:`named_from`; the folder's name keeps the settings
    as recorded, so an analysis run elsewhere finds the bench's fine-tuning); ``allow``: how a refusal says to permit
    the replacement.

    The returned ``LoadedModel.model`` is the base model with the adapter injected (LoRA modifies it
    in place); ``FinetuneResult.model`` is the fine-tuned model.
    """
    loaded = load_model(named_from(config.model, directory), device=config.device)
    settings = config.finetune_config(seed)
    folder = Path(config.out) / f"seed-{seed}" / "finetune"
    if config.finetune_dir is not None:
        folder = Path(named_from(config.finetune_dir, directory)) / key_digest(
            [config.task, config.n_train, config.model, settings.to_dict()], 16
        )
    tuned = finetune(
        loaded.model, loaded.tokenizer, task.train, settings, folder, progress=False, overwrite=overwrite, allow=allow
    )
    return loaded, tuned


def method_row(
    config: BenchConfig,
    task: BenchTask,
    seed: int,
    method: str,
    tuned,
    tokenizer,
    directory: Path | None = None,
    progress: Progress = no_progress,
    unscored: str | None = None,
) -> dict[str, Any]:
    """One bench row: ``method`` fitted and scored on ``task`` with the fine-tuned ``tuned.model`` (:func:`scored_method`;
    ``tracin`` gets ``tuned.checkpoints`` and a loader of the base model), then its metrics. ``tuned`` and
    ``tokenizer`` are ``None`` for a method that needs no model (the ``lexical`` family: BM25). ``directory``: where
    the bench ran (:func:`finetuned`); ``progress``: the method's passes; ``unscored``: why the model cannot be
    scored (:meth:`wherefrom.models.finetune.FinetuneResult.divergence`), the row's error then, with nothing run.

    Returns ``{seed, method, metrics, top1, seconds, peak_mib, error, warnings}`` (``top1``: each query's highest-scored
    training row id, when scored): ``metrics`` from
    :func:`wherefrom.studies.metrics.class_attribution` (``task.kind == "class"``) or
    :func:`wherefrom.studies.metrics.identification`; a failure is recorded in ``error``, not raised.
    """
    options = config.options_for(method)
    if in_family(method, "checkpoint"):
        options.setdefault("checkpoints", [str(p) for p in tuned.checkpoints])
        options.setdefault("base", lambda: load_model(named_from(config.model, directory), device=config.device).model)
    if unscored:
        scores, usage = None, {"seconds": None, "peak_mib": None, "error": f"not scored: {unscored}", "warnings": []}
    else:
        scores, usage = scored_method(
            method,
            tuned and tuned.model,
            tokenizer,
            config.attribution_config(seed),
            options,
            task.train,
            task.test,
            config.device,
            progress,
        )
    row: dict[str, Any] = {"seed": seed, "method": method, "metrics": None, **usage}
    if scores is not None:
        try:
            row["metrics"] = _metrics(task, scores)
            row["top1"] = [scores.top(q, k=1)[0][0] for q in range(len(scores.query_ids))]
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
    return row


def aggregate(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: ``metrics`` ``{name: {mean, low, high}}`` over the seeds that succeeded (95% t
    interval, clipped to [0, 1] for the metrics in that range; ``low``/``high`` are ``None`` with one seed), mean ``seconds`` / ``peak_mib``,
    ``n_ok``, the ``errors`` of failed seeds and the ``warnings`` of the seeds that had some (by seed; ``None``: a
    row cached by an earlier version, which recorded none)."""
    result: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if not r["error"]]
        entry: dict[str, Any] = {
            "n_ok": len(ok),
            "n_seeds": len(mine),
            "errors": {str(r["seed"]): r["error"] for r in mine if r["error"]},
            # by seed: those said, and None for a row cached by an earlier version (it kept none)
            "warnings": {str(r["seed"]): r.get("warnings") for r in mine if r.get("warnings") != []},
            "metrics": {},
            "seconds": None,
            "peak_mib": None,
        }
        if ok:
            names = [k for k, v in ok[0]["metrics"].items() if k not in _NOT_AGGREGATED and isinstance(v, (int, float))]
            for name in names:
                stat = mean_stat(
                    [r["metrics"].get(name) for r in ok], within=(0.0, 1.0) if name in _UNIT_INTERVAL else None
                )
                if stat:
                    entry["metrics"][name] = stat
            for what in ("seconds", "peak_mib"):
                values = [r[what] for r in ok if r[what] is not None]
                entry[what] = sum(values) / len(values) if values else None
        result[method] = entry
    return result


def table_metrics(kind: str) -> list[str]:
    """The metrics a bench of task ``kind`` reports, in order (``cover_ceiling``, the cover an ideal ranking reaches,
    is kept in the rows, not reported as a method's metric)."""
    return ["acc", "cover", "mrr"] if kind == "class" else ["auprc", "auroc", "mrr", "recall_at_k", "acc"]


def markdown(summary: dict[str, Any], kind: str, command: str, title: str) -> str:
    """The aggregate as a Markdown table: method x metrics ("mean [low, high]" over seeds), time, memory."""
    names = table_metrics(kind)
    rows = []
    for method, entry in summary.items():
        if not entry["n_ok"]:  # userP: the seeds column was empty
            failed = failure_cell(next(iter(entry["errors"].values()), None))
            rows.append([method, failed, *[""] * (len(names) + 1), f"0/{entry['n_seeds']}"])
            continue
        rows.append(
            [
                method,
                *(interval_cell(entry["metrics"].get(n)) for n in names),
                number(entry["seconds"], ".2f"),
                number(entry["peak_mib"], ".0f"),
                f"{entry['n_ok']}/{entry['n_seeds']}",
            ]
        )
    table = markdown_table(["method", *names, "time, s", "peak memory, MiB", "seeds ok"], rows)
    head = f"# wherefrom bench: {title}\n\nCommand: `{command}`\n\n"
    notes = failure_notes(by_seed(summary, "errors")) + warning_notes(by_seed(summary, "warnings"))
    return head + table + "\n" + notes


def by_seed(summary: dict[str, Any], key: str, run: str = "") -> list[tuple[str, Any]]:
    """An :func:`aggregate`'s ``errors`` or ``warnings`` (``key``; of the ``run`` an ablation names, if any) as
    ``(label, value)`` pairs labelled ``[run: ]method, seed s``, as :func:`wherefrom.studies.toolkit.failure_notes`
    and :func:`~wherefrom.studies.toolkit.warning_notes` list them."""
    return [
        (f"{run + ': ' if run else ''}{method}, seed {seed}", value)
        for method, entry in summary.items()
        for seed, value in entry.get(key, {}).items()  # no warnings key in a bench.json written before they were kept
    ]


def planned_rows(config: BenchConfig) -> tuple[dict[int, BenchTask], dict[int, dict[str, Any]]]:
    """``(tasks, keys)``: each seed's task and the key of each of its methods' rows (:func:`row_key`), as
    :func:`run_bench` caches them."""
    tasks = {seed: build_task(config, seed) for seed in config.seeds}
    return tasks, {seed: {m: row_key(config, seed, m, task) for m in config.methods} for seed, task in tasks.items()}


def row_units(config: BenchConfig, keys: dict[int, dict[str, Any]]) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, key)`` of every row of ``config.out`` that ``keys`` (:func:`planned_rows`) plans: what
    :func:`wherefrom.studies.toolkit.refuse_replacing` checks (``ablate`` checks every run's at once)."""
    out = Path(config.out)
    return [(_row_path(out, seed, m), key) for seed in keys for m, key in keys[seed].items()]


def refuse_replaced_rows(config: BenchConfig, keys: dict[int, dict[str, Any]]) -> None:
    """:class:`wherefrom.core.store.OutputExists` when a finished row of ``config.out`` holds another key than
    ``keys`` (:func:`planned_rows`) gives it (:func:`wherefrom.studies.toolkit.refuse_replacing`)."""
    refuse_replacing(row_units(config, keys))


def run_bench(
    config: BenchConfig,
    progress: Progress = no_progress,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the benchmark of ``config`` (resuming from ``config.out``); returns what ``bench.json`` holds.

    ``progress`` wraps the loop over methods of each seed and each method's passes (tqdm-like, as elsewhere in
    wherefrom);
    ``log`` receives one line per step; ``command`` is recorded (default: :func:`command_line`). A row or a
    fine-tuned model made with other settings is recomputed and replaced with ``overwrite=True``; ``overwrite=False``
    (the default, as ``wherefrom bench`` without ``--overwrite``; it was ``True``) refuses that instead (:class:`wherefrom.core.store.OutputExists` naming the settings
    that differ), the rows of every seed checked before any work.
    """
    config.validate()
    say = log or (lambda _line: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    kind = title = headline = None
    sizes: dict[str, int] = {}
    tasks, keys = planned_rows(config)
    if not overwrite:
        refuse_replaced_rows(config, keys)
    for seed, task in tasks.items():
        kind, title, headline = task.kind, task.description or task.name, task.headline_metric
        sizes = {"n_train": len(task.train), "n_test": len(task.test)}
        for line in short_of_sizes(task, config.n_train, config.n_test) if seed == config.seeds[0] else []:
            say(line)
        done = {m: cached(_row_path(out, seed, m), keys[seed][m]) for m in config.methods}
        tuned = loaded = None
        if any(done[m] is None and not in_family(m, "lexical") for m in config.methods):
            loaded, tuned = finetuned(config, seed, task, overwrite)
            say(f"seed {seed}: {'reused' if tuned.reused else 'trained'} the fine-tuned model")
        # not scored: every gradient of NaN weights was computed, to fail on "non-finite score(s)"
        diverged = tuned and tuned.divergence()
        for method in progress(config.methods, f"seed {seed}"):
            if done[method] is not None:
                say(f"seed {seed} {method}: reused")
                rows.append(done[method])
                continue
            unscored = None if in_family(method, "lexical") else diverged
            row = method_row(
                config, task, seed, method, tuned, loaded and loaded.tokenizer, progress=progress, unscored=unscored
            )
            row = store(_row_path(out, seed, method), keys[seed][method], row)
            say(f"seed {seed} {method}: " + (f"failed: {row['error']}" if row["error"] else f"{row['seconds']:.1f} s"))
            rows.append(row)
        tuned = loaded = None
        free_memory()

    summary = aggregate(rows, config.methods)
    command = command or command_line(config)
    report = {
        "format": _FORMAT_VERSION,
        **provenance(command),
        "config": asdict(config),
        "kind": kind,
        "headline": headline,
        "sizes": sizes,
        "rows": [dict(r.items()) for r in rows],
        "aggregate": summary,
    }
    shown = f"{config.task} ({title}; {sizes['n_train']} training rows, {sizes['n_test']} queries)"
    write_report(out / "bench", report, markdown(summary, kind or "class", command, shown))
    return report
