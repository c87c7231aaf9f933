"""The registry of named attribution methods: what each computes, its typed options and its paper.

Every method has the same two-phase contract (dattri-style): ``fit(train)`` once, then
``scores(queries, train)`` returning :class:`wherefrom.core.scoring.Scores` with the README's sign
convention (positive = proponent; for the similarity families, :data:`SIMILARITY_FAMILIES`, higher = more
similar). :data:`METHODS` holds one :class:`MethodSpec` per name: its
family (``influence``: a curvature strategy over exact gradients; ``projected``: influence in a
random projection of the gradients; ``checkpoint``: summed over fine-tuning checkpoints;
``representation``; ``lexical``), a description, the citation (paper, equation where there is one),
its options as :class:`wherefrom.core.options.OptionSpec` and the builder.

:func:`make_method` validates the options against the spec before any model work (unknown option,
wrong type, out of range or missing required option: :class:`wherefrom.core.options.OptionError`, a
``ValueError`` naming the method, the option, the value and what is allowed). Options that are
:class:`~wherefrom.engine.api.AttributionConfig` settings changing a method's numbers (``damping``,
``damping_factor``, ``fisher``, ``reduction``, ``query_rank``, where the method has them) override
the config's value; every other option goes to the method's constructor (an influence method's to
its curvature strategy, :data:`wherefrom.curvature.STRATEGIES`). ``wherefrom methods`` prints the
registry.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from wherefrom.core.data import Record
from wherefrom.core.options import UNSET, OptionError, OptionSpec, check_options, from_signature, with_defaults
from wherefrom.core.scoring import Scores
from wherefrom.curvature import STRATEGIES, configured_curvature, curvature_from_state
from wherefrom.curvature.base import (
    DAMPING_FACTOR,
    DAMPING_OPTIONS,
    GROSSE_2023,
    Progress,
    no_progress,
    unused_damping_factor,
)
from wherefrom.curvature.iterative import AGARWAL_2017, SCHIOPPA_2022
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.lexical import BM25
from wherefrom.methods.projection import ProjectedInfluence
from wherefrom.methods.representation import RepSim
from wherefrom.methods.tracin import TracIn, tracin_scores
from wherefrom.models.loading import device_here, is_peft, model_folder_problem

__all__ = [
    "FAMILIES",
    "METHODS",
    "SETTING_OPTIONS",
    "InfluenceMethod",
    "Method",
    "MethodSpec",
    "check_methods",
    "in_family",
    "make_method",
    "method_settings",
    "method_spec",
    "similarity_family",
]


class Method(Protocol):
    """A named attribution recipe: ``fit`` once on the training rows, then ``scores`` query rows."""

    def fit(self, train: Sequence[Record]) -> Any: ...

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores: ...

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What ``fit`` computed: ``(tensors, JSON-ready values)``, saved by :func:`wherefrom.methods.saved.save_fitted`."""
        ...

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], train: Sequence[Record]) -> None:
        """Adopt a :meth:`fitted_state` of a method made with the same options, fitted on ``train``."""
        ...


class InfluenceMethod:
    """Influence with one curvature strategy: ``-grad f(z_q)^T (G + lambda I)^-1 grad L(z_m)``."""

    def __init__(
        self,
        name: str,
        model,
        tokenizer,
        config: AttributionConfig,
        progress: Progress = no_progress,
        **strategy_options: Any,
    ):
        self.name = name
        options = {**config.strategy_options, **strategy_options}
        self.attributor = Attributor(model, tokenizer, replace(config, strategy_options=options), progress=progress)

    def fit(self, train: Sequence[Record]) -> None:
        self.attributor.fit(train)

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        return self.attributor.scores(queries, train)

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The fitted curvature's state tensors and its metadata (strategy, damping, options, modules, info)."""
        curvature = self.attributor.curvature
        if curvature.needs_fit and not curvature.state:
            raise RuntimeError(f"method {self.name!r} is not fitted: call fit(train) first")
        return dict(curvature.state), curvature.metadata()

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], train: Sequence[Record]) -> None:
        """Adopt the saved curvature (``cg``/``lissa`` are re-attached to the model and ``train``)."""
        self.attributor.use_curvature(curvature_from_state(state, tensors), train)


FAMILIES = ("influence", "projected", "checkpoint", "representation", "lexical")
ROW_FAMILIES = ("influence", "projected", "checkpoint", "representation")
"""The families whose train side is a vector per training row (raw or projected gradients, checkpoint rows, hidden
states), which a vector index stores; a lexical method scores from its fitted state only."""

SETTING_OPTIONS: tuple[OptionSpec, ...] = from_signature(
    AttributionConfig,
    # the damping's range and help as every strategy declares them; type and default from AttributionConfig
    *(replace(spec, type=UNSET, default=UNSET) for spec in DAMPING_OPTIONS),
    OptionSpec(
        "fisher",
        help="true: G from labels sampled from the model (Gauss-Newton); empirical: from the data's completions",
        source="Martens & Grosse 2015 (true vs empirical Fisher)",
    ),
    OptionSpec("reduction", help="training loss over completion tokens: sum (Grosse et al.) or mean"),
    OptionSpec("query_rank", low=1, help="rank of the low-rank query batching; null: full rank"),
)
""":class:`~wherefrom.engine.api.AttributionConfig` settings a method may take as options (they override
the config's value); a method declares the ones that change its numbers."""

SETTING_NAMES = frozenset(spec.name for spec in SETTING_OPTIONS)

INPUT_SETTINGS = frozenset({"batch_size", "max_length", "chat_template", "template", "truncate"})
""":class:`~wherefrom.engine.api.AttributionConfig` settings of how rows become model inputs, read by every method
that runs the model (``repsim`` reads only these)."""

GRADIENT_SETTINGS = INPUT_SETTINGS | {
    "include",
    "exclude",
    "query_without_eos",
    "autocast",
    "append_eos",
    "pad_left",
    "loss_tokens",
    "normalize",
}
""":class:`~wherefrom.engine.api.AttributionConfig` settings read by every method that takes gradients of the model:
the inputs, the tracked modules, the query measurement, autocast and the score normalisation. Beyond these a method
reads the setting options it declares (:data:`SETTING_NAMES`), its fixed :attr:`MethodSpec.settings` and, where it
draws anything at random, ``seed`` (:attr:`MethodSpec.settings_read`)."""

DRAWING_SETTINGS = GRADIENT_SETTINGS | {"seed"}
""":data:`GRADIENT_SETTINGS` and ``seed``: read by a method that samples Fisher targets or projections."""


def _settings(*names: str, **presets: Any) -> tuple[OptionSpec, ...]:
    """The :data:`SETTING_OPTIONS` called ``names``, with a method's ``presets`` as their defaults."""
    chosen = [spec for spec in SETTING_OPTIONS if spec.name in names]
    return tuple(replace(spec, default=presets[spec.name]) if spec.name in presets else spec for spec in chosen)


@dataclass(frozen=True)
class MethodSpec:
    """One named method: ``build(name, model, tokenizer, config, progress, **options)`` makes it (``progress``: the
    :data:`wherefrom.curvature.base.Progress` its passes over rows report to; ``bm25`` runs none).

    ``settings``: :class:`~wherefrom.engine.api.AttributionConfig` values the method fixes (``strategy``,
    ``normalize``) or presets (``fisher`` for ``datainf``); setting options given to :func:`make_method`
    override the presets. ``options``: every keyword the method accepts. ``model_settings``: the
    :class:`~wherefrom.engine.api.AttributionConfig` settings of the model's passes that the method reads
    (:data:`GRADIENT_SETTINGS`, :data:`DRAWING_SETTINGS`, :data:`INPUT_SETTINGS` or none). ``curvature_settings``:
    the settings and options read only while the method's option ``curvature`` is on (``trak``/``logra``: the
    Fisher and strategy of the projected curvature that ``curvature=False`` skips; not the damping, which an
    ``index --precondition empirical`` of such a run applies to the Fisher of the stored rows).
    """

    name: str
    family: str
    description: str
    citation: str
    options: tuple[OptionSpec, ...]
    build: Callable[..., Method]
    settings: Mapping[str, Any] = field(default_factory=dict)
    model_settings: frozenset[str] = DRAWING_SETTINGS
    curvature_settings: frozenset[str] = frozenset()

    @property
    def settings_read(self) -> frozenset[str]:
        """The :class:`~wherefrom.engine.api.AttributionConfig` settings that change this method's numbers: its
        :attr:`model_settings`, the setting options it declares and the settings it fixes or presets. A setting
        outside it is ignored by the method (``bm25`` reads none; ``trak``/``logra`` read no ``strategy``: their
        projected curvature is their own option)."""
        declared = {spec.name for spec in self.options if spec.name in SETTING_NAMES}
        return self.model_settings | declared | set(self.settings)

    def skipped_with(self, options: Mapping[str, Any]) -> frozenset[str]:
        """The settings and options this method does not read with its ``options``: :attr:`curvature_settings` with
        ``curvature=False``, else none."""
        return self.curvature_settings if options.get("curvature") is False else frozenset()

    def takes(self, name: str, value: Any = UNSET, options: Mapping[str, Any] | None = None) -> bool:
        """Whether this method's numbers follow the configuration's setting ``name`` (at ``value``, when given), with
        its ``options``: one of :attr:`settings_read` that it does not fix or preset (:attr:`settings`:
        ``method_settings`` lays those over the configuration, so ``datainf`` scores with the empirical Fisher
        whatever ``--fisher`` says; its own ``fisher`` is a setting option) nor skip (:meth:`skipped_with`:
        ``logra``'s Fisher with ``curvature=False``; the damping factor beside its own absolute ``damping`` option), or a
        fixed or preset setting given at the method's own value."""
        if name in self.unread_with(options or {}):
            return False
        if name in self.settings:
            return value is not UNSET and self.settings[name] == value
        return name in self.settings_read

    def unread_with(self, options: Mapping[str, Any]) -> frozenset[str]:
        """The settings this method does not read with its ``options``: those it skips (:meth:`skipped_with`), and
        ``damping_factor`` beside its own absolute ``damping`` option, which sets lambda itself (userO:
        ``--damping-factor`` beside it was taken, recorded and unused)."""
        own_damping = {"damping_factor"} if options.get("damping") is not None else set()
        return self.skipped_with(options) | own_damping

    def read(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``settings`` (:class:`~wherefrom.engine.api.AttributionConfig` names to values) in
        :attr:`settings_read`: those this method's scores depend on, so those a cache of its scores is keyed on."""
        return {k: v for k, v in settings.items() if k in self.settings_read}

    def check(self, options: Mapping[str, Any], supplied: Collection[str] = ()) -> dict[str, Any]:
        """``options`` validated and converted (see :func:`wherefrom.core.options.check_options`; ``supplied``:
        required options the caller fills in later)."""
        return check_options(f"method {self.name!r}", self.options, options, supplied)

    @property
    def constructor_options(self) -> tuple[OptionSpec, ...]:
        """The :attr:`options` that go to the method's constructor (an influence method's: its strategy's), not the
        setting options (:data:`SETTING_NAMES`)."""
        return tuple(spec for spec in self.options if spec.name not in SETTING_NAMES)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what ``wherefrom methods --json`` prints for this method)."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "citation": self.citation,
            "settings": dict(self.settings),
            "options": [spec.to_dict() for spec in self.options],
        }


KOH_LIANG = "Koh & Liang 2017, Understanding Black-box Predictions via Influence Functions, eq. 2"
CHARPIAT = "Charpiat et al. 2019, Input Similarity from the Neural Network Perspective"


def _influence(name: str, description: str, citation: str, **settings: Any) -> MethodSpec:
    """An :class:`InfluenceMethod` over the strategy ``settings["strategy"]``, with its options. A strategy that
    fits nothing (``identity``) reads no Fisher, damping or seed: it declares only ``reduction`` and ``query_rank``."""
    strategy = STRATEGIES[settings["strategy"]]
    names = SETTING_NAMES if strategy.needs_fit else {"reduction", "query_rank"}
    options = (*_settings(*names, **settings), *strategy.option_specs)
    model = DRAWING_SETTINGS if strategy.needs_fit else GRADIENT_SETTINGS
    return MethodSpec(name, "influence", description, citation, options, InfluenceMethod, settings, model)


def _tracin(
    name: str,
    model,
    tokenizer,
    config: AttributionConfig,
    progress: Progress = no_progress,
    checkpoints=None,
    base=None,
    **options,
) -> TracIn:
    base = base or (lambda: _without_adapter(copy.deepcopy(model)))
    return TracIn(base, checkpoints, tokenizer, config, progress=progress, **options)


def _without_adapter(model):
    """``model`` with a PEFT adapter removed, not merged (PEFT's ``unload``: the base weights), else as it is: the
    base that TracIn's LoRA checkpoints go on. A run given ``--adapter`` (the fine-tuning's final adapter) holds the
    adapted model, and its checkpoints' adapters did not fit the wrapped module names, so such a run fitted and then
    failed to score unless ``base`` named the base model's folder."""
    return model.unload() if is_peft(model) else model


PROJECTED_CURVATURE = from_signature(
    ProjectedInfluence,
    OptionSpec("curvature", help="false: no projected Fisher, scores are raw projected gradient dot products"),
    OptionSpec(
        "strategy",
        help="projected curvature: exact (dense k x k F~ per module), or kfac/ekfac of the projected per-token "
        "factors (logra only)",
    ),
)


def _projected(
    name: str,
    description: str,
    citation: str,
    build: Callable[..., ProjectedInfluence],
    strategies: tuple[str, ...],
    *projection: OptionSpec,
) -> MethodSpec:
    """A :class:`ProjectedInfluence` made by ``build`` (``trak``/``logra``), with its projection options
    (type and default read from ``build`` unless given), ``curvature`` and its projected curvature ``strategies``
    (userO: trak listed kfac and ekfac, LoGra's only, and refused them after the model loaded), and the damping and
    Fisher settings."""
    options = (
        *from_signature(build, *projection),
        *(replace(spec, choices=strategies) if spec.name == "strategy" else spec for spec in PROJECTED_CURVATURE),
        *_settings("damping", "damping_factor", "fisher", "reduction"),
    )
    return MethodSpec(
        name,
        "projected",
        description,
        citation,
        options,
        lambda _name, model, tokenizer, config, progress=no_progress, **chosen: build(
            model, tokenizer, config, progress=progress, **chosen
        ),
        curvature_settings=frozenset({"fisher", "strategy"}),
    )


_SPECS = [
    _influence(
        "gradsim",
        "gradient dot product grad L(z_q)^T grad L(z_m) (identity curvature)",
        f"{CHARPIAT}; {GROSSE_2023} (baseline)",
        strategy="identity",
    ),
    _influence(
        "gradsim-cosine",
        "gradient cosine similarity, in [-1, 1]",
        CHARPIAT,
        strategy="identity",
        normalize="cosine",
    ),
    _influence("identity", "gradient dot product (the identity strategy, as gradsim)", CHARPIAT, strategy="identity"),
    _influence(
        "diagonal",
        "influence with the diagonal of the Fisher per module",
        f"{KOH_LIANG} (diagonal G)",
        strategy="diagonal",
    ),
    _influence(
        "kfac",
        "influence with Kronecker-factored Fisher blocks A (x) S per module",
        f"Martens & Grosse 2015, Optimizing Neural Networks with Kronecker-factored Approximate Curvature; {KOH_LIANG}",
        strategy="kfac",
    ),
    _influence(
        "ekfac",
        "influence with K-FAC's eigenbasis and eigenvalues re-fitted to per-example gradients",
        "George et al. 2018, Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis; "
        f"{GROSSE_2023} (EK-FAC influence for LLMs, approximating the PBRF of Bae et al. 2022)",
        strategy="ekfac",
    ),
    _influence(
        "exact",
        "influence with the dense damped GGN (or Hessian) per module block or over all tracked parameters",
        f"{KOH_LIANG}; Bae et al. 2022, If Influence Functions are the Answer, Then What is the Question? (GGN, PBRF)",
        strategy="exact",
    ),
    _influence(
        "cg",
        "influence by conjugate gradients on GGN-vector products (no matrix formed)",
        f"{KOH_LIANG}, sec. 3 (conjugate gradients; Martens 2010)",
        strategy="cg",
    ),
    _influence(
        "lissa",
        "influence by the LiSSA recursion r_j = v + (I - alpha (G + lambda I)) r_(j-1), estimate alpha r_J",
        f"{AGARWAL_2017}; {KOH_LIANG}, sec. 3 (stochastic estimation)",
        strategy="lissa",
    ),
    _influence(
        "arnoldi",
        "influence with the top eigenpairs of the GGN from Arnoldi iterations",
        SCHIOPPA_2022,
        strategy="arnoldi",
    ),
    _influence(
        "datainf",
        "Kwon et al.'s closed-form inverse per module (Sherman-Morrison per example), empirical Fisher",
        "Kwon et al. 2024, DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and Diffusion Models, eq. 5",
        strategy="datainf",
        fisher="empirical",  # Kwon et al. form DataInf from the training-loss gradients (empirical Fisher)
    ),
    _projected(
        "trak",
        "influence in a dense random (Gaussian/Rademacher) projection of the gradients, damped projected Fisher",
        "Park et al. 2023, TRAK: Attributing Model Behavior at Scale",
        ProjectedInfluence.trak,
        ("exact",),
        OptionSpec("dim", low=1, help="projected length k per module"),
        OptionSpec("kind", help="distribution of the projection's entries"),
    ),
    _projected(
        "logra",
        "influence in LoGra's Kronecker projection P_out g a^T P_in^T (the gradient is never formed)",
        "Choe et al. 2024, What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence Functions",
        ProjectedInfluence.logra,
        ("exact", "kfac", "ekfac"),
        OptionSpec("dim_in", low=1, help="projected input side k_in per module"),
        OptionSpec("dim_out", low=1, help="projected output side k_out per module"),
        OptionSpec("kind", help="projection matrices' entries"),
    ),
    MethodSpec(
        "tracin",
        "checkpoint",
        "sum_k lr_k grad L(z_q; theta_k)^T grad L(z_m; theta_k) over saved fine-tuning checkpoints",
        "Pruthi et al. 2020, Estimating Training Data Influence by Tracing Gradient Descent (TracInCP)",
        (
            *from_signature(
                TracIn,
                OptionSpec(
                    "checkpoints",
                    help="folders a fine-tuning run saved (LoRA adapters or full models), or (model, lr) pairs",
                ),
                OptionSpec(
                    "dim",
                    low=1,
                    help="project each module's gradient to dim numbers (TRAK's seeded Gaussian projection, the "
                    "same at every checkpoint); null: unprojected",
                ),
            ),
            OptionSpec(
                "base",
                type=(str, Path, callable),
                default=None,
                nullable=True,
                problem=lambda base: None if callable(base) else model_folder_problem(base),
                help="base model folder (or loader) for LoRA checkpoints; null: a copy of the given model, without "
                "its LoRA adapter when it has one (--adapter)",
            ),
            *from_signature(
                tracin_scores,
                OptionSpec("learning_rates", help="one per checkpoint; null: from each trainer_state.json"),
                OptionSpec(
                    "device",
                    type=(str, torch.device),
                    nullable=True,
                    problem=device_here,
                    help="where checkpoint folders are loaded; null: GPU if available",
                ),
                OptionSpec("dtype", help="dtype checkpoint folders are loaded in (a torch.dtype)"),
            ),
            *_settings("reduction", "query_rank"),
        ),
        _tracin,
    ),
    MethodSpec(
        "repsim",
        "representation",
        "cosine similarity of one layer's hidden states, pooled over positions",
        "Hanawa et al. 2021, Evaluation of Similarity-based Explanations; "
        "Li et al. 2024, Do Influence Functions Work on Large Language Models?",
        from_signature(
            RepSim,
            OptionSpec("layer", help="hidden-state index: 0 = embeddings, -1 = last layer"),
            OptionSpec("pooling", help="last_prompt: last prompt token; last: last token; mean: over real tokens"),
        ),
        lambda name, model, tokenizer, config, progress=no_progress, **options: RepSim.from_config(
            model, tokenizer, config, progress=progress, **options
        ),
        model_settings=INPUT_SETTINGS,
    ),
    MethodSpec(
        "bm25",
        "lexical",
        "Okapi BM25 of the query's words against prompt + completion (no model)",
        "Robertson & Zaragoza 2009, The Probabilistic Relevance Framework: BM25 and Beyond",
        from_signature(
            BM25,
            OptionSpec("k1", low=0.0, help="term-frequency saturation"),
            OptionSpec("b", low=0.0, high=1.0, help="document-length normalisation"),
            OptionSpec("idf", help="lucene: log(1 + (N - n + 0.5) / (n + 0.5)); okapi: the classic form"),
            OptionSpec("epsilon", help="okapi idf: negative values become epsilon x mean idf"),
        ),
        lambda name, model, tokenizer, config, _progress=no_progress, **options: BM25(**options),  # no model pass
        model_settings=frozenset(),
    ),
]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
"""Every method by name (``wherefrom methods`` lists them with their options and papers)."""


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; ``ValueError`` naming the known methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def split_settings(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(setting options, constructor options)`` of a method's ``options``: those named in :data:`SETTING_NAMES`,
    which override attribution settings, and the others, which go to its constructor (each in its given order)."""
    settings = {k: v for k, v in options.items() if k in SETTING_NAMES}
    return settings, {k: v for k, v in options.items() if k not in SETTING_NAMES}


def options_in_full(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor options (:attr:`MethodSpec.constructor_options`) of method ``name`` in ``options``, with every
    one left out at its default: the form in which run folders and ``attribute`` record and compare a method's
    options, so that an option given at its default is the same setting as one left out. Setting options
    (:data:`SETTING_NAMES`) are not in it: they are recorded with the attribution settings. ``ValueError`` naming
    the known methods for an unknown ``name``."""
    return with_defaults(method_spec(name).constructor_options, split_settings(options)[1])


def options_off_default(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of method ``name`` less the constructor options given at their defaults (those
    :func:`options_in_full` fills in): the form a study's cache key holds, so that an option given at its default and one
    left out hit the same cached row. Setting options (:data:`SETTING_NAMES`) stay as given: they override the
    study's attribution settings, whose values the key holds apart. A row cached before keys took this form
    (they held the options as given) still matches unless it was made with an option given at its default; that
    one is computed once more. An unknown ``name``: ``options``."""
    defaults = options_in_full(name, {}) if name in METHODS else {}
    return {k: v for k, v in options.items() if not (k in defaults and v == defaults[k])}


def in_family(name: str, family: str) -> bool:
    """True when ``name`` is a method of :data:`METHODS` in ``family`` (one of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; choose one of {list(FAMILIES)}")
    return name in METHODS and METHODS[name].family == family


SIMILARITY_FAMILIES = ("representation", "lexical")
"""The families whose scores are a similarity, not influence: higher = more similar, no proponents or opponents."""


def similarity_family(name: object) -> str | None:
    """The family of method ``name`` when its scores are a similarity (:data:`SIMILARITY_FAMILIES`: repsim's
    ``representation``, bm25's ``lexical``), else ``None`` (an influence method, a bare strategy, or a name that is
    not a method: a run's recorded method may be absent)."""
    if not isinstance(name, str) or name not in METHODS:
        return None
    family = METHODS[name].family
    return family if family in SIMILARITY_FAMILIES else None


def make_method(
    name: str,
    model,
    tokenizer,
    config: AttributionConfig | None = None,
    progress: Progress = no_progress,
    **options: Any,
) -> Method:
    """The method ``name`` (one of :data:`METHODS`) with ``options``, validated before any model work; its passes
    over rows report to ``progress`` (a run's bars: userD saw none for logra, trak, tracin or repsim runs).

    Setting options (:data:`SETTING_OPTIONS` the method declares) replace the ``config``'s values; the
    others go to the method's constructor. Raises ``ValueError`` for an unknown method and
    :class:`wherefrom.core.options.OptionError` (a ``ValueError``) for an unknown option, a value of the
    wrong type or out of range, or a required option missing (``tracin``'s ``checkpoints``), naming the
    method, the option, the value and what is allowed.
    """
    config, constructor = method_settings(name, config, options)
    return METHODS[name].build(name, model, tokenizer, config, progress, **constructor)


def method_settings(
    name: str,
    config: AttributionConfig | None = None,
    options: Mapping[str, Any] | None = None,
    supplied: Collection[str] = (),
) -> tuple[AttributionConfig, dict[str, Any]]:
    """``(config, constructor options)`` of method ``name``: ``options`` validated, the method's fixed
    settings and its setting options applied to ``config``, the other options left for its constructor
    (an influence method's: its strategy's). ``supplied``: required options the caller fills in later (a study
    checks its methods' options before fine-tuning gives tracin its checkpoints). An influence method's damping and
    strategy options are checked as its curvature will check them (:func:`wherefrom.curvature.make_curvature`); an
    absolute ``damping`` with a ``damping_factor`` off its default is refused (the factor would change nothing: a
    ``tune`` grid over it scored identical points and "chose" one).
    Raises as :func:`make_method`, before any model work."""
    spec = method_spec(name)
    settings, constructor = split_settings(spec.check(options or {}, supplied))
    unused = unused_damping_factor(settings.get("damping"), settings.get("damping_factor", DAMPING_FACTOR))
    if unused is not None:
        raise OptionError(f"method {name!r}: option {unused}")
    config = replace(config or AttributionConfig(), **{**spec.settings, **settings})
    if spec.family == "influence":
        curvature = configured_curvature(config.strategy, config.damping, config.damping_factor, constructor)
        try:
            curvature.check_reduction(config.reduction)
        except ValueError as error:
            raise OptionError(f"method {name!r}: {error}") from None
    return config, constructor


def refuse_skipped_options(name: str, settings: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """:class:`OptionError` naming each of method ``name``'s ``settings`` (attribution settings, as
    :class:`~wherefrom.engine.api.AttributionConfig` fields) or constructor ``options`` that its ``options`` make
    unread (:meth:`MethodSpec.skipped_with`: ``trak``/``logra`` with ``curvature=False`` and a ``fisher`` or a
    ``strategy`` off its default): accepted, recorded and changing no score. Checked where a run or a study is made
    (``fit``, ``attribute``, a study's command, :meth:`wherefrom.engine.run.Run.create`), not where a recorded one
    is opened: an older version recorded such runs, and they still open, score and index as recorded.
    ``options``: the constructor options (:func:`split_settings`)."""
    spec = method_spec(name)
    skipped = spec.skipped_with(options)
    defaults = {**asdict(AttributionConfig()), **with_defaults(spec.constructor_options, {})}
    given = {**{k: v for k, v in settings.items() if k in spec.settings_read}, **options}
    off = [f"{k}={v!r}" for k, v in given.items() if k in skipped and v != defaults.get(k)]
    if off:
        one = len(off) == 1
        raise OptionError(
            f"method {name!r}: {', '.join(off)} with curvature=False: it fits no projected curvature, so "
            f"{'this changes' if one else 'these change'} no score; leave {'it' if one else 'them'} out or set "
            "curvature=True"
        )


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
