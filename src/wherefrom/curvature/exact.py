"""Exact damped Gauss-Newton inverse, for models small enough to form the matrix.

The GGN of the summed token cross-entropy equals the true Fisher:
``G = mean_n sum_t sum_c p_{ntc} grad log p_{ntc} grad log p_{ntc}^T`` over completion positions
``t`` and every vocabulary entry ``c``. It is computed here with ``torch.func.jacrev`` on
``functional_call``, independently of the hook-based gradient code, so it can serve as ground truth
for every other strategy.

``curvature="fisher"`` forms instead ``F = mean_n g_n g_n^T`` of the per-example gradients of the fitting loss
(:meth:`ExactGGN.fit_blocks`): with ``fisher="empirical"`` the empirical Fisher, the exact reference of the
empirical-Fisher estimators (their ``fisher`` setting does not reach the GGN and the Hessian).

``blocks="module"`` keeps one dense block per tracked module (the structure K-FAC approximates);
``blocks="full"`` keeps the whole ``(P, P)`` matrix, cross-module terms included.
Damping per block (or for the full matrix): ``damping_factor x trace(G_block) / dim`` unless an
absolute ``damping`` is given.

Many processes (:mod:`wherefrom.core.distributed`): each process sums over its own rows; the float64
sums and the example count are added over processes before the division by the count.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacfwd, jacrev

from wherefrom.core.distributed import sum_counts, sum_over_ranks
from wherefrom.core.gradients import per_example_gradients
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.options import OptionSpec, from_signature
from wherefrom.core.task import IGNORE_INDEX, model_inputs, per_example_loss
from wherefrom.curvature.base import CURVATURE_KINDS, DAMPING_FACTOR, Curvature, CurvatureKind, DataShape

Blocks = Literal["module", "full"]
BLOCKS: tuple[str, ...] = typing.get_args(Blocks)
"""The exact curvature's blocks: one per tracked module (block diagonal) or one over every tracked parameter (the whole
GGN; ``--exact-blocks``)."""


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Use eager attention inside (SDPA has no vmap batching rule for its backward: ~10x slower)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous is not None:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if previous is not None:
            config._attn_implementation = previous


class ExactGGN(Curvature):
    """Dense damped GGN (or true Hessian) inverse; refuses, with the byte count, when too large.

    ``curvature="hessian"`` forms the Hessian of the mean summed-completion-token training loss
    (data labels) with ``torch.func.jacrev`` twice instead of the GGN. It may be indefinite away from a
    minimum; the damping is then ``damping_factor x trace / dim`` as well (refused, naming the block,
    when that trace is negative: pass an absolute damping), and the inverse can have negative
    directions (reported in ``info["negative_eigenvalues"]``). A damped block that is singular is
    refused by name. A zero block under the relative damping preconditions to 0 (:mod:`.base`).
    """

    name = "exact"
    distributes = True

    def __init__(
        self,
        damping: float | None = None,
        damping_factor: float = DAMPING_FACTOR,
        blocks: Blocks = "module",
        curvature: CurvatureKind = "ggn",
    ):
        super().__init__(damping, damping_factor)
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {list(BLOCKS)}, got {blocks!r}")
        if curvature not in CURVATURE_KINDS:
            raise ValueError(f"curvature must be one of {list(CURVATURE_KINDS)}, got {curvature!r}")
        self.blocks = blocks
        self.curvature = curvature

    option_specs = from_signature(
        __init__,
        OptionSpec("blocks", help="module: one dense block per tracked module; full: all tracked parameters jointly"),
        OptionSpec(
            "curvature",
            help="ggn: Gauss-Newton matrix; hessian: the true Hessian (may be indefinite); fisher: mean of g g^T over "
            "the fitting loss's per-example gradients (the empirical Fisher with fisher=empirical)",
        ),
    )

    def _blocks(self, modules) -> dict[str, int]:
        """``{block: size}``: one per module, or ``{"full": P}``."""
        sizes = {m.name: m.shape[0] * m.shape[1] for m in modules}
        return {"full": sum(sizes.values())} if self.blocks == "full" else sizes

    def state_bytes(self, modules, data: DataShape) -> int:
        """Per block of size ``s``: the float32 matrix, the float64 inverse and a float64 damping."""
        return sum(nbytes(s, s) + nbytes(s, s, dtype=torch.float64) + 8 for s in self._blocks(modules).values())

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        """The whole ``(P, P)`` float64 matrix is accumulated whatever ``blocks`` is (the blocks are cut
        from it), plus each block's saved matrix and inverse, the inversion workspace of the largest
        block, and one example's ``(t, V, P)`` Jacobian (or one batch's ``(P, P)`` Hessian)."""
        total = sum(m.shape[0] * m.shape[1] for m in modules)
        needs = {
            f"dense {self.curvature.upper()} over {total:,} parameters (P x P, float64)": nbytes(
                total, total, dtype=torch.float64
            )
        }
        for name, size in self._blocks(modules).items():
            needs[f"{name}: saved matrix (float32) and inverse (float64)"] = (
                nbytes(size, size) + nbytes(size, size, dtype=torch.float64) + 8
            )
        largest = max(self._blocks(modules).values(), default=0)
        needs["inversion workspace (largest block, float64)"] = 3 * nbytes(largest, largest, dtype=torch.float64)
        if self.curvature == "hessian":
            needs["Hessian of one batch (torch.func)"] = nbytes(total, total)
        elif self.curvature == "fisher":
            needs["per-example gradients of one batch"] = data.dense_gradient_bytes(modules) + nbytes(
                data.max_batch, total, dtype=torch.float64
            )
        else:  # jac (t, V, P) in the parameters' dtype, its flattened copy and the float64 weighted rows
            needs["Jacobian of one example (t x V x P)"] = 2 * nbytes(
                data.max_labelled, data.vocabulary, total
            ) + nbytes(data.max_labelled, data.vocabulary, total, dtype=torch.float64)
        return needs

    def _fit(self, model, modules, batches, loss_fn, progress) -> None:
        if self.curvature == "fisher":  # the per-example gradients of loss_fn, as the diagonal strategy takes them
            self.fit_blocks(
                lambda: (
                    per_example_gradients(model, modules, batch, loss_fn)
                    for batch in progress(batches(), "exact Fisher")
                ),
                {m.name: m.shape for m in modules},
            )
            return
        total = sum(m.shape[0] * m.shape[1] for m in modules)
        params = {f"{m.name}.{suffix}": p for m in modules for suffix, p in zip(("weight", "bias"), m.parameters())}
        device = next(model.parameters()).device
        ggn = torch.zeros(total, total, dtype=torch.float64, device=device)

        def log_probs(p, input_ids, attention_mask, positions):
            """``(t, V)`` float64 next-token log-probabilities at the predicting ``positions``."""
            logits = functional_call(
                model,
                p,
                (),
                model_inputs(model, {"input_ids": input_ids[None], "attention_mask": attention_mask[None]}),
            ).logits
            return F.log_softmax(logits[0, positions].double(), dim=-1)

        with eager_attention(model):
            if self.curvature == "hessian":
                self._accumulate_hessian(model, modules, batches, progress, params, ggn)
            else:
                self._accumulate(modules, batches, progress, log_probs, params, ggn)
        sum_over_ranks({"ggn": ggn})
        self.info["examples"] = sum_counts({"examples": self.info["examples"]})["examples"]
        ggn /= max(self.info["examples"], 1)
        self._invert({m.name: m.shape for m in modules}, ggn)

    def fit_blocks(self, blocks, shapes) -> None:
        """``G = mean_n vec(G_n) vec(G_n)^T`` of the gradient blocks, per module (``blocks="module"``: only
        the diagonal blocks are accumulated) or jointly, in float64, then damped and inverted as the GGN.
        ``ValueError`` for ``curvature="hessian"`` (gradient blocks give no Hessian)."""
        if self.curvature == "hessian":
            raise ValueError("exact with curvature='hessian' needs the model: it cannot be fitted from gradient blocks")
        sizes = {name: out * inp for name, (out, inp) in shapes.items()}
        keys = ["full"] if self.blocks == "full" else list(sizes)
        size = {"full": sum(sizes.values()), **sizes}
        sums = {key: torch.zeros(size[key], size[key], dtype=torch.float64) for key in keys}
        count = 0
        for grads in blocks():
            rows = {name: grads[name].reshape(grads[name].shape[0], -1).double() for name in sizes}
            parts = {"full": torch.cat(list(rows.values()), dim=1)} if self.blocks == "full" else rows
            for key, flat in parts.items():
                sums[key] += (flat.T @ flat).cpu()
            count += next(iter(rows.values())).shape[0]
        sum_over_ranks(sums)
        count = sum_counts({"examples": count})["examples"]
        if count == 0:
            raise ValueError("cannot fit 'exact' from zero gradient rows")
        self.info["examples"] = count
        self._invert_blocks({key: total / count for key, total in sums.items()})

    def _accumulate_hessian(self, model, modules, batches, progress, params, hessian: torch.Tensor) -> None:
        """Add the Hessian of each batch's summed training loss, in the flat Linear-orientation layout."""
        sizes = [m.shape[0] * m.shape[1] for m in modules]
        flat0 = torch.cat(
            [
                m.from_param_layout(m.module.weight.detach(), m.module.bias.detach() if m.has_bias else None).flatten()
                for m in modules
            ]
        )

        def unflatten(flat: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {}
            for m, part in zip(modules, torch.split(flat, sizes)):
                for suffix, value in zip(("weight", "bias"), m.to_param_layout(part.reshape(m.shape))):
                    out[f"{m.name}.{suffix}"] = value
            return out

        examples = 0
        for batch in progress(batches(), "exact Hessian"):

            def loss(flat: torch.Tensor, batch: dict = batch) -> torch.Tensor:
                logits = functional_call(
                    model,
                    unflatten(flat),
                    (),
                    model_inputs(model, batch),
                ).logits
                return per_example_loss(logits.double(), batch["labels"], "sum").sum()

            with torch.no_grad():  # torch.func transforms still differentiate inside
                # reverse-over-reverse: some activations (SiLU) have no forward-mode rule for their backward
                hessian += jacrev(jacrev(loss))(flat0).to(hessian.dtype)  # in the model's own dtype
            examples += batch["input_ids"].shape[0]
        self.info["examples"] = examples

    def _accumulate(self, modules, batches, progress, log_probs, params, ggn: torch.Tensor) -> None:
        """Add ``sum_t sum_c p_c grad log p_c grad log p_c^T`` of every example to ``ggn``.

        The ``(t, V, P)`` Jacobian of the completion positions' log-probabilities is built in forward
        mode (``P`` tangents) when the tracked parameters are fewer than its ``t x V`` outputs, else in
        reverse mode (``t x V`` cotangents): the same matrix, whichever pass count is smaller.
        """
        examples = 0
        detached = {k: v.detach() for k, v in params.items()}
        forward, reverse = jacfwd(log_probs), jacrev(log_probs)
        for batch in progress(batches(), "exact GGN"):
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()  # position t predicts token t + 1
                if positions.numel() == 0:
                    examples += 1
                    continue
                with torch.no_grad():  # torch.func transforms still differentiate inside
                    probs = log_probs(detached, ids, mask, positions).exp()
                    jacobian = forward if ggn.shape[0] < probs.numel() else reverse
                    jac = jacobian(detached, ids, mask, positions)
                flat = torch.cat([self._layout(m, jac) for m in modules], dim=-1)  # (t, V, P)
                rows = (flat * probs.sqrt().unsqueeze(-1)).reshape(-1, ggn.shape[0])
                ggn += rows.T @ rows
                examples += 1
        self.info["examples"] = examples

    @staticmethod
    def _layout(module, jac: dict[str, torch.Tensor]) -> torch.Tensor:
        """Jacobian blocks of one module in Linear orientation, flattened: ``(T, V, out * in')``."""
        weight = jac[f"{module.name}.weight"]
        bias = jac.get(f"{module.name}.bias") if module.has_bias else None
        dense = module.from_param_layout(weight, bias)
        return dense.reshape(*dense.shape[:2], -1)

    def _invert(self, shapes: dict[str, tuple[int, int]], ggn: torch.Tensor) -> None:
        if self.blocks == "full":
            spans = {"full": (0, ggn.shape[0])}
        else:
            spans, start = {}, 0
            for name, (out, inp) in shapes.items():
                spans[name] = (start, start + out * inp)
                start += out * inp
        self._invert_blocks({key: ggn[lo:hi, lo:hi] for key, (lo, hi) in spans.items()})

    def _invert_blocks(self, blocks: dict[str, torch.Tensor]) -> None:
        """Damp and invert each dense ``block`` (``lambda = damping_factor x trace / dim`` unless absolute),
        keeping the block, its inverse and its damping; the damping and mean eigenvalue also in ``info``."""
        for key, block in blocks.items():
            mean = (torch.trace(block) / block.shape[0]).item()
            damping = self.damping_for(mean, key)
            self.info.setdefault("damping", {})[key] = damping
            self.info.setdefault("mean_eigenvalue", {})[key] = mean
            eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
            self.state[f"{key}.matrix"] = block.float().cpu()  # the GGN or Hessian block
            if damping == 0:  # a zero block (base module doc): its preconditioner is 0
                self.state[f"{key}.inverse"] = torch.zeros_like(block).cpu()
            else:
                inverse, singular = torch.linalg.inv_ex(block + damping * eye)
                if int(singular) != 0:
                    raise ValueError(
                        f"exact {self.curvature} block {key!r} + damping {damping:g} x I is singular "
                        "(an eigenvalue of an indefinite Hessian equals -damping); choose another damping"
                    )
                self.state[f"{key}.inverse"] = inverse.cpu()
            if self.curvature == "hessian":
                negative = int((torch.linalg.eigvalsh(block + damping * eye) < 0).sum())
                self.info.setdefault("negative_eigenvalues", {})[key] = negative
            self.state[f"{key}.damping"] = torch.tensor(damping, dtype=torch.float64)

    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.blocks == "module":
            return super().precondition(grads)
        inverse = self.state["full.inverse"]
        rows, device = next(iter(grads.values())).shape[0], next(iter(grads.values())).device
        check_memory(
            {
                "gradient rows and their solutions (float64)": 2 * nbytes(rows, inverse.shape[0], dtype=torch.float64),
                "the full inverse on the gradients' device": 0 if inverse.device == device else inverse.numel() * 8,
            },
            f"preconditioning {rows} rows with 'exact' (blocks='full')",
            device,
            "Precondition fewer rows at once.",
        )
        return self.precondition_jointly(grads, lambda flat: flat @ inverse.to(flat.device))

    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        inverse = self.state[f"{name}.inverse"].to(grads.device)
        flat = grads.flatten(1).double() @ inverse  # symmetric inverse: row-vector form is fine
        return flat.to(grads.dtype).reshape(grads.shape)
