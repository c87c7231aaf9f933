"""One model pass over the training rows that serves K-FAC/EK-FAC's fitting stages and scoring.

Without it an EK-FAC fit followed by pairwise scores passes over the training rows three times (as
kronfluence does): the covariance pass (true-Fisher labels, first draw), the eigenvalue-correction pass
(second draw) and the train-gradient pass of scoring (the data's labels). The three differ only in the
loss that is backpropagated, so :class:`SharedPass` runs ONE forward pass per batch and one backward pass
per distinct loss (:func:`wherefrom.core.gradients.shared_token_factors`); with the empirical Fisher the
three losses are one and a single backward pass serves all. Per batch it

* hands the fitting loss's token factors to the covariance sums (as the covariance pass would);
* keeps the per-example gradients ``G_n = sum_t g_t a_t^T`` ``(b, out, in')`` of the correction loss,
  from which the correction ``mean_n (Q_S^T G_n Q_A)^2`` is computed once the eigenbases are known (no
  second model pass);
* keeps the per-example gradients of the training loss for scoring (no third pass; see
  :meth:`wherefrom.engine.api.Attributor.train_gradient_stream`).

The numbers are those of separate passes: the same forward computation and gradients, the true Fisher's draws indexed as
the separate passes index them (the correction loss starts each example at the draw the covariance pass
left it at), the covariances bit for bit, the correction rotated from ``G_n`` instead of from the token
factors (equal up to float round-off; the form is recorded with the covariances stage, so a fit resumed
after that stage, which needs a model pass for the correction, rotates ``G_n`` too and gives the same bytes).

When the pass is shared (:func:`plan`): one process (under ``torch.distributed`` each process fits on its
own share and the stages keep their own passes), a ``kfac``/``ekfac`` strategy, and the kept gradients
(``rows x P`` float32 per kept set) fit in memory beside the fit's own needs, as predicted by
:func:`wherefrom.core.memory.check_memory`; for EK-FAC the correction is taken from the kept gradients only
when rotating them costs no more multiply-adds than rotating the token factors of a second pass
(``sum_m o i (o + i) <= T sum_m (o^2 + i^2 + o i)``, ``T`` the mean tokens per row: small modules such as
LoRA's). Otherwise the fit makes its separate passes and the reason is logged (logger ``wherefrom.engine.passes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from wherefrom.core.distributed import world_size
from wherefrom.core.encoding import Batches
from wherefrom.core.gradients import LossFn, shared_token_factors
from wherefrom.core.memory import MemoryLimitError, check_memory, nbytes
from wherefrom.core.tracking import TrackedModule
from wherefrom.curvature.base import Curvature, DataShape, Progress, no_progress
from wherefrom.curvature.kronecker import EKFAC, PER_EXAMPLE, FactorSource, FactorStream

logger = logging.getLogger(__name__)

Kept = list[tuple[list[str], dict[str, torch.Tensor]]]
"""Per batch, the row ids and ``{module: (b, out, in')}`` per-example gradients."""


def kept_rows(kept: Kept, start: int, stop: int) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """Rows ``[start, stop)`` of ``kept`` (counted over its batches in order), as ``(ids, {module: (b, out,
    in')})`` pieces: the batches' slices that fall inside (views, nothing copied)."""
    offset = 0
    for ids, grads in kept:
        low, high = max(start, offset) - offset, min(stop, offset + len(ids)) - offset
        if low < high:
            yield ids[low:high], {name: grad[low:high] for name, grad in grads.items()}
        offset += len(ids)
        if offset >= stop:
            return


@dataclass(frozen=True)
class Plan:
    """What one shared pass serves: ``correction`` (EK-FAC's eigenvalue correction from kept gradients) and
    ``train`` (the training gradients kept for scoring); the covariances always. ``reason``: why a part is
    not shared (empty when nothing was left out)."""

    correction: bool
    train: bool
    reason: str = ""


def plan(
    curvature: Curvature,
    modules: Sequence[TrackedModule],
    data: DataShape,
    mean_tokens: float,
    keep_train: bool,
    separate_draws: bool,
    device: torch.device,
) -> Plan | None:
    """The :class:`Plan` of a fit of ``curvature`` on ``data`` (``mean_tokens`` tokens per row), or ``None``
    when the fit makes its own passes; a refusal is logged with its reason. ``keep_train``: keep the training
    gradients for scoring; ``separate_draws``: the fitting and correction losses draw their own labels (true
    Fisher), so each is a backward pass of its own; the kept sets are then distinct (memory)."""
    if not curvature.takes_source:
        return None
    if world_size() > 1:
        logger.info(
            "fitting %r in separate passes: under torch.distributed each process fits on its share", curvature.name
        )
        return None
    correction, reason = isinstance(curvature, EKFAC), ""
    shapes = [m.shape for m in modules]
    if correction:
        dense = sum(o * i * (o + i) for o, i in shapes)
        tokens = mean_tokens * sum(o * o + i * i + o * i for o, i in shapes)
        if dense > tokens:
            correction = False
            reason = (
                f"the eigenvalue correction from per-example gradients would cost {dense:,} multiply-adds per row "
                f"against {tokens:,.0f} from token factors ({mean_tokens:.0f} tokens per row), so it makes its own pass"
            )
    if not correction and not keep_train:
        if reason:
            logger.info("fitting %r in separate passes: %s", curvature.name, reason)
        return None
    size = sum(o * i for o, i in shapes)
    sets = 1 if not (correction and keep_train and separate_draws) else 2
    needs = {
        **curvature.memory_needs(modules, data),
        f"kept per-example gradients ({data.examples} rows x {size:,} parameters x {sets} set(s), float32)": sets
        * nbytes(data.examples, size),
        "token factors of the shared pass's other losses (one batch)": 2 * data.token_factor_bytes(modules),
    }
    try:
        check_memory(needs, f"sharing the passes of fitting {curvature.name!r}", device)
    except MemoryLimitError as error:
        logger.info("fitting %r in separate passes: %s", curvature.name, error)
        return None
    if reason:
        logger.info("fitting %r: %s", curvature.name, reason)
    return Plan(correction, keep_train, reason)


class SharedPass(FactorSource):
    """The :class:`wherefrom.curvature.kronecker.FactorSource` of one shared pass (module docstring).

    ``rows()``: the fitting batches with their ids, ``examples`` rows in all; ``fisher_loss``: the fitting loss
    (covariances);
    ``correction_loss``: the loss of the correction gradients (``None`` when the correction makes its own pass;
    the fitting loss itself for the empirical Fisher); ``train_loss``: the loss of the kept training gradients
    (``None``: not kept). Losses given as the same object share one backward pass. After the covariance stage
    has run the pass, :attr:`train_gradients` holds the kept training gradients (``None`` when the stage was
    reused from disk and no pass ran, or they were not asked for)."""

    def __init__(
        self,
        model: torch.nn.Module,
        modules: Sequence[TrackedModule],
        rows: Callable[[], Batches],
        examples: int,
        fisher_loss: LossFn,
        correction_loss: LossFn | None,
        train_loss: LossFn | None,
        progress: Progress = no_progress,
    ):
        super().__init__(model, modules, lambda: rows().without_ids(), fisher_loss, progress)
        self.rows, self.examples = rows, examples
        self.losses: list[LossFn] = []
        self.roles = {
            role: self._index(loss)
            for role, loss in (("covariances", fisher_loss), ("correction", correction_loss), ("train", train_loss))
            if loss is not None
        }
        self.correction_loss = correction_loss
        if correction_loss is not None:
            self.info = {"correction_from": PER_EXAMPLE}
        self.correction_gradients: list[tuple[int, dict[str, torch.Tensor]]] | None = None
        self.train_gradients: Kept | None = None

    def _index(self, loss: LossFn) -> int:
        for k, known in enumerate(self.losses):
            if known is loss:
                return k
        self.losses.append(loss)
        return len(self.losses) - 1

    def stream(self, stage: str, dense: bool = False) -> FactorStream:
        if stage == "covariances":
            return self._shared
        if self.correction_gradients is not None:
            kept = self.correction_gradients
            return lambda: iter(kept)
        return super().stream(stage, dense)  # a fit resumed after its covariances: the correction's own pass

    def loss_for(self, stage: str) -> LossFn:
        if stage == "eigenvalue correction" and self.correction_gradients is not None:
            return self.correction_loss  # type: ignore[return-value]
        return self.loss_fn

    def _shared(self) -> Iterator[tuple[int, dict]]:
        correction: list[tuple[int, dict[str, torch.Tensor]]] = []
        train: Kept = []
        description = "shared pass (" + ", ".join(self.roles) + ")"
        kept_losses = {self.roles[role] for role in ("correction", "train") if role in self.roles}
        # per-example gradients once per distinct loss (the empirical Fisher's roles share one), kept in one
        # buffer per module of all the rows, allocated at the first batch: per-batch tensors that outlive the
        # pass's transient ones would scatter over the heap and hold its freed pages
        buffers: dict[int, dict[str, torch.Tensor]] = {k: {} for k in kept_losses}
        offset = 0
        for ids, batch in self.progress(self.rows(), description):
            if offset + len(ids) > self.examples:
                raise RuntimeError(f"the shared pass was given {self.examples} rows but its batches hold more")
            results = [
                factors for factors, _losses in shared_token_factors(self.model, self.modules, batch, self.losses)
            ]
            dense = {}
            for k in kept_losses:
                dense[k] = {}
                for name, factors in results[k].items():
                    gradient = factors.dense()
                    if name not in buffers[k]:
                        buffers[k][name] = gradient.new_empty((self.examples, *gradient.shape[1:]))
                    dense[k][name] = buffers[k][name][offset : offset + len(ids)]
                    dense[k][name].copy_(gradient)
            offset += len(ids)
            if "correction" in self.roles:
                correction.append((len(ids), dense[self.roles["correction"]]))
            if "train" in self.roles:
                train.append((list(ids), dense[self.roles["train"]]))
            yield len(ids), results[self.roles["covariances"]]
        if "correction" in self.roles:
            self.correction_gradients = correction
        if "train" in self.roles:
            self.train_gradients = train
