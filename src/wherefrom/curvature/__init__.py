"""Curvature strategies behind one interface (:class:`Curvature`), looked up by name."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from .base import BatchSource, Curvature
from .datainf import DataInf
from .exact import ExactGGN
from .iterative import Arnoldi, ConjugateGradient, ConvergenceWarning, LiSSA
from .kronecker import EKFAC, KFAC
from .products import GGNOperator
from .simple import Diagonal, Identity

STRATEGIES: dict[str, type[Curvature]] = {
    cls.name: cls for cls in (Identity, Diagonal, KFAC, EKFAC, ExactGGN, ConjugateGradient, LiSSA, Arnoldi, DataInf)
}


def make_curvature(strategy: str, damping: float | None = None, damping_factor: float = 0.1, **options) -> Curvature:
    """A fresh, unfitted strategy by name (one of :data:`STRATEGIES`); ``options`` go to its constructor."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](damping=damping, damping_factor=damping_factor, **options)


def saved_options(meta: dict[str, Any]) -> dict[str, Any]:
    """Constructor options recorded in a curvature's ``metadata()``.

    Two places count: an ``"options"`` dict (strategies that save all their settings there), and any
    top-level key named like a constructor keyword of the strategy (e.g. ``ExactGGN``'s ``blocks``).
    """
    cls = STRATEGIES.get(meta.get("strategy", ""))
    options: dict[str, Any] = {}
    if cls is not None:
        parameters = inspect.signature(cls.__init__).parameters
        reserved = {"self", "damping", "damping_factor"}
        named = [k for k, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        options = {k: meta[k] for k in named if k not in reserved and k in meta}
    options.update(meta.get("options") or {})
    return options


def load_curvature(folder: Path) -> Curvature:
    """Load a curvature saved by :meth:`Curvature.save`, with the constructor options it was made with.

    ``cg``/``lissa`` come back without model and data: call their ``attach(model, modules, batches)``
    before ``precondition``.
    """
    meta, state = Curvature.load_state(Path(folder))
    curvature = make_curvature(meta["strategy"], meta["damping"], meta["damping_factor"], **saved_options(meta))
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
    "saved_options",
]
