"""Named bundles of bench settings: wherefrom's own and the reference study's, and the switches between them.

A preset (:data:`PRESETS`) is a dict of :class:`wherefrom.studies.bench.BenchConfig` field values
(``method_options`` merged per method). :func:`resolve` lays explicit settings over a preset; ``wherefrom
bench --preset`` records the resolved settings in ``bench.json``. A switch (:data:`SWITCHES`) is a named
group of preset keys that belong together; ``wherefrom ablate`` flips one switch at a time.

``reference-study`` is what the released code of Li et al. (2024, Do Influence Functions Work on Large
Language Models?), plumprc/Failures-of-Influence-Functions-in-LLMs at 93f9489, did:

* ``template``: ``[INST] {prompt} [/INST] {completion}`` with BOS, no EOS (``utils.get_preprocessed_dataset``,
  ``influence.py``); RepSim sees ``[INST] {prompt} [/INST]`` (``repsim.py``).
* ``padded-loss``: rows left-padded with the padding id (the reference: EOS) to 128 tokens, ``labels =
  input_ids``: the loss runs over all 127 next-token positions, padding, prompt and tags included
  (``collect_gradient``). The reference takes the *mean* over them; at a fixed length the mean is the sum
  / 127, a constant that cancels under the relative damping and never changes a ranking, so the
  reduction stays ``sum`` (which also lets LiSSA and CG, which need the summed loss, run). The one
  absolute setting it does not cancel in is LiSSA's scale: see ``lissa``.
* ``fisher``: the reference preconditions with its training rows' own gradients (empirical Fisher) and
  damps each block with ``lambda = mean over rows of mean(g^2) / 10`` (``calculate_lambda_const``). That
  mean is ``trace(G_emp) / P`` per block, i.e. ``0.1 x`` the mean eigenvalue of the empirical Fisher: our
  default damping rule on ``fisher="empirical"`` for the per-module strategies (exact for EK-FAC, whose
  corrected eigenvalues average to it, and DataInf; K-FAC's Kronecker eigenvalues approximate it, and
  LiSSA on ``curvature="fisher"`` takes it exactly but over all modules jointly, not per block).
* ``lissa``: ``damping_sign="reference"``, ``depth`` 3, ``scale`` :data:`REFERENCE_LISSA_SCALE` (the
  reference's 1e-3 on its mean loss over 127 positions, whose Fisher is the summed loss's / 127^2: so
  1e-3 / 127^2 on the summed loss wherefrom takes; 1e-3 there would make ``alpha lambda_max`` about 16,000
  times larger than the reference's and the recursion no longer near ``4 v``) and ``curvature="fisher"``: the
  recursion multiplies by the mean outer product of the training rows' own gradients, as the reference's
  ``(1/n) sum (g.r) g`` over its cached gradients did (``influence_function``, ``hvp_cal='LiSSA'``;
  :class:`wherefrom.curvature.iterative.LiSSA`, :class:`wherefrom.curvature.products.FisherOperator`; with
  the ``fisher`` switch set to ours, the gradients of labels drawn from the model). wherefrom's LiSSA
  multiplies by the GGN.
* ``finetune``: LoRA alpha 32, dropout 0.1 (rank 4 on q_proj/v_proj as ours), batch 24, 10 epochs, AdamW
  5e-5 decayed linearly (``finetune.py`` with the Hugging Face ``Trainer`` defaults).

Shared by both presets (nothing to switch): per-example gradients of the final adapter's LoRA matrices,
each A and B its own block, model in eval mode (``collect_gradient``; wherefrom's default tracking),
RepSim on the last layer's last prompt token by cosine.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from wherefrom.core.encoding import REFERENCE_TEMPLATE
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import method_spec
from wherefrom.models.finetune import FinetuneConfig

__all__ = [
    "FINETUNE_FIELDS",
    "PRESETS",
    "REFERENCE_LISSA_SCALE",
    "SWITCHES",
    "check_preset",
    "resolve",
    "switch_keys",
    "switched",
    "switches_between",
]

REFERENCE_LISSA_SCALE = 1e-3 / 127**2
"""The reference study's LiSSA scale 1e-3, taken on its mean loss over the 127 next-token positions of a row
padded to 128, for the summed loss: the per-example gradients are 127 times larger, their Fisher 127^2."""

PRESETS: dict[str, dict[str, Any]] = {
    "wherefrom": {  # the command line's defaults
        **{
            key: getattr(AttributionConfig, key)
            for key in ("template", "append_eos", "pad_left", "loss_tokens", "truncate", "max_length", "fisher")
        },
        **{
            key: getattr(FinetuneConfig, key)
            for key in ("lora_alpha", "lora_dropout", "lr_schedule", "learning_rate", "batch_size", "epochs")
        },
        "method_options": {"lissa": {}},
    },
    "reference-study": {
        "template": REFERENCE_TEMPLATE,
        "append_eos": False,
        "pad_left": True,
        "loss_tokens": "all",
        "truncate": True,
        "max_length": 128,
        "fisher": "empirical",
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "lr_schedule": "linear",
        "learning_rate": 5e-5,
        "batch_size": 24,
        "epochs": 10,
        "method_options": {
            "lissa": {"damping_sign": "reference", "depth": 3, "scale": REFERENCE_LISSA_SCALE, "curvature": "fisher"}
        },
    },
}
"""Each preset's settings (the same keys in every preset, so each switch has a value on both sides)."""

SWITCHES: dict[str, tuple[str, ...]] = {
    "template": ("template", "append_eos"),
    "padded-loss": ("pad_left", "loss_tokens", "max_length", "truncate"),
    "fisher": ("fisher",),
    "lissa": ("method_options.lissa",),
    "finetune": ("lora_alpha", "lora_dropout", "lr_schedule", "learning_rate", "batch_size", "epochs"),
}
"""Named groups of preset keys flipped together by ``wherefrom ablate`` (``method_options.<method>``: that
method's options)."""


FINETUNE_FIELDS = frozenset(f.name for f in fields(FinetuneConfig))
"""The preset keys the fine-tuning reads: a switch of one changes the model every method scores."""


def check_preset(name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the presets unless it is in :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")


def _get(settings: Mapping[str, Any], key: str) -> Any:
    if key.startswith("method_options."):
        return settings["method_options"].get(key.split(".", 1)[1], {})
    return settings[key]


def _set(settings: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("method_options."):
        settings["method_options"][key.split(".", 1)[1]] = copy.deepcopy(value)
    else:
        settings[key] = value


def resolve(preset: str, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``preset`` with ``explicit`` laid over them: a plain key replaces the preset's value,
    ``method_options`` are merged per method and option (:func:`_lay_options`: an explicit option wins).
    ``ValueError`` for an unknown preset."""
    check_preset(preset)
    settings = copy.deepcopy(PRESETS[preset])
    for key, value in explicit.items():
        if key == "method_options":
            _lay_options(settings["method_options"], value)
        else:
            settings[key] = value
    return settings


def _lay_options(into: dict[str, dict[str, Any]], explicit: Mapping[str, Mapping[str, Any]]) -> None:
    """Lay ``explicit`` method options (``{method or "*": {option: value}}``) over a preset's ``into``, per method
    and option; an explicit option for every method (``"*"``, a plain ``--option key=value``) also replaces the
    preset's value of that option for any one method (the flag overrides the preset, which the method's own
    entry would otherwise win over: :func:`wherefrom.core.option_pairs.options_for`)."""
    for options in into.values():
        for key in explicit.get("*", {}):
            options.pop(key, None)
    for method, options in explicit.items():
        into[method] = {**into.get(method, {}), **options}


def switched(start: Mapping[str, Any], target: str, switch: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """``start`` (resolved settings) with the keys of ``switch`` taken from preset ``target``, except keys
    the user fixed (``fixed``: explicit settings, which hold in every run)."""
    if switch not in SWITCHES:
        raise ValueError(f"unknown switch {switch!r}; choose one of {list(SWITCHES)}")
    settings = copy.deepcopy(dict(start))
    for key in SWITCHES[switch]:
        if key in fixed:
            continue
        _set(settings, key, _get(PRESETS[target], key))
    return _with_fixed_options(settings, fixed)


def _with_fixed_options(settings: dict[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the explicit method options of ``fixed`` merged in again (they hold in every run)."""
    _lay_options(settings["method_options"], fixed.get("method_options", {}))
    return settings


def switches_between(
    start: str, target: str, fixed: Mapping[str, Any], methods: Sequence[str] | None = None
) -> list[str]:
    """The switches whose settings differ between presets ``start`` and ``target`` once ``fixed`` (explicit
    settings) are laid over both, in :data:`SWITCHES` order; given ``methods``, a method's options count
    only when it is among them, and an attribution setting only when one of them reads it (:func:`switch_keys`)."""
    return [name for name in SWITCHES if switch_keys(start, target, name, fixed, methods)]


def switch_keys(
    start: str, target: str, switch: str, fixed: Mapping[str, Any], methods: Sequence[str] | None = None
) -> list[str]:
    """The settings of ``switch`` that differ between presets ``start`` and ``target`` once ``fixed`` (explicit
    settings) are laid over both, in :data:`SWITCHES` order: what the switch's run changes (``ablate.md`` listed
    every key of the switch, ``epochs`` under ``--epochs 3`` too); given ``methods``, a method's options count only
    when it is among them, and an attribution setting only when one of them reads it (a fine-tuning setting
    always: it changes the model every method scores)."""
    a, b = resolve(start, fixed), resolve(target, fixed)

    def matters(key: str) -> bool:  # userE: a fisher run of gradsim and bm25 changed nothing (delta +0.000)
        if methods is None:
            return True
        if key.startswith("method_options."):
            return key.split(".", 1)[1] in methods
        return key in FINETUNE_FIELDS or any(method_spec(method).takes(key) for method in methods)

    return [key for key in SWITCHES[switch] if matters(key) and _get(a, key) != _get(b, key)]
