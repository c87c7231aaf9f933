"""Sensitivity of influence to word order (Grosse et al. 2023, section 5.3.3), on invented facts.

Each seed invents ``n_facts`` facts "the capital of S is O" from nonce words (no model has seen them)
and builds training rows whose completion states a fact (the loss covers the statement):

* ``same``: ``"fact:"`` -> ``" the capital of S is O."``, the query's order (S before O);
* ``reversed``: ``"fact:"`` -> ``" O is the capital of S."``, the same fact, O before S;
* ``control``: the same-order statement of an unrelated invented fact (never queried).

Every fact gets ``repeats`` rows of each order. The query of fact ``i`` is ``"fact: the capital of S_i
is"`` -> ``" O_i"``. A fresh base model is fine-tuned on the rows (:func:`wherefrom.models.finetune.finetune`,
cached under ``out/seed-<s>/finetune``), then ``method`` scores every row for every query
(:func:`wherefrom.studies.bench.scored_method`; the query's ``f`` is ``log p(" O_i" | prompt)`` without
the appended EOS, see :class:`WordOrderConfig`). For each query the mean score of its fact's
``same`` rows, of its fact's ``reversed`` rows and of the ``control`` rows are taken (sign: positive =
proponent); a seed's value is the mean over its queries, and the report gives the mean over seeds with
a 95% Student-t interval (:func:`wherefrom.studies.metrics.mean_stat`), and the ratio reversed / same.
Grosse et al. found that the reversed ordering carries almost no influence on large models.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wherefrom.core.data import Record
from wherefrom.core.store import (
    check_replacement,
    hardware,
    package_versions,
)
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import check_methods, method_spec
from wherefrom.models.finetune import FinetuneConfig, finetune
from wherefrom.models.loading import load_model
from wherefrom.studies.bench import scored_method
from wherefrom.studies.metrics import mean_stat
from wherefrom.studies.toolkit import check_seeds, interval_cell, markdown_table, warning_notes, write_report

GROUPS = ("same", "reversed", "control")
"""Training-row groups of the study, by how the row states a fact relative to the query."""
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def tiny_finetune() -> FinetuneConfig:
    """The default fine-tuning of the study: every parameter, 40 epochs at 3e-3 (on the tiny models the
    summed completion loss falls from about 113 to about 7 nats); ``seed`` is set per study seed."""
    return FinetuneConfig(epochs=40, learning_rate=3e-3, lora_rank=None, max_length=128)


@dataclass
class WordOrderConfig:
    """Settings of :func:`run_word_order` (saved in ``wordorder.json``).

    ``model``: base model folder (``None``: the default SmolLM2); ``finetune``: the fine-tuning settings
    (its ``seed`` is replaced by each study seed; its input layout, ``batch_size`` and ``max_length`` also serve
    the attribution: :meth:`attribution`; a template, a chat template or ``loss_tokens="all"`` is refused, as the
    query would no longer measure its object alone). The default suits the tiny models (:func:`tiny_finetune`); a real model wants a
    LoRA rank and fewer epochs. ``query_without_eos`` (default ``True``): the query measures
    ``f = log p(" O" | "fact: the capital of S is")`` without the EOS the library appends to a
    completion. Every same-order row continues ``O`` with ``"."``, so with the EOS in ``f`` those rows
    also teach "do not stop after O", against the query's last token; measured on SmolLM2 (rank-8
    LoRA, seed 0) that term turned the same-order rows' mean influence negative (-5869, against +276
    for the reversed rows), hiding the fact itself.
    """

    out: str
    model: str | None = None
    n_facts: int = 6
    repeats: int = 2
    n_controls: int = 12
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    method: str = "ekfac"
    finetune: FinetuneConfig = field(default_factory=tiny_finetune)
    device: str | None = None
    query_without_eos: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting when one is impossible, before any training."""
        for name in ("n_facts", "repeats", "n_controls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_seeds(self.seeds)
        check_methods([self.method])
        if method_spec(self.method).family == "lexical":  # userE: 40 epochs, then same = reversed, ratio 1
            raise ValueError(
                f"method {self.method!r} scores the words a row shares with the query, not their order: a fact's "
                "same-order and reversed rows hold the same words, so its groups cannot differ; choose another method"
            )
        self.finetune.validate()
        if self.finetune.loss_tokens != "completion":  # reviewQ: f would be the whole query text's log-likelihood
            raise ValueError(
                f"finetune.loss_tokens={self.finetune.loss_tokens!r}: the study's query measures f = log p(' O' | "
                "'fact: the capital of S is'), its completion alone, and the attribution encodes the query as the "
                "fine-tuning encoded its rows; use loss_tokens='completion'"
            )
        if self.finetune.template is not None or self.finetune.chat_template:
            raise ValueError(
                "finetune.template / chat_template: the study's query 'fact: the capital of S is' -> ' O' is a "
                "same-order row's text cut before its object, which a template that wraps the prompt 'fact:' and "
                "its completion apart no longer is (userE: reversed/same 0.82 with one, 0.04 without); leave them out"
            )
        self.attribution(self.seeds[0])  # a layout the query cannot use is refused before any training

    def attribution(self, seed: int) -> AttributionConfig:
        """The attribution settings of study seed ``seed`` (its ``seed`` too: EK-FAC draws its fitting targets with
        it): the fine-tuning's input layout (EOS, padding, loss tokens, truncation, ``max_length``) and
        ``batch_size``, and :attr:`query_without_eos`.
        Raises ``ValueError`` for ``query_without_eos`` with a fine-tuning that appends no EOS."""
        return AttributionConfig(
            **self.finetune.layout(),
            batch_size=self.finetune.batch_size,
            seed=seed,
            query_without_eos=self.query_without_eos,
        )


def _nonce(rng: random.Random, used: set[str]) -> str:
    """A new pronounceable nonce word of 2-3 consonant-vowel syllables."""
    while True:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice([2, 3])))
        if word not in used:
            used.add(word)
            return word


def word_order_rows(n_facts: int, repeats: int, n_controls: int, seed: int) -> tuple[list[Record], list[Record]]:
    """``(train, queries)`` of one seed (see the module docstring). Train labels are ``"same:<i>"``,
    ``"reversed:<i>"`` or ``"control"``; query ``i`` has id ``"fact-<i>"`` and label ``str(i)``."""
    rng = random.Random(seed)
    used: set[str] = set()
    facts = [(_nonce(rng, used), _nonce(rng, used)) for _ in range(n_facts + n_controls)]
    train = []
    for i, (subject, obj) in enumerate(facts[:n_facts]):
        for r in range(repeats):
            train.append(Record(f"same-{i}-{r}", "fact:", f" the capital of {subject} is {obj}.", f"same:{i}"))
            train.append(Record(f"reversed-{i}-{r}", "fact:", f" {obj} is the capital of {subject}.", f"reversed:{i}"))
    for j, (subject, obj) in enumerate(facts[n_facts:]):
        train.append(Record(f"control-{j}", "fact:", f" the capital of {subject} is {obj}.", "control"))
    rng.shuffle(train)
    queries = [
        Record(f"fact-{i}", f"fact: the capital of {subject} is", f" {obj}", str(i))
        for i, (subject, obj) in enumerate(facts[:n_facts])
    ]
    return train, queries


def group_means(total: np.ndarray, train: Sequence[Record], queries: Sequence[Record]) -> dict[str, list[float]]:
    """Per query, the mean score of its fact's ``same`` rows, its ``reversed`` rows and the ``control`` rows.

    ``total``: ``(n_query, n_train)`` in the order of ``queries`` and ``train``. Returns ``{group: [per query]}``
    (NaN for a group without rows).
    """
    labels = np.array([r.label for r in train])
    out: dict[str, list[float]] = {g: [] for g in GROUPS}
    for q, query in enumerate(queries):
        for group in GROUPS:
            mask = labels == (group if group == "control" else f"{group}:{query.label}")
            out[group].append(float(total[q, mask].mean()) if mask.any() else float("nan"))
    return out


def _compared(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run that a rerun must share to replace it: all but ``out`` and ``device`` (they change no
    number), the model folder by its resolved path (``m``, ``./m`` and its absolute path are one model)."""
    settings = {k: v for k, v in config.items() if k not in ("out", "device")}
    if settings.get("model") is not None:
        settings["model"] = str(Path(settings["model"]).resolve())
    return settings


def run_word_order(
    config: WordOrderConfig,
    command: str = "",
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Run the study for every seed; writes ``out/wordorder.json`` and ``out/wordorder.md``, returns the payload.
    ``progress``: the method's passes over rows.

    A rerun into the same ``out`` reuses each seed's fine-tuned model of the same settings. ``overwrite=False``
    (``wherefrom word-order`` without ``--overwrite``) refuses (:class:`wherefrom.core.store.OutputExists`) to
    replace results made with other settings: before any work a ``wordorder.json`` of another configuration
    (``out`` and ``device`` aside, the model by its path: they change no number), and a seed's fine-tuning of other settings
    (:func:`wherefrom.models.finetune.finetune`; one killed before ``wordorder.json`` was written).

    Raises ``ValueError`` for a bad setting (before training) or a method that scores every training row alike
    (after the fine-tuning, which a rerun reuses) or one whose weights ended non-finite (:meth:`wherefrom.models.finetune.FinetuneResult.check_finite`), and ``RuntimeError`` when the method fails.
    """
    config.validate()
    out = Path(config.out)
    if not overwrite:
        report = out / "wordorder.json"
        check_replacement(
            [report], report, _compared(asdict(config)), recorded_as=lambda saved: _compared(saved.get("config") or {})
        )
    per_seed = []
    for seed in config.seeds:
        train, queries = word_order_rows(config.n_facts, config.repeats, config.n_controls, seed)
        loaded = load_model(config.model, device=config.device)
        tuning = replace(config.finetune, seed=seed)
        tuned = finetune(
            loaded.model,
            loaded.tokenizer,
            train,
            tuning,
            out / f"seed-{seed}" / "finetune",
            progress=False,
            overwrite=overwrite,
        )
        tuned.check_finite(f"word-order: seed {seed}")
        attribution = config.attribution(seed)
        scores, usage = scored_method(
            config.method, tuned.model, loaded.tokenizer, attribution, {}, train, queries, config.device, progress
        )
        if scores is None:
            raise RuntimeError(f"word-order: method {config.method!r} failed on seed {seed}: {usage['error']}")
        total = scores.total.double().numpy()
        if not np.ptp(total, axis=1).any():  # the table showed same = reversed = control, reversed/same 1
            raise ValueError(
                f"word-order: method {config.method!r} scored every training row alike for each query on seed {seed} "
                f"(every row has the prompt {train[0].prompt!r}, and repsim, say, reads the prompt's last token): "
                "its groups cannot differ; choose another method"
            )
        per_query = group_means(total, train, queries)
        means = {g: float(np.mean(v)) for g, v in per_query.items()}
        losses = tuned.epoch_losses
        log(
            f"seed {seed}: "
            + ", ".join(f"{g} {v:+.4g}" for g, v in means.items())
            + f" (fine-tuning loss {losses[0]:.4g} -> {losses[-1]:.4g} nats)"
        )
        per_seed.append(
            {
                "seed": seed,
                "means": means,
                "per_query": per_query,
                "final_loss": tuned.epoch_losses[-1],
                "warnings": usage["warnings"],
            }
        )
    summary = {g: mean_stat([s["means"][g] for s in per_seed]) for g in GROUPS}
    ratios = [s["means"]["reversed"] / s["means"]["same"] for s in per_seed if s["means"]["same"] != 0]
    summary["reversed/same"] = mean_stat(ratios)
    payload = {
        "config": asdict(config),
        "command": command,
        "versions": package_versions(),
        "hardware": hardware(),
        "seeds": per_seed,
        "summary": summary,
    }
    write_report(out / "wordorder", payload, markdown(payload))
    return payload


RATIO_LABEL = "reversed / same (each seed's ratio, then their mean)"
"""How ``wordorder.md`` and the report name ``summary["reversed/same"]``: the mean over seeds of each seed's ratio,
not the ratio of the two means shown above it (userM divided those: 72.03 / 69.98 = 1.029, shown 1.085)."""


def markdown(payload: dict[str, Any]) -> str:
    """The summary as a Markdown table (mean [95% interval over seeds]; the ratio as :data:`RATIO_LABEL`), then the
    method's warnings on each seed (:func:`wherefrom.studies.toolkit.warning_notes`)."""
    config = payload["config"]
    lines = [
        f"# Word order: influence of a fact stated in the query's order and reversed ({config['method']})",
        "",
        f"{config['n_facts']} invented facts x {config['repeats']} rows per order, {config['n_controls']} controls, "
        f"seeds {config['seeds']}; mean score per row, mean over queries, then over seeds [95% t interval].",
        "",
        markdown_table(
            ["rows", "mean influence"],
            [
                [RATIO_LABEL if key == "reversed/same" else key, interval_cell(stat, ".4g")]
                for key, stat in payload["summary"].items()
            ],
        ),
    ]
    if payload.get("command"):
        lines += ["", f"Command: `{payload['command']}`"]
    warned = [(f"seed {s['seed']}", s.get("warnings")) for s in payload.get("seeds", [])]
    return "\n".join(lines) + "\n" + warning_notes(warned)
