"""What the three analyses share: a bench folder, its fine-tuned models, caches and reports.

A bench folder is what ``wherefrom bench`` wrote (:mod:`wherefrom.studies.bench`): ``bench.json`` (config,
rows, aggregate) and ``seed-<s>/finetune`` (the LoRA fine-tune with ``checkpoints/epoch-k``). An
analysis reads the config from ``bench.json``, rebuilds each seed's task with
:func:`wherefrom.studies.bench.build_task` and gets each seed's fine-tuned model through
:func:`wherefrom.models.finetune.finetune` with the bench's settings (which reuses the saved run; it would
train again only if the folder were missing or stale). Its cache files live under
``seed-<s>/<analysis>/`` and carry a ``key`` of every setting they depend on
(:func:`wherefrom.core.store.read_keyed_json`); its report is ``<analysis>.json`` + ``<analysis>.md`` in
the bench folder.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import nn

from wherefrom.core.store import atomic_write_json, atomic_write_text, hardware, package_versions
from wherefrom.methods.tracin import _load_checkpoint
from wherefrom.models.finetune import FinetuneConfig, FinetuneResult, finetune
from wherefrom.models.loading import LoadedModel, load_model
from wherefrom.studies.bench import BenchConfig
from wherefrom.studies.benchtasks import BenchTask

__all__ = [
    "Bench",
    "finetuned",
    "free_memory",
    "load_checkpoint",
    "method_options",
    "number",
    "open_bench",
    "spearman",
    "write_report",
]

BENCH_FILE = "bench.json"
CLASS_METRICS = ("acc", "cover")
IDENTIFY_METRICS = ("auprc",)


@dataclass
class Bench:
    """A bench folder: ``config`` (with ``out`` = ``folder``), the parsed ``bench.json`` as ``report``."""

    folder: Path
    config: BenchConfig
    report: dict[str, Any]

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

    def seed_key(self, seed: int) -> dict[str, Any]:
        """Every bench setting a seed's task and fine-tuned model depend on (cache keys start from it)."""
        skip = {"out", "methods", "seeds", "method_options", "device"}
        return {**{k: v for k, v in asdict(self.config).items() if k not in skip}, "seed": seed}

    def unit_path(self, seed: int, analysis: str, name: str, suffix: str = ".json") -> Path:
        """``folder/seed-<s>/<analysis>/<name><suffix>``: one cached unit of work."""
        return self.folder / f"seed-{seed}" / analysis / f"{name}{suffix}"


def open_bench(folder: str | Path, device: str | None = None, seeds: Sequence[int] | None = None) -> Bench:
    """Read ``folder/bench.json``; ``device`` (``cpu``, ``cuda``) replaces the bench's own setting and
    ``seeds`` (a subset of the bench's) restricts an analysis to those seeds.

    Raises ``FileNotFoundError`` naming the file when it is missing and ``ValueError`` when it holds
    no bench config or ``seeds`` names a seed the bench did not run.
    """
    folder = Path(folder)
    path = folder / BENCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {BENCH_FILE} in {folder}: pass the folder `wherefrom bench --out` wrote")
    report = json.loads(path.read_text(encoding="utf-8"))
    saved = report.get("config") if isinstance(report, dict) else None
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
    config.validate()
    return Bench(folder, config, report)


def finetuned(bench: Bench, seed: int, task: BenchTask) -> tuple[LoadedModel, FinetuneResult]:
    """The base model (tokenizer included) and the seed's fine-tuned model, exactly as ``wherefrom bench``
    made it (same :class:`FinetuneConfig`, same folder ``seed-<s>/finetune``: reused when complete).

    The returned ``LoadedModel.model`` is the base model with the adapter injected (LoRA modifies it
    in place); ``FinetuneResult.model`` is the fine-tuned model.
    """
    c = bench.config
    loaded = load_model(c.model, device=c.device)
    config = FinetuneConfig(
        epochs=c.epochs,
        learning_rate=c.learning_rate,
        batch_size=c.batch_size,
        max_length=c.max_length,
        seed=seed,
        lora_rank=c.lora_rank,
    )
    tuned = finetune(
        loaded.model, loaded.tokenizer, task.train, config, bench.folder / f"seed-{seed}" / "finetune", progress=False
    )
    return loaded, tuned


def load_checkpoint(bench: Bench, folder: Path) -> nn.Module:
    """The model of a checkpoint (or final weights) folder: the base model plus its LoRA adapter, or a
    full model folder; eval mode, on the bench's device (:mod:`wherefrom.methods.tracin` loads them the same way)."""
    c = bench.config
    return _load_checkpoint(lambda: load_model(c.model, device=c.device).model, Path(folder), c.device, torch.float32)


def method_options(bench: Bench, extra: dict[str, dict], method: str) -> dict[str, Any]:
    """The bench's options of ``method`` updated with ``extra`` (``{method or "*": {key: value}}``)."""
    return {**bench.config.options_for(method), **extra.get("*", {}), **extra.get(method, {})}


def free_memory() -> None:
    """Collect garbage and empty the CUDA cache between models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman rank correlation of the pairs where both values are finite; ``None`` with fewer than
    3 pairs or a constant side (undefined)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    value = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
    return value if math.isfinite(value) else None


def number(value: float | None, fmt: str = ".3f") -> str:
    """``value`` formatted, ``–`` for ``None`` or a non-finite value."""
    return "–" if value is None or not math.isfinite(value) else format(value, fmt)


def write_report(bench: Bench, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<name>.json`` (``payload`` + bench config, versions, hardware) and ``<name>.md`` in the bench
    folder, atomically."""
    report = {
        "analysis": name,
        "bench": str(bench.folder),
        "bench_config": asdict(bench.config),
        "versions": package_versions(),
        "hardware": hardware(),
        **payload,
    }
    json_path, md_path = bench.folder / f"{name}.json", bench.folder / f"{name}.md"
    atomic_write_json(report, json_path)
    atomic_write_text(markdown, md_path)
    return json_path, md_path
