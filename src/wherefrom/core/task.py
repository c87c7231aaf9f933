"""The training loss L(z) and the query measurement f(z_q).

Conventions (see README, "Sign and scale"):

* ``labels`` are aligned with ``input_ids`` (Hugging Face convention): ``labels[b, t]`` is the
  token at position ``t`` or ``-100`` where no loss is taken (prompt and padding). Logits at
  position ``t`` predict the token at ``t + 1``; the shift happens here.
* The training loss of one example is the **sum** over its completion tokens of the token
  cross-entropy (nats), as Grosse et al. (2023) need; ``reduction="mean"`` divides by the number of
  completion tokens instead.
* The query measurement is ``f(z) = log p(completion | prompt) = -L_sum(z)``, over every labelled
  token: the completion and the EOS (or chat end-of-turn marker) that
  :func:`wherefrom.core.encoding.encode_records` appends, so ``f`` asks "why this answer, and then
  stop". ``LanguageModelingTask(query_without_eos=True)`` leaves out each row's last labelled token
  (that EOS): "why these tokens", for a completion that is the start of a longer answer.
* The output layer runs at the positions that predict a labelled token only, where the model allows it
  (:func:`labelled_predictions`); the losses are those of the full logits, to float round-off.
* With ``sample=True`` the target tokens are drawn from the model's own predictive distribution
  (true Fisher); otherwise the data's tokens are used (empirical Fisher / plain loss). Given
  per-row ``seeds`` (:func:`example_seeds`: the seed, the example's tokens and how many times it was
  drawn before), each example draws from its own generator, so the draws do not depend on the batch
  size, the batch composition or the padding.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Reduction = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
"""The training-loss reductions over completion tokens (``--reduction``)."""


class UnmeasuredQuery(ValueError):
    """A query row of a batch (``row``: its index there) with no token left to measure once its last labelled token
    is left out (``query_without_eos``): its measurement would be 0 and its scores all 0. The caller names the row
    (:meth:`wherefrom.engine.api.Attributor.token_factor_stream`)."""

    def __init__(self, row: int):
        super().__init__(
            "no token of the query is left to measure once its last labelled token (the appended EOS, where there "
            "is one) is left out (query_without_eos): it was the only one predicted (an empty prompt with no BOS "
            "makes the first completion token context only); give the query a prompt, or measure its last token too "
            "(query_without_eos off)"
        )
        self.row = row


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of a call of ``model`` on ``batch`` (:func:`wherefrom.core.encoding.collate`):
    ``input_ids`` and ``attention_mask`` ``(B, T)``, and, when a row is left-padded (``pad_left``: attention 0 at
    its first position) and the model's ``forward`` takes them (:func:`base_model`'s class: a ``position_ids``
    parameter or ``**kwargs``), ``position_ids`` ``(B, T)`` counted from each row's first real token (0 on its
    padding), the rule of ``transformers``' ``generate``. Without them a model with absolute positions (GPT-2)
    read a left-padded row's tokens at positions shifted by its padding: its scores changed with ``max_length``,
    and matched no unpadded pass. Right-padded batches get no ``position_ids`` (the model's own ``0 .. T-1`` are
    those); a model whose ``forward`` takes none places left-padded rows as it does itself."""
    mask = batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if mask.numel() and bool((mask[:, 0] == 0).any()) and _takes_positions(type(base_model(model))):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return inputs


@functools.cache
def _takes_positions(model_type: type) -> bool:
    """Whether ``model_type.forward`` takes ``position_ids`` (by name, or through ``**kwargs``)."""
    parameters = inspect.signature(model_type.forward).parameters.values()
    return any(p.name == "position_ids" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for logits ``[:, :-1]``: ``labels[:, 1:]``, shape ``(B, T-1)``."""
    return labels[:, 1:]


def example_seeds(batch: dict[str, torch.Tensor], seed: int, repeats: Sequence[int] | None = None) -> list[int]:
    """One 63-bit seed per row of ``batch``: a BLAKE2b hash of ``seed``, ``repeats[row]`` (the index of
    this draw for the example, default 0: a second pass over the data draws afresh with 1) and the
    row's attended ``input_ids`` and ``labels`` (padding excluded); nothing else enters."""
    mask = batch["attention_mask"].bool().cpu()
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    seeds = []
    for row in range(ids.shape[0]):
        repeat = 0 if repeats is None else int(repeats[row])
        digest = hashlib.blake2b(
            int(seed).to_bytes(8, "little", signed=True) + repeat.to_bytes(8, "little"), digest_size=8
        )
        digest.update(ids[row][mask[row]].to(torch.int64).numpy().tobytes())
        digest.update(labels[row][mask[row]].to(torch.int64).numpy().tobytes())
        seeds.append(int.from_bytes(digest.digest(), "little") >> 1)
    return seeds


class DrawCounts:
    """How many times each example has drawn sampled targets, keyed by its first-draw seed
    (:func:`example_seeds`); the draw index of the next pass enters the example's seed, so a second pass
    over the data draws afresh. ``get_state`` / ``set_state`` (an ``(n, 2)`` int64 tensor of ``(key,
    count)`` rows) let a resumable fit persist the counts with a finished stage."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def next(self, keys: Sequence[int]) -> list[int]:
        """The draw index of each key (0 the first time), counting this draw."""
        repeats = []
        for key in keys:
            repeats.append(self.counts.get(key, 0))
            self.counts[key] = repeats[-1] + 1
        return repeats

    def get_state(self) -> torch.Tensor:
        return torch.tensor(sorted(self.counts.items()), dtype=torch.int64).reshape(-1, 2)

    def set_state(self, state: torch.Tensor) -> None:
        """Take the counts of ``state``; a key listed more than once (the states of several processes,
        gathered) keeps its largest count, the latest, since counts only grow."""
        self.counts = {}
        for key, count in state.tolist():
            self.counts[int(key)] = max(int(count), self.counts.get(int(key), 0))


def _draw_per_example(probs: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """``(B, T-1)`` tokens drawn from ``probs`` ``(B, T-1, V)`` at the ``mask`` positions of each row,
    by inverse CDF from uniforms of the row's own CPU generator (position order; 0 elsewhere)."""
    drawn = torch.zeros(mask.shape, dtype=torch.long, device=probs.device)
    for row, seed in enumerate(seeds):
        positions = mask[row].nonzero().flatten()
        if positions.numel() == 0:
            continue
        uniforms = torch.rand(positions.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        cdf = probs[row, positions].double().cumsum(-1)
        picks = torch.searchsorted(cdf, (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        drawn[row, positions] = picks.clamp_max(probs.shape[-1] - 1)
    return drawn


def prediction_losses(
    pred: torch.Tensor,
    targets: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits ``pred`` ``(B, K, V)`` against the tokens they predict, ``targets``
    ``(B, K)`` (``-100`` where no loss is taken): shape ``(B, K)``, in nats, zero at ``-100``; taken in
    float32 or wider. With ``sample=True`` each unmasked target is replaced by a token drawn from
    ``softmax(pred)`` (detached), which gives true-Fisher gradients: from one generator per row when
    ``seeds`` (``B`` ints, :func:`example_seeds`) is given, drawn at the row's unmasked positions in their
    order, so a row's draws depend neither on its batch nor on the masked positions around them; else from
    ``generator`` (or the global RNG) at every position of ``pred``, so those draws depend on ``K``."""
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # half precision -> float32
    mask = targets != IGNORE_INDEX
    if sample:
        with torch.no_grad():
            probs = torch.softmax(pred.detach(), dim=-1)
            if seeds is not None:
                drawn = _draw_per_example(probs, mask, seeds)
            else:
                drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            targets = torch.where(mask, drawn.view_as(targets), targets)
    safe = targets.masked_fill(~mask, 0)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), safe.reshape(-1), reduction="none")
    return nll.view_as(targets) * mask


def token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy, shape ``(B, T-1)``, zero where the target is ``-100``: the
    :func:`prediction_losses` of ``logits[:, :-1]`` (``logits``: ``(B, T, V)``) against
    ``labels[:, 1:]`` (``labels``: ``(B, T)``); ``sample``, ``generator``, ``seeds`` as there."""
    return prediction_losses(logits[:, :-1, :], shifted_targets(labels), sample, generator, seeds)


@functools.cache
def _keeps_logits(model_type: type) -> bool:
    """Whether models of ``model_type`` compute their output layer at given positions only: a model class of
    the ``transformers`` library whose ``forward`` takes ``logits_to_keep``, in a version that accepts a
    ``(B, K)`` tensor of positions there (``transformers.modeling_utils.slice_logits_to_keep``)."""
    import transformers.modeling_utils

    return (
        hasattr(transformers.modeling_utils, "slice_logits_to_keep")
        and model_type.__module__.startswith("transformers.models.")
        and "logits_to_keep" in inspect.signature(model_type.forward).parameters
    )


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or its base model when it wraps one (a PEFT adapter's ``get_base_model``): the class that
    decides which arguments its ``forward`` takes."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def labelled_predictions(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor, every_position: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits at the positions that predict a labelled token, and those tokens: ``(B, K, V)``
    and ``(B, K)``, ``K`` the most labelled tokens in any row (``labels`` ``(B, T)``: ``-100`` where no loss
    is taken); each row's positions in order, then ``-100`` targets to fill it up to ``K``.

    A model of the ``transformers`` library (directly or under a PEFT adapter) whose ``forward`` takes
    ``logits_to_keep`` computes its output layer at these positions only: for a completion of a few tokens
    after a longer prompt, most of the vocabulary projection, its softmax and its backward pass are skipped
    (the losses are those of the full logits, to float round-off). Other models, PEFT prompt-learning adapters
    (their virtual tokens shift the positions) and ``every_position=True`` (the output layer is a tracked
    module, whose token statistics need every position) give full logits, from which the positions are taken.
    ``RuntimeError`` if a model answers ``logits_to_keep`` with another shape; ``ValueError`` if its full logits
    do not have one position per input token (prompt tuning's virtual tokens)."""
    targets = shifted_targets(labels)
    mask = targets != IGNORE_INDEX
    counts = mask.sum(dim=1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    # per row: labelled positions first, in order (a stable sort of "not labelled")
    positions = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    filled = torch.arange(width, device=labels.device) < counts.unsqueeze(1)
    positions = torch.where(filled, positions, 0)
    kept = torch.where(filled, targets.gather(1, positions), IGNORE_INDEX)
    inputs = model_inputs(model, batch)
    base = base_model(model)
    peft = getattr(model, "active_peft_config", None)
    if not every_position and not getattr(peft, "is_prompt_learning", False) and _keeps_logits(type(base)):
        logits = model(**inputs, logits_to_keep=positions).logits
        if logits.shape[:2] != positions.shape:
            raise RuntimeError(
                f"{type(base).__name__} returned logits of shape {tuple(logits.shape)} for logits_to_keep of shape "
                f"{tuple(positions.shape)}; expected {tuple(positions.shape)} + (vocabulary,)"
            )
        return logits, kept
    logits = model(**inputs).logits
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"{type(base).__name__} returned logits for {logits.shape[1]} positions of {labels.shape[1]} input tokens "
            "(an adapter that adds virtual tokens, such as PEFT prompt tuning?): the loss needs one per token"
        )
    logits = logits[:, :-1, :]
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])), kept


def completion_predictions(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at every position that predicts a labelled token of ``batch`` (``labels`` ``-100`` elsewhere), over
    the batch in row order: ``(N, V)``, their target ids ``(N,)`` and the batch row of each ``(N,)``; computed by
    :func:`labelled_predictions` (the output layer at these positions only where the model allows)."""
    logits, targets = labelled_predictions(model, batch, batch["labels"])
    keep = targets != IGNORE_INDEX
    return logits[keep], targets[keep], keep.nonzero()[:, 0]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "sum") -> torch.Tensor:
    """Training loss of each example, shape ``(B,)``, in nats (sum or mean over completion tokens) of the
    full-sequence ``logits`` ``(B, L, V)`` against ``labels`` ``(B, L)`` (``-100`` outside the completion);
    the empirical (observed-label) loss of :func:`token_losses`."""
    return reduced(token_losses(logits, labels), shifted_targets(labels), reduction)


def reduced(losses: torch.Tensor, targets: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Per-example loss ``(B,)`` from the per-position ``losses`` ``(B, K)`` of ``targets`` ``(B, K)``: their
    sum, or with ``"mean"`` their sum over the number of targets that are not ``-100`` (at least 1).
    ``ValueError`` for another ``reduction``."""
    total = losses.sum(dim=1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (targets != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


@dataclass(frozen=True)
class LanguageModelingTask:
    """Default task: summed completion-token loss for training rows, log-likelihood for queries.

    A user task may subclass this and override :meth:`train_loss` / :meth:`measurement`; both must
    return one value per example, shape ``(B,)``.
    """

    reduction: Reduction = "sum"
    query_without_eos: bool = False
    every_position: bool = False
    """Compute the logits of every position (:func:`labelled_predictions`): the :class:`Attributor
    <wherefrom.engine.api.Attributor>` sets it when the output layer is a tracked module."""

    def train_loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        sample: bool = False,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """L(z) per example, ``(B,)``; ``sample=True`` draws targets from the model (true Fisher),
        per row from ``seeds`` (``B`` ints, :func:`example_seeds`: independent of batching) when given,
        else from ``generator``."""
        pred, targets = labelled_predictions(model, batch, batch["labels"], self.every_position)
        return reduced(prediction_losses(pred, targets, sample, generator, seeds), targets, self.reduction)

    def measurement(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """f(z_q) = log p(completion | prompt) per example, ``(B,)``, in nats; equals ``-L_sum``. With
        ``query_without_eos`` each row's last labelled token (the appended EOS) is left out; :class:`UnmeasuredQuery`
        for a row left with no predicted token."""
        labels = batch["labels"]
        if self.query_without_eos:
            labels = without_last_label(labels)
            before, after = ((shifted_targets(x) != IGNORE_INDEX).sum(dim=1) for x in (batch["labels"], labels))
            emptied = ((before > 0) & (after == 0)).nonzero()
            if len(emptied):
                raise UnmeasuredQuery(int(emptied[0]))
        return -prediction_losses(*labelled_predictions(model, batch, labels, self.every_position)).sum(dim=1)


def without_last_label(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` ``(B, T)`` with each row's last labelled position (``!= -100``) set to ``-100``; a row
    with one labelled token or none is returned unchanged (its completion would be empty)."""
    labelled = labels != IGNORE_INDEX
    last = torch.where(labelled, torch.arange(labels.shape[1], device=labels.device), -1).amax(dim=1)
    keep = labelled.sum(dim=1) > 1
    out = labels.clone()
    rows = keep.nonzero().flatten()
    out[rows, last[rows]] = IGNORE_INDEX
    return out
