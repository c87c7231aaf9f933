"""What the three analyses share: a bench folder, its fine-tuned models, caches and reports.

A bench folder is what ``wherefrom bench`` wrote (:mod:`wherefrom.studies.bench`): ``bench.json`` (config,
rows, aggregate) and ``seed-<s>/finetune`` (the LoRA fine-tune with ``checkpoints/epoch-k``). An
analysis reads the config from ``bench.json``, rebuilds each seed's task with
:func:`wherefrom.studies.bench.build_task` and gets each seed's fine-tuned model through
:func:`wherefrom.studies.bench.finetuned` with the bench's settings (which reuses the saved run; it would
train again only if the folder were missing; one made from other inputs is refused). Its cache files live under
``seed-<s>/<analysis>/`` and carry a ``key`` of every setting they depend on
(:func:`wherefrom.studies.toolkit.cached`); its report is ``<analysis>.json`` + ``<analysis>.md`` in
the bench folder (:func:`write_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wherefrom.core.store import read_json_object
from wherefrom.methods.tracin import checkpoint_model
from wherefrom.models.finetune import FinetuneResult
from wherefrom.models.loading import LoadedModel, load_model
from wherefrom.studies import toolkit
from wherefrom.studies.bench import BenchConfig, build_task, finetuned, model_key, named_from, rows_key, task_from
from wherefrom.studies.benchtasks import BenchTask
from wherefrom.studies.outputs import recorded_directory

__all__ = [
    "Bench",
    "first_queries",
    "load_checkpoint",
    "method_options",
    "open_bench",
    "write_report",
]

BENCH_FILE = "bench.json"
CLASS_METRICS = ("acc", "cover")
IDENTIFY_METRICS = ("auprc",)


@dataclass
class Bench:
    """A bench folder: ``config`` (with ``out`` = ``folder``; its paths as recorded, which cache keys hold), the
    parsed ``bench.json`` as ``report``, and ``directory``, where the bench ran: its relative paths (a ``path:``
    task's files, ``model``, ``finetune_dir``) are named from there (:func:`bench_directory`), wherever the
    analysis runs."""

    folder: Path
    config: BenchConfig
    report: dict[str, Any]
    directory: Path

    @property
    def kind(self) -> str:
        """``"class"`` or ``"identify"``: which metrics the task is scored by."""
        return self.report.get("kind") or "class"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The bench metrics an analysis pairs with: Acc and Cover (class tasks) or AUPRC (identification)."""
        return CLASS_METRICS if self.kind == "class" else IDENTIFY_METRICS

    def metric(self, seed: int, method: str, name: str) -> float | None:
        """The bench's value of metric ``name`` for (``seed``, ``method``); ``None`` if absent or failed."""
        for row in self.report.get("rows", []):
            if row.get("seed") == seed and row.get("method") == method and not row.get("error"):
                value = (row.get("metrics") or {}).get(name)
                return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        return None

    def seed_key(self, seed: int, task: BenchTask) -> dict[str, Any]:
        """Every bench setting a seed's ``task`` and fine-tuned model depend on, a file task's rows
        (:func:`wherefrom.studies.bench.rows_key`) and the base model's weights
        (:func:`wherefrom.studies.bench.model_key`, as a bench row's key holds them: a model folder saved again under
        the same name served the ``ihvp`` and ``weights`` rows of the old weights); cache keys start from it."""
        skip = {"out", "methods", "seeds", "method_options", "device"}
        return {
            **{k: v for k, v in asdict(self.config).items() if k not in skip},
            "seed": seed,
            **rows_key(self.config, task),
            **model_key(named_from(self.config.model, self.directory)),
        }

    def validate(self, config: BenchConfig | None = None) -> None:
        """:meth:`wherefrom.studies.bench.BenchConfig.validate` of ``config`` (default: the bench's; an analysis's
        own methods and options), a ``path:`` task's files checked where the bench ran (:attr:`directory`)."""
        config = config or self.config
        replace(config, task=task_from(config.task, self.directory)).validate()

    def task(self, seed: int) -> BenchTask:
        """The seed's task (:func:`wherefrom.studies.bench.build_task`, files named from :attr:`directory`)."""
        return build_task(self.config, seed, self.directory)

    def finetuned(
        self, seed: int, task: BenchTask, log: Callable[[str], None] = lambda _line: None
    ) -> tuple[LoadedModel, FinetuneResult]:
        """The base model and the seed's fine-tuned model (:func:`wherefrom.studies.bench.finetuned`): the bench's
        own, reused; one made from other inputs (another base model where the bench's relative ``model`` now
        names another folder) is refused, :class:`wherefrom.core.store.OutputExists`, not trained again in its
        place, and one whose weights are not finite (:meth:`wherefrom.models.finetune.FinetuneResult.divergence`) is refused, ``ValueError``. One that is missing (deleted, or never finished) is trained, and ``log`` says so (userJ: it was
        trained again without a word, while the bench's metrics an analysis pairs with came from the deleted one)."""
        allow = f"--overwrite to `wherefrom bench` for {self.folder} (an analysis never replaces a fine-tuning)"
        loaded, tuned = finetuned(self.config, seed, task, overwrite=False, directory=self.directory, allow=allow)
        tuned.check_finite(f"seed {seed}")  # the bench's rows of this seed failed on it
        if not tuned.reused:
            log(
                f"seed {seed}: the bench's fine-tuning was not in {tuned.output_dir}: fine-tuned again (the bench's "
                "metrics are the earlier fine-tuning's)"
            )
        return loaded, tuned

    def base_model(self) -> nn.Module:
        """The bench's base model (its ``model`` folder named from :attr:`directory`), on its device."""
        return load_model(named_from(self.config.model, self.directory), device=self.config.device).model

    def unit_path(self, seed: int, analysis: str, name: str, suffix: str = ".json") -> Path:
        """``folder/seed-<s>/<analysis>/<name><suffix>``: one cached unit of work."""
        return self.folder / f"seed-{seed}" / analysis / f"{name}{suffix}"


def open_bench(folder: str | Path | Bench, device: str | None = None, seeds: Sequence[int] | None = None) -> Bench:
    """Read ``folder/bench.json``; ``device`` (``cpu``, ``cuda``) replaces the bench's own setting and
    ``seeds`` (a subset of the bench's) restricts an analysis to those seeds. A :class:`Bench` is
    returned as it is when neither is given (else its folder is read again).

    Raises ``FileNotFoundError`` naming the file when it is missing and ``ValueError`` when it holds
    no bench config or ``seeds`` names a seed the bench did not run.
    """
    if isinstance(folder, Bench):
        if device is None and seeds is None:
            return folder
        folder = folder.folder
    folder = Path(folder)
    path = folder / BENCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {BENCH_FILE} in {folder}: pass the folder `wherefrom bench --out` wrote")
    report = read_json_object(path)  # a damaged file is named (it was "Expecting value: line 2 column 1")
    saved = report.get("config")
    if not isinstance(saved, dict) or "task" not in saved:
        raise ValueError(f"{path} has no bench 'config' (was it written by `wherefrom bench`?)")
    known = {f.name for f in fields(BenchConfig)}
    config = BenchConfig(**{k: v for k, v in saved.items() if k in known})
    config = replace(config, out=str(folder), device=device if device is not None else config.device)
    if seeds is not None:
        unknown = [s for s in seeds if s not in config.seeds]
        if unknown or not seeds:
            raise ValueError(f"seeds {list(seeds)}: the bench in {folder} ran seeds {config.seeds}")
        config = replace(config, seeds=list(seeds))
    bench = Bench(folder, config, report, bench_directory(folder))
    bench.validate()
    return bench


def bench_directory(folder: Path) -> Path:
    """Where the bench in ``folder`` ran, which its relative paths are named from: the directory recorded by
    ``wherefrom bench`` in ``folder/config.json``, for a run of ``wherefrom ablate`` (``ABLATE/runs/<name>``) that
    recorded by ``ablate`` in ``ABLATE/config.json``, else (a bench of the Python API) the current directory.
    An analysis run elsewhere read a ``path:`` task's files from the current directory ("file not found")."""
    recorded = recorded_directory(folder, "bench")
    if recorded is None and folder.resolve().parent.name == "runs":
        recorded = recorded_directory(folder.resolve().parent.parent, "ablate")
    return recorded or Path.cwd()


def first_queries(test: Sequence[Any], n_queries: int | None, say: Callable[[str], None]) -> int | None:
    """``n_queries`` (``--n-queries``: the first test rows only) as an analysis keys its cache on it: ``None`` (all)
    when it is ``None`` or reaches the task's ``len(test)`` rows, which is said (userJ: ``--n-queries 100`` of a
    6-query bench was keyed apart from all 6 and recomputed everything to the same numbers)."""
    if n_queries is None or n_queries < len(test):
        return n_queries
    say(f"--n-queries {n_queries}: the task has {len(test)} test rows; all are used")
    return None


def load_checkpoint(bench: Bench, folder: Path) -> nn.Module:
    """The model of a checkpoint (or final weights) folder: the base model plus its LoRA adapter, or a
    full model folder; eval mode, on the bench's device (:func:`wherefrom.methods.tracin.checkpoint_model`)."""
    return checkpoint_model(bench.base_model, Path(folder), bench.config.device, torch.float32)


def method_options(bench: Bench, extra: dict[str, dict], method: str) -> dict[str, Any]:
    """The bench's options of ``method`` updated with ``extra`` (``{method or "*": {key: value}}``)."""
    return {**bench.config.options_for(method), **extra.get("*", {}), **extra.get(method, {})}


def write_report(bench: Bench, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<name>.json`` (the analysis name, the bench folder and config, provenance of ``payload["command"]``,
    then ``payload``) and ``<name>.md`` in the bench folder, atomically (:func:`wherefrom.studies.toolkit.write_report`)."""
    report = {
        "analysis": name,
        "bench": str(bench.folder),
        "bench_config": asdict(bench.config),
        **toolkit.provenance(payload["command"]),
        **payload,
    }
    return toolkit.write_report(bench.folder / name, report, markdown)
