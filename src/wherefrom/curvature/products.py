"""Matrix-free curvature-vector products over *all* tracked modules jointly.

:class:`GGNOperator` applies the Gauss-Newton matrix that ``ExactGGN(blocks="full")`` forms, cross-module
terms included, without ever building it::

    G v = mean_n sum_t J_nt^T H_nt J_nt v,        H_nt = diag(p_nt) - p_nt p_nt^T

over the completion positions ``t`` of example ``n`` (``labels[:, 1:] != -100``), with ``J_nt`` the
Jacobian of the logits at ``t`` with respect to the tracked parameters and ``p_nt`` their softmax. This
is the analytic expectation over labels drawn from the model, i.e. the true Fisher of the *summed*
token cross-entropy, averaged over examples (the same ``G`` as :mod:`wherefrom.curvature.exact`).

One product costs, per fitting batch, a forward-mode pass (``torch.func.jvp``, batched over the vectors
with ``vmap``) and one reverse pass (``torch.func.vjp``). ``curvature="hessian"`` applies the true
Hessian of the mean training loss instead (summed token cross-entropy against the data's own labels),
by reverse-over-reverse differentiation; it can be indefinite.

:class:`FisherOperator` applies ``F v = mean_n g_n (g_n . v)``, the Fisher of the per-example gradients
``g_n`` of the fitting loss, kept as an ``n x P`` matrix after one gradient pass: with the data's labels
(``fisher="empirical"``) the empirical Fisher, which is the ``G`` of the reference study's LiSSA (Li et al.
2024's code, ``(1/n) sum (g.r) g`` over its cached gradients); with labels drawn from the model once per
example (``fisher="true"``) a one-draw estimate of the ``G`` above. A product then costs two ``n x P``
matrix products and no model pass.

Vectors are ``{module name: (k, out, in')}`` in the Linear orientation of :mod:`wherefrom.core.tracking`,
or flat ``(k, P)`` rows (modules concatenated in selection order) for :meth:`GGNOperator.matvec_flat`.
The model runs in eval mode with eager attention inside every product (SDPA lacks batching and
forward-AD rules for some of its ops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from wherefrom.core.gradients import Batch, LossFn, per_example_gradients
from wherefrom.core.task import IGNORE_INDEX, model_inputs, per_example_loss
from wherefrom.core.tracking import TrackedModule
from wherefrom.curvature.base import OWN_CURVATURES, TRACE_PROBES, BatchSource, OwnCurvature, Progress, no_progress
from wherefrom.curvature.exact import eager_attention
from wherefrom.models.loading import eval_mode

Example = tuple[int, int]
"""``(batch index, row index)`` of one fitting example."""


class GGNOperator:
    """``v -> G v`` (or ``H v``) for the mean training loss over the fitting batches.

    The batches are read once (``batches()`` is materialised: token ids only) so that products can be
    repeated and restricted to random subsets of examples (:meth:`matvec_flat` ``examples=``).
    ``max_vectors`` bounds how many vectors share one vmapped pass: peak memory grows like
    ``max_vectors x (batch x tokens x vocabulary)`` (the logits' tangents), so keep it small for real
    vocabularies; more vectors are processed in chunks.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[TrackedModule],
        batches: BatchSource,
        curvature: OwnCurvature = "ggn",
        max_vectors: int = 4,
        progress: Progress = no_progress,
    ):
        if curvature not in OWN_CURVATURES:
            raise ValueError(f"curvature must be one of {list(OWN_CURVATURES)}, got {curvature!r}")
        if max_vectors < 1:
            raise ValueError(f"max_vectors must be >= 1, got {max_vectors}")
        self.model = model
        self.modules = list(modules)
        self.curvature = curvature
        self.max_vectors = max_vectors
        self.batches: list[Batch] = [
            {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            for batch in progress(batches(), "GGN operator data")
        ]
        self.examples: list[Example] = [
            (b, r) for b, batch in enumerate(self.batches) for r in range(batch["input_ids"].shape[0])
        ]
        if not self.examples:
            raise ValueError("the curvature operator needs at least one fitting example")
        self.sizes = [m.shape[0] * m.shape[1] for m in self.modules]
        self.device = self.modules[0].parameters()[0].device

    # --- layout ----------------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """``P``: the dimension of the (square) operator."""
        return sum(self.sizes)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    def flatten(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (k, out, in')}`` -> ``(k, P)`` in selection order."""
        missing = [n for n in self.names if n not in vectors]
        if missing or len(vectors) != len(self.modules):
            raise ValueError(
                f"expected vectors for exactly the {len(self.modules)} tracked modules; missing {missing[:5]}"
            )
        return torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in self.names], dim=1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(k, P)`` -> ``{name: (k, out, in')}``."""
        out, start = {}, 0
        for m, size in zip(self.modules, self.sizes):
            out[m.name] = flat[:, start : start + size].reshape(-1, *m.shape)
            start += size
        return out

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{m.name}.{s}": p.detach() for m in self.modules for s, p in zip(("weight", "bias"), m.parameters())}

    def _to_params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(k, P)`` -> ``{param name: (k, *param.shape)}`` in the modules' own layouts."""
        out = {}
        for m, (name, block) in zip(self.modules, self.unflatten(flat).items()):
            for suffix, part, param in zip(("weight", "bias"), m.to_param_layout(block), m.parameters()):
                out[f"{name}.{suffix}"] = part.to(param.dtype).contiguous()  # each tangent in its primal's dtype
        return out

    def _from_params(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for m in self.modules:
            bias = grads.get(f"{m.name}.bias") if m.has_bias else None
            dense = m.from_param_layout(grads[f"{m.name}.weight"], bias)
            parts.append(dense.reshape(dense.shape[0], -1))
        return torch.cat(parts, dim=1)

    # --- products --------------------------------------------------------------------------------
    def matvec(
        self, vectors: dict[str, torch.Tensor], examples: Sequence[Example] | None = None
    ) -> dict[str, torch.Tensor]:
        """``G v`` for every row ``v`` of ``{name: (k, out, in')}``; returns the same layout and dtype."""
        flat = self.flatten(vectors)
        return self.unflatten(self.matvec_flat(flat, examples).to(flat.dtype))

    def matvec_flat(self, flat: torch.Tensor, examples: Sequence[Example] | None = None) -> torch.Tensor:
        """``G x`` for every row of ``flat`` ``(k, P)``; float64 out, on ``flat``'s device.

        ``examples``: a subset of ``(batch, row)`` pairs (:attr:`examples`) to average over instead of
        all fitting examples (LiSSA's stochastic products).
        """
        if flat.dim() != 2 or flat.shape[1] != self.num_parameters:
            raise ValueError(f"expected (k, {self.num_parameters}) vectors, got {tuple(flat.shape)}")
        result = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
        if flat.shape[0] == 0:
            return result
        chosen = self._group(examples)
        count = sum(self.batches[b]["input_ids"].shape[0] if rows is None else len(rows) for b, rows in chosen)
        params = self._params()
        with torch.no_grad(), eval_mode(self.model), eager_attention(self.model):  # torch.func differentiates inside
            for lo in range(0, flat.shape[0], self.max_vectors):
                tangents = self._to_params(flat[lo : lo + self.max_vectors].to(self.device))
                for batch_index, rows in chosen:
                    batch = self.batches[batch_index]
                    if rows is not None:
                        batch = {k: v[rows] for k, v in batch.items()}
                    product = self._batch_product(params, tangents, batch)
                    result[lo : lo + self.max_vectors] += self._from_params(product).to(result.device, torch.float64)
        return result / count

    def _group(self, examples: Sequence[Example] | None) -> list[tuple[int, torch.Tensor | None]]:
        if examples is None:
            return [(b, None) for b in range(len(self.batches))]
        rows: dict[int, list[int]] = {}
        for b, r in examples:
            rows.setdefault(int(b), []).append(int(r))
        if not rows:
            raise ValueError("examples must not be empty")
        return [
            (b, torch.tensor(sorted(r), device=self.batches[b]["input_ids"].device)) for b, r in sorted(rows.items())
        ]

    def _logits_fn(self, batch: Batch):
        def logits(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.model, p, (), model_inputs(self.model, batch)).logits

        return logits

    def _batch_product(self, params, tangents, batch: Batch) -> dict[str, torch.Tensor]:
        """Summed (not averaged) curvature product of one batch, ``{param name: (k, *shape)}``."""
        if self.curvature == "hessian":
            return self._batch_hessian(params, tangents, batch)
        logits_fn = self._logits_fn(batch)
        logits, pullback = vjp(logits_fn, params)
        jv = vmap(lambda t: jvp(logits_fn, (params,), (t,))[1])(tangents)  # (k, B, T, V)
        keep = (batch["labels"][:, 1:] != IGNORE_INDEX).unsqueeze(-1)
        work = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits[:, :-1].to(work), dim=-1) * keep  # zero off completion positions
        jv = jv[:, :, :-1].to(work)
        hjv = probs * (jv - (probs * jv).sum(-1, keepdim=True))  # (diag(p) - p p^T) J v
        del jv
        cotangent = F.pad(hjv.to(logits.dtype), (0, 0, 0, 1))  # the last position predicts nothing
        return vmap(pullback)(cotangent)[0]

    def _batch_hessian(self, params, tangents, batch: Batch) -> dict[str, torch.Tensor]:
        logits_fn = self._logits_fn(batch)

        def loss(p):
            return per_example_loss(logits_fn(p), batch["labels"], "sum").sum()

        _, pullback = vjp(grad(loss), params)  # the Hessian is symmetric: its vjp is H v
        return vmap(pullback)(tangents)[0]

    # --- spectrum --------------------------------------------------------------------------------
    def trace(self, probes: int = TRACE_PROBES, seed: int = 0) -> tuple[float, float]:
        """Hutchinson estimate of ``trace(G)`` with ``probes`` seeded Rademacher vectors.

        Returns ``(estimate, standard error)``; ``0.1 x estimate / P`` is the default damping.
        """
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        generator = torch.Generator().manual_seed(seed)
        z = torch.randint(0, 2, (probes, self.num_parameters), generator=generator).double().mul_(2).sub_(1)
        z = z.to(self.device)
        values = (z * self.matvec_flat(z)).sum(1)
        error = float(values.std() / probes**0.5) if probes > 1 else float("nan")
        return float(values.mean()), error

    def mean_eigenvalue(self, probes: int = TRACE_PROBES, seed: int = 0) -> tuple[float, dict[str, float]]:
        """Hutchinson estimate of the mean eigenvalue ``trace(G) / P`` (:meth:`trace`, ``probes`` seeded
        Rademacher vectors), the quantity of the default damping ``damping_factor x mean eigenvalue``
        (Grosse et al. 2023; the rule itself is :func:`wherefrom.curvature.base.relative_damping`).

        Returns ``(trace / P, {"trace_estimate", "trace_standard_error"})``.
        """
        trace, error = self.trace(probes, seed)
        return trace / self.num_parameters, {"trace_estimate": trace, "trace_standard_error": error}

    def top_eigenvalue(self, iterations: int = 20, seed: int = 0, examples: Sequence[Example] | None = None) -> float:
        """Largest eigenvalue (in magnitude) by power iteration from a seeded start; a Rayleigh quotient,
        so it approaches from below: callers that need an upper bound add a safety margin."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, self.num_parameters, generator=generator, dtype=torch.float64).to(self.device)
        x /= x.norm()
        value = 0.0
        for _ in range(max(iterations, 1)):
            y = self.matvec_flat(x, examples)
            value = float((x * y).sum())
            norm = y.norm()
            if norm == 0:
                return 0.0
            x = y / norm
        return abs(value)


class FisherOperator(GGNOperator):
    """``v -> F v`` with ``F = mean_n g_n g_n^T`` over the fitting examples (module docstring).

    ``loss_fn`` gives the per-example losses whose gradients ``g_n`` (``(P,)``, the flat layout of
    :meth:`GGNOperator.flatten`) are taken once, batch by batch, in eval mode, and kept in float64 on the model's device
    (``n x P x 8`` bytes). Products, the spectrum and example subsets as :class:`GGNOperator`; the trace is
    exact (``mean_n ||g_n||^2``).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[TrackedModule],
        batches: BatchSource,
        loss_fn: LossFn,
        progress: Progress = no_progress,
    ):
        super().__init__(model, modules, batches, "ggn", 1, progress)
        self.curvature = "fisher"
        rows = []
        with eval_mode(model):  # as every product with G: no dropout
            for batch in progress(self.batches, "per-example gradients (Fisher operator)"):
                grads = per_example_gradients(model, self.modules, batch, loss_fn)
                rows.append(self.flatten(grads).to(torch.float64))
        self.gradients = torch.cat(rows)
        sizes = torch.tensor([batch["input_ids"].shape[0] for batch in self.batches])
        self.offsets = (torch.cumsum(sizes, 0) - sizes).tolist()

    def matvec_flat(self, flat: torch.Tensor, examples: Sequence[Example] | None = None) -> torch.Tensor:
        """``F x`` for every row of ``flat`` ``(k, P)``, over ``examples`` (``(batch, row)`` pairs) or all;
        float64 out, on ``flat``'s device."""
        if flat.dim() != 2 or flat.shape[1] != self.num_parameters:
            raise ValueError(f"expected (k, {self.num_parameters}) vectors, got {tuple(flat.shape)}")
        grads = self.gradients
        if examples is not None:
            if not examples:
                raise ValueError("examples must not be empty")
            grads = grads[[self.offsets[int(b)] + int(r) for b, r in examples]]
        x = flat.to(grads.device, torch.float64)
        return ((x @ grads.T) @ grads / grads.shape[0]).to(flat.device)

    def trace(self, probes: int = TRACE_PROBES, seed: int = 0) -> tuple[float, float]:
        """``trace(F) = mean_n ||g_n||^2``, exactly: returns ``(trace, 0.0)`` (``probes``, ``seed`` unused)."""
        return float(self.gradients.square().sum() / self.gradients.shape[0]), 0.0
