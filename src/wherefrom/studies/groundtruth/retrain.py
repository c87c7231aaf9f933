"""Retraining harness: train on subsets of the training set with fixed seeds, measure the queries,
cache every run so an interrupted job resumes.

A :class:`Retrainer` knows how to train a model on ``train[indices]`` with a seed and returns the
query measurements ``f(z_q) = log p(completion | prompt)`` (nats, summed over completion tokens),
shape ``(n_query,)`` float64. :func:`run_jobs` runs a list of ``(job_id, indices, seed)`` jobs through
one, in this process or in ``workers`` spawned processes, and writes each finished job to
``cache_dir/<job_id>.json`` atomically together with the retrainer's :meth:`Retrainer.key`, the
indices and the seed; a later call reuses every job whose file carries the same three.

Implementations:

* :class:`FinetuneRetrainer`: a fresh copy of a base model (a model folder, or ``None`` for the
  default model), fine-tuned with :func:`wherefrom.models.finetune.finetune` (LoRA, or all weights with
  ``lora_rank=None``; no checkpoints, a scratch folder deleted after measuring);
* :class:`FunctionRetrainer`: any picklable function ``fn(indices, seed) -> (n_query,)`` (e.g. a
  convex model trained to convergence, where exact influence is known).
"""

from __future__ import annotations

import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from wherefrom.core.data import Record, check_records, data_fingerprint
from wherefrom.core.distributed import available_cores
from wherefrom.core.encoding import encode_records, iterate_batches, pad_id
from wherefrom.core.task import LanguageModelingTask
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.models.finetune import FinetuneConfig, finetune
from wherefrom.models.loading import eval_mode, load_model, recorded_tokenizer_fingerprint
from wherefrom.studies.toolkit import cached, refuse_replacing, store

__all__ = [
    "SCRATCH_PREFIX",
    "FinetuneRetrainer",
    "FunctionRetrainer",
    "Job",
    "OversubscribedWorkers",
    "Retrainer",
    "measure_queries",
    "run_jobs",
]

Job = tuple[str, Sequence[int], int]
"""``(job_id, indices into the training set, seed)``; ``job_id`` names the cache file."""

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FORMAT_VERSION = 1
SCRATCH_PREFIX = "wherefrom-retrain-"
"""The name prefix of a :class:`FinetuneRetrainer` job's scratch folder (what a killed job leaves is found by it)."""


@runtime_checkable
class Retrainer(Protocol):
    """Trains on a subset of the training set and measures the queries. Must be picklable (hold
    paths and settings, not models) so :func:`run_jobs` can send it to worker processes."""

    def key(self) -> dict[str, Any]:
        """Everything the measurements depend on (model, data, training settings, query ids), JSON-ready."""
        ...

    def train_and_measure(self, indices: Sequence[int], seed: int) -> np.ndarray:
        """``(n_query,)`` float64 ``f(z_q)`` of the model trained on ``train[indices]`` with ``seed``."""
        ...


@dataclass
class FunctionRetrainer:
    """A :class:`Retrainer` from a function ``fn(indices: (k,) int64 array, seed) -> (n_query,)``.

    ``fn`` must be picklable for ``workers > 1`` (a module-level function or a
    ``functools.partial`` of one); ``identity`` is a JSON-ready description of what ``fn`` computes
    (data, settings) and becomes the cache key.
    """

    fn: Callable[[np.ndarray, int], np.ndarray]
    identity: dict[str, Any]

    def key(self) -> dict[str, Any]:
        return {"kind": "function", **self.identity}

    def train_and_measure(self, indices: Sequence[int], seed: int) -> np.ndarray:
        return np.asarray(self.fn(np.asarray(indices, dtype=np.int64), seed), dtype=np.float64).ravel()


def measure_queries(
    model: nn.Module,
    tokenizer: Any,
    queries: Sequence[Record],
    batch_size: int = 8,
    **layout: Any,
) -> np.ndarray:
    """``(n_query,)`` float64 ``f(z_q) = log p(completion | prompt)`` (nats, summed over completion
    tokens; :meth:`wherefrom.core.task.LanguageModelingTask.measurement`) under ``torch.no_grad`` in eval mode.

    ``layout``: the keywords of :func:`wherefrom.core.encoding.encode_records` the rows are encoded with
    (``max_length``, ``template``, ``append_eos``, ``pad_left``, ``loss_tokens``, ...;
    :meth:`wherefrom.models.finetune.FinetuneConfig.layout`): the fine-tuning's, so the measured function is the one
    the model was trained on and the attribution differentiates (``loss_tokens="all"``: summed over every labelled
    token)."""
    queries = check_records(queries, "query rows")
    examples = encode_records(queries, tokenizer, model=model, **layout)
    device = next(model.parameters()).device
    task = LanguageModelingTask()
    values: list[torch.Tensor] = []
    with torch.no_grad(), eval_mode(model):
        for _, batch in iterate_batches(examples, batch_size, pad_id(tokenizer), device=device):
            values.append(task.measurement(model, batch).double().cpu())
    return torch.cat(values).numpy() if values else np.zeros(0)


MEASURED = {"completion": "completion", "all": "all labelled"}
"""The tokens :func:`measure_queries` sums over, by ``loss_tokens`` (in a retraining job's key)."""


@dataclass
class FinetuneRetrainer:
    """Re-fine-tunes a fresh copy of the base model ``model`` (folder; ``None``: the default model)
    on ``train[indices]`` with :func:`wherefrom.models.finetune.finetune` (``config`` with the job's seed,
    no per-epoch checkpoints) in a scratch folder under ``scratch`` (default: the system temp
    folder) that is deleted afterwards, then measures ``queries`` (:func:`measure_queries`).

    The seed sets the LoRA initialisation and the batch order (see :func:`wherefrom.models.finetune.finetune`).
    The base-model fingerprint in :meth:`key` is computed once (one model load) and kept.
    """

    train: list[Record]
    queries: list[Record]
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    model: str | None = None
    device: str | None = None
    scratch: str | None = None
    measure_batch_size: int = 8
    recorded_tokenizer: str | None = None
    """The tokenizer fingerprint the ground truth's records hold (its full-data fine-tuning's): a version-1 one of
    this tokenizer keys the jobs in that form, so jobs cached before version 2 of the fingerprint are reused
    (:func:`wherefrom.models.loading.recorded_tokenizer_fingerprint`)."""
    _fingerprints: dict[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.config.validate()
        self.train, self.queries = list(self.train), list(self.queries)
        if not self.train or not self.queries:
            raise ValueError("FinetuneRetrainer needs at least one training row and one query")

    def key(self) -> dict[str, Any]:
        if self._fingerprints is None:
            loaded = load_model(self.model, device="cpu")
            tokenizer = recorded_tokenizer_fingerprint(
                self.recorded_tokenizer, loaded.tokenizer, loaded.tokenizer_fingerprint, "the ground truth's records"
            )
            self._fingerprints = {"base_model": loaded.fingerprint, "tokenizer": tokenizer}
        settings = self.config.to_dict()
        for per_job in ("seed", "checkpoint_every_epoch"):
            settings.pop(per_job)
        return {
            "kind": "finetune",
            "format": _FORMAT_VERSION,
            "model": self.model,
            **self._fingerprints,
            "train": data_fingerprint(self.train),
            "n_train": len(self.train),
            "queries": data_fingerprint(self.queries),
            "query_ids": [q.id for q in self.queries],
            "finetune": settings,
            "measurement": f"log p(completion | prompt), summed over {MEASURED[self.config.loss_tokens]} tokens",
        }

    def train_and_measure(self, indices: Sequence[int], seed: int) -> np.ndarray:
        from transformers.utils import logging as hf_logging

        rows = [self.train[int(i)] for i in indices]
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per job is noise
        try:
            loaded = load_model(self.model, device=self.device)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        config = replace(self.config, seed=int(seed), checkpoint_every_epoch=False)
        if self.scratch is not None:
            Path(self.scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=self.scratch) as folder:
            tuned = finetune(loaded.model, loaded.tokenizer, rows, config, folder, progress=False, resumable=False)
            # its measurements would be NaN, and LDS would leave them out unsaid
            tuned.check_finite(f"retraining on {len(rows)} rows (seed {seed})")
            return measure_queries(
                tuned.model, loaded.tokenizer, self.queries, self.measure_batch_size, **config.layout()
            )


class OversubscribedWorkers(UserWarning):
    """More ``workers`` than CPU cores: :func:`run_jobs` runs one process per core instead (``groundtruth --workers
    12`` on 2 cores took 82 s where 2 processes took 9 s: twelve models in memory sharing two cores)."""


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_one(retrainer: Retrainer, indices: list[int], seed: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    values = retrainer.train_and_measure(indices, seed)
    return np.asarray(values, dtype=np.float64).ravel(), time.perf_counter() - started


def _check_jobs(jobs: Sequence[Job], n_train: int | None) -> list[tuple[str, list[int], int]]:
    checked, seen = [], set()
    for job in jobs:
        if len(job) != 3:
            raise ValueError(f"a job is (job_id, indices, seed), got {job!r}")
        job_id, indices, seed = job
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise ValueError(f"job id {job_id!r}: use letters, digits, '.', '_' and '-' (it names a file)")
        if job_id in seen:
            raise ValueError(f"job id {job_id!r} repeats")
        seen.add(job_id)
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError(f"job {job_id!r} has no training rows")
        if min(indices) < 0 or (n_train is not None and max(indices) >= n_train):
            raise ValueError(f"job {job_id!r}: indices must lie in [0, {n_train}), got {min(indices)}..{max(indices)}")
        checked.append((job_id, indices, int(seed)))
    return checked


def run_jobs(
    retrainer: Retrainer,
    jobs: Sequence[Job],
    cache_dir: str | Path,
    workers: int = 1,
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
    replace: bool = True,
) -> dict[str, np.ndarray]:
    """Run every job (``(job_id, indices, seed)``) through ``retrainer``; returns ``{job_id: (n_query,)}``.

    Each finished job is written atomically to ``cache_dir/<job_id>.json`` (``key``: the retrainer's
    key, indices and seed; ``values``; ``seconds``) as soon as it ends, so an interruption loses only
    the jobs in flight; a rerun skips every job whose file has the same key. ``workers > 1`` runs the
    remaining jobs in that many spawned processes (at most one per core: :class:`OversubscribedWorkers` warns of
    more), each with ``torch.set_num_threads(max(1, cores // workers))``; the first failing job stops the run (finished jobs stay cached) and its error is
    raised. ``progress`` wraps the iteration over finished jobs; ``log`` gets one line per job. ``replace=False``: a
    finished job of another key (other settings, rows or seed under the same id) is not recomputed but refused
    (:class:`wherefrom.core.store.OutputExists`, :func:`wherefrom.studies.toolkit.refuse_replacing`) before any job
    runs; jobs of new ids are run beside the earlier ones.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not isinstance(retrainer, Retrainer):
        raise TypeError(
            f"retrainer must have key() and train_and_measure(indices, seed); got {type(retrainer).__name__}"
        )
    n_train = len(retrainer.train) if isinstance(retrainer, FinetuneRetrainer) else None
    checked = _check_jobs(jobs, n_train)
    say = log or (lambda _line: None)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    base_key = retrainer.key() if checked else {}
    results: dict[str, np.ndarray] = {}
    todo = []
    for job_id, indices, seed in checked:
        key = {"retrainer": base_key, "indices": indices, "seed": seed}
        saved = cached(cache_dir / f"{job_id}.json", key)
        if saved is not None:
            results[job_id] = np.asarray(saved["values"], dtype=np.float64)
        else:
            todo.append((job_id, indices, seed, key))
    if not replace:
        refuse_replacing((cache_dir / f"{job_id}.json", key) for job_id, _, _, key in todo)
    if len(results):
        say(f"{len(results)} of {len(checked)} jobs reused from {cache_dir}")

    def finish(job_id: str, key: dict[str, Any], values: np.ndarray, seconds: float) -> None:
        store(cache_dir / f"{job_id}.json", key, {"job_id": job_id, "values": values.tolist(), "seconds": seconds})
        results[job_id] = values
        say(f"job {job_id}: {seconds:.1f} s")

    cores = available_cores()
    if workers > cores and len(todo) > 1:
        warnings.warn(
            f"workers={workers} (--workers) but this process may use {cores} CPU cores: running {cores} "
            "retraining processes (more would share the cores, each holding its own model)",
            OversubscribedWorkers,
            stacklevel=2,
        )
        workers = cores
    if workers == 1 or len(todo) <= 1:
        for job_id, indices, seed, key in progress(todo, "retraining"):
            values, seconds = _run_one(retrainer, indices, seed)
            finish(job_id, key, values, seconds)
    elif todo:
        threads = max(1, cores // workers)
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads,),
        ) as pool:
            futures = {
                pool.submit(_run_one, retrainer, indices, seed): (job_id, key) for job_id, indices, seed, key in todo
            }
            try:
                for future in progress(as_completed(futures), "retraining"):
                    job_id, key = futures[future]
                    values, seconds = future.result()
                    finish(job_id, key, values, seconds)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    lengths = {v.shape for v in results.values()}
    if len(lengths) > 1:
        raise ValueError(
            f"jobs returned measurements of different shapes {sorted(lengths)}: mixed caches in {cache_dir}?"
        )
    return {job_id: results[job_id] for job_id, _, _ in checked}
