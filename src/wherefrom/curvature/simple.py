"""The two simplest strategies: identity (gradient dot product) and diagonal Fisher."""

from __future__ import annotations

import torch

from wherefrom.core.distributed import sum_counts, sum_over_ranks
from wherefrom.core.gradients import per_example_gradients
from wherefrom.core.memory import nbytes
from wherefrom.curvature.base import Curvature, DataShape


class Identity(Curvature):
    """``G = 0`` and no damping: scores are plain gradient dot products (Grosse et al.'s baseline)."""

    name = "identity"
    needs_fit = False
    distributes = True

    def _fit(self, model, modules, batches, loss_fn, progress) -> None:
        """Nothing to estimate."""

    def fit_blocks(self, blocks, shapes) -> None:
        """Nothing to estimate."""

    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        return grads


class Diagonal(Curvature):
    """Diagonal of the Fisher, ``diag(G)[j] = mean_n (grad_j L_n)^2``, per module ``(out, in')``."""

    name = "diagonal"
    distributes = True

    def state_bytes(self, modules, data: DataShape) -> int:
        """``{name}.diagonal`` ``(out, in')`` float32 and ``{name}.damping`` (float32 scalar) per module."""
        return sum(nbytes(*m.shape) + 4 for m in modules)

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        needs = {
            f"{m.name}: diagonal (float64 sums, float32 state)": nbytes(*m.shape, dtype=torch.float64)
            + nbytes(*m.shape)
            + 4
            for m in modules
        }
        largest = max((nbytes(data.max_batch, *m.shape, dtype=torch.float64) for m in modules), default=0)
        needs["per-example gradients of one batch"] = (
            data.dense_gradient_bytes(modules) + data.token_factor_bytes(modules) + 2 * largest
        )
        return needs

    def _fit(self, model, modules, batches, loss_fn, progress) -> None:
        self.fit_blocks(
            lambda: (
                per_example_gradients(model, modules, batch, loss_fn)
                for batch in progress(batches(), "diagonal Fisher")
            ),
            {m.name: m.shape for m in modules},
        )

    def fit_blocks(self, blocks, shapes) -> None:
        """``diag(G) = mean_n G_n ** 2`` per module, accumulated in float64 (sums and count added over
        processes under :mod:`wherefrom.core.distributed`), kept in float32 (a block outside its range is refused,
        :func:`~wherefrom.curvature.base.check_float32_block`)."""
        sums = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        count = 0
        for grads in blocks():
            for name, g in grads.items():
                sums[name] += g.double().pow(2).sum(0).cpu()
            count += next(iter(grads.values())).shape[0]
        sum_over_ranks(sums)
        count = sum_counts({"examples": count})["examples"]
        self.info["examples"] = count
        for name, total in sums.items():
            diag = total / max(count, 1)
            damping = self.float32_damping(diag, name)
            self.state[f"{name}.diagonal"] = diag.float()
            self.state[f"{name}.damping"] = torch.tensor(damping)

    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        diag = self.state[f"{name}.diagonal"].to(grads.device)
        return grads / (diag + self.state[f"{name}.damping"].to(grads.device))
