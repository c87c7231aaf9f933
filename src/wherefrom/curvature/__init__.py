"""Curvature strategies behind one interface (:class:`Curvature`), looked up by name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wherefrom.core.options import OptionError, check_options
from wherefrom.curvature.base import DAMPING_FACTOR, DAMPING_OPTIONS, BatchSource, Curvature
from wherefrom.curvature.datainf import DataInf
from wherefrom.curvature.exact import ExactGGN
from wherefrom.curvature.iterative import Arnoldi, ConjugateGradient, ConvergenceWarning, LiSSA
from wherefrom.curvature.kronecker import EKFAC, KFAC
from wherefrom.curvature.products import FisherOperator, GGNOperator
from wherefrom.curvature.simple import Diagonal, Identity

STRATEGIES: dict[str, type[Curvature]] = {
    cls.name: cls for cls in (Identity, Diagonal, KFAC, EKFAC, ExactGGN, ConjugateGradient, LiSSA, Arnoldi, DataInf)
}


def make_curvature(
    strategy: str, damping: float | None = None, damping_factor: float = DAMPING_FACTOR, **options
) -> Curvature:
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


def configured_curvature(
    strategy: str, damping: float | None, damping_factor: float, options: Mapping[str, Any]
) -> Curvature:
    """:func:`make_curvature` of a configuration's ``strategy`` with its strategy ``options`` as a mapping
    (:attr:`wherefrom.engine.api.AttributionConfig.strategy_options`, ``--strategy-option``). Raises
    :class:`wherefrom.core.options.OptionError` naming the setting when ``options`` holds ``damping`` or
    ``damping_factor``: they are the configuration's own settings (given twice, they reached the strategy as a
    ``TypeError`` naming none), and an unknown option listing the strategy's own (they were listed with ``damping``
    and ``damping_factor``, which the next try was refused for); else as :func:`make_curvature`."""
    clash = [spec.name for spec in DAMPING_OPTIONS if spec.name in options]
    if clash:
        raise OptionError(
            f"strategy {strategy!r}: {clash[0]} is the damping setting, not a strategy option; give it as "
            f"{clash[0]} (--{clash[0].replace('_', '-')} on the command line)"
        )
    if strategy in STRATEGIES:  # an unknown one lists the strategy's own options, not the damping settings (userO)
        check_options(f"strategy {strategy!r}", STRATEGIES[strategy].option_specs, options)
    return make_curvature(strategy, damping, damping_factor, **options)


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
    "configured_curvature",
    "curvature_from_state",
    "load_curvature",
    "make_curvature",
]
