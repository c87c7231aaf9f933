"""A run directory: fitted curvature, gradient index and scores for one (model, data, settings).

Layout::

    RUN/config.json            every argument (RunConfig), enough to redo the run in one line
    RUN/manifest.json          versions, hardware, model/tokenizer/data fingerprints, module shapes
    RUN/factors/               curvature.json + curvature.safetensors
    RUN/index/shard-NNNNN.safetensors   raw training gradients {module: (n, out, in')} + ids
    RUN/index/index.json       written last: the index is complete
    RUN/scores/<name>.safetensors + <name>.json   pairwise scores with their ids

Every file is written atomically; ``fit`` and ``index`` resume from whatever finished. Opening a
run with another model, tokenizer, module selection or training set raises :class:`RunMismatch`
naming what differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from wherefrom.core.data import Record, data_fingerprint, load_records
from wherefrom.core.scoring import Scores, save_scores
from wherefrom.core.store import atomic_save_tensors, atomic_write_json, hardware, package_versions
from wherefrom.core.tracking import selection_signature
from wherefrom.curvature import Curvature, load_curvature
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.models.loading import LoadedModel, load_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RunMismatch(ValueError):
    """The run directory was made with another model, tokenizer, selection or data."""


@dataclass
class RunConfig:
    """Arguments of ``wherefrom fit``: model, data, and the attribution settings.

    ``model`` ``None`` = the default SmolLM2-135M-Instruct; ``device`` ``None`` = CUDA if available.
    """

    train: str
    model: str | None = None
    adapter: str | None = None
    device: str | None = None
    attribution: AttributionConfig = field(default_factory=AttributionConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(AttributionConfig)}
        attribution = AttributionConfig(**{k: v for k, v in data.get("attribution", {}).items() if k in known})
        return cls(
            train=data["train"],
            model=data.get("model"),
            adapter=data.get("adapter"),
            device=data.get("device"),
            attribution=attribution,
        )


def changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, new value)`` for every setting that differs, nested dicts walked
    (e.g. ``("attribution.max_length", 128, 2048)``)."""
    differ = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differ += changed_settings(before, after, f"{prefix}{key}.")
        elif before != after:
            differ.append((f"{prefix}{key}", before, after))
    return differ


class Run:
    """An open run directory with its model loaded and checked against the manifest."""

    def __init__(
        self,
        folder: Path,
        config: RunConfig,
        loaded: LoadedModel,
        train: list[Record],
        progress: Progress = no_progress,
    ):
        self.folder = Path(folder)
        self.config = config
        self.loaded = loaded
        self.train = train
        self.attributor = Attributor(loaded.model, loaded.tokenizer, config.attribution, progress=progress)

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, config: RunConfig, progress: Progress = no_progress) -> Run:
        """Open ``folder`` for ``config``: check it against a finished result there (fitted factors, an
        index or scores; :class:`RunMismatch` names each setting that differs), else write config/manifest."""
        folder = Path(folder)
        loaded = load_model(config.model, config.adapter, device=config.device)
        run = cls(folder, config, loaded, load_records(config.train), progress)
        manifest = run.manifest()
        if run.finished():
            run._check(json.loads((folder / "manifest.json").read_text()), manifest)
            # Round-trip through RunConfig: settings added in later versions take their defaults.
            saved = RunConfig.from_dict(json.loads((folder / "config.json").read_text())).to_dict()
            differ = changed_settings(saved, config.to_dict())
            if differ:
                raise RunMismatch(
                    f"{folder} holds a run with other settings; use a new --run folder or the same arguments. "
                    "Differing: "
                    + "; ".join(f"{key}: saved {before!r}, now {after!r}" for key, before, after in differ)
                )
        else:  # nothing finished here yet (e.g. a fit that failed): the new settings replace the old
            atomic_write_json(config.to_dict(), folder / "config.json")
            atomic_write_json(manifest, folder / "manifest.json")
        return run

    def finished(self) -> bool:
        """Whether the folder holds a finished result (fitted factors, an index or scores): only then are
        its settings fixed."""
        return any((self.folder / part).exists() for part in ("factors/curvature.json", "index", "scores"))

    @classmethod
    def open(cls, folder: Path, progress: Progress = no_progress, device: str | None = None) -> Run:
        """Open an existing run: reload model and data from its config and verify the fingerprints."""
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"{folder} is not a wherefrom run directory (no config.json); run `wherefrom fit` first"
            )
        config = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
        if device is not None:
            config.device = device
        loaded = load_model(config.model, config.adapter, device=config.device)
        run = cls(folder, config, loaded, load_records(config.train), progress)
        run._check(json.loads((folder / "manifest.json").read_text()), run.manifest())
        if (folder / "factors" / "curvature.json").exists():
            run.attributor.use_curvature(load_curvature(folder / "factors"), run.train)
        return run

    def manifest(self) -> dict[str, Any]:
        return {
            "versions": package_versions(),
            "hardware": hardware(),
            "model": {
                "name": self.loaded.name,
                "path": self.loaded.path,
                "adapter": self.loaded.adapter,
                "fingerprint": self.loaded.fingerprint,
            },
            "tokenizer_fingerprint": self.loaded.tokenizer_fingerprint,
            "data": {"path": self.config.train, "rows": len(self.train), "fingerprint": data_fingerprint(self.train)},
            "modules": selection_signature(self.attributor.modules),
            "dtype": str(next(self.loaded.model.parameters()).dtype),
        }

    @staticmethod
    def _check(saved: dict[str, Any], now: dict[str, Any]) -> None:
        checks = [
            (saved["model"]["fingerprint"], now["model"]["fingerprint"], "model weights (or adapter)"),
            (saved["tokenizer_fingerprint"], now["tokenizer_fingerprint"], "tokenizer"),
            (saved["modules"], now["modules"], "module selection"),
            (saved["data"]["fingerprint"], now["data"]["fingerprint"], f"training data ({now['data']['path']})"),
        ]
        for before, after, what in checks:
            if before != after:
                raise RunMismatch(f"the {what} differ from those this run was made with; refit in a new run folder")

    # --- fit -----------------------------------------------------------------------------------
    def fit(self) -> bool:
        """Fit the curvature unless finished factors exist; returns True when it fitted."""
        target = self.folder / "factors"
        if (target / "curvature.json").exists():
            self.attributor.use_curvature(load_curvature(target), self.train)
            return False
        started = time.perf_counter()
        curvature = self.attributor.fit(self.train)
        curvature.info["fit_seconds"] = round(time.perf_counter() - started, 3)
        curvature.save(target)
        return True

    # --- index ---------------------------------------------------------------------------------
    def build_index(self, shard_size: int = 256, dtype: str = "float32") -> int:
        """Write raw training gradients in shards of ``shard_size`` rows; resumes. Returns shards written now."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        folder = self.folder / "index"
        if (folder / "index.json").exists():
            return 0
        written = 0
        n_shards = (len(self.train) + shard_size - 1) // shard_size
        for shard in range(n_shards):
            path = folder / f"shard-{shard:05d}.safetensors"
            if path.exists():
                continue
            rows = self.train[shard * shard_size : (shard + 1) * shard_size]
            ids, parts = [], []
            for batch_ids, grads in self.attributor.gradients(rows, description=f"index shard {shard + 1}/{n_shards}"):
                ids += batch_ids
                parts.append({n: g.to(DTYPES[dtype]).cpu() for n, g in grads.items()})
            tensors = {n: torch.cat([p[n] for p in parts]).contiguous() for n in self.attributor.module_names}
            atomic_save_tensors(tensors, path, meta={"ids": json.dumps(ids)})
            written += 1
        atomic_write_json(
            {"shards": n_shards, "rows": len(self.train), "dtype": dtype, "shard_size": shard_size},
            folder / "index.json",
        )
        return written

    def has_index(self) -> bool:
        return (self.folder / "index" / "index.json").exists()

    def indexed_gradients(self) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """``(ids, {module: (n, out, in')})`` per shard of a complete index, as float32."""
        info = json.loads((self.folder / "index" / "index.json").read_text())
        for shard in range(info["shards"]):
            with safe_open(str(self.folder / "index" / f"shard-{shard:05d}.safetensors"), "pt") as fh:
                ids = json.loads(fh.metadata()["ids"])
                yield ids, {n: fh.get_tensor(n).float() for n in self.attributor.module_names}

    # --- scores --------------------------------------------------------------------------------
    def scores(self, queries: list[Record], curvature: Curvature | None = None) -> Scores:
        """Pairwise scores of ``queries`` against the training set (from the index when complete).

        ``curvature`` overrides the run's fitted one (e.g. identity on the same index).
        """
        curvature = curvature or self.attributor.curvature
        if curvature.needs_fit and not curvature.state:
            raise RuntimeError(f"no fitted curvature in {self.folder / 'factors'}; run `wherefrom fit` first")
        query_ids, pre = self.attributor.preconditioned_queries(queries, curvature)
        train = (
            self.indexed_gradients()
            if self.has_index()
            else self.attributor.gradients(self.train, description="train gradients")
        )
        return self.attributor.scores_from_gradients(query_ids, pre, train)

    def save_scores(self, scores: Scores, name: str) -> Path:
        """Write ``scores/<name>.safetensors`` and ``scores/<name>.json`` (see :func:`wherefrom.core.scoring.save_scores`)."""
        return save_scores(scores, self.folder / "scores", name)
