"""TracIn (Pruthi et al., 2020), checkpoint form (TracInCP): learning rate x gradient dot products,
summed over the checkpoints a fine-tuning run leaves.

    TracIn(z_m, z_q) = sum_k lr_k * grad L(z_q; theta_k)^T grad L(z_m; theta_k)

``L`` is the training loss of :mod:`wherefrom.core.task` (summed over completion tokens by default);
the query side uses the attribution task's ``-f(z_q)`` (``= L(z_q)`` for the default task), as
every method does. Sign: positive = proponent. A gradient step ``theta_k - lr_k grad L(z_m)``
changes ``L(z_q)`` by ``-lr_k grad L(z_q)^T grad L(z_m)`` to first order, so a positive term means
training on ``z_m`` at checkpoint ``k`` lowered the query's loss (raised ``f(z_q)``).

Each checkpoint's learning rate is read from its ``trainer_state.json``
(:func:`wherefrom.models.finetune.read_trainer_state`, key ``learning_rate``), unless given explicitly.
Per-module parts are summed over checkpoints, so they still sum to the total. With
``AttributionConfig(normalize="cosine")`` each checkpoint's term is the gradient cosine instead of
the dot product, ``sum_k lr_k cos(grad L(z_q; theta_k), grad L(z_m; theta_k))`` (as in LESS,
Xia et al. 2024). The configured curvature strategy is ignored: TracIn is first order
(``identity``).

As index rows (``wherefrom index`` of a tracin run): ``TracIn(z_m, z_q) = <[sqrt(lr_k) grad L(z_q; theta_k)]_k,
[sqrt(lr_k) grad L(z_m; theta_k)]_k>``, so a row is the concatenation over checkpoints of ``sqrt(lr_k)``-scaled
gradients (:meth:`TracIn.checkpoint_rows`, laid out module by module by :func:`interleave_checkpoints`) and a
product search over the store gives TracIn's top rows (a learning rate must be >= 0).

Checkpoint folders (as :func:`wherefrom.models.finetune.finetune` writes them under
``output_dir/checkpoints/epoch-k``) hold either a LoRA adapter (``adapter_config.json``; loaded on a
fresh copy of the base model) or a full model (``config.json``). In-memory checkpoints are given as
``(model, learning_rate)`` pairs.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

from wherefrom.core.data import Record
from wherefrom.core.gradients import block_products, flatten_blocks
from wherefrom.core.scoring import Scores, unit_rows
from wherefrom.core.store import file_digest, read_json_object
from wherefrom.core.task import LanguageModelingTask
from wherefrom.core.tracking import selection_signature
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig, Attributor, checked_rows
from wherefrom.methods.projection import RandomProjection
from wherefrom.models.finetune import (
    CONFIG_FILE,
    TRAINER_STATE_FILE,
    finetune_record,
    read_trainer_state,
    warn_layout_mismatch,
)
from wherefrom.models.loading import (
    ModelLoadError,
    check_adapter,
    check_weights,
    load_model,
    pick_device,
    quiet_peft,
)
from wherefrom.models.optimizer_state import OPTIMIZER_STATE_FILE

__all__ = ["TracIn", "checkpoint_model", "finetune_checkpoints", "interleave_checkpoints", "tracin_scores"]

BaseModel = str | Path | Callable[[], nn.Module] | None
"""A base-model folder (for :func:`wherefrom.models.loading.load_model`), a callable returning a *fresh*
base model (LoRA adapters are injected into it), or ``None`` when no LoRA folder is given."""
Checkpoint = str | Path | tuple[nn.Module, float]


def finetune_checkpoints(output_dir: str | Path) -> list[Path]:
    """The per-epoch checkpoint folders of a :func:`wherefrom.models.finetune.finetune` run, in epoch order."""
    output_dir = Path(output_dir)
    config = output_dir / CONFIG_FILE
    if config.is_file():
        listed = read_json_object(config).get("checkpoints")
        if listed:
            return [output_dir / rel for rel in listed]
    found = [p for p in (output_dir / "checkpoints").glob("epoch-*") if p.is_dir() and p.name[6:].isdigit()]
    if not found:
        raise FileNotFoundError(
            f"no checkpoints in {output_dir / 'checkpoints'} (fine-tune with checkpoint_every_epoch=True)"
        )
    return sorted(found, key=lambda p: int(p.name[6:]))


def learning_rate(value: Any, where: str) -> float:
    """``value`` as a learning rate: a real number (a Python, numpy or one-element torch one) that is finite and >= 0
    (``ValueError`` naming ``where`` otherwise; ``True`` and ``"0.1"`` are not numbers here). A NaN was found only
    when the scores were computed ("non-finite scores"), and a negative rate flipped the signs of its checkpoint's
    terms where the index refused it (userH)."""
    rate = math.nan
    if not isinstance(value, bool | str | bytes):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several numbers
            rate = float(value)
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{where}: learning rate {value!r}; a learning rate is a finite number >= 0")
    return rate


def checked_checkpoints(checkpoints: Sequence[Any], learning_rates: Sequence[Any] | None) -> list[Checkpoint]:
    """``checkpoints`` checked before any model work: each a folder (a path) or an in-memory ``(model, lr)`` pair,
    no folder twice (its terms would count double), and ``learning_rates`` (when given) one finite rate >= 0 per
    checkpoint (:func:`learning_rate`). Folders are returned resolved. ``ValueError`` naming the checkpoint: a
    ``[folder, lr]`` list from the command line was taken for an in-memory pair and failed in ``Path(list)``."""
    if not checkpoints:
        raise ValueError("TracIn needs at least one checkpoint")
    if learning_rates is not None:
        if len(learning_rates) != len(checkpoints):
            raise ValueError(f"got {len(learning_rates)} learning rates for {len(checkpoints)} checkpoints")
        for k, value in enumerate(learning_rates):
            learning_rate(value, f"tracin learning_rates[{k}]")
    checked: list[Checkpoint] = []
    for k, checkpoint in enumerate(checkpoints):
        if isinstance(checkpoint, tuple) and len(checkpoint) == 2 and isinstance(checkpoint[0], nn.Module):
            rate = (
                checkpoint[1] if learning_rates is not None else learning_rate(checkpoint[1], f"tracin checkpoint {k}")
            )
            checked.append((checkpoint[0], rate))  # given learning_rates override a pair's (reviewS: None refused)
        elif isinstance(checkpoint, str | os.PathLike):
            checked.append(Path(checkpoint).resolve())
        else:
            raise ValueError(
                f"tracin checkpoint {k} is {checkpoint!r}: give a checkpoint folder (a path), or in Python an "
                "in-memory (model, learning rate) pair; a folder's learning rate comes from its trainer_state.json, "
                "or give them all as learning_rates=[...]"
            )
    folders = [c for c in checked if isinstance(c, Path)]
    repeated = sorted({str(c) for c in folders if folders.count(c) > 1})
    if repeated:
        raise ValueError(f"tracin checkpoint folder(s) {repeated} given more than once: each would count again")
    return checked


def _learning_rate(folder: Path) -> float:
    if not folder.is_dir():
        raise FileNotFoundError(f"tracin checkpoint {folder}: no such folder")
    if not (folder / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"no {TRAINER_STATE_FILE} in checkpoint {folder}: TracIn needs each checkpoint's learning rate "
            "(pass learning_rates=[...] explicitly, or name the epoch folders a fine-tuning saved, e.g. "
            "OUT/checkpoints/epoch-1)"
        )
    state = read_trainer_state(folder)
    if "learning_rate" not in state:
        raise KeyError(f"{folder / TRAINER_STATE_FILE} has no 'learning_rate'")
    return learning_rate(state["learning_rate"], str(folder / TRAINER_STATE_FILE))


WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json", "adapter_config.json")
"""The files of a checkpoint (or base model) folder that decide its model: weights and configs (not the optimizer
state beside them, :data:`wherefrom.models.optimizer_state.OPTIMIZER_STATE_FILE`)."""


def weights_fingerprint(folder: str | Path) -> str:
    """An XXH3-128 digest of the names and bytes of ``folder``'s :data:`WEIGHT_FILES` (in name order; about 0.1 s
    per 500 MB read from the page cache): what identifies a checkpoint's weights in a tracin index's settings,
    whose rows are gradients at those weights (a checkpoint rewritten in place kept its path and learning rate, and
    its index served rows of the old weights to queries of the new ones). Raises ``FileNotFoundError`` naming a
    folder that is gone."""
    digest = xxhash.xxh3_128()
    for path in weight_files(folder):
        digest.update(f"{path.name}\n{file_digest(path)[0]}\n".encode())
    return digest.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    """``folder``'s :data:`WEIGHT_FILES`, in name order; ``FileNotFoundError`` naming a folder that is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model or checkpoint folder")
    found = {p for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.name != OPTIMIZER_STATE_FILE}
    return sorted(found, key=lambda p: p.name)


def weights_stat(folder: str | Path) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of each of ``folder``'s :func:`weight_files`: while it is unchanged, the weights
    are taken as fingerprinted before (reviewS: a tracin run hashed every checkpoint's bytes on each opening)."""
    return [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in weight_files(folder)]


def checkpoint_model(base: BaseModel, folder: Path, device, dtype: torch.dtype) -> nn.Module:
    """The model of one checkpoint folder (a :func:`wherefrom.models.finetune.finetune` epoch checkpoint or its
    final weights), in eval mode on ``device`` (``None``: :func:`wherefrom.models.loading.pick_device`) in ``dtype``.

    A LoRA adapter folder (``adapter_config.json``) is applied to ``base`` (:data:`BaseModel`: a folder,
    or a callable returning a fresh base model); a full model folder (``config.json``) is loaded as it
    is. Raises ``ValueError`` for an adapter without ``base`` and
    :class:`wherefrom.models.loading.ModelLoadError` for a folder holding neither.
    """
    if (folder / "adapter_config.json").is_file():
        if base is None:
            raise ValueError(f"checkpoint {folder} is a LoRA adapter: give the base model (folder or loader)")
        if callable(base):
            from peft import PeftModel

            model = base()
            check_adapter(folder, model, None)
            with quiet_peft():
                model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
            model.to(device=pick_device(device), dtype=dtype)
        else:
            return load_model(base, adapter=folder, device=device, dtype=dtype).model
    elif (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        check_weights(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        model.to(pick_device(device))
    else:
        raise ModelLoadError(
            f"checkpoint {folder} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json)"
        )
    model.eval()
    return model


def _checkpoint(
    base: BaseModel, checkpoint: Checkpoint, lr: float | None, device, dtype: torch.dtype
) -> tuple[nn.Module, float]:
    """``(model, learning rate)`` of one checkpoint: a folder loaded now (its rate from ``trainer_state.json``
    unless ``lr`` is given), or an in-memory ``(model, lr)`` pair (``lr`` overriding its rate when given)."""
    if isinstance(checkpoint, tuple):
        return checkpoint[0], float(checkpoint[1] if lr is None else lr)
    model = checkpoint_model(base, Path(checkpoint), device, dtype)
    return model, float(_learning_rate(Path(checkpoint)) if lr is None else lr)


def interleave_checkpoints(parts: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """Rows ``(b, C * D)`` of a TracIn index from each checkpoint's block ``parts[c]`` ``(b, D)`` (its module
    blocks of ``sizes`` flattened in module order): module by module, that module's ``C`` checkpoint blocks
    in checkpoint order, so a module's part of a row is one contiguous ``(C, size)`` block."""
    stacked = torch.stack(list(parts), dim=1)  # (b, C, D)
    return torch.cat([block.flatten(1) for block in stacked.split(list(sizes), dim=2)], dim=1)


def tracin_scores(
    base: BaseModel,
    checkpoints: Sequence[Checkpoint],
    tokenizer,
    queries: Sequence[Record],
    train: Sequence[Record],
    config: AttributionConfig | None = None,
    *,
    learning_rates: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    task: LanguageModelingTask | None = None,
    progress: Progress = no_progress,
) -> Scores:
    """TracInCP scores ``(n_query, n_train)``: ``sum_k lr_k grad L(z_q; theta_k)^T grad L(z_m; theta_k)``.

    ``checkpoints``: checkpoint folders (LoRA adapters on ``base``, or full model folders), e.g.
    :func:`finetune_checkpoints` of a fine-tuning run, and/or in-memory ``(model, lr)`` pairs.
    ``learning_rates`` overrides the folders' ``trainer_state.json`` (one per checkpoint).
    Folders are loaded one at a time on ``device`` (``None``: GPU if available) in ``dtype``;
    in-memory models stay where they are. ``config`` sets batching, module selection, reduction and
    ``normalize``; its strategy is replaced by ``identity``. Every checkpoint must expose the same
    tracked modules. Per-module parts are ``sum_k lr_k`` times each checkpoint's per-module part.
    Raises :class:`~wherefrom.core.data.DataError` before loading any checkpoint for an empty
    ``queries`` or ``train``, an invalid row or a repeated id.
    """
    queries, train = checked_rows(queries, "query rows"), checked_rows(train, "training rows")
    checkpoints = checked_checkpoints(checkpoints, learning_rates)
    config = replace(config or AttributionConfig(), strategy="identity")
    total: torch.Tensor | None = None
    reference: Scores | None = None
    for k, checkpoint in enumerate(checkpoints):
        loaded = not isinstance(checkpoint, tuple)
        model, lr = _checkpoint(base, checkpoint, None if learning_rates is None else learning_rates[k], device, dtype)
        attributor = Attributor(model, tokenizer, config, task=task, progress=progress)
        scores = attributor.scores(queries, train)
        if reference is None:
            reference = scores
        elif scores.module_names != reference.module_names:
            raise ValueError(
                f"checkpoint {k} tracks other modules than checkpoint 0 "
                f"({len(scores.module_names)} vs {len(reference.module_names)}); TracIn needs one selection"
            )
        term = float(lr) * scores.per_module.double()
        total = term if total is None else total + term
        del attributor, scores
        if loaded:
            del model
            gc.collect()
    assert reference is not None and total is not None
    return Scores(
        reference.query_ids, reference.train_ids, reference.module_names, total.to(reference.per_module.dtype)
    )


class TracIn:
    """TracInCP as a method with the two-phase contract: ``fit(train)`` resolves the checkpoints and their
    learning rates (the fitted state), ``scores`` sums their gradient products.

    Arguments as in :func:`tracin_scores`; e.g.
    ``TracIn(base_dir, finetune_checkpoints(run_dir), tokenizer).scores(queries, train)``.
    """

    name = "tracin"

    def __init__(
        self,
        base: BaseModel,
        checkpoints: Sequence[Checkpoint],
        tokenizer,
        config: AttributionConfig | None = None,
        dim: int | None = None,
        **options: Any,
    ):
        """``dim``: project each module's gradient to ``dim`` numbers with TRAK's seeded Gaussian projection
        (:class:`wherefrom.methods.projection.RandomProjection`, seed ``config.seed``; the same matrix at every
        checkpoint and on both sides), so that scores are ``sum_k lr_k (P q_k) . (P g_k)`` and index rows short;
        ``None``: unprojected. ``options``: the keyword arguments of :func:`tracin_scores` (``learning_rates``,
        ``device``, ...). Raises ``ValueError`` as :func:`checked_checkpoints` (no checkpoints, one neither a folder
        nor a ``(model, lr)`` pair, a folder twice, a bad learning rate) and for ``dim < 1``."""
        checked = checked_checkpoints(checkpoints, options.get("learning_rates"))
        self.base, self.checkpoints, self.tokenizer, self.config = base, checked, tokenizer, config
        seed = (config or AttributionConfig()).seed
        self.projection = None if dim is None else RandomProjection(dim, seed=seed)
        self.options = dict(options)
        self.fitted = False
        self.signature: list[list] | None = None
        """:meth:`module_signature`, once known."""
        self.weights: list[str] | None = None
        """The checkpoint folders' :func:`weights_fingerprint`, once fitted (or restored from a state that has them)."""
        self.weights_stats: list[Any] | None = None
        """The checkpoint folders' :func:`weights_stat` when :attr:`weights` were taken."""

    def fit(self, train: Sequence[Record]) -> None:
        """Fix each checkpoint's learning rate (given, or read from its ``trainer_state.json``) and fingerprint each
        checkpoint folder's weights (:func:`weights_fingerprint`, recorded with the fitted state): nothing else to
        precompute. A checkpoint whose fine-tuning laid its rows out otherwise than the configuration is warned of
        (:func:`wherefrom.models.finetune.warn_layout_mismatch`; userH: only an ``--adapter`` was checked, so
        checkpoints tuned with ``--no-eos`` were attributed with the EOS appended, without a word)."""
        given = self.options.get("learning_rates")
        rates = []
        for k, checkpoint in enumerate(self.checkpoints):
            if given is not None:
                rates.append(float(given[k]))
            else:
                rates.append(float(checkpoint[1]) if isinstance(checkpoint, tuple) else _learning_rate(checkpoint))
        if isinstance(self.base, str | Path):
            self.base = str(Path(self.base).resolve())
        folders = [c for c in self.checkpoints if not isinstance(c, tuple)]
        for folder in {finetune_record(c): c for c in reversed(folders)}.values():  # once per fine-tuning (reviewS)
            warn_layout_mismatch(folder, (self.config or AttributionConfig()).layout())
        self.weights = [weights_fingerprint(c) for c in folders]
        self.weights_stats = [weights_stat(c) for c in folders]
        self.options["learning_rates"], self.fitted = rates, True

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The checkpoint folders (absolute paths), their learning rates and the base model folder (``None``
        when the base is a loader, e.g. the registry's copy of the given model: the loader of the method
        made again is kept).

        Raises ``RuntimeError`` before :meth:`fit` and ``ValueError`` for in-memory checkpoints (only
        folders can be found again)."""
        if not self.fitted:
            raise RuntimeError("tracin is not fitted: call fit(train) first")
        if any(isinstance(c, tuple) for c in self.checkpoints):
            raise ValueError("tracin: in-memory (model, lr) checkpoints cannot be saved; give checkpoint folders")
        state = {"checkpoints": [str(c) for c in self.checkpoints], "learning_rates": self.options["learning_rates"]}
        recorded = {"weights": self.weights, "weights_stats": self.weights_stats}
        return {}, {**state, **recorded, "base": None if callable(self.base) else self.base}

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], train: Sequence[Record]) -> None:
        """Adopt saved checkpoint folders and learning rates; :class:`~wherefrom.models.loading.ModelLoadError`
        naming a checkpoint folder that is gone, or whose weights differ from those fingerprinted at the fit
        (userH: a checkpoint fine-tuned again in place was scored with the old learning rates, without a word; a
        state saved before fingerprints were recorded is not checked)."""
        missing = [c for c in state["checkpoints"] if not Path(c).is_dir()]
        if missing:
            raise ModelLoadError(f"tracin checkpoint folder(s) {missing} are gone (moved or deleted); refit")
        recorded, stats = state.get("weights"), state.get("weights_stats") or [None] * len(state["checkpoints"])
        changed = [
            c
            for c, w, stat in zip(state["checkpoints"], recorded or [], stats)
            if weights_stat(c) != stat and weights_fingerprint(c) != w  # hashed only when a file's size or time moved
        ]
        if changed:
            raise ModelLoadError(
                f"tracin checkpoint folder(s) {changed} hold other weights than when the run was fitted (written "
                "again since?): its learning rates and scores were of the old ones; fit a new run (or delete this "
                "run's method folder and run its fit again)"
            )
        self.checkpoints = [Path(c) for c in state["checkpoints"]]
        self.options["learning_rates"], self.fitted = list(state["learning_rates"]), True
        self.signature, self.weights, self.weights_stats = None, recorded, stats
        if state["base"] is not None:
            self.base = state["base"]

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        """``(n_query, n_train)`` TracInCP scores with ids; positive = proponent. With ``dim``: from the
        projected rows of :meth:`checkpoint_rows` (both sides held in memory), per module
        (:func:`wherefrom.core.gradients.block_products`); with ``normalize="cosine"`` each checkpoint's projected
        gradients are unit length. Raises :class:`~wherefrom.core.data.DataError` for no or invalid rows."""
        if self.projection is None:
            return tracin_scores(
                self.base, self.checkpoints, self.tokenizer, queries, train, config=self.config, **self.options
            )
        queries, train = checked_rows(queries, "query rows"), checked_rows(train, "training rows")
        if not self.fitted:  # the learning rates: given, or read from the checkpoints
            self.fit(train)
        unit = self.config is not None and self.config.normalize == "cosine"
        query_ids, query_rows = self.query_vectors(queries, unit)
        train_ids, train_rows = self.rows(train, unit)
        blocks = self.row_blocks()
        per_module = block_products(query_rows, train_rows, blocks)
        return Scores(query_ids, train_ids, [name for name, _shape in blocks], per_module)

    # --- rows of a vector store ------------------------------------------------------------------
    def vector_settings(self) -> dict[str, Any]:
        """What fixes the index rows' meaning besides the model: the checkpoint folders, their learning rates and
        the :func:`weights_fingerprint` of each checkpoint (and of a base model folder), read now, so that a checkpoint
        rewritten in place is a changed setting (:meth:`fitted_state`'s errors; ``FileNotFoundError`` naming a
        folder that is gone)."""
        _tensors, state = self.fitted_state()
        projection = None if self.projection is None else self.projection.config()
        base = state["base"]
        return {
            "method": self.name,
            "checkpoints": state["checkpoints"],
            "learning_rates": state["learning_rates"],
            "projection": projection,
            "weights": [weights_fingerprint(c) for c in state["checkpoints"]],
            **({"base_weights": weights_fingerprint(base)} if base is not None else {}),
        }

    def row_blocks(self) -> list[tuple[str, tuple[int, ...]]]:
        """The layout of an index row (:func:`interleave_checkpoints`): per module, ``(C, out, in')``, or with
        ``dim`` ``(C, k)`` with ``k = min(dim, out * in')``."""
        count = len(self.checkpoints)
        if self.projection is None:
            return [(name, (count, out, inp)) for name, out, inp in self.module_signature()]
        return [(name, (count, self.projection.dim_for((out, inp)))) for name, out, inp in self.module_signature()]

    def module_signature(self) -> list[list]:
        """The tracked modules of the checkpoints, ``[[name, out, in'], ...]``
        (:func:`wherefrom.core.tracking.selection_signature` of checkpoint 0, loaded once for it; every
        checkpoint must track the same): the block layout of an index row."""
        if self.signature is None:
            self.signature = selection_signature(self.checkpoint_attributor(0).modules)
            gc.collect()
        return self.signature

    def checkpoint_attributor(self, k: int, like: list[list] | None = None) -> Attributor:
        """An :class:`~wherefrom.engine.api.Attributor` (identity curvature) on checkpoint ``k``'s model; a folder
        is loaded now (on the ``device`` option, in its ``dtype``).

        Raises ``RuntimeError`` before :meth:`fit` and ``ValueError`` naming the checkpoint when its tracked
        modules (names and shapes) are not ``like`` (a :meth:`module_signature`)."""
        if not self.fitted:
            raise RuntimeError("tracin is not fitted: call fit(train) first")
        device, dtype = self.options.get("device"), self.options.get("dtype", torch.float32)
        model, _lr = _checkpoint(self.base, self.checkpoints[k], self.options["learning_rates"][k], device, dtype)
        config = replace(self.config or AttributionConfig(), strategy="identity")
        progress = self.options.get("progress", no_progress)
        attributor = Attributor(model, self.tokenizer, config, task=self.options.get("task"), progress=progress)
        if like is not None and selection_signature(attributor.modules) != like:
            raise ValueError(
                f"tracin checkpoint {k} ({self.checkpoints[k]}) tracks other modules than checkpoint 0; "
                "TracIn needs one selection"
            )
        return attributor

    def checkpoint_rows(
        self,
        attributor: Attributor,
        k: int,
        records: Sequence[Record],
        divisors: dict[str, torch.Tensor] | None = None,
        unit: bool = False,
        query: bool = False,
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Checkpoint ``k``'s column block of TracIn index rows, ``(ids, (b, D))`` per batch: ``sqrt(lr_k) g_k``
        with ``g_k`` the training-loss gradient at checkpoint ``k`` (``query``: the query side ``-grad f``), its
        modules' ``(out, in')`` blocks flattened in module order (``attributor``: :meth:`checkpoint_attributor`
        of ``k``). ``divisors`` ``{module: (out, in')}``: ``g_k`` divided by them elementwise first (AdamW's
        ``sqrt(v_hat) + eps`` of checkpoint ``k``, :mod:`wherefrom.models.optimizer_state`: LESS), then projected
        with ``dim``; ``unit``:
        ``g_k`` divided by its norm over all modules (the sum over checkpoints is then ``sum_k lr_k cos``,
        TracIn's ``normalize="cosine"``). Raises ``ValueError`` for a negative learning rate (no square root)."""
        lr = float(self.options["learning_rates"][k])
        if lr < 0:
            raise ValueError(f"tracin checkpoint {k} has learning rate {lr} < 0: an index row needs sqrt(lr)")
        loss_fn = attributor.query_loss_fn() if query else None
        description = f"tracin checkpoint {k + 1} {'queries' if query else 'rows'}"
        for ids, grads in attributor.gradients(records, loss_fn, description):
            if divisors is not None:
                grads = {n: g / divisors[n].to(g.device) for n, g in grads.items()}
            if self.projection is not None:
                grads = {n: self.projection.project_flat(n, g.reshape(g.shape[0], -1)) for n, g in grads.items()}
            rows = flatten_blocks(grads, attributor.module_names)
            yield ids, math.sqrt(lr) * (unit_rows(rows) if unit else rows)

    def query_vectors(self, queries: Sequence[Record], unit: bool = False) -> tuple[list[str], torch.Tensor]:
        """Ids and query rows ``(q, C * D)`` in the layout of the index rows (:meth:`rows` with ``query``), so that
        ``query_row @ train_row = sum_k lr_k q_k . g_k`` (TracInCP; positive = proponent; ``unit``:
        ``sum_k lr_k cos``). The query side is never Adam-preconditioned (LESS's convention). Raises
        :class:`~wherefrom.core.data.DataError` before any pass for no queries, an invalid row or a repeated id."""
        return self.rows(checked_rows(queries, "query rows"), unit, query=True)

    def rows(
        self, records: Sequence[Record], unit: bool = False, query: bool = False
    ) -> tuple[list[str], torch.Tensor]:
        """Ids and index rows ``(n, C * D)`` of ``records`` in memory (:meth:`checkpoint_rows` of every checkpoint,
        loaded once each, laid out by :func:`interleave_checkpoints`); a run's index builds them shard by shard
        instead."""
        ids: list[str] = []
        parts = []
        for k in range(len(self.checkpoints)):
            attributor = self.checkpoint_attributor(k, like=self.module_signature())
            batches = list(self.checkpoint_rows(attributor, k, records, unit=unit, query=query))
            ids = [i for batch_ids, _rows in batches for i in batch_ids]
            parts.append(torch.cat([rows.cpu() for _ids, rows in batches]))
            del attributor, batches
            gc.collect()
        return ids, interleave_checkpoints(parts, [math.prod(shape[1:]) for _name, shape in self.row_blocks()])
