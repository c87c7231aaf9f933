"""High-level Python API: one :class:`Attributor` per (model, module selection, settings).

Typical use::

    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="ekfac"))
    attributor.fit(train_records)
    scores = attributor.scores(query_records, train_records)
    scores.top(0, k=10)  # [(train_id, score), ...], positive = proponent

Every score follows the sign convention of :mod:`wherefrom.core.scoring`.
"""

from __future__ import annotations

import contextlib
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Any, Literal

import torch
from torch import nn

from wherefrom.core.data import DataError, Record, check_ids, check_records
from wherefrom.core.distributed import rows_for_rank, world_size
from wherefrom.core.encoding import (
    LAYOUT_SETTINGS,
    MAX_LENGTH,
    Batches,
    EncodedExample,
    check_layout,
    encode_records,
    iterate_batches,
    pad_id,
)
from wherefrom.core.gradients import Batch, LossFn, TokenFactors, token_factors
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.options import plain_numbers
from wherefrom.core.scoring import (
    QueryBlock,
    Scores,
    check_finite,
    compress_queries,
    concat_query_blocks,
    module_scores,
    row_sq_norms,
    summed_token_scores,
)
from wherefrom.core.store import StageFolder
from wherefrom.core.task import (
    REDUCTIONS,
    DrawCounts,
    LanguageModelingTask,
    Reduction,
    UnmeasuredQuery,
    example_seeds,
)
from wherefrom.core.tracking import TrackedModule, name_patterns, output_layer, select_modules, selection_signature
from wherefrom.curvature import Curvature, configured_curvature
from wherefrom.curvature.base import DAMPING_FACTOR, BatchSource, DataShape, Progress, no_progress
from wherefrom.engine.passes import Kept, SharedPass, plan
from wherefrom.models.loading import eval_mode, model_fingerprint

Fisher = Literal["true", "empirical"]
FISHERS: tuple[str, ...] = typing.get_args(Fisher)
"""The Fisher of the fitting loss (``--fisher``): ``"true"``, targets sampled from the model (as Grosse et al. 2023),
or ``"empirical"``, the training rows' own targets."""

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""The ``autocast`` settings and the dtype each runs the model's forward passes in."""


class IgnoredFisherWarning(UserWarning):
    """``fisher="empirical"`` given to a strategy that forms its curvature from the model itself (``exact``,
    ``cg``, ``lissa``, ``arnoldi`` with ``curvature="ggn"`` or ``"hessian"``): the setting changes no number."""


NUMBER_SETTINGS = {
    "batch_size": Integral,
    "max_length": Integral,
    "seed": Integral,
    "query_rank": Integral,
    "damping": Real,
    "damping_factor": Real,
}
"""The numeric settings of :class:`AttributionConfig` and the kind each must be (``query_rank`` and ``damping`` may
be ``None``): a ``batch_size`` of 2.5 or a ``seed`` of ``"a"`` failed deep in a pass, naming no setting."""


@dataclass
class AttributionConfig:
    """Every setting that changes the numbers; saved as ``config.json`` beside a run's outputs.

    ``fisher``: ``"true"`` samples the fitting targets from the model (Gauss-Newton / true Fisher),
    ``"empirical"`` uses the data's completions. ``damping``: absolute lambda, or ``None`` for
    ``damping_factor`` x mean eigenvalue per module. ``query_rank``: rank of the low-rank query
    batching (``None`` = full rank). ``include``/``exclude``: module-name regexes.
    ``normalize="cosine"`` divides each score by ``||q|| * ||g_m||``, with ``q`` the preconditioned
    query over all tracked modules (taken before low-rank compression) and ``g_m`` the training
    gradient over all tracked modules: with the ``identity`` strategy that is the cosine similarity
    of the gradients (gradsim cosine), in ``[-1, 1]`` up to float32 rounding (1.0000001). Per-module parts are divided by the same two
    norms, so they still sum to the total. ``strategy_options``: constructor options of the strategy
    (e.g. ``{"max_iter": 300}`` for ``cg``, ``{"rank": 64}`` for ``arnoldi``); ``extra``: settings
    of methods that are not curvature strategies (e.g. ``layer``/``pooling`` for ``repsim``).
    ``query_without_eos``: the query measurement ``f`` leaves out the EOS appended to each completion
    (:mod:`wherefrom.core.task`); by default ``f = log p(completion, EOS | prompt)``.
    ``autocast``: ``"bfloat16"`` or ``"float16"`` runs the model's forward passes under
    ``torch.autocast`` on its device (faster on GPUs); the captured inputs and output gradients are
    taken to float32 and every statistic is accumulated in float32/float64 as without it (float16's backward
    pass runs on a scaled loss, :data:`wherefrom.core.tracking.LOSS_SCALES`, so small gradients do not flush
    to zero).
    ``template`` / ``append_eos`` / ``pad_left`` / ``loss_tokens`` / ``truncate``: the input layout of
    :func:`wherefrom.core.encoding.encode_records` (defaults: the raw prompt, an EOS after the completion,
    right padding, loss on the completion, a longer row refused); the reference study's layout is ``template=
    REFERENCE_TEMPLATE, append_eos=False, pad_left=True, loss_tokens="all", truncate=True`` with ``max_length=128``.
    """

    strategy: str = "ekfac"
    fisher: Fisher = "true"
    damping: float | None = None
    damping_factor: float = DAMPING_FACTOR
    include: list[str] | None = None
    exclude: list[str] | None = None
    batch_size: int = 8
    max_length: int = MAX_LENGTH
    chat_template: bool = False
    reduction: Reduction = "sum"
    query_rank: int | None = None
    normalize: Literal["cosine"] | None = None
    seed: int = 0
    query_without_eos: bool = False
    autocast: Literal["bfloat16", "float16"] | None = None
    template: str | None = None
    append_eos: bool = True
    pad_left: bool = False
    loss_tokens: Literal["completion", "all"] = "completion"
    truncate: bool = False
    strategy_options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.include = name_patterns(self.include, "include")
        self.exclude = name_patterns(self.exclude, "exclude")
        plain_numbers(self, NUMBER_SETTINGS, ("query_rank", "damping"))
        check_layout(self.layout())  # userK: they failed, or encoded otherwise, only when a run was fitted
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {list(FISHERS)}, got {self.fisher!r}")
        if self.normalize not in (None, "cosine"):
            raise ValueError(f"normalize must be None or 'cosine', got {self.normalize!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.query_rank is not None and self.query_rank < 1:  # it was refused by the first scores, after the fit
            raise ValueError(f"query_rank must be >= 1 or None, got {self.query_rank}")
        if self.autocast not in (None, *AUTOCAST_DTYPES):
            raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if not isinstance(self.query_without_eos, bool):  # reviewU: "no" acted as True
            raise ValueError(f"query_without_eos must be True or False, got {self.query_without_eos!r}")
        if self.query_without_eos and not self.append_eos:  # reviewZ: the row's last completion token was dropped
            raise ValueError(
                "query_without_eos=True with append_eos=False: no EOS is appended, so there is none to leave out "
                "(the last completion token would be); give one of them"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def new_curvature(self) -> Curvature:
        """An unfitted instance of the configured strategy, damping and strategy options (checked: an
        :class:`wherefrom.core.options.OptionError` before any model work)."""
        return configured_curvature(self.strategy, self.damping, self.damping_factor, self.strategy_options)

    def layout(self) -> dict:
        """The keywords of :func:`wherefrom.core.encoding.encode_records` these settings give (rows' text,
        length, EOS, padding and labels)."""
        return {key: getattr(self, key) for key in LAYOUT_SETTINGS}


Rows = Sequence[Record] | Sequence[EncodedExample]


def checked_rows(rows: Rows, source: str) -> list[Record] | list[EncodedExample]:
    """``rows`` validated as the file loaders validate them (:func:`wherefrom.core.data.check_records`;
    for encoded rows, their ids with :func:`wherefrom.core.data.check_ids`). ``source`` names them in
    messages (``"training rows"``, ``"query rows"``). Raises :class:`~wherefrom.core.data.DataError` for an
    empty list, an invalid row or a repeated id."""
    if isinstance(rows, (Record, EncodedExample)):
        raise TypeError(f"{source} must be a list of rows; got one row ({rows.id!r}): pass [row]")
    rows = list(rows)
    if rows and isinstance(rows[0], EncodedExample):
        check_ids([row.id for row in rows], source)
        return rows
    return check_records(rows, source)


class QueryBlocks(dict):
    """``{module: QueryBlock}`` of preconditioned queries, plus ``norms``: ``(n_query,)`` float64
    norms of each full preconditioned query over all modules, taken before low-rank compression
    (``None`` when unknown; then cosine normalisation recomputes them from the blocks)."""

    norms: torch.Tensor | None = None


def _block_sq_norms(block: QueryBlock) -> torch.Tensor:
    """``(q,)`` squared Frobenius norms of one module's query block (dense or low-rank factors)."""
    if isinstance(block, tuple):
        u, v = (x.double() for x in block)
        # ||U V^T||_F^2 = trace((U^T U)(V^T V))
        return ((u.mT @ u) * (v.mT @ v)).sum((-2, -1))
    return row_sq_norms(block)


def _sq_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(n,)`` float64 squared norms of dense gradients ``{module: (n, out, in')}`` over all modules, on CPU."""
    return sum(row_sq_norms(g).cpu() for g in grads.values())


def _per_token_rows(
    encoded: Sequence[Any],
    stream: Iterable[tuple[list[str], dict[str, Any]]],
    score: Callable[[dict[str, Any], int, int], torch.Tensor],
) -> list[tuple[str, list[int], torch.Tensor]]:
    """``[(row_id, input_ids, (n_other, T_row))]`` of the rows of ``encoded`` in order, from ``stream`` (``(ids,
    per-token factors)`` per batch of them) and ``score(factors, width, start)`` (a batch's per-token scores
    ``(n_other, b, width)``, ``width`` its longest row, ``start`` its first row's index): each row's scores cut to
    its own tokens (the padding's dropped)."""
    out: list[tuple[str, list[int], torch.Tensor]] = []
    for ids, factors in stream:
        batch = encoded[len(out) : len(out) + len(ids)]
        per_token = score(factors, max(len(e.input_ids) for e in batch), len(out))
        out += [(i, e.input_ids, per_token[:, j, : len(e.input_ids)].cpu()) for j, (i, e) in enumerate(zip(ids, batch))]
    return out


def cosine_denominator(query_norms: torch.Tensor, train_norms: torch.Tensor) -> torch.Tensor:
    """``(q, n)`` float64 ``||q|| * ||g_m||`` of cosine normalisation, with 1 where it is 0 (score stays 0)."""
    denominator = query_norms.double().cpu()[:, None] * train_norms.double().cpu()[None, :]
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


class Attributor:
    """Fits curvature and computes influence scores for one model and module selection."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        config: AttributionConfig | None = None,
        task: LanguageModelingTask | None = None,
        progress: Progress = no_progress,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (wherefrom.models.loading.load_model(PATH).model loads one), "
                f"got {model!r}"
            )
        if tokenizer is None:
            raise TypeError(f"tokenizer must be the model's transformers tokenizer, got {tokenizer!r}")
        if config is not None and not isinstance(config, AttributionConfig):
            raise TypeError(f"config must be an AttributionConfig (AttributionConfig(**settings)), got {config!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or AttributionConfig()
        if (
            self.config.query_without_eos
            and not self.config.chat_template
            and getattr(tokenizer, "eos_token_id", None) is None
        ):
            raise ValueError(
                "query_without_eos=True: this tokenizer has no eos_token_id, so no EOS is appended to leave out"
            )
        self.modules: list[TrackedModule] = select_modules(model, self.config.include, self.config.exclude)
        head = output_layer(model)
        self.task = task or LanguageModelingTask(
            reduction=self.config.reduction,
            query_without_eos=self.config.query_without_eos,
            every_position=any(m.module is head for m in self.modules),
        )
        self.progress = progress
        self.curvature: Curvature = self.new_curvature()
        self.kept: tuple[tuple, Kept] | None = None
        """The training gradients kept by the last fit, with their :meth:`gradient_key` (``None``: none kept)."""
        if not self.curvature.needs_fit:
            self.curvature.modules = selection_signature(self.modules)

    def new_curvature(self) -> Curvature:
        """An unfitted instance of the configured strategy, damping and strategy options."""
        return self.config.new_curvature()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def num_parameters(self) -> int:
        """``P``: tracked parameters (weights and biases) over all selected modules."""
        return sum(m.shape[0] * m.shape[1] for m in self.modules)

    def check_scoring_memory(self, n_queries: int, n_train: int = 0) -> int:
        """Bytes that scoring ``n_queries`` against ``n_train`` rows holds, checked against the memory
        limit (:func:`wherefrom.core.memory.check_memory`) before the first pass: the query gradients
        and their preconditioned copies ``(n_q, P)`` float32 (raw, preconditioned and joined) at full
        rank; with ``query_rank = r`` only one batch of them is dense at once (queries are compressed a
        batch at a time) plus the factors ``n_q x r x (out + in')`` per module, so the dense part no
        longer grows with ``n_q``; one batch's dense training gradients ``(B, P)``; and the per-module
        scores ``(M, n_q, n_train)`` (twice, parts and result). Raises
        :class:`wherefrom.core.memory.MemoryLimitError` naming the part."""
        size, batch, rank = self.num_parameters, self.config.batch_size, self.config.query_rank
        if rank is None:
            queries = {
                f"query gradients ({n_queries} rows x {size:,} parameters, float32, raw and preconditioned)": 3
                * nbytes(n_queries, size)
            }
        else:
            factors = sum(min(rank, out, inp) * (out + inp) for out, inp in (m.shape for m in self.modules))
            queries = {
                f"query gradients of one batch ({min(batch, n_queries)} rows x {size:,} parameters, raw and "
                "preconditioned)": 2 * nbytes(min(batch, n_queries), size),
                f"rank-{rank} query factors ({n_queries} rows x {factors:,} numbers)": 2 * nbytes(n_queries, factors),
            }
        needs = {
            **queries,
            f"per-example gradients of one batch ({batch} rows x {size:,} parameters)": nbytes(batch, size),
            f"per-module scores ({len(self.modules)} x {n_queries} x {n_train})": 2
            * nbytes(len(self.modules), n_queries, n_train),
        }
        return check_memory(
            needs, "scoring", self.device, "Score fewer queries at once, set query_rank, or track fewer modules."
        )

    # --- data ----------------------------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[EncodedExample]:
        return encode_records(records, self.tokenizer, model=self.model, **self.config.layout())

    def encoded(self, records: Rows) -> list[EncodedExample]:
        """``records`` encoded for this model (:meth:`encode`); already-encoded examples pass as they are."""
        return list(records) if records and isinstance(records[0], EncodedExample) else self.encode(records)  # type: ignore[arg-type]

    def batches(self, records: Sequence[Record] | Sequence[EncodedExample]) -> Batches:
        """``(ids, batch)`` in order (a sized iterator: ``len`` is the number of batches); accepts records or
        already-encoded examples."""
        encoded = self.encoded(records)
        return iterate_batches(encoded, self.config.batch_size, pad_id(self.tokenizer), self.device)

    # --- losses ---------------------------------------------------------------------------------
    def model_pass(self) -> contextlib.AbstractContextManager:
        """The context of a model forward pass: ``torch.autocast`` to ``config.autocast`` on the model's
        device, or nothing. Losses are taken in float32 (:func:`wherefrom.core.task.prediction_losses`), the
        captured factors too (:func:`wherefrom.core.gradients.token_factors`)."""
        if self.config.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.config.autocast])

    def train_loss_fn(self) -> LossFn:
        """``L(z)`` per example with the data's targets."""

        def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
            with self.model_pass():
                return self.task.train_loss(model, batch)

        return loss

    def fisher_loss_fn(self, drawn: Sequence[EncodedExample] = ()) -> LossFn:
        """The loss whose gradients define the Fisher: sampled targets for ``fisher="true"``.

        Each example draws from its own generator (:func:`wherefrom.core.task.example_seeds`) seeded by
        ``config.seed``, its tokens and the number of earlier draws for it by this loss function (0 in
        the first pass over the data, 1 in EK-FAC's second pass, which so draws afresh, as
        kronfluence does): nothing depends on the batch size, batch composition or row order.

        The counts are the loss's ``sampling_state`` (:class:`wherefrom.core.task.DrawCounts`), which a
        resumable fit saves with each stage and restores when it reuses the stage. ``drawn``: rows counted as
        drawn once already (the draws of a pass that comes after a pass over them, computed in the same pass).
        """
        if self.config.fisher == "empirical":
            return self.train_loss_fn()
        draws = DrawCounts()
        draws.next(self.draw_keys(drawn))

        def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
            repeats = draws.next(example_seeds(batch, self.config.seed))
            seeds = example_seeds(batch, self.config.seed, repeats)
            with self.model_pass():
                return self.task.train_loss(model, batch, sample=True, seeds=seeds)

        loss.sampling_state = draws  # type: ignore[attr-defined]
        return loss

    def query_loss_fn(self) -> LossFn:
        """``-f(z_q)`` per example: its gradient is the query vector ``q`` of :mod:`wherefrom.core.scoring`."""

        def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
            with self.model_pass():
                return -self.task.measurement(model, batch)

        return loss

    def fitting_rows(self, encoded: list[EncodedExample]) -> list[EncodedExample]:
        """This process's share of the fitting rows (:func:`wherefrom.core.distributed.rows_for_rank`; all
        of them in one process). Rows with one draw key (:func:`wherefrom.core.task.example_seeds`:
        identical tokens and labels) stay in one process, so the true Fisher's labels are drawn as one
        process draws them."""
        if world_size() == 1:
            return encoded
        return rows_for_rank(encoded, self.draw_keys(encoded))

    def draw_keys(self, encoded: Sequence[EncodedExample]) -> list[int]:
        """Each row's key of the true Fisher's draws (:func:`wherefrom.core.task.example_seeds`, first draw)."""
        keys: list[int] = []
        for _ids, batch in iterate_batches(list(encoded), 256, pad_id(self.tokenizer)):
            keys += example_seeds(batch, self.config.seed)
        return keys

    # --- curvature -----------------------------------------------------------------------------
    def fit(
        self,
        train: Sequence[Record] | Sequence[EncodedExample],
        curvature: Curvature | None = None,
        stages: StageFolder | None = None,
        keep_gradients: bool = True,
    ) -> Curvature:
        """Fit ``curvature`` (default: the configured strategy) on ``train`` (true or empirical Fisher).

        Pass a strategy built with :func:`wherefrom.curvature.make_curvature` to set constructor
        options (e.g. ``rank`` for ``arnoldi``); it is fitted and becomes this attributor's curvature.
        ``stages``: persist and reuse finished fitting stages there (see :meth:`Curvature.fit`).
        K-FAC and EK-FAC fit in one pass shared by their stages when it fits in memory
        (:mod:`wherefrom.engine.passes`); with ``keep_gradients`` that pass also keeps the per-example training
        gradients, so that :meth:`scores` against the same rows makes no train-gradient pass (the attributor
        holds them, ``rows x P`` float32, until the next fit).
        Raises :class:`~wherefrom.core.data.DataError` for no rows, an invalid row or a repeated id.

        Under ``torch.distributed`` every process passes all ``train`` rows, fits on its share
        (:meth:`fitting_rows`) and ends with the curvature of all of them (:meth:`Curvature.fit`).
        """
        encoded = self.fitting_rows(self.encoded(checked_rows(train, "training rows")))

        def batches() -> Iterable[Batch]:
            return self.batches(encoded).without_ids()

        self.curvature = curvature or self.new_curvature()
        self.curvature.check_reduction(self.config.reduction)
        if self.curvature.own_ggn and self.config.fisher == "empirical":
            warnings.warn(
                f"strategy {self.curvature.name!r} forms its {getattr(self.curvature, 'curvature', 'ggn')} from the "
                "model itself: fisher='empirical' changes none of its numbers; give it the strategy option "
                "curvature=fisher for the empirical Fisher (the mean g g^T of the data-label gradients)",
                IgnoredFisherWarning,
                stacklevel=2,
            )
        fisher_loss = self.fisher_loss_fn()
        self.kept = None
        source = self.shared_pass(encoded, batches, fisher_loss, keep_gradients)
        with eval_mode(self.model):
            self.curvature.fit(self.model, self.modules, batches, fisher_loss, self.progress, stages, source=source)
        if source is not None and source.train_gradients is not None:
            self.kept = (self.gradient_key(encoded), source.train_gradients)
        return self.curvature.to(self.device)

    def shared_pass(
        self, encoded: list[EncodedExample], batches: BatchSource, fisher_loss: LossFn, keep_gradients: bool
    ) -> SharedPass | None:
        """The one pass that serves the fit's stages (and keeps the training gradients when ``keep_gradients``)
        on ``encoded``, or ``None`` when the fit makes its own passes (:func:`wherefrom.engine.passes.plan`
        decides and logs why)."""
        empirical = self.config.fisher == "empirical"
        mean_tokens = sum(len(e) for e in encoded) / max(len(encoded), 1)
        data = DataShape.measure(self.model, batches)
        chosen = plan(self.curvature, self.modules, data, mean_tokens, keep_gradients, not empirical, self.device)
        if chosen is None:
            return None
        correction = train = None
        if chosen.correction:  # the true Fisher's second draw: each row's draws continue after the first pass
            correction = fisher_loss if empirical else self.fisher_loss_fn(drawn=encoded)
        if chosen.train:
            train = fisher_loss if empirical else self.train_loss_fn()
        return SharedPass(
            self.model,
            self.modules,
            lambda: self.batches(encoded),
            len(encoded),
            fisher_loss,
            correction,
            train,
            self.progress,
        )

    def gradient_key(self, encoded: Sequence[EncodedExample]) -> tuple:
        """What the training gradients of ``encoded`` depend on: the rows (ids, tokens, labels, padding), the
        batch size and autocast settings, and the model's weights and config
        (:func:`wherefrom.models.loading.model_fingerprint`: the bytes of every parameter, so any change counts,
        one through ``param.data`` too, which no in-place version counter sees; about 0.3 s per 100M parameters)."""
        rows = tuple((e.id, tuple(e.input_ids), tuple(e.labels), e.padding) for e in encoded)
        return rows, self.config.batch_size, self.config.autocast, model_fingerprint(self.model)

    def train_gradient_stream(
        self, train: Rows, description: str = "train gradients"
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor | TokenFactors]]]:
        """``(ids, {module: (b, out, in') or TokenFactors})`` per batch of ``train``'s training-loss gradients:
        those the last :meth:`fit` kept (one shared pass, :mod:`wherefrom.engine.passes`) when ``train`` are its
        rows and nothing they depend on (:meth:`gradient_key`) changed since, else a model pass
        (:meth:`token_factor_stream`). The values are the same either way."""
        encoded = self.encoded(checked_rows(train, f"{description} rows"))
        kept = self.kept_gradients(encoded)
        if kept is not None:
            return ((list(ids), dict(grads)) for ids, grads in kept)
        return self.token_factor_stream(encoded, description=description)

    def kept_gradients(self, train: Rows) -> Kept | None:
        """The per-example training-loss gradients ``[(ids, {module: (b, out, in')})]`` (one entry per batch)
        that the last :meth:`fit` kept, when ``train`` are its rows and nothing they depend on
        (:meth:`gradient_key`) changed since; else ``None``."""
        if self.kept is None:
            return None
        encoded = self.encoded(checked_rows(train, "training rows"))
        return self.kept[1] if self.kept[0] == self.gradient_key(encoded) else None

    def use_curvature(self, curvature: Curvature, train: Sequence[Record] | None = None) -> None:
        """Adopt a loaded curvature after checking it was fitted on this module selection.

        Strategies that multiply by ``G`` on the fly (``cg``, ``lissa``) are re-attached to the model
        and to batches of ``train`` (the rows they were fitted on).
        """
        curvature.check_modules(self.modules)
        if curvature.needs_operator and train is not None:
            encoded = self.encode(checked_rows(train, "training rows"))
            curvature.attach(  # type: ignore[attr-defined]
                self.model, self.modules, lambda: self.batches(encoded).without_ids(), self.progress,
                self.fisher_loss_fn(),
            )  # fmt: skip
        self.curvature = curvature.to(self.device)

    # --- gradients -----------------------------------------------------------------------------
    def token_factor_stream(
        self,
        records: Sequence[Record] | Sequence[EncodedExample],
        loss_fn: LossFn | None = None,
        description: str = "gradients",
    ) -> Iterator[tuple[list[str], dict[str, TokenFactors]]]:
        """``(ids, {module: TokenFactors})`` per batch; training-loss gradients unless ``loss_fn`` is given.

        Raises :class:`~wherefrom.core.data.DataError` (before the first pass) for no rows, an invalid row
        or a repeated id, and naming a query row left with no token to measure
        (:class:`wherefrom.core.task.UnmeasuredQuery`)."""
        records = checked_rows(records, f"{description} rows")
        loss_fn = loss_fn or self.train_loss_fn()
        with eval_mode(self.model):
            for ids, batch in self.progress(self.batches(records), description):  # type: ignore[arg-type]
                try:
                    factors = token_factors(self.model, self.modules, batch, loss_fn)[0]
                except UnmeasuredQuery as error:
                    raise DataError(f"query row {ids[error.row]!r}: {error}") from None
                yield ids, factors

    def gradients(
        self,
        records: Sequence[Record] | Sequence[EncodedExample],
        loss_fn: LossFn | None = None,
        description: str = "gradients",
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """``(ids, {module: (b, out, in')})`` per batch; training-loss gradients unless ``loss_fn`` is given.

        Raises :class:`~wherefrom.core.data.DataError` for no rows, an invalid row or a repeated id."""
        records = checked_rows(records, f"{description} rows")
        for ids, factors in self.token_factor_stream(records, loss_fn, description):
            yield ids, {n: factors.pop(n).dense() for n in self.module_names}

    def preconditioned_queries(
        self, queries: Sequence[Record] | Sequence[EncodedExample], curvature: Curvature | None = None
    ) -> tuple[list[str], QueryBlocks]:
        """Query ids and ``(G + lambda I)^-1 q`` per module, low-rank when ``query_rank`` is set.

        ``curvature`` overrides the fitted one (e.g. identity, to compare methods on one index).
        The returned :class:`QueryBlocks` also carries ``norms``: each full preconditioned query's
        norm over all tracked modules, before compression (used by ``normalize="cosine"``).
        """
        curvature = curvature or self.curvature
        queries = checked_rows(queries, "query rows")
        curvature.check_fitted()  # after the rows: a bad row is named first, as before
        self.check_scoring_memory(len(queries))
        ids, parts, sq_norms = [], [], []
        for batch_ids, grads in self.gradients(queries, self.query_loss_fn(), "query gradients"):
            ids += batch_ids
            pre = curvature.precondition(grads)
            del grads
            sq_norms.append(sum(_block_sq_norms(block) for block in pre.values()))
            # compressed one batch at a time: only one batch of dense preconditioned queries lives at once
            parts.append(compress_queries(pre, self.config.query_rank))
            del pre
        blocks = QueryBlocks({name: concat_query_blocks([p.pop(name) for p in parts]) for name in self.module_names})
        blocks.norms = torch.cat(sq_norms).sqrt()
        return ids, blocks

    # --- scores --------------------------------------------------------------------------------
    def scores_from_gradients(
        self,
        query_ids: list[str],
        queries: dict[str, QueryBlock],
        train_gradients: Iterable[tuple[list[str], dict[str, torch.Tensor | TokenFactors]]],
    ) -> Scores:
        """Pairwise scores of preconditioned queries against a stream of train gradients.

        Each batch maps module names to dense gradients ``(b, out, in')`` or to :class:`TokenFactors`;
        modules are scored one at a time and popped, so one module's dense gradients live at once. An empty
        stream (a process of many given no rows) gives ``(n_modules, n_query, 0)`` scores.
        With ``config.normalize == "cosine"`` every part is divided by ``||q|| * ||g_m||`` (norms over
        all tracked modules; ``||q||`` from ``queries.norms`` when it is a :class:`QueryBlocks`, else
        from the blocks themselves); a zero gradient gets score 0.
        """
        cosine = self.config.normalize == "cosine"
        query_norms = self.query_norms(queries) if cosine else None
        train_ids: list[str] = []
        columns = []
        for ids, grads in train_gradients:
            train_ids += ids
            column = []
            train_sq_norms = torch.zeros(len(ids), dtype=torch.float64)
            for n in self.module_names:
                value = grads.pop(n)
                dense = value.dense() if isinstance(value, TokenFactors) else value.to(self.device)
                column.append(module_scores(queries[n], dense))
                if cosine:
                    train_sq_norms += row_sq_norms(dense).cpu()
                del value, dense
            block = torch.stack(column).cpu()
            if cosine:
                block = (block.double() / cosine_denominator(query_norms, train_sq_norms.sqrt())).to(block.dtype)
            columns.append(block)
        if not columns:  # a process of many given no rows (fewer rows or index shards than processes)
            first = queries[self.module_names[0]]
            dtype = (first[0] if isinstance(first, tuple) else first).dtype
            columns.append(torch.zeros(len(self.module_names), len(query_ids), 0, dtype=dtype))
        return check_finite(Scores(query_ids, train_ids, self.module_names, torch.cat(columns, dim=2)))

    def query_norms(self, queries: dict[str, QueryBlock]) -> torch.Tensor:
        """``(n_query,)`` float64 CPU norms of the preconditioned queries over all tracked modules, for
        ``normalize="cosine"``: ``queries.norms`` when it is a :class:`QueryBlocks` (taken before
        low-rank compression), else recomputed from the blocks."""
        norms = getattr(queries, "norms", None)
        if norms is None:
            norms = sum(_block_sq_norms(queries[n]) for n in self.module_names).sqrt()
        return norms.detach().to("cpu", torch.float64)

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        """Pairwise influence ``(n_query, n_train)`` with a per-module split; positive = proponent.

        With ``config.normalize == "cosine"``, divided by ``||q|| * ||g_m||`` (see
        :meth:`scores_from_gradients`): with the identity strategy, the gradient cosine similarity.
        Raises :class:`~wherefrom.core.data.DataError` before any pass for an empty ``queries`` or
        ``train``, an invalid row or an id repeated within one of them.
        """
        queries, train = checked_rows(queries, "query rows"), checked_rows(train, "training rows")
        queries, train = self.encoded(queries), self.encoded(train)  # every row checked before any pass
        self.check_scoring_memory(len(queries), len(train))
        query_ids, pre = self.preconditioned_queries(queries)
        return self.scores_from_gradients(query_ids, pre, self.train_gradient_stream(train))

    def self_influence(self, train: Sequence[Record]) -> tuple[list[str], torch.Tensor]:
        """``grad L(z)^T (G + lambda I)^-1 grad L(z)`` for each training row, ``(n,)``; with
        ``normalize="cosine"`` divided by ``||(G + lambda I)^-1 grad L(z)|| ||grad L(z)||`` like
        :meth:`scores`. Raises :class:`~wherefrom.core.data.DataError` for no rows, an invalid row or a
        repeated id. It equals the diagonal of ``scores(train, train)`` when ``query_rank=None`` and
        either ``reduction="sum"`` or ``normalize="cosine"`` (scale-free); otherwise it warns: with
        ``reduction="mean"`` the query side of :meth:`scores` is still ``f = log p`` summed over the
        completion (the diagonal is the row's completion length times this value), and ``query_rank``
        truncates only :meth:`scores`' queries.
        """
        if self.config.reduction != "sum" and self.config.normalize is None:
            warnings.warn(
                f"self_influence with reduction={self.config.reduction!r} is grad L^T (G + lambda I)^-1 grad L with the "
                "mean loss on both sides; the diagonal of scores(train, train) uses f = log p (a sum) on the query side, "
                "so it is the row's completion length times this value",
                stacklevel=2,
            )
        if self.config.query_rank is not None:
            warnings.warn(
                f"self_influence uses full-rank preconditioned gradients; scores() truncates queries to "
                f"query_rank={self.config.query_rank}, so its diagonal differs by that truncation",
                stacklevel=2,
            )
        train = checked_rows(train, "training rows")
        self.curvature.check_fitted()
        ids, values = [], []
        for batch_ids, grads in self.gradients(train, description="self-influence"):
            pre = self.curvature.precondition(grads)
            ids += batch_ids
            value = sum((pre[n] * grads[n]).flatten(1).double().sum(1) for n in self.module_names).cpu()
            if self.config.normalize == "cosine":
                pre_norms = sum(_block_sq_norms(pre[n]) for n in self.module_names).sqrt().cpu()
                train_sq = sum(_block_sq_norms(grads[n]) for n in self.module_names).cpu()
                value = value / cosine_denominator(pre_norms, train_sq.sqrt()).diagonal()
            values.append(value.to(grads[self.module_names[0]].dtype))
        return ids, torch.cat(values)

    def token_scores(
        self, queries: Sequence[Record], train: Sequence[Record]
    ) -> tuple[list[str], list[tuple[str, list[int], torch.Tensor]]]:
        """Per-token split of the scores of ``train`` rows (the training side): ``[(train_id, input_ids, (n_query, T))]``.

        Token ``t`` gets ``sum_modules g_t^T Q a_t`` (Grosse et al. 2023, section 5.3.2), with ``Q`` the
        preconditioned query; the tokens of a row sum to its total score, also with ``query_rank`` and with
        ``normalize="cosine"`` (each token divided by the row's ``||q|| * ||g_m||``).
        Raises :class:`~wherefrom.core.data.DataError` before any pass as :meth:`scores` does.
        """
        queries, train = checked_rows(queries, "query rows"), checked_rows(train, "training rows")
        encoded = self.encoded(train)
        query_ids, pre = self.preconditioned_queries(self.encoded(queries))

        def score(factors: dict[str, Any], width: int, _start: int) -> torch.Tensor:
            per_token = summed_token_scores(pre, factors, self.module_names, width)
            if self.config.normalize == "cosine":
                train_norms = _sq_norms({n: f.dense() for n, f in factors.items()}).sqrt()
                per_token = per_token / cosine_denominator(pre.norms, train_norms)[:, :, None].to(per_token)
            return per_token

        return query_ids, _per_token_rows(encoded, self.token_factor_stream(encoded, description="token scores"), score)

    def query_token_scores(
        self, queries: Sequence[Record], train: Sequence[Record]
    ) -> tuple[list[str], list[tuple[str, list[int], torch.Tensor]]]:
        """Per-token split on the query side: ``(train_ids, [(query_id, input_ids, (n_train, T))])``.

        The query gradient is ``q = sum_t g_t a_t^T`` over the query's tokens, so with the symmetric
        preconditioner ``P = (G + lambda I)^-1`` the score ``q^T P grad L(z_m)`` splits into query token
        ``t``'s part ``sum_modules g_t^T [P grad L(z_m)] a_t``; the tokens of a query sum to its
        full-rank score (``query_rank`` is not applied: the preconditioner acts on the training side;
        iterative solvers such as ``cg`` agree up to their tolerance). Under ``normalize="cosine"`` each
        part is divided by ``||P q|| * ||grad L(z_m)||``. Holds every training row's preconditioned
        gradient in memory: meant for a few rows (e.g. a query's top proponents).
        """
        encoded = self.encoded(checked_rows(queries, "query rows"))  # before any pass
        self.curvature.check_fitted()
        train_ids, blocks, train_sq = [], [], []
        for ids, grads in self.gradients(train, description="train gradients"):
            train_ids += ids
            train_sq.append(_sq_norms(grads))
            blocks.append(self.curvature.precondition(grads))
        preconditioned = {n: torch.cat([b.pop(n) for b in blocks]) for n in self.module_names}
        cosine = None
        if self.config.normalize == "cosine":
            cosine = cosine_denominator(self.preconditioned_queries(encoded)[1].norms, torch.cat(train_sq).sqrt())

        def score(factors: dict[str, Any], width: int, start: int) -> torch.Tensor:
            per_token = summed_token_scores(preconditioned, factors, self.module_names, width)  # (n_train, b, T)
            if cosine is not None:
                per_token = per_token / cosine[start : start + per_token.shape[1]].T[:, :, None].to(per_token)
            return per_token

        stream = self.token_factor_stream(encoded, self.query_loss_fn(), "query token scores")
        return train_ids, _per_token_rows(encoded, stream, score)
