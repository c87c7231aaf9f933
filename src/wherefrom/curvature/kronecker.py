"""K-FAC and EK-FAC (George et al. 2018; Grosse et al. 2023).

For a module with per-token inputs ``a_t`` (``in'``) and output gradients ``g_t`` (``out``):

* ``A = sum_{tokens} a a^T / n_tokens`` and ``S = sum_{tokens} g g^T / n_examples``, so that with
  ``G_n = sum_t g_t a_t^T`` and no cross-token terms, ``mean_n vec(G_n) vec(G_n)^T ~= A (x) S`` with ``vec``
  stacking columns (Grosse et al.'s); on the row-major flattening of ``G_n`` ``(out, in')`` that this module
  and the index use, the same curvature reads ``S (x) A``.
  With one example of one token the factorisation is exact.
* K-FAC eigenvalues: ``Lambda[i, j] = s_i * a_j`` from ``A = Q_A diag(a) Q_A^T``, ``S = Q_S diag(s) Q_S^T``.
* EK-FAC eigenvalues (the eigenvalue correction): ``Lambda[i, j] = mean_n (Q_S^T G_n Q_A)[i, j]^2``,
  estimated in a second pass over the data.

``(G + lambda I)^-1 V = Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T`` with ``lambda`` =
``damping_factor * mean(Lambda)`` unless an absolute ``damping`` is given.

Gradients come from the ``loss_fn`` handed to :meth:`fit`: a sampled-label loss gives the true
Fisher (the default in :mod:`wherefrom.engine.api`), the data's labels the empirical Fisher.

Fitting stages (each persisted on its own when :meth:`fit` is given a stage folder, as in
kronfluence): ``covariances`` (the float64 sums ``sum a a^T``, ``sum g g^T`` and the token and
example counts), ``eigenbases`` (``Q_A, a, Q_S, s`` as stored), and for EK-FAC ``eigenvalue
correction`` (``Lambda``). A resumed fit reuses the finished ones and gives identical factors.

Many processes (:mod:`wherefrom.core.distributed`): each process passes its own rows; the float64
sums and the token and example counts of both passes are added over processes before the divisions
above, so every process ends with the one-process factors (up to the order of float summation).

Where the stages read their data (:class:`FactorSource`): by default each stage makes its own model
pass (the covariance pass with the first draw of the true Fisher's labels, the correction pass with the
second); a source may serve both from one pass (:mod:`wherefrom.engine.passes`) and then hand the
correction per-example gradients ``G_n`` ``(b, out, in')`` instead of token factors. The correction is
the same quantity in either form (``(Q_S^T g)(Q_A^T a)^T`` summed over tokens is ``Q_S^T G_n Q_A``); the
form used is recorded with the covariances stage (``info["correction_from"]``) and a resumed fit keeps it,
so a resumed fit gives the same bytes as an uninterrupted one.

From token factors instead of a model (:meth:`KFAC.fit_token_factors`): the same estimates from a stream
of per-token factors of (possibly virtual) modules, e.g. LoGra's projected ``(P_out g_t, P_in a_t)``
(Choe et al., 2024, section 3: K-FAC/EK-FAC in the projected space), where ``A~ = P_in A P_in^T`` and
``S~ = P_out S P_out^T``. No stages are persisted on that path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from wherefrom.core.distributed import active, sum_counts, sum_over_ranks, warn_once
from wherefrom.core.gradients import LossFn, TokenFactors, token_factors
from wherefrom.core.memory import nbytes
from wherefrom.curvature.base import Curvature, DataShape, no_progress, warn_zero_curvature

FactorStream = Callable[[], Iterable[tuple[int, dict[str, Any]]]]
"""A fresh pass over the data: ``(examples in the batch, {module: TokenFactors})`` per batch (a correction
stream may hold per-example gradients ``(b, out, in')`` instead, :class:`FactorSource`)."""


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition in float64, eigenvalues clamped at 0."""
    m = matrix.double()
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.clamp_min(0.0), vectors


class Decompositions:
    """:func:`_eigh` of ``matrix / scale`` as CPU ``(values, vectors)``, values float64 (in float32, those of a block
    with gradients of about 1e-20 are 0; :func:`~wherefrom.curvature.base.check_float32_block` reads them) and vectors
    float32, computed once per distinct pair: a call with a matrix equal (``torch.equal``) to an earlier one and the
    same ``scale`` returns copies of the earlier result (copies: saved tensors may not share memory). It keeps
    references to the matrices it was given (the caller holds them anyway), not copies."""

    def __init__(self) -> None:
        self.known: dict[tuple, list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def __call__(self, matrix: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(matrix.shape), scale, float(matrix.sum()))
        for earlier, (values, vectors) in self.known.get(key, []):
            if torch.equal(earlier, matrix):
                return values.clone(), vectors.clone()
        values, vectors = _eigh(matrix / scale)
        result = (values.cpu(), vectors.float().cpu())
        self.known.setdefault(key, []).append((matrix, result))
        return result


PER_EXAMPLE = "per-example gradients"
"""``info["correction_from"]`` of a fit whose eigenvalue correction rotates per-example gradients ``G_n``
(the default, token factors, is not recorded)."""
STAGE_DESCRIPTIONS = {"covariances": "covariance factors", "eigenvalue correction": "eigenvalue correction"}
"""The fitting stages that read data, and the progress description of each one's model pass."""


class FactorSource:
    """Where K-FAC/EK-FAC's fitting stages read their data: here, one model pass over ``batches()`` per stage
    with ``loss_fn`` (the fitting loss: its true-Fisher draws advance with every pass).

    ``stream(stage, dense)`` is the :data:`FactorStream` of ``stage`` (a key of :data:`STAGE_DESCRIPTIONS`),
    with each module's value a :class:`TokenFactors` or, with ``dense``, the per-example gradients
    ``(b, out, in')``; ``loss_for(stage)`` is the loss whose ``sampling_state`` the stage saves and restores;
    ``info`` is recorded with the covariances stage. Subclasses (:mod:`wherefrom.engine.passes`) serve several
    stages from one pass."""

    def __init__(self, model, modules, batches, loss_fn, progress=no_progress):
        self.model, self.modules, self.batches, self.loss_fn, self.progress = model, modules, batches, loss_fn, progress
        self.info: dict[str, Any] = {}

    def stream(self, stage: str, dense: bool = False) -> FactorStream:
        factors = model_factors(
            self.model, self.modules, self.batches, self.loss_fn, self.progress, STAGE_DESCRIPTIONS[stage]
        )
        return dense_stream(factors) if dense else factors

    def loss_for(self, stage: str) -> LossFn:
        return self.loss_fn


def dense_stream(stream: FactorStream) -> FactorStream:
    """``stream`` with every module's :class:`TokenFactors` replaced by its per-example gradients ``(b, out, in')``."""

    def dense():
        for count, factors in stream():
            yield count, {name: f.dense() for name, f in factors.items()}

    return dense


class KFAC(Curvature):
    """Kronecker-factored curvature with eigenvalues ``s_i a_j``."""

    name = "kfac"
    distributes = True
    takes_source = True
    stage_format = 2
    """2: covariance sums formed without float32 underflow (:func:`gram`), eigenbasis eigenvalues in float64."""

    def state_bytes(self, modules, data: DataShape) -> int:
        """Per module: eigenbases ``(in', in')`` and ``(out, out)`` (float32), their eigenvalues (float64), the
        ``(out, in')`` eigenvalue grid and the damping scalar (float32)."""
        return sum(
            nbytes(o * o + i * i + o * i) + nbytes(o + i, dtype=torch.float64) + 4
            for o, i in (m.shape for m in modules)
        )

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        needs = {}
        for m in modules:
            o, i = m.shape
            # an upper bound: modules fed one input share one ``a^T a`` sum (:meth:`covariance_sums`)
            accumulators = nbytes(o * o + i * i, dtype=torch.float64)
            needs[f"{m.name}: covariance factors and eigenbases"] = (
                accumulators + nbytes(o * o + i * i + o * i) + nbytes(o + i, dtype=torch.float64) + 4
            )
        side = max((max(m.shape) for m in modules), default=0)
        needs["eigendecomposition workspace (largest factor, float64)"] = 3 * nbytes(side, side, dtype=torch.float64)
        needs["token factors of one batch"] = data.token_factor_bytes(modules)
        return needs

    def _fit(self, model, modules, batches, loss_fn, progress) -> None:
        self._fit_factors(model, modules, batches, loss_fn, progress)
        self._outer_eigenvalues([m.name for m in modules])

    def data_source(self, model, modules, batches, loss_fn, progress) -> FactorSource:
        """The fit's :class:`FactorSource`: the one handed to :meth:`fit`, else a model pass per stage."""
        return self.source or FactorSource(model, modules, batches, loss_fn, progress)

    def _outer_eigenvalues(self, names) -> None:
        """K-FAC's eigenvalues ``s_i a_j`` from the fitted eigenbases."""
        for name in names:
            s, a = self.state[f"{name}.s_eigvals"].double(), self.state[f"{name}.a_eigvals"].double()
            self._set_eigenvalues(name, torch.outer(s, a))

    def _fit_factors(self, model, modules, batches, loss_fn, progress) -> None:
        """First pass: covariances ``A`` and ``S``, then their eigenbases (vectors stored float32, values float64)."""

        source = self.data_source(model, modules, batches, loss_fn, progress)

        def eigenbases():
            covariances = self.run_stage(
                "covariances", lambda: self._covariances(model, modules, source), source.loss_for("covariances")
            )
            # the counts, and the recorded form of the correction's data when the source set one
            kept = ("examples", "tokens", "correction_from")
            return self._eigenbases([m.name for m in modules], covariances), {
                key: self.info[key] for key in kept if key in self.info
            }

        self.state.update(self.run_stage("eigenbases", eigenbases, loss_fn))

    def _covariances(self, model, modules, source: FactorSource):
        """``({name.a_cov, name.s_cov: float64 sums}, {examples, tokens, **source.info})`` over the covariance
        stage's stream of ``source`` (of every process's rows)."""
        device = next(model.parameters()).device
        sums, info = self.covariance_sums(
            source.stream("covariances"), {m.name: tuple(m.shape) for m in modules}, device
        )
        return sums, {**info, **source.info}

    @staticmethod
    def covariance_sums(stream: FactorStream, shapes: Mapping[str, tuple[int, int]], device=None):
        """``({name.a_cov, name.s_cov: float64 sums}, {examples, tokens})`` over one pass of ``stream()``
        (sums and counts added over processes).

        Modules fed the same input tensor (one ``a`` object in a batch's factors: q/k/v, gate/up, LoRA's
        ``lora_A`` of q and v) share one ``a^T a`` sum: it is formed and held once, and their ``name.a_cov``
        entries are one tensor (in one process; under ``torch.distributed`` each is reduced on its own)."""
        a_cov: dict[str, torch.Tensor] = {}
        s_cov = {n: torch.zeros(o, o, dtype=torch.float64, device=device) for n, (o, _) in shapes.items()}
        tokens = dict.fromkeys(shapes, 0)
        examples = 0
        for count, factors in stream():
            examples += count
            inputs: dict[int, list[str]] = {}
            for name, f in factors.items():
                inputs.setdefault(id(f.a), []).append(name)
            for names in inputs.values():
                a = factors[names[0]].a
                a = a.reshape(-1, a.shape[-1])
                product = gram(a)
                for total in shared_sums(a_cov, names, product):
                    total += product
                del product
            for name, f in factors.items():
                g = f.g.reshape(-1, f.g.shape[-1])
                s_cov[name] += gram(g)
                tokens[name] += int(f.token_mask.sum())
        # in the order of ``shapes``; every process reduces the same tensors in the same order, whatever sharing
        # its own batches showed (a process may have no rows)
        a_cov = {
            n: a_cov[n] if n in a_cov else torch.zeros(i, i, dtype=torch.float64, device=device)
            for n, (_, i) in shapes.items()
        }
        if active():
            a_cov = {n: v.clone() for n, v in a_cov.items()}
        sum_over_ranks({**{f"a.{n}": v for n, v in a_cov.items()}, **{f"s.{n}": v for n, v in s_cov.items()}})
        tokens, examples = sum_counts(tokens), sum_counts({"examples": examples})["examples"]
        on_cpu = {id(v): v.cpu() for v in a_cov.values()}
        sums = {
            **{f"{n}.a_cov": on_cpu[id(v)] for n, v in a_cov.items()},
            **{f"{n}.s_cov": v.cpu() for n, v in s_cov.items()},
        }
        return sums, {"examples": examples, "tokens": tokens}

    def fit_token_factors(self, stream: FactorStream, shapes: Mapping[str, tuple[int, int]]) -> Curvature:
        """Fit from per-token factors rather than from a model; returns ``self``.

        ``stream()`` is a fresh pass (called once for K-FAC, twice for EK-FAC): per batch, its number of
        examples and ``{module: TokenFactors}`` with ``g`` ``(B, T, out)`` and ``a`` ``(B, T, in')`` for the
        (possibly virtual) modules ``shapes`` (``{name: (out, in')}``). The estimates are the model path's
        (module docstring); LoGra's projected factors give K-FAC/EK-FAC in the projected space."""
        self.modules = [[name, int(out), int(inp)] for name, (out, inp) in shapes.items()]
        self.state, self.info = {}, {}
        covariances, info = self.covariance_sums(stream, shapes)
        self.info.update(info)
        self.state.update(self._eigenbases(list(shapes), covariances))
        self._fitted_eigenvalues(stream, shapes)
        warn_zero_curvature(self.zero_blocks)
        return self

    def _fitted_eigenvalues(self, stream: FactorStream, shapes: Mapping[str, tuple[int, int]]) -> None:
        """K-FAC: ``s_i a_j`` from the eigenbases."""
        self._outer_eigenvalues(list(shapes))

    def _eigenbases(self, names, covariances) -> dict[str, torch.Tensor]:
        """Eigenvectors and eigenvalues of ``A = sum a a^T / n_tokens`` and ``S = sum g g^T / n_examples``
        for the modules ``names``. A factor equal to an earlier one (modules fed the same input, e.g. the
        q/k/v projections, gate/up, or LoRA's ``lora_A`` of q and v) is decomposed once (the same result)."""
        eig: dict[str, torch.Tensor] = {}
        decomposed = Decompositions()
        for name in names:
            a_vals, a_vecs = decomposed(covariances[f"{name}.a_cov"], max(self.info["tokens"][name], 1))
            s_vals, s_vecs = decomposed(covariances[f"{name}.s_cov"], max(self.info["examples"], 1))
            eig[f"{name}.a_eigvecs"] = a_vecs
            eig[f"{name}.a_eigvals"] = a_vals
            eig[f"{name}.s_eigvecs"] = s_vecs
            eig[f"{name}.s_eigvals"] = s_vals
        return eig

    def _set_eigenvalues(self, name: str, eigenvalues: torch.Tensor) -> None:
        """Keep float64 ``eigenvalues`` as float32 with their damping; refuses a block outside float32's range."""
        damping = self.float32_damping(eigenvalues, name)
        self.state[f"{name}.eigenvalues"] = eigenvalues.float().cpu()
        self.state[f"{name}.damping"] = torch.tensor(damping)

    def precondition_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        q_s = self.state[f"{name}.s_eigvecs"].to(grads.device, grads.dtype)
        q_a = self.state[f"{name}.a_eigvecs"].to(grads.device, grads.dtype)
        scale = self.state[f"{name}.eigenvalues"].to(grads.device, grads.dtype) + self.state[f"{name}.damping"].item()
        return q_s @ ((q_s.T @ grads @ q_a) / scale) @ q_a.T


class ArbitraryBasisWarning(RuntimeWarning):
    """EK-FAC's eigenvalue correction put mass in the null space of the output-gradient covariance ``S``, whose
    eigenbasis rounding chose (:meth:`EKFAC.share_in_null_space`)."""


ARBITRARY_SHARE = 0.05
"""The share of a module's corrected eigenvalues in the null space of its ``S`` above which the fit warns
(:class:`ArbitraryBasisWarning`). Measured: 34-61% on 2 rows of a tiny GPT-2 (scores 0.16 of the largest apart
between one and two processes), 0 on 40 rows; at most 1.5% in the demo's fit (SmolLM2 LoRA q/v, 160 rows with
short completions: ``S`` of ``q_proj.lora_B`` of rank 115-203 of 576), whose effect on the scores was not
measured."""


class EKFAC(KFAC):
    """K-FAC eigenbasis with eigenvalues re-fitted to per-example gradients (a second data pass)."""

    name = "ekfac"

    def memory_needs(self, modules, data: DataShape) -> dict[str, int]:
        needs = super().memory_needs(modules, data)
        for m in modules:
            needs[f"{m.name}: covariance factors and eigenbases"] += nbytes(
                *m.shape, dtype=torch.float64
            )  # correction sums
        needs["rotated factors of one batch (largest module)"] = max(
            (
                nbytes(data.max_batch, data.max_tokens, m.shape[0] + m.shape[1])
                + nbytes(data.max_batch, *m.shape, dtype=torch.float64)
                for m in modules
            ),
            default=0,
        )
        return needs

    def _fit(self, model, modules, batches, loss_fn, progress) -> None:
        self._fit_factors(model, modules, batches, loss_fn, progress)
        source = self.data_source(model, modules, batches, loss_fn, progress)
        stage = "eigenvalue correction"
        corrected = self.run_stage(stage, lambda: self._correction(model, modules, source), source.loss_for(stage))
        self._corrected_eigenvalues([m.name for m in modules], corrected)

    def _corrected_eigenvalues(self, names, corrected: dict[str, torch.Tensor]) -> None:
        arbitrary = []
        for name in names:
            eigenvalues = corrected[f"{name}.eigenvalues"].double()
            share = self.share_in_null_space(name, eigenvalues)
            if share > ARBITRARY_SHARE:
                arbitrary.append(f"{name} ({share:.1%})")
            self._set_eigenvalues(name, eigenvalues)
        if arbitrary:
            warn_once(
                f"EK-FAC: in {len(arbitrary)} of {len(names)} modules the eigenvalue correction puts a share of its "
                f"mass in the null space of the output-gradient covariance S, e.g. {arbitrary[0]}, whose eigenbasis "
                "is any that rounding gives: the scores there change with --batch-size and the process count. It "
                "happens with the true Fisher (the correction pass draws other labels than the covariance pass) on "
                "fewer loss tokens than a module's width; more loss tokens, --fisher empirical or --strategy kfac "
                "do not depend on it",
                ArbitraryBasisWarning,
                stacklevel=3,
            )

    def share_in_null_space(self, name: str, eigenvalues: torch.Tensor) -> float:
        """The share of the corrected ``eigenvalues`` ``(out, in)`` of module ``name`` in the rows whose eigenvalue of
        the output-gradient covariance ``S`` is numerically zero (at most ``max x dim x`` float32's epsilon): mass
        the correction pass put where the covariance pass saw no gradient. It comes from the true Fisher's fresh
        label draws on fewer loss tokens than the module's width; the eigenbasis of that null space is arbitrary
        (rounding picks it), so the mass is spread over its directions differently by every batch size and process
        count: userY measured 0.16 of the largest score between one and two processes on 2 training rows of a tiny
        GPT-2 (shares 34-61%), against 5e-6 on 40 rows (share 0). ``A``'s side is not counted: both passes see the
        same activations, so the correction lies in ``A``'s range, and its small eigenvalues (real ones, of an
        ill-conditioned ``A``) carry mass of their own, not an arbitrary basis (reviewX). 0 for a zero block."""
        total = float(eigenvalues.sum())
        if total <= 0:
            return 0.0
        values = self.state[f"{name}.s_eigvals"]
        null = values <= values.max() * values.numel() * torch.finfo(torch.float32).eps
        return float(eigenvalues[null.to(eigenvalues.device)].sum()) / total

    def _correction(self, model, modules, source: FactorSource):
        """``({name.eigenvalues: float64 mean_n (Q_S^T G_n Q_A)^2}, {correction_examples})`` over the correction
        stage's stream of ``source`` (of every process's rows), in the form recorded with the covariances."""
        device = next(model.parameters()).device
        stream = source.stream("eigenvalue correction", dense=self.info.get("correction_from") == PER_EXAMPLE)
        return self.correction_sums(stream, {m.name: tuple(m.shape) for m in modules}, device)

    def correction_sums(self, stream: FactorStream, shapes: Mapping[str, tuple[int, int]], device=None):
        """The eigenvalue correction over one pass of ``stream()`` in the fitted eigenbases (see :meth:`_correction`);
        each module's value is a :class:`TokenFactors` or per-example gradients ``(b, out, in')``."""
        sums = {n: torch.zeros(shape, dtype=torch.float64, device=device) for n, shape in shapes.items()}
        examples = 0
        for count, factors in stream():
            examples += count
            for name, f in factors.items():
                q_s = self.state[f"{name}.s_eigvecs"]
                q_a = self.state[f"{name}.a_eigvecs"]
                if isinstance(f, TokenFactors):
                    # Rotate the token factors first: (Q_S^T g)(Q_A^T a)^T summed over tokens.
                    q_s, q_a = q_s.to(f.g.device, f.g.dtype), q_a.to(f.a.device, f.a.dtype)
                    rotated = torch.einsum("bto,bti->boi", f.g @ q_s, f.a @ q_a)
                else:
                    rotated = q_s.to(f.device, f.dtype).T @ f @ q_a.to(f.device, f.dtype)
                sums[name] += rotated.double().pow(2).sum(0).to(sums[name].device)
        sum_over_ranks(sums)
        examples = sum_counts({"examples": examples})["examples"]
        eigenvalues = {f"{n}.eigenvalues": (sums[n] / max(examples, 1)).cpu() for n in shapes}
        return eigenvalues, {"correction_examples": examples}

    def _fitted_eigenvalues(self, stream: FactorStream, shapes: Mapping[str, tuple[int, int]]) -> None:
        """EK-FAC: the eigenvalue correction from a second pass of ``stream()``."""
        corrected, info = self.correction_sums(stream, shapes)
        self.info.update(info)
        self._corrected_eigenvalues(list(shapes), corrected)


GRAM_SAFE = 2.0**50
"""Entries up to this size (and down to its inverse) give ``x^T x`` products well inside float32's range."""


def gram(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x^T x`` of a ``(rows, d)`` matrix, multiplied in ``x``'s dtype. Where the largest entry is below
    ``1 / GRAM_SAFE`` or above :data:`GRAM_SAFE` (gradients of about 1e-20 square to 1e-40, 0 in float32, and the
    block would pass for a zero one), ``x`` is first scaled by a power of two near its largest entry (in float32 at
    least), which is exact: the sum is that of the unscaled entries, without underflow or overflow."""
    if not x.numel():
        return torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
    low, high = torch.stack(torch.aminmax(x)).tolist()  # one device sync
    largest = max(-low, high)
    if largest == 0 or not math.isfinite(largest) or 1 / GRAM_SAFE <= largest <= GRAM_SAFE:
        return (x.T @ x).double()
    exponent = min(max(math.frexp(largest)[1], -125), 126)
    scaled = x.to(torch.promote_types(x.dtype, torch.float32)) * 2.0**-exponent
    return (scaled.T @ scaled).double() * 4.0**exponent


def shared_sums(sums: dict[str, torch.Tensor], names: list[str], addend: torch.Tensor) -> list[torch.Tensor]:
    """The distinct accumulators in ``sums`` of the modules ``names``, which take the same ``addend``: modules
    without one get one new accumulator (zeros like ``addend``) between them; an accumulator shared with a module
    outside ``names`` (whose addend differs now) is first copied for the modules outside."""
    new = [n for n in names if n not in sums]
    if new:
        fresh = torch.zeros_like(addend)
        for n in new:
            sums[n] = fresh
    distinct = {id(sums[n]): sums[n] for n in names}
    for total in distinct.values():
        outside = [n for n, value in sums.items() if value is total and n not in names]
        if outside:
            copy = total.clone()
            for n in outside:
                sums[n] = copy
    return list(distinct.values())


def model_factors(model, modules, batches, loss_fn, progress, description: str) -> FactorStream:
    """The :data:`FactorStream` of a model's pass over ``batches()`` (the per-token factors of ``modules``)."""

    def stream():
        for batch in progress(batches(), description):
            factors, losses = token_factors(model, modules, batch, loss_fn)
            yield losses.shape[0], factors

    return stream
