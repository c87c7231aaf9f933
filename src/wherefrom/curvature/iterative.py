"""Iterative inverse-Hessian-vector products over a matrix-free :class:`GGNOperator`.

All three strategies solve ``(G + lambda I) x = v`` for **all tracked modules jointly** (cross-module
terms included: the ``G`` of ``ExactGGN(blocks="full")``), one solve per row of the gradient batch
handed to :meth:`precondition`. ``curvature="hessian"`` uses the true Hessian of the mean training
loss instead (it may be indefinite: then CG/LiSSA can fail and say so).

* ``cg`` (:class:`ConjugateGradient`): conjugate gradients, batched over the rows; stops when every
  row's relative residual ``||v - (G + lambda I) x|| / ||v||`` is below ``tol`` or after ``max_iter``.
* ``lissa`` (:class:`LiSSA`): ``r_0 = v``, ``r_j = v + (I - alpha (G + lambda I)) r_{j-1}``, estimate
  ``alpha r_J`` (DESIGN.md's sign: the damping *adds* to ``G``). It converges to the exact damped inverse
  when ``0 < alpha (mu + lambda) < 2`` for every eigenvalue ``mu`` of ``G``; by default
  ``alpha = 1 / (safety (lambda_max + lambda))`` (the safe side, < 1) with ``lambda_max`` from power
  iterations. Depth needed grows like ``(lambda_max + lambda) / lambda``. Each step uses ``batch_size`` random fitting examples
  (seeded), or all of them (``batch_size=None``: deterministic). Convergence check: since
  ``G + lambda I >= lambda I``, ``||x* - alpha r_j|| <= ||r_j - r_{j-1}|| / lambda``; that bound,
  relative to ``||alpha r_j||``, must fall below ``tol``. A norm that outgrows twice what any contracting
  recursion can reach (``(1 + 2 / (alpha lambda)) ||v||``) is divergence: warned, recursion stopped.
* ``arnoldi`` (:class:`Arnoldi`): Schioppa et al. (2022): ``iterations`` Arnoldi steps with full
  re-orthogonalisation from a seeded start vector give the top-``rank`` eigenpairs ``(mu_i, u_i)``;
  then ``x = sum_i u_i u_i^T v / (mu_i + lambda)``. Like the paper, this *drops the orthogonal
  complement* of the top eigenspace (the projection of ``v`` onto it is lost); ``complement=True`` adds
  ``(I - U U^T) v / lambda`` (the damped inverse where ``G`` is taken as 0), which is exact once the kept
  pairs span the range of ``G`` (rank >= rank(G)); full rank is exact either way. The eigenpairs
  are saved with the curvature: a loaded ``arnoldi`` needs neither model nor data.

``cg`` and ``lissa`` need model and data at precondition time: :meth:`OperatorCurvature.attach` gives
them (``fit`` does it too); a loaded one used unattached raises ``RuntimeError``.

Damping: absolute ``damping``, else ``damping_factor x trace(G) / P`` with the trace estimated by
Hutchinson's method (``probes`` seeded Rademacher vectors, about 5% standard error with 32 on the tiny
test models; exact for ``curvature="fisher"``: ``mean_n ||g_n||^2``, so ``0.1 x`` it is the reference
study's ``mean over rows of mean(g^2) / 10``, here over all modules jointly), P the number of tracked
parameters. ``ExactGGN`` computes the trace exactly, so with the
default rule the two damp slightly differently; pass an absolute ``damping`` to compare them.
Every solve reports iterations, residuals and convergence in :attr:`info` and warns
(:class:`ConvergenceWarning`) when it did not converge.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from wherefrom.core.gradients import LossFn
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.options import OptionSpec, from_signature
from wherefrom.core.tracking import TrackedModule, selection_signature
from wherefrom.curvature.base import (
    CURVATURE_KINDS,
    DAMPING_FACTOR,
    TRACE_PROBES,
    BatchSource,
    Curvature,
    CurvatureKind,
    DataShape,
    Progress,
    no_progress,
)
from wherefrom.curvature.products import FisherOperator, GGNOperator

AGARWAL_2017 = "Agarwal, Bullins & Hazan 2017, Second-Order Stochastic Optimization in Linear Time (LiSSA)"
SCHIOPPA_2022 = "Schioppa et al. 2022, Scaling Up Influence Functions (Arnoldi iteration)"


class ConvergenceWarning(RuntimeWarning):
    """An iterative inverse did not reach its tolerance, or diverged."""


class OperatorCurvature(Curvature):
    """A curvature that solves with a :class:`GGNOperator` over all tracked modules at once.

    Common options: ``curvature`` (``"ggn"``, ``"hessian"``, or ``"fisher"``: the Fisher of the fitting
    loss's per-example gradients, kept after one pass, :class:`wherefrom.curvature.products.FisherOperator`;
    with ``fisher="empirical"`` the empirical Fisher the reference study's LiSSA multiplied by), ``probes``
    (Hutchinson probes for the default damping; ``fisher`` takes the trace exactly), ``seed`` (probes, start
    vectors, mini-batch draws), ``max_vectors`` (vectors per vmapped product: memory grows like that times
    the logits of a batch).

    ``options`` (constructor keyword arguments declared in :attr:`option_specs`) are saved in
    ``metadata()["options"]`` so that :func:`wherefrom.curvature.load_curvature` rebuilds the same
    strategy.
    """

    needs_operator: ClassVar[bool] = True

    def __init__(
        self,
        damping: float | None = None,
        damping_factor: float = DAMPING_FACTOR,
        curvature: CurvatureKind = "ggn",
        probes: int = TRACE_PROBES,
        seed: int = 0,
        max_vectors: int = 4,
    ):
        super().__init__(damping, damping_factor)
        if curvature not in CURVATURE_KINDS:
            raise ValueError(f"curvature must be one of {list(CURVATURE_KINDS)}, got {curvature!r}")
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        self.curvature = curvature
        self.probes = probes
        self.seed = seed
        self.max_vectors = max_vectors
        self.operator: GGNOperator | None = None

    option_specs: ClassVar[tuple[OptionSpec, ...]] = from_signature(
        __init__,
        OptionSpec(
            "curvature",
            help="ggn: Gauss-Newton matrix; hessian: the true Hessian of the mean training loss; fisher: mean of "
            "g g^T over the fitting loss's per-example gradients (empirical Fisher with fisher=empirical)",
        ),
        OptionSpec("probes", low=1, help="Hutchinson probes estimating trace(G) for the default damping"),
        OptionSpec("seed", help="seed of the probes, start vectors and mini-batch draws"),
        OptionSpec("max_vectors", low=1, help="vectors per vmapped product with G (memory grows with it)"),
    )

    # --- fitting -----------------------------------------------------------------------------------
    def attach(
        self,
        model: nn.Module,
        modules: Sequence[TrackedModule],
        batches: BatchSource,
        progress: Progress = no_progress,
        loss_fn: LossFn | None = None,
    ) -> OperatorCurvature:
        """Give the model and fitting data that products with ``G`` need (after ``load_curvature``).

        ``modules`` must be the selection this curvature was fitted on; ``batches`` should be the
        fitting batches (the damping and, for LiSSA, the scale saved at fit time are reused);
        ``loss_fn``: the fitting loss, whose per-example gradients ``curvature="fisher"`` needs
        (``ValueError`` without it; the other curvatures ignore it).
        """
        if self.modules:
            self.check_modules(modules)
        else:
            self.modules = selection_signature(modules)
        if self.curvature == "fisher":
            if loss_fn is None:
                raise ValueError(f"{self.name!r} with curvature='fisher' needs the fitting loss (loss_fn) to attach")
            self.operator = FisherOperator(model, modules, batches, loss_fn, progress)
        else:
            self.operator = GGNOperator(model, modules, batches, self.curvature, self.max_vectors, progress)
        return self

    def _fit(self, model, modules, batches: BatchSource, loss_fn, progress: Progress) -> None:
        # the GGN and the Hessian ignore loss_fn (the GGN is the analytic expectation over model-sampled labels)
        operator = self.attach(model, modules, batches, progress, loss_fn).operator
        assert operator is not None
        size = operator.num_parameters
        self.info.update(parameters=size, examples=operator.num_examples, curvature=self.curvature)
        if self.damping is None:
            mean, estimate = operator.mean_eigenvalue(self.probes, self.seed)
            self.info.update(estimate)
            damping = self.damping_for(mean, "full")
        else:
            damping = float(self.damping)
        self.state["damping"] = torch.tensor(damping, dtype=torch.float64)
        self.info["damping"] = damping
        if damping > 0:  # else G = 0 on the fitting rows: every solve is 0 (base.precondition_jointly)
            self._prepare(operator)

    def _prepare(self, operator: GGNOperator) -> None:
        """Strategy-specific work at fit time (scale, eigenpairs)."""

    def state_bytes(self, modules, data: DataShape) -> int:
        """The float64 damping (and LiSSA's scale, Arnoldi's eigenpairs: see the subclasses)."""
        return 8

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        """Vectors of length ``P`` (float64) the fit holds: Hutchinson probes and their products (for
        the default damping), one vmapped product's tangents and logit tangents, and the state; with
        ``curvature="fisher"`` the kept per-example gradients instead of the probes and tangents."""
        size = sum(m.shape[0] * m.shape[1] for m in modules)
        if self.curvature == "fisher":
            product = {
                f"per-example gradients of the Fisher operator ({data.examples} x {size:,}, float64)": nbytes(
                    data.examples, size, dtype=torch.float64
                )
            }
        else:
            product = {
                "GGN-vector product (max_vectors tangents and logit tangents)": (
                    2 * nbytes(self.max_vectors, size, dtype=torch.float64)
                    + 3 * nbytes(self.max_vectors, data.max_batch, data.max_tokens, data.vocabulary)
                )
            }
        needs = {**product, "fitted state": self.state_bytes(modules, data)}
        if self.damping is None and self.curvature != "fisher":
            needs[f"Hutchinson probes ({self.probes} x P, float64) and their products"] = 2 * nbytes(
                self.probes, size, dtype=torch.float64
            )
        return needs

    def solve_needs(self, rows: int, size: int) -> dict[str, int]:
        """``{part: bytes}`` one :meth:`precondition` of ``rows`` gradient rows over ``size`` parameters holds."""
        return {}

    @property
    def lam(self) -> float:
        """The damping lambda in use."""
        if "damping" not in self.state:
            raise RuntimeError(f"{self.name!r} curvature is not fitted; call fit(...) first")
        return float(self.state["damping"])

    def _require_operator(self) -> GGNOperator:
        if self.operator is None:
            raise RuntimeError(
                f"the {self.name!r} curvature needs the model and fitting data to multiply by G, and has none "
                "(it was loaded from disk, or never fitted): call attach(model, modules, batches) or fit(...) first"
            )
        return self.operator

    def _apply(self, x: torch.Tensor, examples=None) -> torch.Tensor:
        """``(G + lambda I) x`` for rows ``x`` ``(k, P)``, float64."""
        return self._require_operator().matvec_flat(x, examples) + self.lam * x

    # --- use ---------------------------------------------------------------------------------------
    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(G + lambda I)^-1`` applied to every row, all modules jointly (like ``ExactGGN(blocks="full")``).

        Raises :class:`wherefrom.core.memory.MemoryLimitError` before solving when :meth:`solve_needs`
        does not fit."""
        first = next(iter(grads.values()), None)
        if first is not None:
            size = sum(rows * cols for _, rows, cols in self.modules)
            check_memory(
                self.solve_needs(first.shape[0], size),
                f"preconditioning {first.shape[0]} rows with {self.name!r}",
                first.device,
                "Precondition fewer rows at once (fewer queries, a smaller batch_size).",
            )
        return self.precondition_jointly(grads, self._solve)

    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"{self.name!r} preconditions all tracked modules jointly; call precondition({{name: grads, ...}}) with every module"
        )

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^-1`` for every row of ``b`` ``(n, P)`` float64."""
        raise NotImplementedError

    def _record(self, report: dict[str, Any]) -> None:
        """Keep the last solve's report in ``info`` and running totals over solves."""
        self.info["last_solve"] = report
        self.info["solves"] = self.info.get("solves", 0) + 1
        self.info["vectors"] = self.info.get("vectors", 0) + report["vectors"]
        self.info["all_converged"] = bool(self.info.get("all_converged", True) and report["converged"])


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=1)


class ConjugateGradient(OperatorCurvature):
    """``cg``: conjugate gradients on ``(G + lambda I) x = v``, batched over the rows.

    ``tol``: relative residual ``||v - (G + lambda I) x|| / ||v||`` every row must reach;
    ``max_iter``: products with ``G`` at most per solve. ``info["last_solve"]`` reports iterations and
    the *true* final relative residual (recomputed with one more product).
    """

    name = "cg"

    def __init__(self, damping=None, damping_factor=DAMPING_FACTOR, tol: float = 1e-6, max_iter: int = 100, **options):
        super().__init__(damping, damping_factor, **options)
        if tol <= 0 or max_iter < 1:
            raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
        self.tol, self.max_iter = tol, max_iter

    option_specs = (
        *OperatorCurvature.option_specs,
        *from_signature(
            __init__,
            OptionSpec("tol", low=0.0, low_inclusive=False, help="relative residual every row must reach"),
            OptionSpec("max_iter", low=1, help="products with G at most per solve"),
        ),
    )

    def solve_needs(self, rows: int, size: int) -> dict[str, int]:
        """The right-hand sides, the solution, residual, direction and product: ``6 x rows x P`` float64."""
        return {
            f"conjugate-gradient vectors ({rows} rows x {size:,} parameters, float64)": 6
            * nbytes(rows, size, dtype=torch.float64)
        }

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        self._require_operator()
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        b_norm = rs.sqrt()
        active = b_norm > 0
        failed = torch.zeros_like(active)
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        for _ in range(self.max_iter):
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            ap = self._apply(p[rows])
            curvature = (p[rows] * ap).sum(1)
            bad = ~(curvature > 0) | ~torch.isfinite(curvature)  # indefinite (Hessian) or broken down
            if bad.any():
                failed[rows[bad]] = True
                active[rows[bad]] = False
            alpha = torch.where(
                bad, torch.zeros_like(curvature), rs[rows] / curvature.where(~bad, torch.ones_like(curvature))
            )
            x[rows] += alpha[:, None] * p[rows]
            r[rows] -= alpha[:, None] * ap
            rs_new = (r[rows] * r[rows]).sum(1)
            iterations[rows[~bad]] += 1
            beta = rs_new / rs[rows].where(rs[rows] > 0, torch.ones_like(rs_new))
            p[rows] = r[rows] + beta[:, None] * p[rows]
            rs[rows] = rs_new
            done = rs_new.sqrt() <= self.tol * b_norm[rows]
            active[rows[done]] = False
        nonzero = b_norm > 0
        residual = torch.zeros_like(b_norm)
        if nonzero.any():
            residual[nonzero] = _row_norms(b[nonzero] - self._apply(x[nonzero])) / b_norm[nonzero]
        recursive = rs.sqrt() / b_norm.where(nonzero, torch.ones_like(b_norm))
        converged = bool((recursive[nonzero] <= self.tol).all()) and not bool(failed.any())
        report = {
            "vectors": int(b.shape[0]),
            "iterations": int(iterations.max()) if iterations.numel() else 0,
            "mean_iterations": float(iterations.float().mean()),
            "relative_residual": float(residual.max()),
            "recursive_relative_residual": float(recursive.max()),
            "tol": self.tol,
            "converged": converged,
        }
        self._record(report)
        if failed.any():
            warnings.warn(
                f"cg: non-positive curvature p^T (G + lambda I) p in {int(failed.sum())} of {b.shape[0]} solves "
                f"(indefinite {self.curvature}? raise the damping); those rows stopped early",
                ConvergenceWarning,
                stacklevel=3,
            )
        elif not converged:
            warnings.warn(
                f"cg did not converge in max_iter={self.max_iter} iterations: relative residual "
                f"{report['relative_residual']:.2e} > tol={self.tol:g} (raise max_iter or the damping)",
                ConvergenceWarning,
                stacklevel=3,
            )
        return x


class LiSSA(OperatorCurvature):
    """``lissa``: ``r_j = v + (I - alpha (G + lambda I)) r_{j-1}``, estimate ``alpha r_J``.

    ``depth``: J at most (the recursion stops early once the error bound is below ``tol``, for the
    deterministic ``batch_size=None`` only); ``scale``: alpha, by default ``1 / (safety (lambda_max +
    lambda))`` with ``lambda_max`` from ``power_iterations`` on the full operator (and, with
    ``batch_size``, on a few sampled mini-batches: their spectra are wider); ``batch_size``: examples per
    stochastic product (``None``: all, deterministic); ``repeats``: independent recursions averaged.
    ``damping_sign``: ``"correct"`` (default) adds the damping; ``"reference"`` subtracts it, as the
    reference study's code did (see the module docstring), and always runs ``depth`` steps.
    """

    name = "lissa"

    def __init__(
        self,
        damping=None,
        damping_factor=DAMPING_FACTOR,
        depth: int = 1000,
        scale: float | None = None,
        batch_size: int | None = None,
        repeats: int = 1,
        tol: float = 1e-4,
        power_iterations: int = 20,
        safety: float = 1.25,
        damping_sign: Literal["correct", "reference"] = "correct",
        **options,
    ):
        super().__init__(damping, damping_factor, **options)
        if damping_sign not in ("correct", "reference"):
            raise ValueError(f"lissa: damping_sign must be 'correct' or 'reference', got {damping_sign!r}")
        if depth < 1 or repeats < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"need depth >= 1, repeats >= 1, batch_size >= 1 or None; got {depth}, {repeats}, {batch_size}"
            )
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if safety < 1:
            raise ValueError(f"safety must be >= 1, got {safety}")
        self.depth, self.scale, self.batch_size, self.repeats = depth, scale, batch_size, repeats
        self.tol, self.power_iterations, self.safety = tol, power_iterations, safety
        self.damping_sign = damping_sign

    option_specs = (
        *OperatorCurvature.option_specs,
        *from_signature(
            __init__,
            OptionSpec("depth", low=1, help="recursion steps J at most", source=AGARWAL_2017),
            OptionSpec("scale", low=0.0, low_inclusive=False, help="alpha; null: 1 / (safety (lambda_max + lambda))"),
            OptionSpec("batch_size", low=1, help="examples per stochastic product; null: all (deterministic)"),
            OptionSpec("repeats", low=1, help="independent recursions averaged", source=AGARWAL_2017),
            OptionSpec("tol", low=0.0, low_inclusive=False, help="relative error bound that stops the recursion"),
            OptionSpec("power_iterations", low=1, help="power iterations estimating lambda_max for the scale"),
            OptionSpec("safety", low=1.0, help="alpha's margin below 1 / (lambda_max + lambda)"),
            OptionSpec(
                "damping_sign",
                help="correct: G + lambda I; reference: G - lambda I, the reference study's LiSSA (what its code did)",
                source="Li et al. 2024 code, utils.influence_function (hvp_cal='LiSSA')",
            ),
        ),
    )

    def state_bytes(self, modules, data: DataShape) -> int:
        """The float64 damping and scale."""
        return 16

    def solve_needs(self, rows: int, size: int) -> dict[str, int]:
        """The right-hand sides, ``r``, the update and a product, plus one estimate per repeat and
        their mean: ``(5 + repeats) x rows x P`` float64."""
        return {
            f"LiSSA vectors ({rows} rows x {size:,} parameters, {self.repeats} repeats, float64)": (5 + self.repeats)
            * nbytes(rows, size, dtype=torch.float64)
        }

    def _stochastic(self, operator: GGNOperator) -> bool:
        return self.batch_size is not None and self.batch_size < operator.num_examples

    def _prepare(self, operator: GGNOperator) -> None:
        if self.scale is not None:
            scale = float(self.scale)
        else:
            top = operator.top_eigenvalue(self.power_iterations, self.seed)
            if self._stochastic(operator):
                generator = torch.Generator().manual_seed(self.seed)
                for i in range(3):
                    sample = self._sample(operator, generator)
                    top = max(top, operator.top_eigenvalue(self.power_iterations, self.seed + 1 + i, sample))
            self.info["lambda_max_estimate"] = top
            scale = 1.0 / (self.safety * (top + self.lam))
        self.state["scale"] = torch.tensor(scale, dtype=torch.float64)
        self.info["scale"] = scale

    def _sample(self, operator: GGNOperator, generator: torch.Generator):
        chosen = torch.randperm(operator.num_examples, generator=generator)[: self.batch_size]
        return [operator.examples[i] for i in chosen.tolist()]

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        operator = self._require_operator()
        alpha, lam = float(self.state["scale"]), self.lam
        if self.damping_sign == "reference":
            return self._reference_solve(operator, b, alpha, lam)
        stochastic = self._stochastic(operator)
        b_norm = _row_norms(b)
        # ||r_j|| of a contracting recursion stays below ||v|| + 2 ||r*|| <= (1 + 2 / (alpha lambda)) ||v||
        ceiling = 2 * (1 + 2 / (alpha * lam)) * b_norm if lam > 0 else torch.full_like(b_norm, math.inf)
        estimates, steps, diverged, bound, ratio = [], 0, False, torch.zeros_like(b_norm), torch.zeros_like(b_norm)
        for repeat in range(self.repeats):
            generator = torch.Generator().manual_seed(self.seed + 1000 + repeat)
            r = b.clone()
            for j in range(1, self.depth + 1):
                sample = self._sample(operator, generator) if stochastic else None
                update = b - alpha * (operator.matvec_flat(r, sample) + lam * r)  # r_j - r_{j-1}
                r = r + update
                steps = max(steps, j)
                r_norm, u_norm = _row_norms(r), _row_norms(update)
                if not bool(torch.isfinite(r_norm).all()) or bool((r_norm > ceiling).any()):
                    diverged = True
                    break
                scale = r_norm.where(r_norm > 0, torch.ones_like(r_norm))
                ratio = u_norm / scale
                bound = u_norm / (lam * alpha * scale) if lam > 0 else torch.full_like(ratio, math.inf)
                if not stochastic and bool((bound <= self.tol).all()):
                    break
            estimates.append(alpha * r)
            if diverged:
                break
        x = torch.stack(estimates).mean(0)
        if stochastic and not diverged:  # the running update is noisy: check the average with the full G
            x_norm = _row_norms(x)
            residual = _row_norms(b - self._apply(x))
            bound = (
                residual / (lam * x_norm.where(x_norm > 0, torch.ones_like(x_norm)))
                if lam > 0
                else torch.full_like(x_norm, math.inf)
            )
        converged = not diverged and bool((bound <= self.tol).all())
        report = {
            "vectors": int(b.shape[0]),
            "iterations": steps,
            "repeats": len(estimates),
            "scale": alpha,
            "update_ratio": float(ratio.max()) if ratio.numel() else 0.0,
            "relative_error_bound": float(bound.max()) if bound.numel() else 0.0,
            "tol": self.tol,
            "diverged": diverged,
            "converged": converged,
        }
        self._record(report)
        if diverged:
            warnings.warn(
                f"lissa diverged at step {steps}: ||r_j|| outgrew every contracting recursion "
                f"(scale alpha={alpha:.3g} too large for lambda_max + lambda, or G + lambda I not positive "
                "definite); lower `scale` or raise the damping",
                ConvergenceWarning,
                stacklevel=3,
            )
        elif not converged:
            warnings.warn(
                f"lissa did not converge in depth={self.depth}: relative error bound "
                f"{report['relative_error_bound']:.2e} > tol={self.tol:g} (raise depth or the damping)",
                ConvergenceWarning,
                stacklevel=3,
            )
        return x

    def _reference_solve(self, operator: GGNOperator, b: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
        """``alpha r_depth`` of the reference study's recursion ``r_j = v + (I - alpha (G - lambda I)) r_{j-1}``
        (every fitting example in each product, no convergence check)."""
        r = b.clone()
        for _ in range(self.depth):
            r = b + r - alpha * (operator.matvec_flat(r, None) - lam * r)
        report = {"vectors": int(b.shape[0]), "iterations": self.depth, "scale": alpha, "converged": False}
        self._record({**report, "damping_sign": "reference"})  # converged: no check, it need not converge
        return alpha * r


class Arnoldi(OperatorCurvature):
    """``arnoldi``: top-``rank`` eigenpairs of ``G`` by Arnoldi iterations, then a low-rank inverse.

    ``iterations`` (default ``min(P, 2 rank)``, at least ``rank``) Arnoldi steps with two passes of
    Gram-Schmidt against the whole basis; an invariant subspace (breakdown) restarts from a fresh random
    vector orthogonal to the basis, so ``rank = P`` yields a complete basis and the exact inverse.
    The kept pairs are the largest eigenvalues (largest in magnitude for ``curvature="hessian"``).
    ``block_size > 1``: block Arnoldi, ``block_size`` vectors per (vmapped) product, fewer passes over
    the data for the same subspace size. ``info["ritz_relative_residual"]`` is
    ``max_i ||G u_i - mu_i u_i|| / |mu_1|`` over the kept pairs; above ``ritz_tol`` it warns.
    """

    name = "arnoldi"
    needs_operator = False  # its eigenpairs are saved; no products after fitting

    def __init__(
        self,
        damping=None,
        damping_factor=DAMPING_FACTOR,
        rank: int = 64,
        iterations: int | None = None,
        complement: bool = False,
        block_size: int = 1,
        ritz_tol: float = 0.1,
        **options,
    ):
        super().__init__(damping, damping_factor, **options)
        if rank < 1 or (iterations is not None and iterations < rank):
            raise ValueError(f"need rank >= 1 and iterations >= rank, got rank={rank}, iterations={iterations}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.rank, self.iterations, self.complement = rank, iterations, complement
        self.block_size, self.ritz_tol = block_size, ritz_tol

    option_specs = (
        *OperatorCurvature.option_specs,
        *from_signature(
            __init__,
            OptionSpec("rank", low=1, help="top eigenpairs of G kept", source=SCHIOPPA_2022),
            OptionSpec("iterations", low=1, help="Arnoldi steps (>= rank); null: min(P, 2 rank)", source=SCHIOPPA_2022),
            OptionSpec("complement", help="add (I - U U^T) v / lambda, the part outside the kept eigenspace"),
            OptionSpec("block_size", low=1, help="vectors per Arnoldi step (block Arnoldi)"),
            OptionSpec("ritz_tol", low=0.0, low_inclusive=False, help="Ritz residual above which fit warns"),
        ),
    )

    def _steps(self, size: int) -> tuple[int, int]:
        """``(rank, Arnoldi steps)`` for ``size`` parameters."""
        rank = min(self.rank, size)
        return rank, min(size, self.iterations if self.iterations is not None else 2 * rank)

    def state_bytes(self, modules, data: DataShape) -> int:
        """The float64 damping, ``rank`` eigenvalues and the ``(rank, P)`` eigenvectors (float64)."""
        size = sum(m.shape[0] * m.shape[1] for m in modules)
        rank, _ = self._steps(size)
        return 8 + nbytes(rank, dtype=torch.float64) + nbytes(rank, size, dtype=torch.float64)

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        size = sum(m.shape[0] * m.shape[1] for m in modules)
        rank, steps = self._steps(size)
        needs = super().memory_needs(modules, data)
        needs[f"Arnoldi basis ({steps} x {size:,}, float64) and projected matrix"] = (
            nbytes(steps, size, dtype=torch.float64)
            + nbytes(steps, steps, dtype=torch.float64)
            + steps * steps
            + 2 * nbytes(self.block_size, size, dtype=torch.float64)
        )
        needs[f"Ritz check of the {rank} kept eigenvectors"] = nbytes(rank, size, dtype=torch.float64)
        return needs

    def solve_needs(self, rows: int, size: int) -> dict[str, int]:
        return {
            f"Arnoldi projection ({rows} rows x {size:,} parameters, float64)": 3
            * nbytes(rows, size, dtype=torch.float64)
        }

    def _prepare(self, operator: GGNOperator) -> None:
        size = operator.num_parameters
        rank, steps = self._steps(size)
        basis, projected, restarts = self._arnoldi(operator, steps)
        values, vectors = torch.linalg.eigh(projected)
        order = (values.abs() if self.curvature == "hessian" else values).argsort(descending=True)[:rank]
        values = values[order]
        eigenvectors = vectors[:, order].T @ basis  # (rank, P), orthonormal rows
        top = float(values.abs().max()) if values.numel() else 0.0
        ritz = 0.0
        if steps < size and top > 0:  # ||G u - mu u|| / |mu_max| of the kept pairs (one more pass)
            applied = operator.matvec_flat(eigenvectors)
            ritz = float(_row_norms(applied - values[:, None] * eigenvectors).max() / top)
        self.state["eigenvalues"] = values.cpu()
        self.state["eigenvectors"] = eigenvectors.cpu()
        self.info.update(
            rank=rank,
            iterations=steps,
            block_size=self.block_size,
            restarts=restarts,
            top_eigenvalues=[float(v) for v in values[:5]],
            smallest_kept_eigenvalue=float(values[-1]) if values.numel() else 0.0,
            ritz_relative_residual=ritz,
        )
        if ritz > self.ritz_tol:
            warnings.warn(
                f"arnoldi: the kept eigenpairs are not converged (relative Ritz residual {ritz:.2e} > "
                f"{self.ritz_tol:g}); raise `iterations` (now {steps}) or lower `rank`",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _arnoldi(self, operator: GGNOperator, steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Orthonormal basis ``Q`` ``(steps, P)``, ``Q G Q^T`` ``(steps, steps)`` and the number of restarts.

        Block Arnoldi with ``block_size`` vectors per product (1: the classical method). Column block
        ``[start, end)`` yields ``(Q G Q^T)[:end, start:end]`` exactly (two Gram-Schmidt passes against
        the whole basis); the rest of the symmetric matrix is its mirror image.
        """
        size, device = operator.num_parameters, operator.device
        generator = torch.Generator().manual_seed(self.seed)
        basis = torch.zeros(steps, size, dtype=torch.float64, device=device)
        product = torch.zeros(steps, steps, dtype=torch.float64, device=device)
        known = torch.zeros(steps, steps, dtype=torch.bool, device=device)

        def orthogonalise(w: torch.Tensor, filled: int) -> torch.Tensor:
            for _ in range(2):
                w = w - (basis[:filled] @ w) @ basis[:filled]
            return w

        def append(w: torch.Tensor, filled: int, scale: float) -> bool:
            """Put ``w`` (orthogonalised) at ``basis[filled]``; a random vector if ``w`` vanished."""
            w = orthogonalise(w, filled)
            norm = float(w.norm())
            restarted = norm <= 1e-10 * max(scale, 1e-300)
            if restarted:  # invariant subspace found: go on from a fresh direction orthogonal to it
                w = orthogonalise(torch.randn(size, generator=generator, dtype=torch.float64).to(device), filled)
                norm = float(w.norm())
            basis[filled] = w / norm
            return restarted

        block = max(1, min(self.block_size, steps))
        filled, restarts, scale = 0, 0, 0.0
        for _ in range(block):
            append(torch.randn(size, generator=generator, dtype=torch.float64).to(device), filled, 1.0)
            filled += 1
        start = 0
        while start < steps:
            end = filled  # the newest block: basis[start:end]
            w = operator.matvec_flat(basis[start:end])
            coefficients = torch.zeros(end, end - start, dtype=torch.float64, device=device)
            for _ in range(2):  # re-orthogonalise
                h = basis[:end] @ w.T
                w = w - h.T @ basis[:end]
                coefficients += h
            product[:end, start:end] = coefficients
            known[:end, start:end] = True
            scale = max(scale, float(coefficients.abs().max()))
            for row in w:
                if filled == steps:
                    break
                restarts += append(row, filled, scale)
                filled += 1
            start = end
        mirrored = torch.where(known, product, product.T)
        both = known & known.T
        projected = torch.where(both, (product + product.T) / 2, mirrored)
        return basis, projected, restarts

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        if "eigenvectors" not in self.state:
            raise RuntimeError("the 'arnoldi' curvature is not fitted; call fit(...) first")
        vectors = self.state["eigenvectors"].to(b.device, torch.float64)
        values = self.state["eigenvalues"].to(b.device, torch.float64)
        coefficients = b @ vectors.T
        x = (coefficients / (values + self.lam)) @ vectors
        if self.complement:
            x = x + (b - coefficients @ vectors) / self.lam
        self._record({"vectors": int(b.shape[0]), "converged": True})
        return x
