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

from wherefrom.core.tracking import TrackedModule, capturing

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""``loss_fn(model, batch) -> (B,)``: the per-example quantity whose gradient is taken."""


@dataclass
class TokenFactors:
    """Inputs ``a`` ``(B, T, in')`` and output gradients ``g`` ``(B, T, out)`` of one module.

    ``T`` counts every call of the module (concatenated); padding positions are zero in both.
    """

    a: torch.Tensor
    g: torch.Tensor
    token_mask: torch.Tensor
    """``(B, T)`` bool: real (non-padding) token positions."""

    def dense(self) -> torch.Tensor:
        """Per-example gradient ``sum_t g_t a_t^T``, shape ``(B, out, in')``."""
        return torch.einsum("bto,bti->boi", self.g, self.a)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1])


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
    mask = batch.get("attention_mask")
    with torch.enable_grad(), capturing(modules, model) as capture:
        losses = loss_fn(model, batch)
        calls = capture.output_gradients(losses.sum())
    factors: dict[str, TokenFactors] = {}
    for m in modules:
        a_parts, g_parts, mask_parts = [], [], []
        for a, g in calls.pop(m.name):  # pop: each module's raw captures are freed once converted
            dtype = torch.promote_types(a.dtype, torch.float32)  # accumulate half precision in float32
            a, g = _as_3d(a).to(dtype), _as_3d(g).to(dtype)
            keep = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
            if mask is not None and a.shape[1] == mask.shape[1]:
                keep = mask.bool()
                a, g = a * keep.unsqueeze(-1), g * keep.unsqueeze(-1)
            a_parts.append(a)
            g_parts.append(g)
            mask_parts.append(keep)
        join = (lambda parts: parts[0]) if len(a_parts) == 1 else (lambda parts: torch.cat(parts, dim=1))
        factors[m.name] = TokenFactors(join(a_parts), join(g_parts), join(mask_parts))
    return factors, losses.detach()


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
    blocks add up to ``queries @ rows.T``)."""
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
