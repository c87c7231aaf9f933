"""Curvature strategies behind one interface (:class:`Curvature`), looked up by name."""

from __future__ import annotations

from pathlib import Path

from wherefrom.core.options import check_options
from wherefrom.curvature.base import DAMPING_OPTIONS, BatchSource, Curvature
from wherefrom.curvature.datainf import DataInf
from wherefrom.curvature.exact import ExactGGN
from wherefrom.curvature.iterative import Arnoldi, ConjugateGradient, ConvergenceWarning, LiSSA
from wherefrom.curvature.kronecker import EKFAC, KFAC
from wherefrom.curvature.products import FisherOperator, GGNOperator
from wherefrom.curvature.simple import Diagonal, Identity

STRATEGIES: dict[str, type[Curvature]] = {
    cls.name: cls for cls in (Identity, Diagonal, KFAC, EKFAC, ExactGGN, ConjugateGradient, LiSSA, Arnoldi, DataInf)
}


def make_curvature(strategy: str, damping: float | None = None, damping_factor: float = 0.1, **options) -> Curvature:
    """A fresh, unfitted strategy by name (one of :data:`STRATEGIES`); ``options`` go to its constructor.

    The damping and ``options`` are validated against :data:`wherefrom.curvature.base.DAMPING_OPTIONS`
    and the strategy's ``option_specs`` first (text read as JSON, e.g. ``"300"`` -> ``300``):
    :class:`wherefrom.core.options.OptionError` (a ``ValueError``) names the strategy, the option, the
    value and what is allowed. ``ValueError`` for an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[strategy]
    checked = check_options(
        f"strategy {strategy!r}",
        (*DAMPING_OPTIONS, *cls.option_specs),
        {"damping": damping, "damping_factor": damping_factor, **options},
    )
    return cls(**checked)


def load_curvature(folder: Path) -> Curvature:
    """Load a curvature saved by :meth:`Curvature.save`, with the constructor options it was made with.

    ``cg``/``lissa`` come back without model and data: call their ``attach(model, modules, batches)``
    before ``precondition``.
    """
    return curvature_from_state(*Curvature.load_state(Path(folder)))


def curvature_from_state(meta: dict, state: dict) -> Curvature:
    """The strategy ``meta`` (a :meth:`Curvature.metadata`) describes, holding the fitted ``state`` tensors."""
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
    "FisherOperator",
    "GGNOperator",
    "Identity",
    "LiSSA",
    "curvature_from_state",
    "load_curvature",
    "make_curvature",
]
