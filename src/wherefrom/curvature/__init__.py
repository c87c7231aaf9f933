"""Curvature strategies behind one interface (:class:`Curvature`), looked up by name."""

from __future__ import annotations

from pathlib import Path

from .base import BatchSource, Curvature
from .exact import ExactGGN
from .kronecker import EKFAC, KFAC
from .simple import Diagonal, Identity

STRATEGIES: dict[str, type[Curvature]] = {cls.name: cls for cls in (Identity, Diagonal, KFAC, EKFAC, ExactGGN)}


def make_curvature(strategy: str, damping: float | None = None, damping_factor: float = 0.1, **options) -> Curvature:
    """A fresh, unfitted strategy by name (one of :data:`STRATEGIES`); ``options`` go to its constructor."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](damping=damping, damping_factor=damping_factor, **options)


def load_curvature(folder: Path) -> Curvature:
    """Load a curvature saved by :meth:`Curvature.save`."""
    meta, state = Curvature.load_state(Path(folder))
    options = {"blocks": meta["blocks"]} if "blocks" in meta else {}
    curvature = make_curvature(meta["strategy"], meta["damping"], meta["damping_factor"], **options)
    return curvature.restore(meta, state)


__all__ = ["BatchSource", "Curvature", "STRATEGIES", "make_curvature", "load_curvature", "Identity", "Diagonal", "KFAC", "EKFAC", "ExactGGN"]
