"""Curvature strategies behind one interface (:class:`Curvature`), looked up by name."""

from __future__ import annotations

from pathlib import Path

from wherefrom.curvature.base import BatchSource, Curvature
from wherefrom.curvature.datainf import DataInf
from wherefrom.curvature.exact import ExactGGN
from wherefrom.curvature.iterative import Arnoldi, ConjugateGradient, ConvergenceWarning, LiSSA
from wherefrom.curvature.kronecker import EKFAC, KFAC
from wherefrom.curvature.products import GGNOperator
from wherefrom.curvature.simple import Diagonal, Identity

STRATEGIES: dict[str, type[Curvature]] = {
    cls.name: cls for cls in (Identity, Diagonal, KFAC, EKFAC, ExactGGN, ConjugateGradient, LiSSA, Arnoldi, DataInf)
}


def make_curvature(strategy: str, damping: float | None = None, damping_factor: float = 0.1, **options) -> Curvature:
    """A fresh, unfitted strategy by name (one of :data:`STRATEGIES`); ``options`` go to its constructor."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[strategy]
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        raise ValueError(f"strategy {strategy!r} has no option(s) {unknown}; its options are {list(cls.option_names)}")
    return cls(damping=damping, damping_factor=damping_factor, **options)


def load_curvature(folder: Path) -> Curvature:
    """Load a curvature saved by :meth:`Curvature.save`, with the constructor options it was made with.

    ``cg``/``lissa`` come back without model and data: call their ``attach(model, modules, batches)``
    before ``precondition``.
    """
    meta, state = Curvature.load_state(Path(folder))
    curvature = make_curvature(meta["strategy"], meta["damping"], meta["damping_factor"], **meta.get("options", {}))
    return curvature.restore(meta, state)


__all__ = [
    "EKFAC",
    "KFAC",
    "STRATEGIES",
    "Arnoldi",
    "BatchSource",
    "ConjugateGradient",
    "ConvergenceWarning",
    "Curvature",
    "DataInf",
    "Diagonal",
    "ExactGGN",
    "GGNOperator",
    "Identity",
    "LiSSA",
    "load_curvature",
    "make_curvature",
]
