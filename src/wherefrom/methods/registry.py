"""Named attribution methods: recipes over the parts (tracking, gradients, curvature, scoring).

Every method has the same two-phase contract (dattri-style): ``fit(train)`` once, then
``scores(queries, train)`` returning :class:`wherefrom.core.scoring.Scores` with the README's sign
convention (positive = proponent). :func:`make_method` builds one by name; ``options`` go to the
method's constructor (e.g. ``depth`` for ``lissa``, ``rank`` for ``arnoldi``, ``dim`` for ``trak``,
``layer``/``pooling`` for ``repsim``, ``checkpoints`` for ``tracin``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.lexical import BM25
from wherefrom.methods.projection import ProjectedInfluence
from wherefrom.methods.representation import RepSim
from wherefrom.methods.tracin import TracIn


class Method(Protocol):
    """A named attribution recipe: ``fit`` once on the training rows, then ``scores`` query rows."""

    def fit(self, train: Sequence[Record]) -> Any: ...

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores: ...


class InfluenceMethod:
    """Influence with one curvature strategy: ``-grad f(z_q)^T (G + lambda I)^-1 grad L(z_m)``."""

    def __init__(self, name: str, model, tokenizer, config: AttributionConfig, **strategy_options: Any):
        self.name = name
        options = {**config.strategy_options, **strategy_options}
        self.attributor = Attributor(model, tokenizer, replace(config, strategy_options=options))

    def fit(self, train: Sequence[Record]) -> None:
        self.attributor.fit(train)

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        return self.attributor.scores(queries, train)


def _influence(strategy: str, **overrides: Any) -> Callable[..., InfluenceMethod]:
    def build(name: str, model, tokenizer, config: AttributionConfig, **options: Any) -> InfluenceMethod:
        return InfluenceMethod(name, model, tokenizer, replace(config, strategy=strategy, **overrides), **options)

    return build


METHODS: dict[str, Callable[..., Method]] = {
    "gradsim": _influence("identity"),
    "gradsim-cosine": _influence("identity", normalize="cosine"),
    "identity": _influence("identity"),
    "diagonal": _influence("diagonal"),
    "kfac": _influence("kfac"),
    "ekfac": _influence("ekfac"),
    "exact": _influence("exact"),
    "cg": _influence("cg"),
    "lissa": _influence("lissa"),
    "arnoldi": _influence("arnoldi"),
    # Kwon et al. form DataInf from the training-loss gradients (empirical Fisher).
    "datainf": _influence("datainf", fisher="empirical"),
    "tracin": lambda name, model, tokenizer, config, **options: TracIn(
        options.pop("base", None) or (lambda: copy.deepcopy(model)),
        options.pop("checkpoints"),
        tokenizer,
        config,
        **options,
    ),
    "repsim": lambda name, model, tokenizer, config, **options: RepSim.from_config(model, tokenizer, config, **options),
    "bm25": lambda name, model, tokenizer, config, **options: BM25(**options),
    "trak": lambda name, model, tokenizer, config, **options: ProjectedInfluence.trak(
        model, tokenizer, config, **options
    ),
    "logra": lambda name, model, tokenizer, config, **options: ProjectedInfluence.logra(
        model, tokenizer, config, **options
    ),
}
"""Every method by name. ``tracin`` needs ``checkpoints=[...]``; LoRA checkpoints are applied to ``base``
(a model folder), by default to a copy of the given (base) model."""


def make_method(name: str, model, tokenizer, config: AttributionConfig | None = None, **options: Any) -> Method:
    """A method by name (one of :data:`METHODS`); ``options`` go to its constructor."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    if name == "tracin" and "checkpoints" not in options:
        raise ValueError("method 'tracin' needs checkpoints=[...] (folders a fine-tuning run saved)")
    return METHODS[name](name, model, tokenizer, config or AttributionConfig(), **options)


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` as a list; ``ValueError`` when it is empty, names an unknown method or repeats one."""
    methods = list(methods)
    if not methods:
        raise ValueError("at least one method is needed")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat: {methods}")
    return methods
