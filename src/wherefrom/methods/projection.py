"""Projected-gradient influence: TRAK-style random projections (Park et al., 2023, TRAK: Attributing
Model Behavior at Scale) and LoGra's Kronecker projection (Choe et al., 2024, What is Your Data Worth
to GPT?).

Per tracked module with gradient ``G = sum_t g_t a_t^T`` (shape ``(out, in')``), a projection maps
``G`` to a short vector ``G~`` of length ``k``; curvature is then estimated and inverted *in the
projected space*, one dense ``(k, k)`` block per module. The projection is a stage in front of a
curvature strategy: the projected gradients, as blocks ``(b, 1, k)`` of one "virtual" module per
tracked module, fit the ``exact`` strategy (:meth:`wherefrom.curvature.base.Curvature.fit_gradients`,
``blocks="module"``), whose state is saved and loaded like any fitted curvature:

    F~ = mean_n G~_n G~_n^T     (true Fisher: targets sampled from the model; or empirical)
    I(z_m, z_q) = sum_modules q~^T (F~ + lambda I)^-1 G~_m

with ``q~`` the projected query vector ``q = -grad f(z_q)`` (README sign: positive = proponent) and
``lambda = damping_factor x trace(F~) / k`` (0.1 x mean eigenvalue, per module) unless an absolute
``damping`` is given (the damping rule of :mod:`wherefrom.curvature.base`: a damping must be > 0,
and a module whose projected Fisher is exactly zero contributes 0). ``curvature=False`` skips ``F~``: scores are raw projected dot products
``q~^T G~`` (projected gradient similarity), which approach the unprojected ones as ``k`` grows.

Projections (all seeded: the matrices are a pure function of the seed, the module name and the
shapes, so two runs, or the train and query sides, use the same ones):

* :class:`RandomProjection` (``trak``): ``G~ = P vec(G)`` with ``P`` ``(dim, out*in')`` of i.i.d.
  Gaussian or Rademacher entries scaled by ``1/sqrt(dim)``, so ``E[P^T P] = I`` and inner products
  are preserved in expectation (Johnson-Lindenstrauss). ``P`` is generated in blocks of columns,
  each from its own seeded generator, so memory is bounded by ``dim x block_columns`` and the result
  does not depend on the batch; blocks are cached up to ``cache_bytes``. The dense per-example
  gradient of one module is formed (one module at a time).
* :class:`KroneckerProjection` (``logra``): ``P_in`` ``(k_in, in')`` and ``P_out`` ``(k_out, out)``,
  ``G~ = P_out G P_in^T = sum_t (P_out g_t)(P_in a_t)^T``, computed from the projected per-token
  factors, so the full gradient is never formed. Gaussian/Rademacher entries scaled by
  ``1/sqrt(k)`` (``E[P^T P] = I`` on each side), or ``"orthogonal"`` rows (``sqrt(d/k)`` times
  orthonormal rows: exact inner products at ``k = d``).

A projection never *enlarges*: when the requested size reaches the module's size (``dim >= out*in'``,
or ``k_in >= in'`` / ``k_out >= out`` on one side) that side is left unprojected (identity), which is
exact and cheaper; so "full" dimensions reproduce unprojected scores exactly.

``strategy="kfac"``/``"ekfac"`` (LoGra only; Choe et al. 2024 fit EK-FAC in the projected space) replaces
the dense ``F~`` by K-FAC/EK-FAC of the projected per-token factors ``(P_out g_t, P_in a_t)``
(:meth:`wherefrom.curvature.kronecker.KFAC.fit_token_factors`): factors ``S~ = P_out S P_out^T``
(``k_out x k_out``) and ``A~ = P_in A P_in^T`` (``k_in x k_in``), the projected gradient preconditioned as
a ``(k_out, k_in)`` matrix; with full dimensions it is the unprojected K-FAC/EK-FAC.

Memory: ``F~`` is ``k x k`` per module (the exact strategy keeps F~ float32 and its inverse float64), so choose ``k`` with the number of
modules in mind (e.g. LoGra ``k_in = k_out = 16`` gives ``k = 256``).
"""

from __future__ import annotations

import hashlib
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from wherefrom.core.data import Record
from wherefrom.core.encoding import EncodedExample
from wherefrom.core.gradients import LossFn, TokenFactors, flatten_blocks, split_rows
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.scoring import Scores, unit_rows
from wherefrom.curvature import Curvature, curvature_from_state, make_curvature
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig, Attributor, checked_rows

__all__ = ["KroneckerProjection", "ProjectedInfluence", "Projection", "RandomProjection"]

Kind = Literal["gaussian", "rademacher"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
"""Entries of a TRAK projection matrix (:class:`RandomProjection`)."""
KroneckerKind = Literal[Kind, "orthogonal"]
KRONECKER_KINDS: tuple[str, ...] = typing.get_args(KroneckerKind)
"""Entries of LoGra's projection matrices (:class:`KroneckerProjection`): also scaled orthonormal rows."""

TRAK_DIM = 1024
"""Default projected length ``k`` per module of ``trak``."""
LOGRA_DIM = 16
"""Default ``k_in`` and ``k_out`` of ``logra``: ``k = k_in k_out = 256`` numbers per module."""

MEMORY_HINT = "Lower the projected dimension or track fewer modules."
"""What a memory refusal of a projected method says to change."""


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _unit_matrix(rows: int, cols: int, kind: str, seed: int) -> torch.Tensor:
    """``(rows, cols)`` float32 CPU matrix of i.i.d. unit-variance entries from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator)
    if kind == "rademacher":
        return torch.randint(0, 2, (rows, cols), generator=generator).to(torch.float32) * 2 - 1
    raise ValueError(f"unknown projection kind {kind!r}")


class Projection(ABC):
    """Maps one module's per-example gradients, given as :class:`TokenFactors`, to ``(B, k)``."""

    method_name: str

    @abstractmethod
    def dim_for(self, shape: tuple[int, int]) -> int:
        """Projected length ``k`` for a module with gradient shape ``(out, in')``."""

    @abstractmethod
    def project(self, name: str, factors: TokenFactors) -> torch.Tensor:
        """``(B, k)`` projected per-example gradients of module ``name``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Every setting that fixes the matrices (for saving beside results)."""

    @abstractmethod
    def matrix_bytes(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Bytes of the projection matrices (float32) kept for modules ``{name: (out, in')}``."""


class RandomProjection(Projection):
    """TRAK-style dense random projection of the flattened per-module gradient to ``dim``."""

    method_name = "trak"

    def __init__(
        self, dim: int, kind: Kind = "gaussian", seed: int = 0, block_columns: int = 4096, cache_bytes: int = 2**28
    ):
        if dim < 1:
            raise ValueError(f"projection dim must be >= 1, got {dim}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if block_columns < 1:
            raise ValueError(f"block_columns must be >= 1, got {block_columns}")
        self.dim, self.kind, self.seed = int(dim), kind, int(seed)
        self.block_columns, self.cache_bytes = int(block_columns), int(cache_bytes)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0

    def config(self) -> dict[str, Any]:
        return {
            "type": "random",
            "dim": self.dim,
            "kind": self.kind,
            "seed": self.seed,
            "block_columns": self.block_columns,
        }

    def dim_for(self, shape: tuple[int, int]) -> int:
        return min(self.dim, shape[0] * shape[1])

    def matrix_bytes(self, shapes: dict[str, tuple[int, int]]) -> int:
        """The cached blocks (at most ``cache_bytes``) plus one uncached block (of at most ``block_columns``
        columns, no wider than the widest projected module); nothing for a module whose gradient has no more
        than ``dim`` entries (it is not projected)."""
        projected = [o * i for o, i in shapes.values() if self.dim < o * i]
        if not projected:
            return 0
        cached = sum(nbytes(self.dim, size) for size in projected)
        return min(cached, self.cache_bytes) + nbytes(self.dim, min(self.block_columns, max(projected)))

    def block(
        self,
        name: str,
        index: int,
        columns: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Columns ``[index * block_columns, index * block_columns + columns)`` of module ``name``'s ``P``, ``(dim, columns)``."""
        key = (name, index, columns, str(device), dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        matrix = _unit_matrix(self.dim, columns, self.kind, _seed("random", self.seed, self.kind, name, index))
        matrix = (matrix / math.sqrt(self.dim)).to(device=device, dtype=dtype)
        size = matrix.numel() * matrix.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = matrix
            self._cached_bytes += size
        return matrix

    def project_flat(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """``(B, D) -> (B, min(dim, D))``; identity when ``dim >= D``."""
        total = flat.shape[1]
        if self.dim >= total:
            return flat
        out = flat.new_zeros(flat.shape[0], self.dim)
        for index, start in enumerate(range(0, total, self.block_columns)):
            columns = min(self.block_columns, total - start)
            out += flat[:, start : start + columns] @ self.block(name, index, columns, flat.device, flat.dtype).T
        return out

    def project(self, name: str, factors: TokenFactors) -> torch.Tensor:
        dense = factors.dense()
        return self.project_flat(name, dense.reshape(dense.shape[0], -1))


class KroneckerProjection(Projection):
    """LoGra: ``P_out G P_in^T`` from projected activations and output gradients, ``(B, k_out * k_in)``.

    ``matrices`` (optional) gives explicit ``{module: (P_in, P_out)}`` (either may be ``None`` for the
    identity); modules not in it get seeded random matrices.
    """

    method_name = "logra"

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        seed: int = 0,
        kind: KroneckerKind = "gaussian",
        matrices: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
    ):
        if dim_in < 1 or dim_out < 1:
            raise ValueError(f"dim_in and dim_out must be >= 1, got {dim_in}, {dim_out}")
        if kind not in KRONECKER_KINDS:
            raise ValueError(f"kind must be one of {list(KRONECKER_KINDS)}, got {kind!r}")
        self.dim_in, self.dim_out, self.seed, self.kind = int(dim_in), int(dim_out), int(seed), kind
        self.explicit = dict(matrices or {})
        self._cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def config(self) -> dict[str, Any]:
        return {
            "type": "kronecker",
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "kind": self.kind,
            "seed": self.seed,
            "explicit_modules": sorted(self.explicit),
        }

    def _side(self, name: str, side: str, k: int, d: int) -> torch.Tensor | None:
        if k >= d:
            return None
        if self.kind == "orthogonal":
            gaussian = _unit_matrix(d, k, "gaussian", _seed("kronecker", self.seed, self.kind, name, side))
            q, _ = torch.linalg.qr(gaussian)  # (d, k), orthonormal columns
            return q.T * math.sqrt(d / k)
        return _unit_matrix(k, d, self.kind, _seed("kronecker", self.seed, self.kind, name, side)) / math.sqrt(k)

    def matrices_for(
        self, name: str, shape: tuple[int, int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P_in (k_in, in'), P_out (k_out, out))`` of module ``name``; ``None`` = identity."""
        key = (name, tuple(shape), str(device), dtype)
        if key not in self._cache:
            out, inp = shape
            if name in self.explicit:
                p_in, p_out = self.explicit[name]
            else:
                p_in = self._side(name, "in", self.dim_in, inp)
                p_out = self._side(name, "out", self.dim_out, out)
            if (p_in is not None and p_in.shape[1] != inp) or (p_out is not None and p_out.shape[1] != out):
                raise ValueError(f"projection matrices for {name} do not fit its gradient shape {tuple(shape)}")

            def move(p):
                return None if p is None else p.to(device=device, dtype=dtype)

            self._cache[key] = (move(p_in), move(p_out))
        return self._cache[key]

    def dims(self, shape: tuple[int, int], name: str | None = None) -> tuple[int, int]:
        """``(k_out, k_in)`` for a module of gradient shape ``(out, in')``."""
        out, inp = shape
        if name is not None and name in self.explicit:
            p_in, p_out = self.explicit[name]
            return (out if p_out is None else p_out.shape[0], inp if p_in is None else p_in.shape[0])
        return min(self.dim_out, out), min(self.dim_in, inp)

    def dim_for(self, shape: tuple[int, int], name: str | None = None) -> int:
        k_out, k_in = self.dims(shape, name)
        return k_out * k_in

    def matrix_bytes(self, shapes: dict[str, tuple[int, int]]) -> int:
        """``P_in (k_in, in')`` and ``P_out (k_out, out)`` per module (none where ``k >= d``)."""
        total = 0
        for name, (out, inp) in shapes.items():
            k_out, k_in = self.dims((out, inp), name)
            total += nbytes(k_in, inp) * (k_in < inp) + nbytes(k_out, out) * (k_out < out)
        return total

    def project_factors(self, name: str, factors: TokenFactors) -> TokenFactors:
        """The projected per-token factors ``(P_out g_t, P_in a_t)``: ``g`` ``(B, T, k_out)``, ``a`` ``(B, T, k_in)``."""
        a, g = factors.a, factors.g
        p_in, p_out = self.matrices_for(name, (g.shape[-1], a.shape[-1]), a.device, a.dtype)
        if p_in is not None:
            a = a @ p_in.T
        if p_out is not None:
            g = g @ p_out.T
        return replace(factors, a=a, g=g)

    def project(self, name: str, factors: TokenFactors) -> torch.Tensor:
        projected = self.project_factors(name, factors)
        return projected.dense().reshape(projected.a.shape[0], -1)


class ProjectedInfluence:
    """Influence with curvature in a projected gradient space: ``trak`` (random) or ``logra`` (Kronecker).

    ``config`` supplies the module selection, batching, Fisher kind (``fisher="true"`` samples targets,
    seeded by ``config.seed``) and the loss reduction; ``config.strategy`` is ignored. ``damping`` /
    ``damping_factor`` default to the config's (absolute lambda, or factor x mean eigenvalue of ``F~``).
    ``curvature=False``: no fit, scores are raw projected dot products.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        config: AttributionConfig | None = None,
        projection: Projection | None = None,
        damping: float | None = None,
        damping_factor: float | None = None,
        curvature: bool = True,
        strategy: Literal["exact", "kfac", "ekfac"] = "exact",
        progress: Progress = no_progress,
    ):
        config = config or AttributionConfig()
        if strategy not in ("exact", "kfac", "ekfac"):
            raise ValueError(f"strategy must be 'exact', 'kfac' or 'ekfac', got {strategy!r}")
        if strategy != "exact" and not isinstance(projection, KroneckerProjection):
            raise ValueError(
                f"strategy {strategy!r} needs LoGra's Kronecker projection (per-token factors); "
                "a random projection (trak) has only the exact projected Fisher"
            )
        self.strategy = strategy
        self.attributor = Attributor(model, tokenizer, replace(config, strategy="identity"), progress=progress)
        self.projection = projection or RandomProjection(TRAK_DIM, seed=config.seed)
        self.damping = config.damping if damping is None else damping
        self.damping_factor = config.damping_factor if damping_factor is None else damping_factor
        self.use_curvature = curvature
        self.curvature: Curvature = self.new_curvature()  # checks the damping
        self._index: tuple[tuple, list[str], dict[str, torch.Tensor]] | None = None

    @classmethod
    def trak(
        cls,
        model,
        tokenizer,
        config: AttributionConfig | None = None,
        dim: int = TRAK_DIM,
        kind: Kind = "gaussian",
        **kwargs,
    ) -> ProjectedInfluence:
        """TRAK (Park et al. 2023, with one model): influence in a dense random projection of each tracked
        module's flattened gradient to ``dim`` numbers (:class:`RandomProjection`, entries ``kind``, seeded by
        ``config.seed``), preconditioned by the damped projected Fisher ``(F~ + lambda I)^-1`` of ``dim x dim`` per
        module. ``kwargs`` go to :class:`ProjectedInfluence` (``damping``, ``curvature``, ``progress``; ``strategy``
        stays ``"exact"``: a random projection has no token factors). Scores ``(n_query, n_train)``, positive for a
        proponent. ``ValueError`` for ``dim`` < 1 or another ``kind``."""
        config = config or AttributionConfig()
        return cls(model, tokenizer, config, RandomProjection(dim, kind, seed=config.seed), **kwargs)

    @classmethod
    def logra(
        cls,
        model,
        tokenizer,
        config: AttributionConfig | None = None,
        dim_in: int = LOGRA_DIM,
        dim_out: int = LOGRA_DIM,
        kind: KroneckerKind = "gaussian",
        **kwargs,
    ) -> ProjectedInfluence:
        """LoGra (Choe et al. 2024): influence in the Kronecker projection ``P_out G P_in^T`` of each tracked
        module's gradient, ``dim_out x dim_in`` numbers formed from the projected token factors (the gradient is never
        formed; :class:`KroneckerProjection`, entries ``kind``, seeded by ``config.seed``), preconditioned by the
        damped projected Fisher, or by K-FAC/EK-FAC fitted in the projected space with ``strategy="kfac"``/
        ``"ekfac"`` (``kwargs``, with ``damping``, ``curvature``, ``progress``: :class:`ProjectedInfluence`). Scores
        ``(n_query, n_train)``, positive for a proponent. ``ValueError`` for a dimension < 1 or another ``kind``."""
        config = config or AttributionConfig()
        return cls(
            model, tokenizer, config, KroneckerProjection(dim_in, dim_out, seed=config.seed, kind=kind), **kwargs
        )

    @property
    def name(self) -> str:
        return self.projection.method_name

    @property
    def module_names(self) -> list[str]:
        return self.attributor.module_names

    def dims(self) -> dict[str, int]:
        """Projected length ``k`` per module."""
        return {m.name: self._dim(m.name, m.shape) for m in self.attributor.modules}

    def _dim(self, name: str, shape: tuple[int, int]) -> int:
        if isinstance(self.projection, KroneckerProjection):
            return self.projection.dim_for(shape, name)
        return self.projection.dim_for(shape)

    def check_memory(self, rows: int, fit: bool) -> int:
        """Bytes this method holds for ``rows`` rows on its device, checked before the first pass: the projection
        matrices, ``rows`` projected gradients ``(rows, k)`` float32 (parts and joined), and with
        ``fit`` each module's ``k x k`` Fisher (:meth:`fisher_bytes`).
        Raises :class:`wherefrom.core.memory.MemoryLimitError` naming the part."""
        shapes = {m.name: tuple(m.shape) for m in self.attributor.modules}
        dims = self.dims()
        needs = {
            f"{self.name} projection matrices": self.projection.matrix_bytes(shapes),
            f"projected gradients ({rows} rows x {sum(dims.values()):,})": 2 * nbytes(rows, sum(dims.values())),
            "per-example gradients of one batch (float32)": nbytes(
                self.attributor.config.batch_size, max((o * i for o, i in shapes.values()), default=0)
            ),
        }
        if fit and self.use_curvature and self.strategy != "exact":
            for name, (k_out, k_in) in self.curvature_shapes().items():
                needs[f"{name}: projected Kronecker factors ({k_out} x {k_out}, {k_in} x {k_in})"] = 3 * nbytes(
                    k_out * k_out + k_in * k_in + k_out * k_in, dtype=torch.float64
                )
        elif fit and self.use_curvature:
            needs.update(self.fisher_bytes())
        return check_memory(needs, f"{self.name} ({'fit' if fit else 'scores'})", self.attributor.device, MEMORY_HINT)

    def fisher_bytes(self) -> dict[str, int]:
        """``{part: bytes}`` of each module's dense ``k x k`` projected Fisher as the ``exact`` strategy fits it
        (float64 sum, inverse and inversion workspace; float32 F~)."""
        return {
            f"{name}: projected Fisher ({k} x {k})": 4 * nbytes(k, k, dtype=torch.float64) + nbytes(k, k)
            for name, k in self.dims().items()
        }

    def check_row_fisher_memory(self) -> int:
        """Bytes of the Fisher :meth:`row_curvature` fits, whether or not this method uses a curvature, checked
        against the CPU's memory (the stored rows are read and summed there, whatever this method's device).
        Raises :class:`wherefrom.core.memory.MemoryLimitError` naming the part."""
        return check_memory(self.fisher_bytes(), f"{self.name} (Fisher of the stored rows)", "cpu", MEMORY_HINT)

    # --- projected gradients ------------------------------------------------------------------
    def projected_gradients(
        self,
        records: Sequence[Record] | Sequence[EncodedExample],
        loss_fn: LossFn | None = None,
        description: str = "projected gradients",
        divisors: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """``(ids, {module: (b, k)})`` per batch; training-loss gradients unless ``loss_fn`` is given.

        ``divisors`` ``{module: (out, in')}``: each per-example gradient is divided by them elementwise before
        it is projected (AdamW's ``sqrt(v_hat) + eps``, :mod:`wherefrom.models.optimizer_state`); only a
        projection that forms the gradient (:attr:`forms_gradients`, trak) takes them, else ``ValueError``."""
        if divisors is not None and not self.forms_gradients:
            raise ValueError(
                f"{self.name}: its projection never forms the per-example gradient, so it cannot be divided "
                "elementwise (use trak)"
            )
        for ids, factors in self.attributor.token_factor_stream(records, loss_fn, description):
            if divisors is None:
                yield ids, {n: self.projection.project(n, factors.pop(n)) for n in self.module_names}
                continue
            projected = {}
            for n in self.module_names:
                dense = factors.pop(n).dense() / divisors[n].to(self.attributor.device)
                projected[n] = self.projection.project_flat(n, dense.reshape(dense.shape[0], -1))
            yield ids, projected

    @property
    def forms_gradients(self) -> bool:
        """Whether the projection forms each module's full per-example gradient (trak's dense projection does;
        LoGra's Kronecker projection works on the per-token factors and never does)."""
        return isinstance(self.projection, RandomProjection)

    # --- curvature ------------------------------------------------------------------------------
    def new_curvature(self) -> Curvature:
        """The unfitted curvature of the projected space: ``exact`` per (virtual) module (a dense ``k x k``
        ``F~``), ``kfac``/``ekfac`` of the projected per-token factors (``k_out x k_out`` and ``k_in x k_in``
        factors: LoGra's setting), or ``identity`` without curvature. ``ValueError`` for a damping that is not > 0."""
        if not self.use_curvature:
            return make_curvature("identity", self.damping, self.damping_factor)
        if self.strategy != "exact":
            return make_curvature(self.strategy, self.damping, self.damping_factor)
        return make_curvature("exact", self.damping, self.damping_factor, blocks="module")

    def curvature_shapes(self) -> dict[str, tuple[int, int]]:
        """The projected curvature's (virtual) module shapes: ``(1, k)`` for ``exact``, ``(k_out, k_in)`` for
        ``kfac``/``ekfac`` (the projected gradient ``P_out G P_in^T`` as a matrix)."""
        if self.strategy == "exact":
            return {n: (1, k) for n, k in self.dims().items()}
        return {m.name: self.projection.dims(tuple(m.shape), m.name) for m in self.attributor.modules}

    @property
    def inverses(self) -> dict[str, torch.Tensor]:
        """``(F~ + lambda I)^-1`` per module, ``(k, k)`` float64 (empty before :meth:`fit` or without curvature)."""
        return {
            n: self.curvature.state[f"{n}.inverse"] for n in self.module_names if f"{n}.inverse" in self.curvature.state
        }

    @property
    def info(self) -> dict[str, dict[str, float]]:
        """Per module: ``damping`` (lambda), ``mean_eigenvalue`` of ``F~``, ``dim`` ``k`` and ``n_examples``."""
        info = self.curvature.info
        if self.use_curvature and self.strategy != "exact" and self.curvature.state:
            state, dims = self.curvature.state, self.dims()
            return {
                n: {
                    "damping": float(state[f"{n}.damping"]),
                    "mean_eigenvalue": float(state[f"{n}.eigenvalues"].double().mean()),
                    "dim": dims[n],
                    "n_examples": info["examples"],
                }
                for n in self.module_names
            }
        if "damping" not in info:
            return {}
        return {
            n: {
                "damping": info["damping"][n],
                "mean_eigenvalue": info["mean_eigenvalue"][n],
                "dim": int(self.curvature.state[f"{n}.inverse"].shape[0]),
                "n_examples": info["examples"],
            }
            for n in self.module_names
        }

    def fit(self, train: Sequence[Record]) -> None:
        """Projected Fisher ``F~`` per module from the fitting gradients, damped and inverted by the ``exact``
        strategy fitted on the projected blocks (no-op without curvature).

        Raises :class:`~wherefrom.core.data.DataError` for no rows, an invalid row or a repeated id."""
        train = checked_rows(train, "training rows")
        self.check_memory(0, fit=True)
        self.curvature = self.new_curvature()
        if not self.use_curvature:
            return
        loss_fn = self.attributor.fisher_loss_fn()
        if self.strategy != "exact":

            def factors() -> Iterator[tuple[int, dict[str, TokenFactors]]]:
                for ids, batch in self.attributor.token_factor_stream(train, loss_fn, "projected fisher"):
                    yield len(ids), {n: self.projection.project_factors(n, batch.pop(n)) for n in self.module_names}

            self.curvature.fit_token_factors(factors, self.curvature_shapes())
            return

        def blocks() -> Iterator[dict[str, torch.Tensor]]:
            for _ids, grads in self.projected_gradients(train, loss_fn, "projected fisher"):
                yield {n: p.unsqueeze(1) for n, p in grads.items()}  # (b, k) -> (b, 1, k)

        self.curvature.fit_gradients(blocks, self.curvature_shapes())

    def precondition(
        self, grads: dict[str, torch.Tensor], curvature: Curvature | None = None
    ) -> dict[str, torch.Tensor]:
        """``(F~ + lambda I)^-1`` applied to projected rows ``{module: (b, k)}``: this method's fitted curvature
        (identity without curvature), or ``curvature``, another fitted projected curvature of these modules
        (e.g. :meth:`row_curvature`), each row reshaped to the curvature's (virtual) module shape."""
        if curvature is None:
            if not self.use_curvature:
                return grads
            if not self.curvature.state:
                raise RuntimeError(f"{self.name}: call fit(train) before scoring (or pass curvature=False)")
            curvature = self.curvature
        shapes = {name: (out, inp) for name, out, inp in curvature.modules}
        blocks = curvature.precondition({n: g.reshape(g.shape[0], *shapes[n]) for n, g in grads.items()})
        return {n: g.reshape(g.shape[0], -1) for n, g in blocks.items()}

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The projected curvature's state tensors (``exact``: each module's ``F~``, inverse and damping) and
        :meth:`metadata` (projection, damping, the curvature's metadata).

        Raises ``RuntimeError`` before :meth:`fit` and ``ValueError`` for a LoGra projection given explicit
        matrices (they are not part of the saved state; the seeded ones are rebuilt from the projection's config).
        """
        if self.use_curvature and not self.curvature.state:
            raise RuntimeError(f"{self.name}: call fit(train) before saving its state")
        if isinstance(self.projection, KroneckerProjection) and self.projection.explicit:
            raise ValueError(f"{self.name}: a projection with explicit matrices cannot be saved; use seeded ones")
        return dict(self.curvature.state), self.metadata()

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], train: Sequence[Record]) -> None:
        """Adopt a saved projected curvature; ``ValueError`` naming what differs when the saved projection,
        curvature or damping are not this method's."""
        mine = self.metadata()
        for key in ("projection", "curvature", "strategy", "damping", "damping_factor"):
            if state.get(key, "exact" if key == "strategy" else None) != mine[key]:
                raise ValueError(f"{self.name}: saved {key} {state[key]!r} differs from this method's {mine[key]!r}")
        curvature = curvature_from_state(state["projected_curvature"], tensors)
        if self.use_curvature and curvature.modules != [[n, *shape] for n, shape in self.curvature_shapes().items()]:
            raise ValueError(f"{self.name}: the saved projected curvature is of other modules or dimensions")
        self.curvature = curvature

    # --- index and scores -----------------------------------------------------------------------
    def index(self, train: Sequence[Record]) -> dict[str, torch.Tensor]:
        """Project and keep the training gradients (``{module: (n, k)}``, CPU); ``scores`` reuses them for these rows
        while nothing they depend on changed (:meth:`wherefrom.engine.api.Attributor.gradient_key`: the rows' tokens,
        the batch settings and every weight of the model)."""
        encoded = self.attributor.encoded(checked_rows(train, "training rows"))
        self.check_memory(len(encoded), fit=False)
        ids: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.module_names}
        for batch_ids, grads in self.projected_gradients(encoded, description="projected train gradients"):
            ids += batch_ids
            for n in self.module_names:
                parts[n].append(grads.pop(n).cpu())
        stored = {n: torch.cat(p) for n, p in parts.items()} if ids else {}
        self._index = (self.attributor.gradient_key(encoded), ids, stored)
        return stored

    def preconditioned_queries(self, queries: Sequence[Record]) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Query ids and preconditioned projected query vectors ``{module: (q, k)}``."""
        ids: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.module_names}
        for batch_ids, grads in self.projected_gradients(
            queries, self.attributor.query_loss_fn(), "projected query gradients"
        ):
            ids += batch_ids
            for n, value in self.precondition(grads).items():
                parts[n].append(value)
        if not ids:
            return ids, {
                m.name: torch.zeros(0, self._dim(m.name, m.shape), device=self.attributor.device)
                for m in self.attributor.modules
            }
        return ids, {n: torch.cat(p) for n, p in parts.items()}

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        """``(n_query, n_train)`` scores with a per-module split; positive = proponent.

        With ``config.normalize == "cosine"`` every score (and per-module part) is divided by
        ``||q~_pre|| ||G~_m||``, both norms over all modules, in the projected space.
        Raises :class:`~wherefrom.core.data.DataError` before any pass for an empty ``queries`` or
        ``train``, an invalid row or a repeated id.
        """
        queries, train = checked_rows(queries, "query rows"), checked_rows(train, "training rows")
        encoded_train = self.attributor.encoded(train)  # checked before any pass
        indexed = self._index is not None and self._index[0] == self.attributor.gradient_key(encoded_train)
        self.check_memory(len(queries), fit=False)
        query_ids, pre = self.preconditioned_queries(self.attributor.encoded(queries))
        if indexed:
            _, ids, stored = self._index
            stream: Iterator[tuple[list[str], dict[str, torch.Tensor]]] = iter([(list(ids), dict(stored))])
        else:
            stream = self.projected_gradients(encoded_train, description="projected train gradients")
        # Projected blocks are (n, k) matrices: the attributor's scoring (and cosine) applies as is.
        return self.attributor.scores_from_gradients(query_ids, pre, stream)

    # --- rows of a vector store -----------------------------------------------------------------
    def vector_blocks(self) -> list[tuple[str, tuple[int]]]:
        """The layout of a row: ``[(module, (k,)), ...]`` in module order (:func:`wherefrom.core.gradients.split_rows`)."""
        return [(n, (k,)) for n, k in self.dims().items()]

    def vector_settings(self) -> dict[str, Any]:
        """What fixes the rows' meaning besides the model: the projection, the projected curvature's strategy and damping."""
        keys = ("method", "projection", "strategy", "damping", "damping_factor")
        return {k: v for k, v in self.metadata().items() if k in keys}

    def train_vectors(
        self,
        train: Sequence[Record],
        precondition: bool = True,
        unit: bool = False,
        divisors: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """``(ids, rows (b, sum k))`` per batch: the projected training gradients ``G~`` (module blocks
        flattened in module order), with ``precondition`` the fitted ``(F~ + lambda I)^-1 G~`` (the train
        side carries the curvature, as in LESS/TrackStar; ``F~`` is symmetric, so ``q~ . (F~ + lambda I)^-1 G~``
        is :meth:`scores`' value), with ``unit`` divided by the row's norm over all modules. ``divisors``
        (trak only, see :meth:`projected_gradients`): each gradient divided elementwise before projection.

        ``score = query_vectors(...) @ row``: positive = proponent. Raises ``RuntimeError`` for
        ``precondition`` before :meth:`fit`."""
        for ids, grads in self.projected_gradients(train, description="projected train rows", divisors=divisors):
            rows = flatten_blocks(self.precondition(grads) if precondition else grads, self.module_names)
            yield ids, unit_rows(rows) if unit else rows

    def query_vectors(
        self, queries: Sequence[Record], unit: bool = False, curvature: Curvature | None = None
    ) -> tuple[list[str], torch.Tensor]:
        """Ids and projected query vectors ``q~`` (``q = -grad f``), ``(q, sum k)`` in the row layout of
        :meth:`train_vectors` (``unit``: divided by their norms; ``curvature``: a fitted projected curvature
        of these modules, e.g. :meth:`row_curvature`, applied to each ``q~`` first, so that raw rows give
        ``q~ . (F~ + lambda I)^-1 G~``). Raises :class:`~wherefrom.core.data.DataError` before any pass for no
        queries, an invalid row or a repeated id."""
        ids: list[str] = []
        parts = []
        for batch_ids, grads in self.projected_gradients(
            checked_rows(queries, "query rows"), self.attributor.query_loss_fn(), "projected query gradients"
        ):
            ids += batch_ids
            parts.append(
                flatten_blocks(grads if curvature is None else self.precondition(grads, curvature), self.module_names)
            )
        rows = torch.cat(parts)
        return ids, unit_rows(rows) if unit else rows

    def row_curvature(self, rows: Callable[[], Iterator[torch.Tensor]]) -> Curvature:
        """The empirical projected Fisher of stored rows: ``F~ = mean_n G~_n G~_n^T`` per module block of
        ``rows()`` (raw projected training gradients ``(b, sum k)`` in :meth:`vector_blocks`' layout, e.g. the
        shards of an index built with ``precondition=False``), damped with this method's ``damping`` /
        ``damping_factor``, summed and inverted by the ``exact`` strategy in float64 on the CPU (each batch's
        product on the rows' device): the curvature :meth:`fit` gives with ``fisher="empirical"`` on the same
        rows (LoGra, Choe et al. 2024, and Bergson precondition with the training gradients' own second moment).
        Under ``torch.distributed`` each process passes its own rows and the sums are all-reduced. ``ValueError`` for no rows; the Fisher's memory is checked first
        (:meth:`check_row_fisher_memory`)."""
        self.check_row_fisher_memory()
        layout = self.vector_blocks()

        def blocks() -> Iterator[dict[str, torch.Tensor]]:
            for flat in rows():
                yield {n: b.unsqueeze(1) for n, b in split_rows(flat, layout).items()}  # (b, 1, k); summed in float64

        exact = make_curvature("exact", self.damping, self.damping_factor, blocks="module")
        return exact.fit_gradients(blocks, {n: (1, k) for n, (k,) in layout})

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "projection": self.projection.config(),
            "curvature": self.use_curvature,
            "strategy": self.strategy,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "config": self.attributor.config.to_dict(),
            "info": self.info,
            "projected_curvature": self.curvature.metadata(),
        }
