"""Per-example gradients of tracked modules, in factored (per-token) and dense form.

For a module with input ``a_t`` and output gradient ``g_t`` at token ``t``, the per-example weight
gradient is ``G = sum_t g_t a_t^T``, shape ``(out, in + has_bias)`` (Linear orientation, see
:mod:`wherefrom.core.tracking`). One forward and one backward pass serve a whole batch: the objective
is the *sum* of per-example losses, so each example's ``g`` only carries its own loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wherefrom.core.task import base_model
from wherefrom.core.tracking import TrackedModule, capturing

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""``loss_fn(model, batch) -> (B,)``: the per-example quantity whose gradient is taken."""


@dataclass
class TokenFactors:
    """Inputs ``a`` ``(B, T, in')`` and output gradients ``g`` ``(B, T, out)`` of one module.

    ``T`` counts every call of the module (concatenated); padding positions are zero in both. ``a`` may be one
    tensor for several modules (fed the same input) and losses: never modify it in place.
    """

    a: torch.Tensor
    g: torch.Tensor
    token_mask: torch.Tensor
    """``(B, T)`` bool: real (non-padding) token positions."""
    calls: tuple[int, ...] = ()
    """The positions of each call of the module along ``T``, in call order (they sum to ``T``); ``()``: one call."""

    def per_position(self, values: torch.Tensor) -> torch.Tensor | None:
        """``values`` ``(..., T)`` (a number per captured position) summed over the module's calls per position:
        ``(..., T_1)``, or ``None`` when its calls ran on different numbers of positions (no position of one call
        is a position of another)."""
        if len(set(self.calls)) > 1:
            return None
        calls = len(self.calls) or 1
        return values.reshape(*values.shape[:-1], calls, -1).sum(-2) if calls > 1 else values

    def dense(self) -> torch.Tensor:
        """Per-example gradient ``sum_t g_t a_t^T``, shape ``(B, out, in')``."""
        return torch.einsum("bto,bti->boi", self.g, self.a)


def _as_3d(x: torch.Tensor, shape: tuple[int, int] | None, name: str) -> torch.Tensor:
    """A tracked module's input or output gradient ``x`` as ``(B, T', d)`` for a batch of ``shape`` ``(B, T)``:
    ``(B * T, d)``, the positions folded into the rows (OPT's ``fc1``/``fc2`` see the hidden states so), is
    unfolded to ``(B, T, d)`` (it was taken for ``B * T`` rows of one position: the scores had ``B * T`` rows,
    silently, or the batch failed on unequal sizes); ``(B, d)`` is one position per row (a head on a pooled
    state); ``(B, ..., d)`` flattens the middle; for one row (``B = 1``) any ``(n, d)`` is that row's ``n``
    positions (an expert of a mixture that saw ``n`` of its tokens). ``ValueError`` naming module ``name`` when
    the leading size is none of these. Assumed, and not checkable: a ``(B, d)`` input holds one position of each
    row, in row order (an expert of a mixture that receives exactly ``B`` tokens of a larger batch is credited to
    the wrong rows: exclude such modules, or score one row per batch). A batch without token tensors (``shape``
    ``None``: a model of other inputs) takes ``x``'s leading size for ``B``."""
    rows, positions = shape if shape is not None else (x.shape[0], 1)
    if x.dim() == 2 and x.shape[0] == rows:
        return x.unsqueeze(1)
    if x.dim() == 2 and (x.shape[0] == rows * positions or rows == 1):
        return x.reshape(rows, -1, x.shape[-1])
    if x.dim() >= 3 and x.shape[0] == rows:
        return x if x.dim() == 3 else x.reshape(rows, -1, x.shape[-1])
    raise ValueError(
        f"module {name!r} was called on inputs of leading size {x.shape[0]} ({x.dim()}-D), neither the batch's "
        f"{rows} rows nor its {rows} x {positions} positions: its per-example gradients cannot be told apart "
        "(e.g. an expert of a mixture, which sees some of the tokens); leave it out of the tracked modules "
        "(exclude), or score one row per batch (batch_size=1)"
    )


def token_factors(
    model: nn.Module,
    modules: Sequence[TrackedModule],
    batch: Batch,
    loss_fn: LossFn,
) -> tuple[dict[str, TokenFactors], torch.Tensor]:
    """Run ``loss_fn`` on ``batch`` and return per-module :class:`TokenFactors` and the losses ``(B,)``.

    ``g`` is the gradient of ``sum_b loss_fn(model, batch)[b]``. Positions where
    ``batch["attention_mask"] == 0`` are zeroed in ``a`` and ``g`` (they carry no loss, and must not
    enter covariance statistics).
    """
    return shared_token_factors(model, modules, batch, [loss_fn])[0]


def shared_token_factors(
    model: nn.Module,
    modules: Sequence[TrackedModule],
    batch: Batch,
    loss_fns: Sequence[LossFn],
) -> list[tuple[dict[str, TokenFactors], torch.Tensor]]:
    """:func:`token_factors` of each loss in ``loss_fns`` on ``batch`` from ONE forward pass: one backward
    pass per loss (the graph is kept between them), the inputs ``a`` shared by all results (and one tensor for
    the modules fed the same input tensor).

    With several losses, each must run ``model`` on the same arguments (the losses of one task do): the
    model they are handed (:class:`ForwardOnce`) returns the first call's output to the later calls;
    ``ValueError`` when a loss calls it with other arguments. The factors equal those of separate :func:`token_factors` calls (the same
    forward computation, the same gradients), with one forward pass instead of ``len(loss_fns)``.
    """
    mask = batch.get("attention_mask")
    tokens = mask if mask is not None else batch.get("input_ids")
    shape = tuple(tokens.shape[:2]) if tokens is not None and tokens.dim() >= 2 else None
    forward = model if len(loss_fns) == 1 else ForwardOnce(model)
    losses, calls = [], []
    with torch.enable_grad(), capturing(modules, model) as capture:
        for k, loss_fn in enumerate(loss_fns):  # one loss at a time: its own part of the graph is freed after it
            loss = loss_fn(forward, batch)
            calls.append(capture.output_gradients(loss.sum(), retain_graph=k < len(loss_fns) - 1))
            losses.append(loss.detach())
            del loss
    results: list[dict[str, TokenFactors]] = [{} for _ in loss_fns]
    # modules fed the same input tensors (unbiased q/k/v projections, LoRA's lora_A of q and v) share one joined
    # ``a``; the keys are the raw captures' memory, which no other tensor takes while ``calls`` holds them
    joined: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in modules:
        first = calls[0][m.name]
        # half precision accumulates in float32; each call's a and g in the dtype of its input
        dtypes = [torch.promote_types(a.dtype, torch.float32) for a, _g in first]
        unfolded = [_as_3d(a, shape, m.name) for a, _g in first]
        keeps = [_keep(a, mask) for a in unfolded]
        inputs = tuple(_memory(a) for a, _g in first)
        if inputs not in joined:
            joined[inputs] = (
                _join([_masked(a, keep, dtype) for a, keep, dtype in zip(unfolded, keeps, dtypes)]),
                _join(
                    [
                        torch.ones(a.shape[:2], dtype=torch.bool, device=a.device) if keep is None else keep
                        for a, keep in zip(unfolded, keeps)
                    ]
                ),
            )
        joined_a, joined_mask = joined[inputs]
        lengths = tuple(a.shape[1] for a in unfolded)
        for k, per_loss in enumerate(calls):
            # pop: each module's raw captures are freed once converted
            gradients = [
                _masked(_as_3d(g, shape, m.name), keep, dtype)
                for (_a, g), keep, dtype in zip(per_loss.pop(m.name), keeps, dtypes)
            ]
            results[k][m.name] = TokenFactors(joined_a, _join(gradients), joined_mask, lengths)
    return list(zip(results, losses))


class ForwardOnce:
    """``model`` called at most once: a later call with the same arguments (the same tensors, or tensors of
    equal values) gets the first call's output, so several losses of one batch share its forward pass and
    autograd graph. Other attributes are the model's."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.arguments: tuple | None = None
        self.output = None

    def __call__(self, *args, **kwargs):
        arguments = (args, kwargs)
        if self.arguments is None:
            self.arguments, self.output = arguments, self.model(*args, **kwargs)
        elif not _same_arguments(self.arguments, arguments):
            raise ValueError(
                "the losses of one shared pass must run the model on the same arguments; this loss called it "
                "with others (compute them in separate passes)"
            )
        return self.output

    def get_base_model(self) -> nn.Module:
        """:func:`wherefrom.core.task.base_model` of the wrapped model."""
        return base_model(self.model)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def _same_arguments(first: tuple, second: tuple) -> bool:
    (args1, kwargs1), (args2, kwargs2) = first, second
    if len(args1) != len(args2) or kwargs1.keys() != kwargs2.keys():
        return False
    pairs = [*zip(args1, args2), *((kwargs1[k], kwargs2[k]) for k in kwargs1)]
    return all(_same_tensor(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


def _same_tensor(x: torch.Tensor, y: object) -> bool:
    """``y`` is ``x``, or a tensor of the same values on the same device (the positions each loss of a batch
    derives from its labels, :func:`wherefrom.core.task.labelled_predictions`); tensors that require grad only
    by identity (equal values in another graph node are another input)."""
    return x is y or (
        isinstance(y, torch.Tensor)
        and not x.requires_grad
        and not y.requires_grad
        and x.shape == y.shape
        and x.dtype == y.dtype
        and x.device == y.device
        and torch.equal(x, y)
    )


def _memory(x: torch.Tensor) -> tuple:
    """Where ``x``'s values live (address, shape, strides, dtype, device): equal for two captures of one tensor
    while both are alive."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device


def _keep(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(B, T)`` bool mask of real tokens for a ``(B, T, d)`` capture, or ``None`` when ``mask`` does not
    apply to it (no attention mask, or another sequence length)."""
    return mask.bool() if mask is not None and x.shape[1] == mask.shape[1] else None


def _masked(x: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``(B, T, d)`` in ``dtype``, zero where ``keep`` is false."""
    x = x.to(dtype)
    return x if keep is None else x * keep.unsqueeze(-1)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def per_example_gradients(
    model: nn.Module,
    modules: Sequence[TrackedModule],
    batch: Batch,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """Dense per-example gradients ``{name: (B, out, in')}`` of ``loss_fn`` for one batch."""
    factors, _ = token_factors(model, modules, batch, loss_fn)
    return {name: f.dense() for name, f in factors.items()}


def flatten_blocks(blocks: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """One row per example: the blocks ``{module: (b, ...)}`` of ``names`` flattened and concatenated in
    that order, ``(b, sum of block sizes)``; :func:`split_rows` undoes it."""
    return torch.cat([blocks[n].reshape(blocks[n].shape[0], -1) for n in names], dim=1)


def block_products(
    queries: torch.Tensor, rows: torch.Tensor, shapes: Sequence[tuple[str, Sequence[int]]]
) -> torch.Tensor:
    """``(n_blocks, q, n)``: for each block of the layout ``shapes`` (:func:`split_rows`), the inner products of
    the query rows' part ``(q, D)`` with the rows' part ``(n, D)``, summed over the block's whole shape (so the
    blocks add up to ``queries @ rows.T``). ``ValueError`` (:func:`split_rows`) when ``D`` is not the layout's
    total size."""
    query_blocks, row_blocks = split_rows(queries, shapes), split_rows(rows, shapes)
    return torch.stack([query_blocks[n].flatten(1) @ row_blocks[n].flatten(1).T for n, _ in shapes])


def split_rows(rows: torch.Tensor, shapes: Sequence[tuple[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """``{module: (b, *shape)}`` views of rows ``(b, D)`` laid out by :func:`flatten_blocks` in the order of
    ``shapes`` (``[(name, shape), ...]``); ``ValueError`` when ``D`` is not the shapes' total size."""
    sizes = [math.prod(shape) for _, shape in shapes]
    if rows.shape[1] != sum(sizes):
        raise ValueError(f"rows of length {rows.shape[1]} do not split into blocks of sizes {sizes}")
    parts = torch.split(rows, sizes, dim=1)
    return {name: part.reshape(rows.shape[0], *shape) for (name, shape), part in zip(shapes, parts)}
