"""The fine-tuning settings of a study, declared once for ``bench`` and ``groundtruth``.

:class:`StudyFinetuning` holds the settings of the fine-tuning a study trains (and retrains) its model with,
and the input layout its attribution then encodes rows with; :class:`wherefrom.studies.bench.BenchConfig` and
:class:`wherefrom.studies.groundtruth.build.GroundTruthConfig` extend it, so a fine-tuning setting has one
name, one default (:class:`wherefrom.models.finetune.FinetuneConfig`'s) and one command-line form in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wherefrom.core.commandline import field_flags
from wherefrom.core.encoding import LAYOUT_SETTINGS
from wherefrom.engine.api import AttributionConfig
from wherefrom.models.finetune import FinetuneConfig, full_when_zero, lora_target_set

__all__ = ["FIRST_FINETUNING", "LATER_FINETUNING", "LAYOUT", "OTHER_FLAGS", "StudyFinetuning", "later_flags"]

LAYOUT = tuple(key for key in LAYOUT_SETTINGS if key not in ("max_length", "chat_template"))
"""The input-layout settings of a study (:func:`wherefrom.core.encoding.encode_records`), shared by its
fine-tuning and its attribution; the length is a first setting, a chat template is not used by the studies."""
FIRST_FINETUNING = ("epochs", "learning_rate", "lora_rank", "batch_size", "max_length")
"""The fine-tuning settings the studies had from the start."""
LATER_FINETUNING = (*LAYOUT, "lora_alpha", "lora_dropout", "lr_schedule")
"""The fine-tuning settings beyond :data:`FIRST_FINETUNING`: the input layout, LoRA alpha and dropout, the
schedule (with ``lora_targets``: on a study's command line only when off their default)."""


@dataclass(kw_only=True)
class StudyFinetuning:
    """Fine-tuning settings of a study: ``epochs``, ``learning_rate``, ``lora_rank`` (``None`` or 0: full
    fine-tuning, stored as ``None``), ``batch_size``, ``max_length`` (tokens), ``lora_alpha``, ``lora_dropout``,
    ``lr_schedule``, ``lora_targets`` (``None``: :class:`wherefrom.models.finetune.FinetuneConfig`'s default; stored sorted,
    each once, :func:`wherefrom.models.finetune.lora_target_set`, and the default modules given explicitly as
    ``None``, so a study's keys do not tell them apart) and the input layout :data:`LAYOUT`, all as in :class:`wherefrom.models.finetune.FinetuneConfig`
    and with its defaults."""

    epochs: int = FinetuneConfig.epochs
    learning_rate: float = FinetuneConfig.learning_rate
    lora_rank: int | None = FinetuneConfig.lora_rank
    batch_size: int = FinetuneConfig.batch_size
    max_length: int = FinetuneConfig.max_length
    template: str | None = FinetuneConfig.template
    append_eos: bool = FinetuneConfig.append_eos
    pad_left: bool = FinetuneConfig.pad_left
    loss_tokens: str = FinetuneConfig.loss_tokens
    truncate: bool = FinetuneConfig.truncate
    lora_alpha: int = FinetuneConfig.lora_alpha
    lora_dropout: float = FinetuneConfig.lora_dropout
    lr_schedule: str = FinetuneConfig.lr_schedule
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        self.lora_rank = full_when_zero(self.lora_rank)
        if self.lora_targets is not None:
            self.lora_targets = lora_target_set(self.lora_targets)
            if self.lora_targets == FinetuneConfig().lora_targets:
                self.lora_targets = None

    def finetune_config(self, seed: int) -> FinetuneConfig:
        """The :class:`wherefrom.models.finetune.FinetuneConfig` of a fine-tuning with training seed ``seed``
        (per-epoch checkpoints on)."""
        targets = {} if self.lora_targets is None else {"lora_targets": list(self.lora_targets)}
        settings = {key: getattr(self, key) for key in (*FIRST_FINETUNING, *LATER_FINETUNING)}
        return FinetuneConfig(seed=seed, **settings, **targets)

    def fine_tuned_attribution(self, seed: int, **settings: Any) -> AttributionConfig:
        """The :class:`wherefrom.engine.api.AttributionConfig` of an attribution of the fine-tuned model with
        ``seed``: the fine-tuning's batch size, length and input layout, and ``settings`` (e.g. ``damping``)."""
        layout = {key: getattr(self, key) for key in LAYOUT}
        return AttributionConfig(
            batch_size=self.batch_size, max_length=self.max_length, seed=seed, **layout, **settings
        )

    def finetuning_flags(self) -> list[tuple[str, Any]]:
        """``(--flag, value)`` of these settings for a study's command line
        (:func:`wherefrom.core.commandline.command_line`): the first ones always, the later ones when off their
        default (:func:`later_flags`); full fine-tuning as ``--lora-rank 0``."""
        return [
            *field_flags(self, ("epochs", "learning_rate")),
            ("--lora-rank", self.lora_rank or 0),
            *field_flags(self, ("batch_size", "max_length")),
            *later_flags(self, ("lora_targets", *LATER_FINETUNING)),
        ]


OTHER_FLAGS: dict[str, Callable[[Any], tuple[str, Any]]] = {
    "append_eos": lambda value: ("--no-eos", not value),
    "lora_targets": lambda value: ("--lora-target", value),
}
"""``(flag, value)`` on the command line of the configuration fields whose flag is not their name."""


def later_flags(config: Any, names: Sequence[str]) -> list[tuple[str, Any]]:
    """``(--flag, value)`` of the settings ``names`` of the configuration ``config`` (a dataclass: its class
    attributes are the defaults) that are off their default, for :func:`wherefrom.core.commandline.command_line`
    (:data:`OTHER_FLAGS`: ``append_eos`` as ``--no-eos``, ``lora_targets`` as ``--lora-target``)."""
    changed = [k for k in names if getattr(config, k) != getattr(type(config), k)]
    return [OTHER_FLAGS[k](getattr(config, k)) if k in OTHER_FLAGS else field_flags(config, [k])[0] for k in changed]
