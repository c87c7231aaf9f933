"""``wherefrom groundtruth``: build a ground-truth folder once (LDS subsets, leave-one-out, PBRF).

One dataclass, :class:`GroundTruthConfig`, is the command line, the Python call and the saved
config. :func:`build_groundtruth` builds the task (:func:`wherefrom.studies.bench.make_task`, seed
``config.seed``), fine-tunes the full-data model once (per-epoch checkpoints kept for TracIn, in
``out/model/``), retrains on every LDS subset and every leave-one-out set through
:func:`wherefrom.studies.groundtruth.retrain.run_jobs` (cached per job in ``out/jobs/``), and runs PBRF on
the full-data model when ``pbrf_rows > 0``. Seeds: repeat ``r`` of every subset, of the full set and
of every leave-one-out set trains with seed ``config.seed + r`` (the same seeds everywhere: common
random numbers, so seed noise partly cancels in the differences LDS and LOO look at).

Folder layout (every file written atomically; a rerun reuses the fine-tuned model, every finished
job and every finished PBRF row)::

    groundtruth.json     config, command, versions, hardware, train/query ids, timings, noise floors
    lds.safetensors      masks (S, n) uint8, outputs (S, R, Q) float64
    loo.safetensors      rows (L,) int64, full (R, Q) float64, without (L, R, Q) float64
    pbrf.safetensors     rows (P,) int64, influence (Q, P) float64   (only with pbrf_rows > 0)
    model/               the full-data fine-tune (wherefrom.models.finetune layout, checkpoints/epoch-k)
    jobs/                one JSON per retraining job;  pbrf-rows/: one JSON per PBRF row
    scratch/             the jobs' model folders while they run (removed, with what killed jobs left, when all end)

LOO rows and PBRF rows are the first ``loo_rows`` / ``pbrf_rows`` entries of one seeded permutation
of the training rows (so the smaller set is inside the larger), each sorted.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from wherefrom.core.commandline import command_line as render_command
from wherefrom.core.commandline import field_flags
from wherefrom.core.data import data_fingerprint
from wherefrom.core.option_pairs import format_option_pairs
from wherefrom.core.store import atomic_save_tensors, atomic_write_json, read_json_object, refuse_overwrite
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.tracin import finetune_checkpoints
from wherefrom.models.finetune import CONFIG_FILE as FINETUNE_RECORD
from wherefrom.models.finetune import finetune
from wherefrom.models.loading import ADAPTER_DIR, MODEL_DIR, load_model
from wherefrom.studies.bench import check_task_name, make_task, named_from, short_of_sizes, task_from
from wherefrom.studies.benchtasks import BenchTask
from wherefrom.studies.finetuning import StudyFinetuning
from wherefrom.studies.groundtruth.lds import loo_effect, loo_noise, sample_subsets
from wherefrom.studies.groundtruth.pbrf import pbrf_config, pbrf_influence
from wherefrom.studies.groundtruth.retrain import SCRATCH_PREFIX, FinetuneRetrainer, measure_queries, run_jobs
from wherefrom.studies.metrics import FEWEST_CORRELATED
from wherefrom.studies.outputs import recorded_directory
from wherefrom.studies.toolkit import free_memory, provenance

__all__ = ["GroundTruth", "GroundTruthConfig", "base_of", "build_groundtruth", "command_line"]

_FORMAT_VERSION = 1
META_FILE = "groundtruth.json"
META_KEYS = ("config", "train_ids", "query_ids", "train_fingerprint", "query_fingerprint")
"""What loading a ground truth reads of its ``groundtruth.json`` (:meth:`GroundTruth.load`)."""


@dataclass(kw_only=True)
class GroundTruthConfig(StudyFinetuning):
    """Settings of one ground-truth folder.

    ``task``: a :data:`wherefrom.studies.benchtasks.TASKS` name or ``"path:<train>:<test>"``; ``n_train`` /
    ``n_test``: sizes (``None``: the task's default); the test rows are the queries. ``model``: base
    model folder (``None``: the default model). The fine-tuning settings and input layout: those of
    :class:`wherefrom.studies.finetuning.StudyFinetuning`, as in ``bench`` (``lora_rank=None``: full fine-tuning,
    e.g. of a tiny model from a saved random init); the attribution of ``evaluate``, ``tune`` and PBRF takes
    the layout too (:meth:`attribution`). Budget: ``n_subsets`` LDS subsets of fraction ``alpha`` (0 skips LDS), each
    trained ``subset_seeds`` times; ``loo_rows`` rows left out (0 skips LOO), each and the full set
    trained ``loo_seeds`` times; ``pbrf_rows`` rows for PBRF (0 skips it) with ``pbrf_options``
    (fields of :class:`wherefrom.studies.groundtruth.pbrf.PBRFConfig`). ``workers``: parallel retraining
    processes. ``seed``: task, subsets, rows and the first training seed.
    """

    task: str
    out: str
    n_train: int | None = None
    n_test: int | None = None
    model: str | None = None
    alpha: float = 0.5
    n_subsets: int = 32
    subset_seeds: int = 1
    loo_rows: int = 16
    loo_seeds: int = 2
    pbrf_rows: int = 0
    pbrf_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    seed: int = 0
    device: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible setting."""
        check_task_name(self.task)
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.n_subsets < 0 or 0 < self.n_subsets < FEWEST_CORRELATED:
            raise ValueError(
                f"n_subsets (--subsets) must be 0 (no LDS) or >= {FEWEST_CORRELATED} (the LDS is a correlation across "
                f"subsets, undefined over fewer), got {self.n_subsets}"
            )
        for name in ("subset_seeds", "loo_seeds", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("loo_rows", "pbrf_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_subsets == 0 and self.loo_rows == 0 and self.pbrf_rows == 0:
            raise ValueError(
                "nothing to build: n_subsets (--subsets), loo_rows (--loo-rows) and pbrf_rows (--pbrf-rows) are all 0"
            )
        self.finetune_config(self.seed).validate()
        try:  # before any fine-tuning, also where no PBRF row is asked for (they are recorded)
            pbrf_config(self.pbrf_options)
        except ValueError as error:
            raise ValueError(f"pbrf_options (--pbrf-option): {error}") from None
        if self.pbrf_options and self.pbrf_rows == 0:  # userJ: taken, recorded and read by nothing
            raise ValueError(
                f"pbrf_options (--pbrf-option) {self.pbrf_options}: PBRF's options, which a ground truth reads with "
                "pbrf_rows (--pbrf-rows) > 0 only"
            )

    def attribution(self) -> AttributionConfig:
        """The :class:`wherefrom.engine.api.AttributionConfig` that PBRF, ``evaluate`` and ``tune`` start from (the
        fine-tuning's batch size, length and input layout)."""
        return self.fine_tuned_attribution(self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroundTruthConfig:
        """Inverse of ``dataclasses.asdict``; unknown keys raise, missing ones take the defaults."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ground-truth settings {unknown}")
        return cls(**data)


def command_line(config: GroundTruthConfig) -> str:
    """A ``wherefrom groundtruth`` command line equivalent to ``config``."""
    return render_command(
        "groundtruth",
        [
            *field_flags(config, ("task", "n_train", "n_test", "model", "device")),
            *config.finetuning_flags(),
            *field_flags(config, ("alpha",)),
            ("--subsets", config.n_subsets),
            *field_flags(config, ("subset_seeds", "loo_rows", "loo_seeds", "pbrf_rows")),
            ("--pbrf-option", format_option_pairs({"*": config.pbrf_options})),
            *field_flags(config, ("workers", "seed", "out")),
        ],
    )


def _row_sample(n_train: int, seed: int) -> np.ndarray:
    """The seeded permutation LOO and PBRF rows are taken from."""
    return np.random.default_rng([seed, 1]).permutation(n_train)


def too_few_points(loo_rows: int, pbrf_rows: int) -> list[str]:
    """A line for LOO and for PBRF when its rows are fewer than :data:`wherefrom.studies.metrics.FEWEST_CORRELATED`
    (and not 0): each correlation of its evaluation is undefined. ``build_groundtruth`` says it, and ``evaluate.md``
    under its table (userM: `--loo-rows 2` gave blank LOO columns, and the report did not say why)."""
    return [
        f"{flag} {count}: {target} correlations need at least {FEWEST_CORRELATED} points (over 2 a correlation is +-1 "
        f"whatever the scores), so evaluate reports {target} as undefined"
        for target, count, flag in (("LOO", loo_rows, "--loo-rows"), ("PBRF", pbrf_rows, "--pbrf-rows"))
        if 0 < count < FEWEST_CORRELATED
    ]


def loo_rows_of(config: GroundTruthConfig, n_train: int) -> np.ndarray:
    """``(L,)`` sorted int64 indices of the rows left out."""
    return np.sort(_row_sample(n_train, config.seed)[: config.loo_rows]).astype(np.int64)


def pbrf_rows_of(config: GroundTruthConfig, n_train: int) -> np.ndarray:
    """``(P,)`` sorted int64 indices of the PBRF rows (the first ``pbrf_rows`` of the same permutation)."""
    return np.sort(_row_sample(n_train, config.seed)[: config.pbrf_rows]).astype(np.int64)


def _jobs(
    config: GroundTruthConfig, masks: np.ndarray | None, loo: np.ndarray, n_train: int
) -> list[tuple[str, list[int], int]]:
    jobs = []
    if masks is not None:
        for s, mask in enumerate(masks):
            rows = np.flatnonzero(mask).tolist()
            jobs += [(f"lds-{s:04d}-r{r}", rows, config.seed + r) for r in range(config.subset_seeds)]
    if loo.size:
        everything = list(range(n_train))
        jobs += [(f"loo-full-r{r}", everything, config.seed + r) for r in range(config.loo_seeds)]
        for row in loo.tolist():
            without = everything[:row] + everything[row + 1 :]
            jobs += [(f"loo-{row:06d}-r{r}", without, config.seed + r) for r in range(config.loo_seeds)]
    return jobs


def refuse_other_alpha(jobs_dir: Path, first: tuple[str, list[int], int], alpha: float, n_train: int) -> None:
    """:class:`wherefrom.core.store.OutputExists` naming ``--alpha`` when the finished first LDS job in ``jobs_dir``
    holds a subset of another size than ``first`` (``(job_id, rows, seed)``, drawn with ``alpha`` from ``n_train``
    rows). A job's key records its rows, not the fraction they were drawn with, so the generic refusal
    (:func:`wherefrom.studies.toolkit.refuse_replacing`) named only ``indices`` (userF)."""
    job_id, rows, _seed = first
    path = jobs_dir / f"{job_id}.json"
    try:
        recorded = read_json_object(path)["key"]["indices"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none finished, or unreadable: computed, as the jobs' own cache does
    if len(recorded) != len(rows):
        refuse_overwrite(
            [path],
            why=f" and the other LDS jobs, made with another --alpha: subsets of {len(recorded)} of {n_train} rows "
            f"(alpha {len(recorded) / n_train:.3g}), now --alpha {alpha} draws {len(rows)}",
        )


def _load_tuned(config: GroundTruthConfig, model_dir: Path) -> tuple[nn.Module, Any]:
    if config.lora_rank is not None:
        loaded = load_model(
            config.model, adapter=model_dir / ADAPTER_DIR, device=config.device, base_fingerprint=base_of(model_dir)
        )
    else:
        loaded = load_model(model_dir / MODEL_DIR, device=config.device)
    return loaded.model, loaded.tokenizer


def base_of(model_dir: Path) -> str:
    """The fingerprint of the base model the fine-tuning in ``model_dir`` started from (its record)."""
    return read_json_object(Path(model_dir) / FINETUNE_RECORD)["base_model_fingerprint"]


def _lds_noise(outputs: np.ndarray) -> dict[str, float]:
    """Seed noise vs the spread LDS ranks: ``seed_std`` (std over seeds, mean over subsets and
    queries; NaN with one seed) and ``subset_std`` (std over subsets of the seed mean, mean over queries)."""
    seeds = outputs.shape[1]
    seed_std = float(outputs.std(axis=1, ddof=1).mean()) if seeds > 1 else float("nan")
    subset_std = float(outputs.mean(axis=1).std(axis=0, ddof=1).mean())
    return {
        "seed_std": seed_std,
        "subset_std": subset_std,
        "seeds": seeds,
        "subset_to_seed_noise": subset_std / (seed_std / np.sqrt(seeds))
        if seeds > 1 and seed_std > 0
        else float("nan"),
    }


def build_groundtruth(
    config: GroundTruthConfig,
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> GroundTruth:
    """Build (or resume) the ground-truth folder ``config.out``; returns it loaded (:meth:`GroundTruth.load`).

    A rerun reuses every finished part made with the same settings (the full-data model, each retraining job, each
    PBRF row) and adds new ones (more subsets, LOO or PBRF rows). ``overwrite=False`` (the default, as ``wherefrom groundtruth``
    without ``--overwrite``) refuses, with :class:`wherefrom.core.store.OutputExists` naming the settings that
    differ, to replace a finished part made with other settings: the full-data model before it trains, the jobs before
    any job runs, the PBRF rows when PBRF starts (after the jobs: a rerun that changes both the budget and
    ``--pbrf-option`` trains its new jobs first); ``True`` recomputes and replaces it (it was the Python default, as
    :func:`wherefrom.models.finetune.finetune`'s was)."""
    config.validate()
    say = log or (lambda _line: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    task = make_task(config.task, config.n_train, config.n_test, config.seed)
    for line in short_of_sizes(task, config.n_train, config.n_test):
        say(line)
    train, queries = list(task.train), list(task.test)
    n = len(train)
    for name, flag in (("loo_rows", "--loo-rows"), ("pbrf_rows", "--pbrf-rows")):
        if getattr(config, name) > n:
            raise ValueError(
                f"{name} ({flag}) is {getattr(config, name)}, more than the {n} training rows of task {config.task!r}"
            )
    for line in too_few_points(
        config.loo_rows, config.pbrf_rows
    ):  # the effects are kept (another analysis may use them)
        say(line)
    if not queries:
        raise ValueError(f"task {config.task!r} has no test rows to use as queries")

    # the full-data model, kept with its per-epoch checkpoints
    tick = time.perf_counter()
    loaded = load_model(config.model, device=config.device)
    settings = config.finetune_config(config.seed)
    tuned = finetune(
        loaded.model, loaded.tokenizer, train, settings, out / "model", progress=False, overwrite=overwrite
    )
    tuned.check_finite("the full-data model")  # every retrained model's measurement would be compared with NaN
    recorded = read_json_object(out / "model" / FINETUNE_RECORD)["tokenizer_fingerprint"]  # the folder's form
    full_f = measure_queries(tuned.model, loaded.tokenizer, queries, config.batch_size, **settings.layout())
    timings["finetune_s"] = time.perf_counter() - tick
    say(f"full-data model: {'reused' if tuned.reused else 'trained'} ({timings['finetune_s']:.1f} s)")
    epoch_losses = tuned.epoch_losses
    tuned = loaded = None
    free_memory()

    masks = sample_subsets(n, config.alpha, config.n_subsets, config.seed) if config.n_subsets else None
    loo = loo_rows_of(config, n)
    jobs = _jobs(config, masks, loo, n)
    if masks is not None and not overwrite:
        refuse_other_alpha(out / "jobs", jobs[0], config.alpha, n)
    tick = time.perf_counter()
    retrainer = FinetuneRetrainer(
        train,
        queries,
        settings,
        config.model,
        config.device,
        scratch=str(out / "scratch"),
        recorded_tokenizer=recorded,
    )
    values = run_jobs(retrainer, jobs, out / "jobs", config.workers, progress, say, overwrite) if jobs else {}
    # every job is done: their folders go, with what jobs killed before they ended left there, not anything else
    for leftover in (out / "scratch").glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(leftover)
    with contextlib.suppress(OSError):  # only when empty
        (out / "scratch").rmdir()
    timings["retraining_s"] = time.perf_counter() - tick
    timings["job_seconds_sum"] = float(
        sum(json.loads((out / "jobs" / f"{job_id}.json").read_text()).get("seconds", 0.0) for job_id, _, _ in jobs)
    )

    noise: dict[str, Any] = {}
    reproducibility = None
    if masks is not None:
        outputs = np.stack(
            [
                np.stack([values[f"lds-{s:04d}-r{r}"] for r in range(config.subset_seeds)])
                for s in range(config.n_subsets)
            ]
        )
        atomic_save_tensors(
            {"masks": torch.from_numpy(masks.astype(np.uint8)), "outputs": torch.from_numpy(outputs)},
            out / "lds.safetensors",
        )
        noise["lds"] = _lds_noise(outputs)
    if loo.size:
        full = np.stack([values[f"loo-full-r{r}"] for r in range(config.loo_seeds)])
        without = np.stack([np.stack([values[f"loo-{row:06d}-r{r}"] for r in range(config.loo_seeds)]) for row in loo])
        atomic_save_tensors(
            {"rows": torch.from_numpy(loo), "full": torch.from_numpy(full), "without": torch.from_numpy(without)},
            out / "loo.safetensors",
        )
        noise["loo"] = loo_noise(full, loo_effect(full, without))
        # the kept model and the seed-0 retraining of the full set ran the same training
        reproducibility = float(np.abs(full[0] - full_f).max())

    pbrf_info: dict[str, Any] = {}
    if config.pbrf_rows:
        tick = time.perf_counter()
        rows = pbrf_rows_of(config, n)
        model, tokenizer = _load_tuned(config, out / "model")
        influence = pbrf_influence(
            model,
            tokenizer,
            train,
            queries,
            rows.tolist(),
            pbrf_config(config.pbrf_options),
            config.attribution(),
            progress=progress,
            info=pbrf_info,
            cache=out / "pbrf-rows",
            replace=overwrite,
        )
        atomic_save_tensors(
            {"rows": torch.from_numpy(rows), "influence": influence.double().cpu().contiguous()},
            out / "pbrf.safetensors",
        )
        timings["pbrf_s"] = time.perf_counter() - tick
        model = None
        free_memory()
    else:
        (out / "pbrf.safetensors").unlink(missing_ok=True)  # a smaller rebuild must not keep an old one

    timings["total_s"] = time.perf_counter() - started
    meta = {
        "format": _FORMAT_VERSION,
        "config": asdict(config),
        **provenance(command or command_line(config), train=train, query=queries),
        "task": {"name": task.name, "kind": task.kind, "description": task.description},
        "train_ids": [r.id for r in train],
        "query_ids": [q.id for q in queries],
        "epoch_losses": epoch_losses,
        "full_model_f": full_f.tolist(),
        "timings": timings,
        "noise": noise,
        "retrain_reproducibility_max_abs": reproducibility,
        "n_jobs": len(jobs),
        "pbrf": pbrf_info or None,
        "seeds": "repeat r of every training run uses seed config.seed + r",
    }
    atomic_write_json(meta, out / META_FILE)
    return GroundTruth.load(out)


def built_targets(folder: Path, meta: dict[str, Any], config: GroundTruthConfig) -> dict[str, dict | None]:
    """``{lds, loo, pbrf: tensors or None}``: each target file that the ground truth in ``folder`` records as built
    (its ``groundtruth.json``, ``meta``), read; ``ValueError`` naming one that is missing or unreadable (a
    truncated ``lds.safetensors`` ended ``evaluate`` in a safetensors traceback, a deleted one left its LDS out
    without a word), with the command that rebuilds it from the finished jobs."""
    noise = meta.get("noise") if isinstance(meta.get("noise"), dict) else {}
    built = {"lds": "lds" in noise, "loo": "loo" in noise, "pbrf": bool(config.pbrf_rows)}
    targets: dict[str, dict | None] = {}
    for name, expected in built.items():
        path = folder / f"{name}.safetensors"
        targets[name] = None
        if not expected:  # a file of an earlier, larger build (a rebuild with --subsets 0 leaves it): not this one's
            continue
        rebuild = (
            f"rerun `wherefrom replay {folder}` (or its groundtruth command, or `build_groundtruth` for one made in "
            "Python) to write it again from the finished jobs"
        )
        if not path.is_file():
            raise ValueError(f"{path} is missing, though {folder / META_FILE} records its {name} target; {rebuild}")
        try:
            targets[name] = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise ValueError(f"{path} cannot be read ({error}); {rebuild}") from None
    return targets


@dataclass
class GroundTruth:
    """A ground-truth folder, loaded. Arrays are numpy float64 / int64 / bool; ``None`` where a target
    was not built. ``loo_effect`` is ``(Q, L)`` (:func:`wherefrom.studies.groundtruth.lds.loo_effect`),
    ``pbrf_influence`` ``(Q, P)``, ``lds_masks`` ``(S, n)``, ``lds_outputs`` ``(S, R, Q)``."""

    folder: Path
    config: GroundTruthConfig
    model: str | None
    """The base model folder, ``config.model`` named from the directory the ground truth was built in (the
    directory its ``config.json`` records; else the current one); ``None``: the default model."""
    meta: dict[str, Any]
    task: BenchTask
    lds_masks: np.ndarray | None
    lds_outputs: np.ndarray | None
    loo_rows: np.ndarray | None
    loo_full: np.ndarray | None
    loo_without: np.ndarray | None
    pbrf_rows: np.ndarray | None
    pbrf_influence: np.ndarray | None

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> GroundTruth:
        """Read ``folder`` (built by :func:`build_groundtruth`) and rebuild its task; ``device``: where its model
        is loaded and methods run from now on (default: the device it was built on, as recorded). Raises
        ``FileNotFoundError`` without ``groundtruth.json``, ``ValueError`` when it is not JSON or lacks one of
        :data:`META_KEYS` (it was ``KeyError``), and when the rebuilt task's ids differ from the saved ones (e.g.
        the data files changed)."""
        folder = Path(folder)
        path = folder / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"not a ground-truth folder (no {META_FILE}): {folder}")
        meta = read_json_object(path)
        lacking = [key for key in META_KEYS if key not in meta]
        if lacking or not isinstance(meta["config"], dict):
            raise ValueError(
                f"{path} is damaged: {f'it lacks {lacking}' if lacking else 'its config is not a JSON object'} "
                f"(written last, by a finished `wherefrom groundtruth`); rebuild it with `wherefrom replay {folder}` "
                "(a ground truth built with the Python API: build_groundtruth again)"
            )
        config = GroundTruthConfig.from_dict(meta["config"])
        if device is not None:
            config = replace(config, device=device)
        # relative paths name files from where the ground truth was built (`evaluate` run elsewhere loaded another
        # folder of that name as its base model)
        built_in = recorded_directory(folder, "groundtruth") or Path.cwd()
        model = named_from(config.model, built_in)
        task = make_task(task_from(config.task, built_in), config.n_train, config.n_test, config.seed)
        for what, records in (("train", task.train), ("query", task.test)):
            if [r.id for r in records] != meta[f"{what}_ids"]:
                raise ValueError(f"{folder}: the rebuilt task's {what} ids differ from {META_FILE} (data changed?)")
        if (
            data_fingerprint(task.train) != meta["train_fingerprint"]
            or data_fingerprint(task.test) != meta["query_fingerprint"]
        ):
            raise ValueError(f"{folder}: the rebuilt task's rows differ from the ones the ground truth was built on")
        targets = built_targets(folder, meta, config)
        lds, loo, pbrf = targets["lds"], targets["loo"], targets["pbrf"]
        return cls(
            folder=folder,
            config=config,
            model=model,
            meta=meta,
            task=task,
            lds_masks=None if lds is None else lds["masks"].numpy().astype(bool),
            lds_outputs=None if lds is None else lds["outputs"].numpy(),
            loo_rows=None if loo is None else loo["rows"].numpy(),
            loo_full=None if loo is None else loo["full"].numpy(),
            loo_without=None if loo is None else loo["without"].numpy(),
            pbrf_rows=None if pbrf is None else pbrf["rows"].numpy(),
            pbrf_influence=None if pbrf is None else pbrf["influence"].numpy(),
        )

    @property
    def train_ids(self) -> list[str]:
        return list(self.meta["train_ids"])

    @property
    def query_ids(self) -> list[str]:
        return list(self.meta["query_ids"])

    @property
    def loo_effect(self) -> np.ndarray | None:
        """``(Q, L)``: how much each left-out row raised each query's ``f`` (seed means)."""
        if self.loo_full is None or self.loo_without is None:
            return None
        return loo_effect(self.loo_full, self.loo_without)

    @property
    def model_dir(self) -> Path:
        """The full-data fine-tuning folder (:func:`wherefrom.models.finetune.finetune` layout)."""
        return self.folder / "model"

    @property
    def checkpoints(self) -> list[Path]:
        """Per-epoch checkpoint folders of the full-data fine-tune, in epoch order."""
        return finetune_checkpoints(self.model_dir)

    def load_model(self, device: str | None = None) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)`` of the full-data fine-tuned model (eval mode; a ``PeftModel`` for LoRA)."""
        config = replace(self.config, model=self.model, device=device or self.config.device)
        return _load_tuned(config, self.model_dir)
