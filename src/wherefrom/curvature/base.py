"""The curvature interface: fit on a data stream, save/load, precondition gradients by module.

``precondition(grads)`` returns ``(G + lambda I)^-1 grads`` for each tracked module, where ``G`` is
that module's block of the Gauss-Newton / Fisher matrix of the *average* training loss (per-example
loss summed over completion tokens by default) and ``lambda`` is the module's damping.

Damping: an absolute value when ``damping`` is given; otherwise ``damping_factor`` (default 0.1)
times the mean eigenvalue of the module's curvature block (Grosse et al., 2023).

Persistence: :meth:`Curvature.save` writes checksummed files (:mod:`wherefrom.core.store`) and
:meth:`Curvature.load_state` verifies them, raising :class:`wherefrom.core.store.DamagedFile` naming a
damaged file. A fit given a :class:`wherefrom.core.store.StageFolder` persists each stage that
:meth:`Curvature.run_stage` wraps (K-FAC: covariances, eigenbases; EK-FAC: also the eigenvalue
correction), so a killed fit resumes after its last finished stage with bit-identical results on
the same device: a ``loss_fn`` carrying a ``sampling_state`` attribute (the per-example draw counts of
the true Fisher's sampled labels, :class:`wherefrom.core.task.DrawCounts`) has that state saved with
each stage and restored when the stage is reused.
Memory: before the first pass, :meth:`Curvature.fit` measures the data (:class:`DataShape`), asks
the strategy for the bytes it will allocate (:meth:`Curvature.memory_needs`, ``{part: bytes}``) and
refuses with :class:`wherefrom.core.memory.MemoryLimitError` (module, bytes, limit) when they do not fit.

Degenerate curvature, one rule for every strategy (:func:`check_damping`, :func:`relative_damping`):

* ``damping`` and ``damping_factor`` must be finite and > 0, and at least :data:`SMALLEST_DAMPING` (``ValueError``
  naming the setting, at construction): with fewer fitting rows than parameters ``G`` is singular, and
  ``(G + 0 I)^-1`` does not exist; an undamped solve would return values decided by round-off eigenvalues.
  The floor only makes the value one float32 holds (not 0 or subnormal); a representable but tiny damping is
  still far below round-off for any curvature and the user's choice.
* With the relative damping, a block whose curvature is exactly zero (every fitting gradient of the
  module is 0, e.g. ``lora_A`` of a fresh LoRA adapter, whose ``lora_B = 0``) has ``lambda = 0`` too;
  its preconditioner is defined as 0, the pseudo-inverse of the zero matrix, so the block contributes
  exactly 0 to every score. ``fit`` warns (:class:`DegenerateCurvatureWarning`) naming those blocks
  (listed in ``info["zero_curvature"]``). A negative mean eigenvalue (an indefinite Hessian) is
  refused by name.
* The strategies with a float32 state (``kfac``, ``ekfac``, ``diagonal``) sum their statistics in float64 and
  refuse a nonzero block whose relative damping or eigenvalues float32 cannot hold (:func:`check_float32_block`:
  gradient entries below about 1e-20 or above about 1e19), naming it; ``exact``, ``datainf``, ``trak`` and
  ``logra`` (with its default ``strategy="exact"``) keep float64 curvature and score such a block.
"""

from __future__ import annotations

import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from wherefrom.core.distributed import gather_rows, on_main, refuse, sum_counts, warn_once
from wherefrom.core.gradients import Batch, LossFn
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.options import OptionSpec, from_signature
from wherefrom.core.store import (
    StageFolder,
    load_tensors_checked,
    read_json_checked,
    save_tensors_checked,
    write_json_checked,
)
from wherefrom.core.task import IGNORE_INDEX
from wherefrom.core.tracking import TrackedModule, output_layer, selection_signature

BatchSource = Callable[[], Iterable[Batch]]
"""A callable that returns a fresh iterable over the fitting batches (some strategies need two passes)."""

GradientSource = Callable[[], Iterable[Mapping[str, torch.Tensor]]]
"""A callable that returns a fresh iterable over per-batch gradient blocks ``{module: (b, out, in')}``."""

Progress = Callable[[Iterable[Batch], str], Iterator[Batch]]

RNG_KEY = "__sampling_state__"
"""Key of the loss's sampling state in a persisted fitting stage."""

STAGE_FORMAT_KEY = "stage_format"
"""Key of :attr:`Curvature.stage_format` in a persisted fitting stage's info (absent: layout 1)."""

META_FILE = "curvature.json"
"""Strategy, damping, options, modules and info of a saved curvature (written last: "finished")."""
TENSORS_FILE = "curvature.safetensors"
"""The fitted state tensors of a saved curvature."""


def no_progress(batches: Iterable[Batch], _description: str) -> Iterator[Batch]:
    return iter(batches)


@dataclass(frozen=True)
class DataShape:
    """Sizes of the fitting data that set the memory a strategy needs (measured without a model pass).

    ``examples``: this process's rows; ``all_examples``: the rows of every process under ``torch.distributed``
    (what a strategy that gathers rows onto every process holds; ``None``: ``examples``); ``max_batch``: rows
    of the largest batch; ``max_tokens``: the widest batch's sequence length ``T`` (1 for batches without
    ``input_ids``); ``max_labelled``: most predicting
    positions of one row (``labels[1:] != -100``; ``max_tokens`` without labels); ``vocabulary``: the
    width of the model's logits (0 when it has no output embedding or ``config.vocab_size``).
    """

    examples: int
    max_batch: int
    max_tokens: int
    max_labelled: int
    vocabulary: int
    all_examples: int | None = None

    @property
    def rows_everywhere(self) -> int:
        """Rows over every process (``examples`` in one process)."""
        return self.examples if self.all_examples is None else self.all_examples

    @classmethod
    def measure(cls, model: nn.Module, batches: BatchSource) -> DataShape:
        """Sizes of ``batches`` (this process's rows); under ``torch.distributed`` a collective (every process
        calls it) for ``all_examples``."""
        examples = max_batch = max_labelled = 0
        max_tokens = 1
        for batch in batches():
            rows = next(iter(batch.values())).shape[0]
            examples, max_batch = examples + rows, max(max_batch, rows)
            if "input_ids" in batch:
                max_tokens = max(max_tokens, batch["input_ids"].shape[1])
            if "labels" in batch and batch["labels"].shape[1] > 1:
                max_labelled = max(max_labelled, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).max()))
        head = output_layer(model)
        vocabulary = (
            int(head.weight.shape[0])
            if head is not None
            else int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        )
        everywhere = sum_counts({"examples": examples})["examples"]
        return cls(examples, max_batch, max_tokens, max_labelled or max_tokens, vocabulary, everywhere)

    def token_factor_bytes(self, modules: Sequence[TrackedModule]) -> int:
        """Bytes of one batch's :class:`~wherefrom.core.gradients.TokenFactors` (``a`` and ``g``, float32) over ``modules``."""
        return sum(nbytes(self.max_batch, self.max_tokens, m.shape[0] + m.shape[1]) for m in modules)

    def dense_gradient_bytes(self, modules: Sequence[TrackedModule]) -> int:
        """Bytes of one batch's dense per-example gradients ``(B, out, in')`` (float32) over ``modules``."""
        return sum(nbytes(self.max_batch, *m.shape) for m in modules)


class DegenerateCurvatureWarning(RuntimeWarning):
    """Some curvature blocks are exactly zero: they contribute 0 to every score (see the module doc)."""


OwnCurvature = Literal["ggn", "hessian"]
CurvatureKind = Literal[OwnCurvature, "fisher"]
CURVATURE_KINDS: tuple[str, ...] = typing.get_args(CurvatureKind)
"""The curvatures a strategy with a ``curvature`` option approximates: the GGN or the Hessian of the summed token
loss, which it forms itself (:data:`OWN_CURVATURES`), or the Fisher of the fitting loss's gradients."""
OWN_CURVATURES: tuple[str, ...] = typing.get_args(OwnCurvature)

DAMPING_FACTOR = 0.1
"""The default relative damping: lambda = 0.1 x mean eigenvalue of each curvature block (Grosse et al. 2023's
choice), used where no absolute damping is given; every strategy, study and the command line default to it."""

TRACE_PROBES = 32
"""Default number of Hutchinson probes (Hutchinson 1989) that estimate trace(G) of an operator whose eigenvalues are
not formed (``cg``, ``lissa``, ``arnoldi``, PBRF): mean eigenvalue = trace / P for the relative damping."""


SMALLEST_DAMPING = float(torch.finfo(torch.float32).tiny)
"""The smallest damping (and damping factor) taken: float32's smallest normal number, about 1.18e-38; a smaller one
is 0 (below about 1.4e-45) or subnormal in the float32 statistics, where ``1e-46`` passed as > 0 (trak scores of
1e20). Only representability: ``exact`` and the projected curvatures solve in float64, where any damping far below
round-off acts as none."""


FLOAT32_LARGEST = float(torch.finfo(torch.float32).max)
"""float32's largest finite number, about 3.4e38: the largest damping taken, and in a float32 curvature state the
largest relative damping and eigenvalue (:func:`check_float32_block`)."""


def check_damping(damping: float | None, damping_factor: float) -> None:
    """Refuse a damping that leaves ``(G + lambda I)`` without an inverse where ``G`` is singular.

    Raises ``ValueError`` naming the setting unless ``damping`` is ``None`` or finite, at least
    :data:`SMALLEST_DAMPING` and at most :data:`FLOAT32_LARGEST` (``1e39`` was infinite in a float32 state), and
    ``damping_factor`` is finite and at least :data:`SMALLEST_DAMPING` (``1e-46`` passed a check of > 0 and was 0 in
    the float32 curvature: scores of 1e19-1e20, or decided by round-off).
    """
    problem = damping_problem(damping, damping_factor)
    if problem:
        raise ValueError(problem)


def damping_problem(damping: float | None, damping_factor: float = DAMPING_FACTOR) -> str | None:
    """What :func:`check_damping` refuses, or ``None``: also the check of the ``damping`` and ``damping_factor``
    options (:data:`DAMPING_OPTIONS`), so that ``--option damping=1e-46`` is named as a method's option (userO: the
    bare text, after the option's own check of > 0 had passed)."""
    if damping is not None and not (math.isfinite(damping) and SMALLEST_DAMPING <= damping <= FLOAT32_LARGEST):
        return (
            f"damping must be a finite number > 0, at least {SMALLEST_DAMPING:.4g} (float32's smallest normal number: "
            f"a smaller one is 0 or subnormal in float32) and at most {FLOAT32_LARGEST:.4g} (float32's largest) (an "
            f"absolute lambda), got {damping}: with lambda = 0 the damped "
            "inverse (G + lambda I)^-1 does not exist when G is singular (fewer fitting rows than parameters), and an "
            "undamped solve returns values decided by round-off; pass e.g. 1e-3, or leave damping unset for "
            "damping_factor x mean eigenvalue"
        )
    if not (math.isfinite(damping_factor) and damping_factor >= SMALLEST_DAMPING):
        return (
            f"damping_factor must be a finite number > 0, at least {SMALLEST_DAMPING:.4g} (float32's smallest normal "
            f"number), got {damping_factor} (default {DAMPING_FACTOR}: lambda = {DAMPING_FACTOR} x mean eigenvalue)"
        )
    return None


def unused_damping_factor(damping: float | None, damping_factor: float) -> str | None:
    """Why ``damping_factor`` would change nothing beside an absolute ``damping``, or ``None`` when it does.

    An absolute ``damping`` sets lambda itself, so a ``damping_factor`` off :data:`DAMPING_FACTOR` is unused; the
    command line (``--damping`` with ``--damping-factor``) and a method's options (a ``tune`` grid over the factor
    scored identical points and "chose" one) refuse it with this text.
    """
    if damping is None or damping_factor == DAMPING_FACTOR:
        return None
    return (
        f"damping={damping} sets lambda itself, so damping_factor={damping_factor} (lambda = factor x the mean "
        "eigenvalue, used without damping) would change nothing: give one of them"
    )


SMALLEST_FLOAT32_STATE_DAMPING = 2.0**-136
"""The smallest relative damping a float32 curvature state takes, about 1.15e-41: float32 holds it (a subnormal
number there) to a relative 2^-13 (1.2e-4), and every eigenvalue added to it to that absolute precision; below,
the damping and the block's eigenvalues lose their digits (0 below about 1.4e-45: non-finite scores)."""


class UnrepresentableCurvature(ValueError):
    """A nonzero curvature block that a strategy's float32 state cannot hold (:func:`check_float32_block`)."""


def check_float32_block(values: torch.Tensor, damping: float, block: str, strategy: str) -> None:
    """Refuse a curvature ``block`` whose damping ``damping`` is below :data:`SMALLEST_FLOAT32_STATE_DAMPING` or whose
    float64 eigenvalues ``values`` (any shape) or damping exceed :data:`FLOAT32_LARGEST`, for the strategies that
    keep their curvature in float32 (``kfac``, ``ekfac``, ``diagonal``).

    A block's curvature is its gradients squared, and the relative damping ``damping_factor x`` its mean
    eigenvalue: at the default factor 0.1, gradient entries below about 1e-20 (root mean square) give a damping
    below the floor (before: non-finite scores, or, where kfac's float32 sums underflowed to exactly 0, a block
    silently taken as zero), entries above about 1e19 eigenvalues beyond float32 (infinite). A block that is
    exactly zero (``damping == 0``) passes: it is the zero block of the module doc; so do non-finite ``values``
    (:func:`check_finite_state` names those). Raises :class:`UnrepresentableCurvature` naming the block, its mean
    and largest eigenvalue, its damping, and what to change: the ``damping_factor`` where the mean eigenvalue is
    itself in float32's normal range, else the gradients' scale, the module selection or the strategy.
    """
    top = float(values.max()) if values.numel() else 0.0
    if damping == 0 or not math.isfinite(top):
        return
    if SMALLEST_FLOAT32_STATE_DAMPING <= damping <= FLOAT32_LARGEST and top <= FLOAT32_LARGEST:
        return
    mean = float(values.mean())
    found = (
        f"curvature block {block!r} ({strategy}) has mean eigenvalue {mean:.3g} (largest {top:.3g}) and damping "
        f"lambda = {damping:.3g}, outside what its float32 state holds (lambda {SMALLEST_FLOAT32_STATE_DAMPING:.3g} .. "
        f"{FLOAT32_LARGEST:.3g}, eigenvalues up to {FLOAT32_LARGEST:.3g})"
    )
    if damping < SMALLEST_FLOAT32_STATE_DAMPING and mean >= SMALLEST_DAMPING:
        raise UnrepresentableCurvature(f"{found}: the damping_factor is too small for it; raise it")
    raise UnrepresentableCurvature(
        f"{found}: its gradient entries are about {math.sqrt(max(mean, 0.0)):.1g} (root mean square) and their "
        "squares leave float32's range. Scale the model or the loss so that its gradients are nearer 1, exclude the "
        "module (include/exclude), or use a strategy that keeps its curvature in float64 (exact, datainf, trak, or "
        "logra with its default strategy 'exact')"
    )


class NonFiniteCurvature(ValueError):
    """Fitting statistics with NaN or infinite entries (the model's weights, or its outputs on the fitting rows,
    are not finite)."""


def relative_damping(damping: float | None, damping_factor: float, mean_eigenvalue: float, block: str) -> float:
    """lambda of one curvature ``block``: the absolute ``damping``, else ``damping_factor x mean_eigenvalue``.

    Returns 0.0 only for a block whose curvature is exactly zero under the relative rule (the caller
    then treats the block's preconditioner as 0). Raises :class:`NonFiniteCurvature` naming ``block`` when the mean
    eigenvalue is NaN or infinite (the statistics are: a NaN weight, or outputs that overflow), and ``ValueError``
    naming it when the mean eigenvalue is negative (an indefinite Hessian): pass an absolute damping.
    """
    if damping is not None:
        return float(damping)
    if not math.isfinite(mean_eigenvalue):
        raise NonFiniteCurvature(
            f"curvature block {block!r} has mean eigenvalue {mean_eigenvalue:g}: its statistics have NaN or infinite "
            "entries (the model's weights or its outputs on the fitting rows are not finite); nothing of it was saved"
        )
    if mean_eigenvalue < 0:
        raise ValueError(
            f"curvature block {block!r} has mean eigenvalue {mean_eigenvalue:g}, so the relative damping "
            f"damping_factor x mean eigenvalue would not be positive (indefinite Hessian?); pass an absolute damping > 0"
        )
    return damping_factor * mean_eigenvalue


def check_finite_state(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteCurvature` naming ``what``, how many of ``tensors`` and the first of them with a NaN
    or infinite entry; called before a fitting stage is saved or an eigendecomposition reads it (which failed with
    a linear-algebra error), and on a fitted state."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteCurvature(
            f"{what} has NaN or infinite entries in {len(bad)} of its {len(tensors)} tensors, e.g. {bad[0]!r}: "
            "the model's weights or its outputs on the fitting rows are not finite; nothing of it was saved"
        )


def warn_zero_curvature(blocks: Sequence[str]) -> None:
    """Warn that ``blocks`` have exactly zero curvature and therefore contribute 0 to every score."""
    if blocks:
        warn_once(
            f"the curvature of {len(blocks)} block(s) is exactly zero on the fitting rows (every gradient of theirs "
            f"is 0, e.g. lora_A of a fresh LoRA adapter whose lora_B = 0): {list(blocks)[:8]}"
            f"{' ...' if len(blocks) > 8 else ''}. With the relative damping lambda is 0 there too, so they "
            "contribute exactly 0 to every score (the pseudo-inverse of a zero block); exclude them, or pass an "
            "absolute damping to score them as gradient dot products / lambda",
            DegenerateCurvatureWarning,
            stacklevel=3,
        )


class Curvature(ABC):
    """One curvature estimator. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]
    needs_fit: ClassVar[bool] = True
    option_specs: ClassVar[tuple[OptionSpec, ...]] = ()
    """Typed constructor keywords (besides the damping, :data:`DAMPING_OPTIONS`), validated by
    :func:`wherefrom.curvature.make_curvature`, saved in ``metadata()["options"]`` and restored on load."""
    stage_format: ClassVar[int] = 1
    """The layout of the strategy's persisted fitting stages (:meth:`run_stage`): a saved stage of another layout (an
    earlier version's, killed midway) is recomputed, not resumed."""
    needs_operator: ClassVar[bool] = False
    """True for strategies that multiply by ``G`` on the fly (``cg``, ``lissa``): they must be attached
    to the model and fitting data again after loading."""
    distributes: ClassVar[bool] = False
    """True for strategies whose fit is sums over rows that :mod:`wherefrom.core.distributed` adds over
    processes (each fitting on its own rows); the others refuse to fit under ``WORLD_SIZE > 1``."""
    takes_source: ClassVar[bool] = False
    """True for strategies whose fitting stages can read a given data source instead of their own model
    passes (:meth:`fit`'s ``source``: ``kfac``, ``ekfac``)."""

    @property
    def own_ggn(self) -> bool:
        """True for strategies that form the GGN (or Hessian) of the summed token loss themselves instead of using
        the ``loss_fn`` handed to :meth:`fit`: those with a ``curvature`` option (``exact`` and the operator
        strategies) on ``"ggn"`` or ``"hessian"``; on ``"fisher"`` they take the fitting loss's gradients as the
        others do. The Fisher setting (true or empirical) does not reach the former."""
        return getattr(self, "curvature", None) in OWN_CURVATURES

    def check_reduction(self, reduction: str) -> None:
        """``ValueError`` when this strategy cannot fit under the training loss's ``reduction``: one that forms the
        GGN or Hessian of the summed loss itself (:attr:`own_ggn`) takes ``"sum"`` only. Checked when a method is
        made (``reduction="mean"`` was listed and taken for ``exact``, ``cg``, ``lissa``, ``arnoldi``, then refused
        by the fit) and again by the fit."""
        if self.own_ggn and reduction != "sum":
            raise ValueError(
                f"strategy {self.name!r} forms the GGN of the summed completion loss itself; "
                f"reduction={reduction!r} is not supported with it (use reduction='sum')"
            )

    def __init__(self, damping: float | None = None, damping_factor: float = DAMPING_FACTOR):
        check_damping(damping, damping_factor)
        self.damping = damping
        self.damping_factor = damping_factor
        self.modules: list[list] = []  # [[name, out, in'], ...] of the selection fitted on
        self.state: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = {}
        self.stages: StageFolder | None = None
        self.source: Any = None  # the data source of the fit in progress (fit's ``source``)

    # --- fitting -------------------------------------------------------------------------------
    @classmethod
    def refuse_distributed(cls) -> None:
        """Raise :class:`wherefrom.core.distributed.NotDistributable` naming the strategy and those that distribute
        when it cannot fit under ``torch.distributed`` (:attr:`distributes` false) and ``WORLD_SIZE > 1``."""
        if not cls.distributes:
            from wherefrom.curvature import STRATEGIES  # the registry imports this module

            refuse(
                f"strategy {cls.name!r}",
                "it iterates over all fitting rows; fit it in one process, or use one of "
                + ", ".join(sorted(name for name, other in STRATEGIES.items() if other.distributes)),
            )

    def fit(
        self,
        model: nn.Module,
        modules: Sequence[TrackedModule],
        batches: BatchSource,
        loss_fn: LossFn,
        progress: Progress = no_progress,
        stages: StageFolder | None = None,
        source: Any = None,
    ) -> Curvature:
        """Estimate the curvature from ``loss_fn`` gradients over ``batches()``; returns ``self``.

        ``stages``: where finished fitting stages are persisted and found again (see the module
        docstring); the caller records the fit's settings beside them first.
        ``source``: where the fitting stages read their data instead of a model pass each over ``batches``
        with ``loss_fn`` (a :class:`wherefrom.curvature.kronecker.FactorSource`, e.g. one pass shared by
        several stages); ``ValueError`` for a strategy that cannot take one (:attr:`takes_source` false).
        Raises :class:`wherefrom.core.memory.MemoryLimitError` before the first pass when
        :meth:`memory_needs` exceeds the memory limit of the model's device.

        Under ``torch.distributed`` each process passes its own rows (:func:`wherefrom.core.distributed.rows_for_rank`)
        and the strategy adds its sums and counts over processes before dividing, so every process ends
        with the one-process curvature; a strategy that does not (:attr:`distributes` false: ``cg``,
        ``lissa``, ``arnoldi``, which iterate over all rows) raises
        :class:`wherefrom.core.distributed.NotDistributable` before any pass."""
        self.refuse_distributed()
        if source is not None and not self.takes_source:
            raise ValueError(
                f"strategy {self.name!r} reads its fitting data from its own model passes; a shared data source "
                "serves only kfac and ekfac"
            )
        needs = self.memory_needs(modules, DataShape.measure(model, batches))
        check_memory(
            needs,
            f"fitting {self.name!r}",
            next(model.parameters()).device,
            "Track fewer or smaller modules (include/exclude, LoRA), fit on fewer rows, or use a cheaper strategy.",
        )
        self.modules = selection_signature(modules)
        self.state, self.info = {}, {}
        self.stages, self.source = stages, source
        try:
            self._fit(model, modules, batches, loss_fn, progress)
        except BaseException:  # an interrupted fit (Ctrl-C) leaves no half state that scores would take as fitted
            self.modules, self.state = [], {}
            raise
        finally:
            self.stages, self.source = None, None
        check_finite_state(self.state, f"the curvature of strategy {self.name!r}")
        warn_zero_curvature(self.zero_blocks)
        return self

    def fit_gradients(self, blocks: GradientSource, shapes: Mapping[str, tuple[int, int]]) -> Curvature:
        """Estimate the curvature from per-example gradient blocks rather than from a model; returns ``self``.

        ``blocks()`` yields, per batch, ``{module: (b, out, in')}`` for the (possibly virtual) modules
        ``shapes`` (``{name: (out, in')}``), e.g. projected gradients as ``(b, 1, k)`` blocks
        (:mod:`wherefrom.methods.projection`: the projection is a stage in front of the curvature). ``G``
        is then ``mean_n vec(G_n) vec(G_n)^T`` of the blocks (or its diagonal), the Fisher of the loss
        that produced them. Strategies that need the model (``exact``'s GGN is formed from the blocks here,
        not from Jacobians) or per-token factors (``kfac``, ``ekfac``) raise ``NotImplementedError``
        unless they override :meth:`fit_blocks`: ``identity``, ``diagonal`` and ``exact`` do.
        """
        self.modules = [[name, int(out), int(inp)] for name, (out, inp) in shapes.items()]
        self.state, self.info = {}, {}
        self.fit_blocks(blocks, dict(shapes))
        check_finite_state(self.state, f"the curvature of strategy {self.name!r}")
        warn_zero_curvature(self.zero_blocks)
        return self

    def fit_blocks(self, blocks: GradientSource, shapes: dict[str, tuple[int, int]]) -> None:
        """The strategy's estimate from gradient blocks (see :meth:`fit_gradients`)."""
        raise NotImplementedError(
            f"strategy {self.name!r} cannot be fitted from gradient blocks; identity, diagonal and exact can"
        )

    def run_stage(
        self, stage: str, compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]], loss_fn: LossFn
    ) -> dict[str, torch.Tensor]:
        """``compute()``'s tensors, or the persisted ones of ``stage`` when a finished copy exists.

        ``compute`` returns ``(tensors, info)``; ``info`` is merged into ``self.info`` in both cases.
        The state of ``loss_fn.sampling_state`` (if any) after the stage is saved and restored with it.
        Under ``torch.distributed`` rank 0 looks for the stage and hands it to every rank, and writes it
        with the sampling states of all ranks (:func:`wherefrom.core.distributed.gather_rows`).
        """
        sampling = getattr(loss_fn, "sampling_state", None)
        stages = self.stages
        saved = on_main(lambda: stages.load(stage)) if stages is not None else None
        if saved is not None and saved[1].pop(STAGE_FORMAT_KEY, 1) != self.stage_format:
            saved = None  # another version's layout
        if saved is not None:
            tensors, info = saved
            rng = tensors.pop(RNG_KEY, None)
            if sampling is not None and rng is not None:
                sampling.set_state(rng)
        else:
            tensors, info = compute()
            check_finite_state(tensors, f"the {stage} stage of strategy {self.name!r}")
            if stages is not None:
                rng = {RNG_KEY: gather_rows(sampling.get_state())} if sampling is not None else {}
                on_main(lambda: stages.save(stage, {**tensors, **rng}, {**info, STAGE_FORMAT_KEY: self.stage_format}))
        self.info.update(info)
        return tensors

    def memory_needs(self, modules: Sequence[TrackedModule], data: DataShape) -> dict[str, int]:
        """``{part: bytes}`` the fit will allocate for ``modules`` on ``data`` (accumulators, fitted
        state, the largest per-batch buffers); parts name the module or buffer. Default: nothing."""
        return {}

    def state_bytes(self, modules: Sequence[TrackedModule], data: DataShape) -> int:
        """Predicted bytes of the fitted :attr:`state` (what :meth:`save` writes)."""
        return 0

    @abstractmethod
    def _fit(self, model, modules, batches: BatchSource, loss_fn: LossFn, progress: Progress) -> None: ...

    def float32_damping(self, values: torch.Tensor, block: str) -> float:
        """:meth:`damping_for` of the float64 eigenvalues ``values`` (any shape) of a ``block`` the strategy keeps in
        float32, refusing a block that float32 cannot hold (:func:`check_float32_block`)."""
        damping = self.damping_for(values.mean().item(), block)
        check_float32_block(values, damping, block, self.name)
        return damping

    def damping_for(self, mean_eigenvalue: float, block: str) -> float:
        """The damping lambda of one curvature ``block`` (a module name, or ``"full"`` for a joint inverse)
        given the mean eigenvalue of its curvature (:func:`relative_damping`); a zero block is recorded
        in ``info["zero_curvature"]`` and preconditions to 0."""
        damping = relative_damping(self.damping, self.damping_factor, mean_eigenvalue, block)
        if damping == 0:
            self.info.setdefault("zero_curvature", []).append(block)
        return damping

    @property
    def zero_blocks(self) -> list[str]:
        """Blocks whose curvature is exactly zero under the relative damping: their preconditioner is 0."""
        return list(self.info.get("zero_curvature", []))

    # --- use -----------------------------------------------------------------------------------
    @abstractmethod
    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``(G_m + lambda_m I)^-1`` applied to ``grads`` of shape ``(n, out, in')``."""

    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply :meth:`precondition_module` to every module in ``grads`` (``{name: (n, out, in')}``);
        0 for a module in :attr:`zero_blocks`."""
        zero = set(self.zero_blocks)
        return {
            name: torch.zeros_like(g) if name in zero else self.precondition_module(name, g)
            for name, g in grads.items()
        }

    def precondition_jointly(
        self, grads: dict[str, torch.Tensor], solve: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """For strategies whose inverse couples modules: ``solve`` maps the ``(n, P)`` float64 rows of
        every fitted module's ``grads``, flattened jointly in fitted order, to ``(n, P)``; returns
        ``{name: (n, out, in')}`` with each block in its input's dtype and device. Refuses a subset of
        the modules (the coupled inverse needs them all)."""
        names = [name for name, _, _ in self.modules]
        if set(names) != set(grads):
            raise ValueError(
                f"{self.name!r} preconditions all fitted modules at once; got {len(grads)} of {len(names)}"
            )
        flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1).double()
        solved = solve(flat) if flat.shape[0] and "full" not in self.zero_blocks else torch.zeros_like(flat)
        out, start = {}, 0
        for name, rows, cols in self.modules:
            out[name] = (
                solved[:, start : start + rows * cols].reshape(-1, rows, cols).to(grads[name].device, grads[name].dtype)
            )
            start += rows * cols
        return out

    def to(self, device: torch.device | str) -> Curvature:
        self.state = {k: v.to(device) for k, v in self.state.items()}
        return self

    # --- persistence ---------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Constructor keyword arguments (besides the damping) that reproduce this strategy."""
        return {spec.name: getattr(self, spec.name) for spec in self.option_specs}

    def metadata(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "options": self.options(),
            "modules": self.modules,
            "info": self.info,
        }

    def save(self, folder: Path) -> None:
        """Write ``curvature.safetensors`` then ``curvature.json`` (the "finished" marker) into
        ``folder``, atomically and with their checksums recorded in ``folder/checksums.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors_checked({k: v.contiguous().cpu() for k, v in self.state.items()}, folder / TENSORS_FILE)
        write_json_checked(self.metadata(), folder / META_FILE)

    @classmethod
    def load_state(cls, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(metadata, state)`` saved by :meth:`save`, verified against the recorded checksums.

        Raises ``FileNotFoundError`` when ``folder`` holds no fitted curvature and
        :class:`wherefrom.core.store.DamagedFile` naming a file that is truncated, changed or unrecorded.
        """
        meta_path, tensors_path = folder / META_FILE, folder / TENSORS_FILE
        if not meta_path.exists() and not tensors_path.exists():
            raise FileNotFoundError(f"no fitted curvature in {folder} (expected {META_FILE} and {TENSORS_FILE})")
        meta = read_json_checked(meta_path)
        return meta, load_tensors_checked(tensors_path)[0]

    def restore(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> Curvature:
        self.modules = meta["modules"]
        self.info = meta.get("info", {})
        self.state = state
        return self

    def check_fitted(self) -> None:
        """``RuntimeError`` naming the strategy when it needs a fit and has none (no fitted module): preconditioning
        then failed with a ``KeyError`` on a factor's name (``...q_proj.s_eigvecs``)."""
        if self.needs_fit and not self.modules:
            raise RuntimeError(
                f"strategy {self.name!r} is not fitted: call fit(train rows) first, or load a fitted curvature"
            )

    def check_modules(self, modules: Sequence[TrackedModule]) -> None:
        """Raise if ``modules`` is not the selection this curvature was fitted on."""
        wanted = selection_signature(modules)
        if wanted != self.modules:
            fitted = {tuple(x) for x in self.modules}
            missing = [x for x in wanted if tuple(x) not in fitted][:5]
            raise ValueError(
                f"curvature was fitted on a different module selection ({len(self.modules)} modules) than "
                f"the current one ({len(wanted)} modules); e.g. not fitted: {missing}"
            )


GROSSE_2023 = "Grosse et al. 2023, Studying Large Language Model Generalization with Influence Functions"

DAMPING_OPTIONS: tuple[OptionSpec, ...] = from_signature(
    Curvature.__init__,
    OptionSpec(
        "damping",
        low=0.0,
        low_inclusive=False,
        problem=damping_problem,
        help="absolute damping lambda added to G; null: damping_factor x mean eigenvalue, per module",
        source=GROSSE_2023,
    ),
    OptionSpec(
        "damping_factor",
        low=0.0,
        low_inclusive=False,
        problem=lambda factor: damping_problem(None, factor),
        help="relative damping: lambda = damping_factor x mean eigenvalue of the module's G (when damping is null)",
        source=GROSSE_2023,
    ),
)
"""The damping every strategy takes (its default rule and range), shared by the influence methods."""
