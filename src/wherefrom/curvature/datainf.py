"""DataInf (Kwon et al., 2023, arXiv 2310.00902): a closed-form inverse per module, no matrix solve.

For one module ``l`` let ``g_1 .. g_n`` be the per-example training gradients (flattened
``(out, in')``), ``G_l = (1/n) sum_i g_i g_i^T`` their second moment (the empirical Fisher when
the gradients use the data's targets) and ``lambda_l`` the damping. DataInf swaps the inverse and
the average,

    (G_l + lambda_l I)^-1  =  ((1/n) sum_i (g_i g_i^T + lambda_l I))^-1
                         ~=  (1/n) sum_i (g_i g_i^T + lambda_l I)^-1,

and each term has a closed form by Sherman-Morrison,
``(g g^T + lambda I)^-1 = (1/lambda) (I - g g^T / (lambda + g^T g))``. So for a vector ``v``

    P_l v = (1 / (n lambda_l)) sum_i [ v - (g_i^T v) / (lambda_l + ||g_i||^2) g_i ]

which is what :meth:`DataInf.precondition_module` computes (Kwon et al.'s eq. (5); their code's
``compute_hvp_proposed`` in ``src/influence.py``). It is exact for ``n = 1`` and an
approximation otherwise (the error grows with the spread of the ``g_i g_i^T``); ``P_l`` is
symmetric positive definite, so scores keep the sign convention of :mod:`wherefrom.core.scoring`.

Damping: ``damping`` (absolute) if given, else ``damping_factor`` (default 0.1) times the mean
over examples and entries of ``g_i^2`` for the module, as in Kwon et al.'s code
(``lambda = mean_i mean(g_i**2) / 10``). That mean equals ``trace(G_l) / dim``, the mean
eigenvalue of ``G_l``, so it is the same rule as the other strategies' default, with the same
treatment of a module whose gradients are all zero (it contributes 0; :mod:`.base`).

The gradients are those of the ``loss_fn`` given to :meth:`fit`; Kwon et al. use the training
loss with the data's targets, i.e. ``AttributionConfig(fisher="empirical")``. With
``fisher="true"`` the targets are sampled from the model (a Monte Carlo Fisher) instead.

State: the per-example gradients of every module (``{name}.gradients``, ``(n, out, in')``) and
the damping (``{name}.damping``), so a fitted DataInf saves and loads like any strategy. That is
``n x (number of tracked parameters)`` numbers: fine for LoRA modules, too much for full layers
of a large model. Before the first pass :meth:`fit` predicts those bytes and raises
:class:`wherefrom.core.memory.MemoryLimitError` when they exceed ``max_bytes`` (default 2 GiB) or,
with the working buffers, the memory limit (:mod:`wherefrom.core.memory`).

Many processes (:mod:`wherefrom.core.distributed`): each process takes the gradients of its own rows
and every process then holds all of them, gathered in rank order (the order of the ``g_i`` does not
enter ``P_l``); the memory guard counts this process's rows only.
"""

from __future__ import annotations

import torch

from wherefrom.core.distributed import gather_rows, sum_counts
from wherefrom.core.gradients import per_example_gradients
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.options import OptionSpec, from_signature
from wherefrom.curvature.base import DAMPING_FACTOR, Curvature, DataShape

DEFAULT_MAX_BYTES = 2 * 1024**3


class DataInf(Curvature):
    """Kwon et al.'s closed-form approximation of ``(G_l + lambda_l I)^-1`` per module (see module doc)."""

    name = "datainf"
    distributes = True

    def __init__(
        self, damping: float | None = None, damping_factor: float = DAMPING_FACTOR, max_bytes: int = DEFAULT_MAX_BYTES
    ):
        super().__init__(damping=damping, damping_factor=damping_factor)
        self.max_bytes = int(max_bytes)

    option_specs = from_signature(
        __init__,
        OptionSpec(
            "max_bytes", low=1, help="memory guard: most bytes of kept per-example gradients before fit refuses"
        ),
    )

    def state_bytes(self, modules, data: DataShape) -> int:
        """Per module: the ``(n, out, in')`` float32 gradients and the float64 damping (``n``: the rows of every
        process: under ``torch.distributed`` each process ends holding all of them)."""
        return sum(nbytes(data.rows_everywhere, *m.shape) + 8 for m in modules)

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        n = data.rows_everywhere
        needs = {f"{m.name}: per-example gradients of all {n} rows": nbytes(n, *m.shape) + 8 for m in modules}
        check_memory(
            needs,
            "fitting 'datainf' (the kept per-example gradients)",
            hint=("Track fewer or smaller modules (e.g. LoRA), fit on fewer rows, or raise max_bytes."),
            limit=(self.max_bytes, "the datainf option max_bytes"),
        )
        largest = max((m.shape[0] * m.shape[1] for m in modules), default=0)
        needs["concatenation and float64 mean of the largest module"] = nbytes(
            n, largest, dtype=torch.float64
        ) + nbytes(n, largest)
        needs["per-example gradients of one batch"] = data.dense_gradient_bytes(modules) + data.token_factor_bytes(
            modules
        )
        return needs

    def _fit(self, model, modules, batches, loss_fn, progress) -> None:
        parts: dict[str, list[torch.Tensor]] = {m.name: [] for m in modules}
        held = 0
        count = 0
        for batch in progress(batches(), "DataInf gradients"):
            grads = per_example_gradients(model, modules, batch, loss_fn)
            for name, g in grads.items():
                held += g.numel() * g.element_size()
                parts[name].append(g.detach().cpu())
            count += next(iter(grads.values())).shape[0]
        count, held = (sum_counts({"examples": count, "bytes": held})[k] for k in ("examples", "bytes"))
        if count == 0:
            raise ValueError("DataInf needs at least one training example to fit")
        self.info["examples"] = count
        self.info["bytes"] = held
        for m in modules:
            chunks = parts[m.name]
            stacked = gather_rows(torch.cat(chunks) if chunks else torch.zeros(0, *m.shape))
            chunks.clear()
            mean_square = float(stacked.double().pow(2).mean())  # mean over examples and entries
            self.state[f"{m.name}.gradients"] = stacked
            self.state[f"{m.name}.damping"] = torch.tensor(self.damping_for(mean_square, m.name), dtype=torch.float64)

    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``(1/(n lambda)) sum_i [v - (g_i^T v)/(lambda + ||g_i||^2) g_i]`` for each ``v`` in ``grads``.

        Computed in float64 (``v`` close to the span of the ``g_i`` cancels strongly), returned in
        ``grads``' dtype.
        """
        train = self.state[f"{name}.gradients"].to(grads.device, torch.float64).flatten(1)  # (n, P)
        lam = float(self.state[f"{name}.damping"])
        v = grads.to(torch.float64).flatten(1)  # (k, P)
        norms = torch.einsum("np,np->n", train, train)  # ||g_i||^2
        coefficients = (v @ train.T) / (lam + norms)  # (k, n)
        n = train.shape[0]
        out = (v - coefficients @ train / n) / lam
        return out.reshape(grads.shape).to(grads.dtype)
