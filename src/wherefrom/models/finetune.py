"""Fine-tuning a causal LM on records (LoRA or full), with checkpoints that TracIn can replay.

The training loss is the one attribution uses (:mod:`wherefrom.core.task`): each example's loss is the
**sum** of its completion-token cross-entropies (prompt and padding carry no loss), and a step
minimises the **mean over the examples of the batch** of these summed losses. So the update of a
step is ``-lr * AdamW(1/B * sum_b grad L_sum(z_b))``; a checkpoint's ``learning_rate`` together
with per-example gradients of ``L_sum`` is what TracIn needs.

Layout of ``output_dir`` after :func:`finetune`::

    finetune_config.json        config + data/model/tokenizer fingerprints + results (written last)
    train_log.jsonl             one line per optimiser step: epoch, step, loss, lr, batch_ids
    checkpoints/epoch-1/        adapter (LoRA) or full model + tokenizer, trainer_state.json and
                                optimizer_state.safetensors (AdamW's second moment, step, betas, eps:
                                :mod:`wherefrom.models.optimizer_state`; checksummed in checksums.json)
    checkpoints/epoch-2/        ...
    adapter/  or  model/        final weights (LoRA adapter, or full model + tokenizer)
    resume/epoch-k/             while training: the whole training state after the last finished epoch
                                (:mod:`wherefrom.models.training_state`); removed once the run is complete

Every file and folder is written under a temporary name and renamed into place, and
``finetune_config.json`` is written last, so an interrupted run never leaves something that looks
complete. A later call with the same config, data, base model and tokenizer reuses the result
instead of training again (``FinetuneResult.reused``). A run killed part-way (kill -9 included) resumes
after its last finished epoch when called again with the same config, data, base model and tokenizer
(``FinetuneResult.resumed_after``): parameters, AdamW's moments, the schedule and the random generators are
restored, so the result is the uninterrupted run's, bit for bit on CPU. Anything else retrains from scratch.
Checkpoints of runs saved before the optimizer state was kept still load (their folders lack only
``optimizer_state.safetensors``).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import random
import re
import shutil
import warnings
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wherefrom.core.data import Record, check_records, data_fingerprint
from wherefrom.core.encoding import (
    LAYOUT_SETTINGS,
    MAX_LENGTH,
    check_layout,
    encode_records,
    iterate_batches,
    pad_id,
    template_ends_turn,
)
from wherefrom.core.options import plain_numbers
from wherefrom.core.store import (
    OLD,
    OVERWRITE_ALLOW,
    PARTIAL,
    OutputExists,
    atomic_write_dir,
    atomic_write_text,
    file_in_the_way,
    read_json_object,
    refuse_other_inputs,
    refuse_overwrite,
)
from wherefrom.core.task import model_inputs, per_example_loss
from wherefrom.core.tracking import is_linear
from wherefrom.models.loading import (
    ADAPTER_DIR,
    MODEL_DIR,
    ModelLoadError,
    check_adapter,
    check_weights,
    is_peft,
    model_fingerprint,
    quiet_peft,
    recorded_tokenizer_fingerprint,
    tokenizer_fingerprint,
)
from wherefrom.models.optimizer_state import save_adam_state
from wherefrom.models.training_state import JSON_FILE as STATE_JSON
from wherefrom.models.training_state import TrainingStateMismatch, latest_training_state, save_training_state

__all__ = [
    "CONFIG_FILE",
    "LAYOUT_FLAGS",
    "LORA_SETTINGS",
    "LR_SCHEDULES",
    "TRAINER_STATE_FILE",
    "TRAIN_LOG_FILE",
    "FinetuneConfig",
    "FinetuneDiverged",
    "FinetuneResult",
    "LayoutMismatch",
    "finetune",
    "full_when_zero",
    "lora_target_set",
    "read_trainer_state",
    "warn_layout_mismatch",
]

LR_SCHEDULES = ("constant", "linear")
"""Learning-rate schedules: constant, or linear decay to 0 over all steps (no warm-up)."""

CONFIG_FILE = "finetune_config.json"
TRAIN_LOG_FILE = "train_log.jsonl"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
RESUME_DIR = "resume"
_FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


_NUMBER_SETTINGS = {
    **dict.fromkeys(("epochs", "batch_size", "max_length", "seed", "lora_rank", "lora_alpha"), numbers.Integral),
    **dict.fromkeys(("learning_rate", "weight_decay", "lora_dropout"), numbers.Real),
}
"""The numeric settings of :class:`FinetuneConfig` and the kind each must be (``lora_rank`` may also be ``None``)."""


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune`.

    ``lora_rank=None`` (or 0) fine-tunes all parameters (then a smaller ``learning_rate``, such as 1e-5,
    suits real models); otherwise a LoRA adapter of that rank, scale ``lora_alpha / lora_rank``,
    no dropout and no bias is trained on ``lora_targets``. AdamW, no warm-up; the learning rate follows
    ``lr_schedule`` (constant by default, or a linear decay). ``max_length`` bounds prompt + completion tokens (a longer example raises
    :class:`wherefrom.core.data.DataError`, or with ``truncate`` keeps its first ``max_length`` tokens).
    ``chat_template`` renders prompts with the tokenizer's chat template (see
    :func:`wherefrom.core.encoding.encode_records`); ``template``, ``append_eos``, ``pad_left``,
    ``loss_tokens`` and ``truncate`` are that function's input layout (with ``loss_tokens="all"`` the step loss is the
    mean over the batch of each row's loss summed over all its next-token positions).

    The reference study's settings (plumprc/Failures-of-Influence-Functions-in-LLMs, ``finetune.py``:
    ``LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])`` and the
    Hugging Face ``Trainer`` defaults, AdamW at 5e-5 decayed linearly to 0, batch 24, 10 epochs) are
    ``lora_dropout=0.1`` (dropout on the LoRA input while training; default 0) and
    ``lr_schedule="linear"`` (the rate falls linearly from ``learning_rate`` to 0 over all steps, no
    warm-up; default ``"constant"``). The reference's loss is the token mean over the batch; ours is a
    sum, a constant factor (127 x batch rows at a fixed length of 128) that AdamW's update ignores up to
    its epsilon. ``train_log.jsonl`` records each step's rate; a checkpoint records the rate of its
    epoch's first step (TracIn's step size is then approximate under ``"linear"``).
    """

    epochs: int = 2
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = MAX_LENGTH
    seed: int = 0
    lora_rank: int | None = 4
    lora_alpha: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    weight_decay: float = 0.0
    chat_template: bool = False
    checkpoint_every_epoch: bool = True
    template: str | None = None
    append_eos: bool = True
    pad_left: bool = False
    loss_tokens: str = "completion"
    truncate: bool = False
    lora_dropout: float = 0.0
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        self.lora_rank = full_when_zero(self.lora_rank)
        if self.lora_targets is not None:  # None is refused by validate, naming the setting
            self.lora_targets = lora_target_set(self.lora_targets)

    def validate(self) -> None:
        """Raise ``ValueError`` on an impossible setting, naming it: a value of the wrong type first (userK:
        ``batch_size=2.5`` and ``epochs="2"`` failed inside training or a comparison, naming none), then one out of
        range, as the command line's checks refuse it (``lora_alpha=0`` trained nothing, ``seed=-1``)."""
        plain_numbers(self, _NUMBER_SETTINGS, ("lora_rank",))  # numpy's numbers stored as Python's
        check_layout(self.layout())
        if not isinstance(self.checkpoint_every_epoch, bool):
            raise ValueError(f"checkpoint_every_epoch must be True or False, got {self.checkpoint_every_epoch!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.lora_alpha < 1:
            raise ValueError(f"lora_alpha must be >= 1, got {self.lora_alpha}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ValueError(f"lora_rank must be >= 1 or None, got {self.lora_rank}")
            if not self.lora_targets:
                raise ValueError("lora_targets must name at least one module for LoRA")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the settings; the layout and schedule settings only when they differ from
        their defaults, so a run saved before they existed still matches its settings."""
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        for name in LATER_SETTINGS:
            if data[name] == getattr(FinetuneConfig, name):
                del data[name]
        return data

    def layout(self) -> dict[str, Any]:
        """The keywords of :func:`wherefrom.core.encoding.encode_records` these settings give."""
        return {key: getattr(self, key) for key in LAYOUT_SETTINGS}


class FinetuneDiverged(UserWarning):
    """A fine-tuning step's loss is not finite (too high a learning rate): the run goes on as configured (a resumed
    run still equals an uninterrupted one), and the weights and scores of the model are NaN."""


class LayoutMismatch(UserWarning):
    """The rows are encoded otherwise than the fine-tuning that made the model encoded them (another template, EOS,
    padding, loss tokens or truncation): the loss ``L(z)`` attributed is not the one the model was trained on."""


LAYOUT_FLAGS = {
    "chat_template": "--chat-template",
    "template": "--template",
    "append_eos": "--no-eos",
    "pad_left": "--pad-left",
    "loss_tokens": "--loss-tokens",
    "truncate": "--truncate",
    "max_length": "--max-length",
}
"""The command-line flag of each input-layout setting (``append_eos=False`` is ``--no-eos``)."""


def finetune_record(weights: str | Path) -> Path:
    """Where the fine-tuning that wrote ``weights`` (its ``adapter/``, ``model/`` or an epoch checkpoint) records
    its settings: the ``finetune_config.json`` of its output folder (which may not exist)."""
    folder = Path(weights)
    return (folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else folder.parent) / CONFIG_FILE


def warn_layout_mismatch(
    weights: str | Path | None, layout: dict[str, Any], read: Collection[str] | None = None
) -> None:
    """Warn (:class:`LayoutMismatch`) when the fine-tuning that wrote ``weights`` (its ``adapter/``, ``model/`` or an
    epoch checkpoint, beside the ``finetune_config.json`` it recorded) laid its rows out otherwise than ``layout``
    (:meth:`wherefrom.engine.api.AttributionConfig.layout`), naming each setting with both values and its flag;
    ``max_length`` only where either side pads or truncates to it; ``read``: the settings the method reads (a setting
    it does not read changes none of its numbers, and is refused if given). Nothing for a folder no fine-tuning of
    wherefrom wrote, or whose record is unreadable (named where the fine-tuning is reused). userA: an adapter tuned
    with ``--no-eos`` was attributed with the EOS appended, without a word."""
    if weights is None:
        return
    folder = Path(weights)
    record = finetune_record(folder)
    if (folder.name not in (ADAPTER_DIR, MODEL_DIR) and folder.parent.name != CHECKPOINTS_DIR) or not record.is_file():
        return
    try:
        saved = read_json_object(record)
    except (OSError, ValueError):
        return
    recorded = saved.get("config")
    other_weights = folder.name in (ADAPTER_DIR, MODEL_DIR) and folder.name != saved.get("weights_dir", folder.name)
    if not isinstance(recorded, dict) or other_weights:
        return  # ft/model beside a LoRA fine-tuning's record is not its weights
    tuned = {key: recorded.get(key, getattr(FinetuneConfig, key)) for key in LAYOUT_FLAGS}
    cut = tuned["pad_left"] or tuned["truncate"] or layout["pad_left"] or layout["truncate"]
    keys = [key for key in LAYOUT_FLAGS if read is None or key in read]
    differ = [key for key in keys if tuned[key] != layout[key] and (key != "max_length" or cut)]
    if differ:
        shown = ", ".join(f"{key} {tuned[key]!r} there, {layout[key]!r} here ({LAYOUT_FLAGS[key]})" for key in differ)
        warnings.warn(
            f"{folder} was fine-tuned with rows laid out otherwise ({record}): {shown}; the loss attributed is not "
            "the one the model was trained on: give the flags the fine-tuning was given",
            LayoutMismatch,
            stacklevel=2,
        )


def full_when_zero(lora_rank: int | None) -> int | None:
    """``None`` (full fine-tuning) for a LoRA rank of 0, the rank otherwise: the command line's "--lora-rank 0
    fine-tunes every weight", in every command and configuration. Only an integer 0 (``False`` and ``0.0`` are left
    for the type check to name: they were taken as 0, a full fine-tuning)."""
    exact_zero = isinstance(lora_rank, numbers.Integral) and not isinstance(lora_rank, bool) and lora_rank == 0
    return None if exact_zero else lora_rank


def lora_target_set(targets: Sequence[str]) -> list[str]:
    """The LoRA target module names ``targets`` sorted, each once: PEFT adapts the set of modules they name
    (``LoraConfig.target_modules`` is a set), so the order and repeats given change no fine-tuning, and one
    fine-tuning has one identity (``--lora-target v_proj --lora-target q_proj`` was another than the default). One
    name given as a string is a list of one (it was split into its characters: userK)."""
    return sorted({targets} if isinstance(targets, str) else set(targets))


LORA_SETTINGS = ("lora_alpha", "lora_targets", "lora_dropout")
"""The :class:`FinetuneConfig` settings of the LoRA adapter alone: a full fine-tuning (``lora_rank=None``) reads none."""

LATER_SETTINGS = ("template", "append_eos", "pad_left", "loss_tokens", "truncate", "lora_dropout", "lr_schedule")
"""Settings added after runs were first saved: recorded only when not at their default."""


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced.

    ``model`` is in eval mode on the input model's device: a ``peft.PeftModel`` with frozen
    parameters for LoRA (as ``wherefrom.models.loading.load_model(base, adapter=weights_dir)`` gives it),
    the fully fine-tuned model otherwise. ``weights_dir`` is ``output_dir/adapter`` or
    ``output_dir/model``; ``epoch_losses[k]`` the mean training loss over the steps of epoch
    ``k + 1``; ``checkpoints`` the per-epoch folders in epoch order (empty without
    ``checkpoint_every_epoch``); ``reused`` whether an earlier identical run was loaded instead
    of training; ``resumed_after`` the epoch an interrupted identical run had finished, whose state this
    call restored and trained on from (0: trained from the start, or reused).
    """

    model: nn.Module
    output_dir: Path
    weights_dir: Path
    epoch_losses: list[float]
    checkpoints: list[Path]
    reused: bool
    resumed_after: int = 0

    @property
    def is_lora(self) -> bool:
        """Whether ``weights_dir`` holds a LoRA adapter (else a full model)."""
        return self.weights_dir.name == ADAPTER_DIR

    def nonfinite_parameters(self) -> list[str]:
        """The names of the model's floating-point parameters holding a NaN or infinite entry: a fine-tuning whose
        every loss was finite can still end so, when its last step (after the last loss) overflowed (reviewU)."""
        return [
            name
            for name, parameter in self.model.named_parameters()
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all())
        ]

    def divergence(self) -> str | None:
        """Why this fine-tuning's weights cannot be scored, or ``None`` when they are finite: a mean epoch loss that is
        not finite (the weights are not either), or, every loss finite, parameters left non-finite by the last step
        (:meth:`nonfinite_parameters`). Every caller that scores the model checks it first (``finetune`` exits 1, a
        bench seed's rows fail "not scored", the others call :meth:`check_finite`: they scored NaN weights, a bench row
        failing with "non-finite score(s)" after every gradient was computed). Only the final weights are read: an
        AdamW step keeps a NaN weight NaN, so a fine-tuning with a non-finite checkpoint ends non-finite too (``analyze
        convergence`` then refuses the seed, its finite first epochs included)."""
        diverged = [k for k, loss in enumerate(self.epoch_losses, 1) if not math.isfinite(loss)]
        if diverged:
            return (
                f"the fine-tuning diverged (the mean loss of epoch {diverged[0]} is not finite): the weights in "
                f"{self.weights_dir} are not finite either; lower the learning rate (--learning-rate)"
            )
        broken = self.nonfinite_parameters()
        if broken:
            return (
                f"the fine-tuning diverged in its last step (every mean loss is finite): {len(broken)} parameter(s) "
                f"in {self.weights_dir} are not finite ({broken[0]}, ...); lower the learning rate (--learning-rate)"
            )
        return None

    def check_finite(self, what: str) -> None:
        """``ValueError`` ``"<what>: <divergence>"`` when the weights cannot be scored (:meth:`divergence`)."""
        problem = self.divergence()
        if problem:
            raise ValueError(f"{what}: {problem}")


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_LEFTOVER = re.compile(
    r"^\.("
    + "|".join(re.escape(n) for n in (CONFIG_FILE, TRAIN_LOG_FILE, CHECKPOINTS_DIR, ADAPTER_DIR, MODEL_DIR, RESUME_DIR))
    + f")({re.escape(PARTIAL)}|{re.escape(OLD)})"
)
"""The hidden partial or old copy an interrupted atomic write of one of the run's files leaves beside it."""


def _clear_outputs(output_dir: Path, resuming: Sequence[str] | None = None) -> None:
    """Delete what an earlier (other or interrupted) run left: only names this module writes. ``resuming``:
    the checkpoints (relative paths) of the interrupted run being resumed, kept with its training state
    (``None``: nothing is resumed, everything goes)."""
    _remove(output_dir / CONFIG_FILE)  # first: nothing may look complete from here on
    kept = {output_dir / rel for rel in resuming or ()}
    for name in (TRAIN_LOG_FILE, ADAPTER_DIR, MODEL_DIR, *((RESUME_DIR,) if resuming is None else ())):
        _remove(output_dir / name)
    checkpoints = output_dir / CHECKPOINTS_DIR
    if resuming is None:
        _remove(checkpoints)
    elif checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if entry not in kept:  # later epochs and the partial folders of a killed write
                _remove(entry)
    for leftover in output_dir.iterdir():
        if _LEFTOVER.match(leftover.name):
            _remove(leftover)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def check_lora_targets(model: nn.Module, targets: list[str], rank: int | None = None) -> None:
    """Raise ``ValueError`` naming each of ``targets`` (``FinetuneConfig.lora_targets``, ``--lora-target``) that
    matches no module of ``model`` by PEFT's rule (a module named so, or whose dotted name ends in ``.target``),
    with the names of the model's linear layers (:func:`wherefrom.core.tracking.is_linear`): PEFT refuses when none matches, with
    a message naming neither the setting nor the model's modules, and ignores a target that alone matches none.
    Also raised for a target that matches a module other than a linear layer (userK: ``embed_tokens`` trained an
    adapter that attribution, which tracks linear layers, never read; ``mlp`` ended in PEFT's module dump) and
    for a ``rank`` above the smaller side of a targeted layer's weight (userK: ``--lora-rank 100000`` was killed
    for memory without a word; a LoRA update ``B A`` has at most that rank whatever ``r`` is)."""
    modules = list(model.named_modules())
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules if is_linear(module)})
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    layers = f"its linear layers are named {', '.join(linear)}"

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith(f".{target}")

    unmatched = [t for t in targets if not any(matches(name, t) for name, _module in modules)]
    if unmatched:
        raise ValueError(
            f"lora_targets {unmatched} (finetune's and groundtruth's --lora-target): no module of this {kind} model "
            f"is named so; {layers} (a command without --lora-target fine-tunes "
            "with LoRA only a model that has the default q_proj and v_proj: use --lora-rank 0, or such a model)"
        )
    matched = [(name, module) for name, module in modules if any(matches(name, t) for t in targets)]
    other = {name: type(module).__name__ for name, module in matched if not is_linear(module)}
    if other:
        shown = ", ".join(f"{name} ({kind_name})" for name, kind_name in list(other.items())[:3])
        raise ValueError(
            f"lora_targets {sorted(t for t in targets if any(matches(n, t) for n in other))} (--lora-target): "
            f"{len(other)} module(s) that are not linear layers, e.g. {shown}; wherefrom fine-tunes and attributes "
            f"LoRA on linear layers only: {layers}"
        )
    if rank is not None:
        name, module = min(matched, key=lambda pair: min(pair[1].weight.shape))
        most = min(module.weight.shape)
        if rank > most:
            raise ValueError(
                f"lora_rank {rank} (--lora-rank) is above the rank a LoRA update of {name}, weight "
                f"{tuple(module.weight.shape)}, can have: at most {most}"
            )


def _wrap_lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    gpt2 = getattr(getattr(model, "config", None), "model_type", None) == "gpt2"
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.lora_targets),
        lora_dropout=config.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores weights (in, out)
    )
    with quiet_peft():
        return get_peft_model(model, lora)


def _save_weights(model: nn.Module, tokenizer: Any, folder: Path, lora: bool, progress: bool = True) -> None:
    from transformers.utils import logging as hf_logging

    quiet = not progress and hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers shows a "Writing model shards" bar
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    if not lora:
        tokenizer.save_pretrained(folder)


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint folder (``epoch``, ``step``, ``learning_rate``,
    ``mean_loss``, ...)."""
    return read_json_object(Path(checkpoint) / TRAINER_STATE_FILE)


def _identity(config: FinetuneConfig, records: Sequence[Record], model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """What must match for a saved run to be reused or an interrupted one resumed (recorded by a run trained now)."""
    return {
        "format": _FORMAT_VERSION,
        "config": config.to_dict(),
        "data_fingerprint": data_fingerprint(records),
        "num_records": len(records),
        "base_model_fingerprint": model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }


def _in_recorded_form(identity: dict[str, Any], recorded: Any, tokenizer: Any, where: Path) -> dict[str, Any]:
    """``identity`` to compare with the record ``recorded`` (read from ``where``): its tokenizer fingerprint in the
    record's form (a run made before version 2 of the fingerprint keeps version 1 where it matches:
    :func:`wherefrom.models.loading.recorded_tokenizer_fingerprint`), and for a full fine-tuning recorded as one,
    the record's LoRA settings (:data:`LORA_SETTINGS`, which train nothing there: ``lora_alpha=32`` of a preset
    or a Python config made an identical rerun with the default refused). A run trained now records ``identity``."""
    saved = recorded if isinstance(recorded, dict) else {}
    form = recorded_tokenizer_fingerprint(
        saved.get("tokenizer_fingerprint"), tokenizer, identity["tokenizer_fingerprint"], str(where)
    )
    config, saved_config = identity["config"], saved.get("config")
    if config["lora_rank"] is None and isinstance(saved_config, dict) and saved_config.get("lora_rank", 0) is None:
        unused = {key: saved_config[key] for key in LORA_SETTINGS if key in saved_config}
        config = {key: value for key, value in config.items() if key not in LORA_SETTINGS} | unused
    return {**identity, "config": config, "tokenizer_fingerprint": form}


def _finished_record(output_dir: Path) -> dict[str, Any] | None:
    """The record (``CONFIG_FILE``) of the finished run in ``output_dir``, or ``None`` when missing or unreadable."""
    try:
        return read_json_object(output_dir / CONFIG_FILE)
    except (OSError, ValueError):
        return None


def _refuse_other_run(output_dir: Path, identity: dict[str, Any], tokenizer: Any, allow: str) -> None:
    """:class:`wherefrom.core.store.OutputExists` when ``output_dir`` holds a finished run made from other inputs
    (naming each setting, data or model fingerprint that differs, with both values) or whose record is unreadable;
    nothing when it records the same inputs (a run whose checkpoints or weights are gone is trained again: that loses
    nothing). ``allow``: how the caller permits replacing it, named in the message."""
    path = output_dir / CONFIG_FILE
    saved = _finished_record(output_dir)
    if saved is None:
        refuse_overwrite([path], allow, why=" (its record is unreadable)")
        return
    now = _in_recorded_form(identity, saved, tokenizer, path)
    refuse_other_inputs([path], {key: saved.get(key) for key in now}, now, allow)


def _refuse_unrecorded_outputs(output_dir: Path, model: nn.Module) -> None:
    """Refuse to train into ``output_dir`` where it would delete what no fine-tuning recorded: ``ValueError`` when
    the base model's own folder (``model.config.name_or_path``) is ``output_dir`` or one the run replaces
    (``--model proj/model --out proj --full`` replaced the base model by the fine-tuned one), and
    :class:`wherefrom.core.store.OutputExists` naming ``adapter/``, ``model/``, ``checkpoints/`` or the training
    log where no record of a fine-tuning is there (its ``finetune_config.json``, a killed run's ``resume/``, an
    epoch checkpoint's trainer state): the user's own folders of those names were deleted, also without
    ``--overwrite``."""
    writes = (ADAPTER_DIR, MODEL_DIR, CHECKPOINTS_DIR, RESUME_DIR)
    base = getattr(getattr(model, "config", None), "name_or_path", None) or ""
    if base and Path(base).is_dir():
        base_dir, out = Path(base).resolve(), output_dir.resolve()
        if base_dir == out:
            raise ValueError(
                f"the output folder {output_dir} is the base model's folder {base}: the fine-tuning's files would mix "
                "with the model's; choose another output folder"
            )
        if any(base_dir.is_relative_to(out / name) for name in writes):
            raise ValueError(
                f"the base model's folder {base} is where the fine-tuning writes (output folder {output_dir}: its "
                f"{', '.join(f'{n}/' for n in writes)}): it would be replaced; choose another output folder"
            )
    recorded = (output_dir / CONFIG_FILE).exists() or (output_dir / RESUME_DIR).exists()
    # an epoch's checkpoint folder, or a leftover of a write or a clearing a kill interrupted (a run killed while
    # deleting its checkpoints leaves epoch-k without its trainer state)
    recorded = recorded or any(
        p.is_dir() and re.fullmatch(r"epoch-\d+", p.name) for p in (output_dir / CHECKPOINTS_DIR).glob("epoch-*")
    )
    recorded = recorded or (output_dir.is_dir() and any(_LEFTOVER.match(p.name) for p in output_dir.iterdir()))
    unrecorded = [output_dir / n for n in (ADAPTER_DIR, MODEL_DIR, CHECKPOINTS_DIR, TRAIN_LOG_FILE)]
    unrecorded = [str(path) for path in unrecorded if path.exists()]
    if unrecorded and not recorded:
        raise OutputExists(
            f"{', '.join(unrecorded)} would be deleted: no fine-tuning made {'it' if len(unrecorded) == 1 else 'them'} "
            f"({output_dir} holds no {CONFIG_FILE}, {RESUME_DIR}/ or epoch checkpoint); move them or choose another "
            "output folder (--overwrite does not delete them; a fine-tuning killed while writing its final weights, "
            "without epoch checkpoints, leaves such a folder too: delete it)"
        )


def _try_reuse(
    output_dir: Path, identity: dict[str, Any], tokenizer: Any
) -> tuple[list[float], list[Path], Path] | None:
    """``(epoch_losses, checkpoints, weights_dir)`` of a complete matching run, else ``None``."""
    saved = _finished_record(output_dir)
    if saved is None:
        return None
    identity = _in_recorded_form(identity, saved, tokenizer, output_dir / CONFIG_FILE)
    if any(saved.get(k) != v for k, v in identity.items()):
        return None
    lora = identity["config"]["lora_rank"] is not None
    weights_dir = output_dir / (ADAPTER_DIR if lora else MODEL_DIR)
    marker = "adapter_config.json" if lora else "config.json"
    if not (weights_dir / marker).is_file():
        return None
    checkpoints = [output_dir / rel for rel in saved.get("checkpoints", [])]
    if not all((c / TRAINER_STATE_FILE).is_file() for c in checkpoints):
        return None
    losses = saved.get("epoch_losses")
    if not isinstance(losses, list):
        return None
    return [float(x) for x in losses], checkpoints, weights_dir


def _new_run() -> dict[str, Any]:
    """The bookkeeping of a run at its start: no log rows, epoch losses, checkpoints or steps yet."""
    return {"log": [], "epoch_losses": [], "checkpoints": [], "step": 0}


def _restore(
    output_dir: Path,
    identity: dict[str, Any],
    tokenizer: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    overwrite: bool,
    allow: str,
) -> tuple[int, dict[str, Any]]:
    """``(epochs done, bookkeeping)`` of the interrupted identical run whose newest training state is in
    ``output_dir/resume`` (restored into ``model``, ``optimizer``, ``schedule`` and the generators), or
    ``(0, empty bookkeeping)`` when there is none to resume: a damaged state, one whose checkpoints are gone,
    or (with ``overwrite``) one of other settings is logged and left to be deleted. Raises
    :class:`wherefrom.core.store.OutputExists` for a state of other settings without ``overwrite`` (naming
    ``allow``)."""
    state, notes = latest_training_state(output_dir / RESUME_DIR)
    for note in notes:
        logger.warning("not resuming from a damaged training state: %s", note)
    if state is None:
        return 0, _new_run()
    differing = state.differences(_in_recorded_form(identity, state.identity, tokenizer, state.folder / STATE_JSON))
    if differing and not overwrite:
        refuse_overwrite(
            [state.folder],
            allow,
            why=f" (an interrupted run with other settings: {'; '.join(differing)}; rerun with them to resume it)",
        )
    missing = [rel for rel in state.bookkeeping["checkpoints"] if not (output_dir / rel / TRAINER_STATE_FILE).is_file()]
    try:
        if differing or missing:
            why = f"other settings ({'; '.join(differing)})" if differing else f"{', '.join(missing)} are gone"
            raise TrainingStateMismatch(f"{state.folder}: {why}")
        state.restore(model, optimizer, schedule, device)
    except TrainingStateMismatch as error:
        logger.warning("not resuming, training from the start: %s", error)
        return 0, _new_run()
    logger.info("resuming %s after epoch %d", output_dir, state.epoch)
    return state.epoch, state.bookkeeping


def _load_saved(model: nn.Module, weights_dir: Path, lora: bool, allow: str) -> nn.Module:
    """The finished fine-tuning's weights in ``weights_dir`` on ``model`` (its adapter, or its model). Raises
    :class:`wherefrom.models.loading.ModelLoadError` naming a damaged weight file (e.g. cut short: it was a
    ``SafetensorError`` traceback), the fine-tuning folder to delete so that it is made again, and ``allow`` (the
    caller's way to replace it)."""
    try:
        if lora:
            check_adapter(weights_dir, model, None)
        else:
            check_weights(weights_dir)
    except ModelLoadError as error:
        raise ModelLoadError(
            f"{str(error).split('. It was probably cut short')[0]}: the finished fine-tuning in {weights_dir.parent} "
            f"cannot be reused; restore the file, delete that folder, or pass {allow} to fine-tune again"
        ) from error
    device, dtype = _device_of(model), _dtype_of(model)
    if lora:
        from peft import PeftModel

        with quiet_peft():
            loaded = PeftModel.from_pretrained(model, str(weights_dir), is_trainable=False)
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype, local_files_only=True)
    loaded.to(device)
    loaded.eval()
    return loaded


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    config: FinetuneConfig,
    output_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    resumable: bool = True,
    allow: str = OVERWRITE_ALLOW,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``records`` and save checkpoints, logs and final weights.

    ``model`` is a plain (non-PEFT) causal LM; it is modified in place (LoRA layers are injected
    into it, or its weights are trained), so pass a freshly loaded model. Training runs on the
    model's device in its dtype:

    * with ``config.lora_rank`` set, ``peft.get_peft_model`` wraps it with a LoRA adapter on
      ``config.lora_targets`` and only the adapter trains; otherwise every parameter trains;
    * ``torch`` and ``random`` are seeded with ``config.seed`` (LoRA initialisation included);
      epoch ``k`` (1-based) visits the examples in ``torch.randperm`` order drawn from a
      ``torch.Generator`` seeded with ``seed + k``; batches of ``batch_size``, the last smaller;
    * the loss of a step is the mean over its examples of the summed completion-token loss
      (:func:`wherefrom.core.task.per_example_loss` with ``"sum"``); AdamW with ``learning_rate`` (on the
      ``lr_schedule``) and ``weight_decay``.

    After each epoch (with ``checkpoint_every_epoch``) the weights go to
    ``output_dir/checkpoints/epoch-{k}`` with a ``trainer_state.json`` (epoch, step, learning
    rate, mean loss) and ``optimizer_state.safetensors`` (AdamW's ``exp_avg_sq`` per trainable parameter,
    step, betas, eps: :func:`wherefrom.models.optimizer_state.save_adam_state`); at the end the final
    weights go to ``output_dir/adapter`` (LoRA) or ``output_dir/model`` (full model + tokenizer), then
    ``train_log.jsonl`` and ``finetune_config.json`` (config, fingerprints of data, base model and tokenizer, epoch
    losses, checkpoint list). If a complete earlier run with the same config and fingerprints is
    in ``output_dir``, its weights are loaded instead (``reused=True``); when they are damaged,
    :class:`wherefrom.models.loading.ModelLoadError` names the file, or with ``overwrite`` the run is trained again
    (logged). With ``resumable`` (the default; off
    for a throw-away ``output_dir``), each epoch but the last also leaves its training state in
    ``output_dir/resume`` (:mod:`wherefrom.models.training_state`; for full fine-tuning three copies of the
    model's size, twice that while the next one is written); an interrupted run with the same config,
    fingerprints and device kind resumes from the newest one after its last finished epoch
    (``resumed_after``), keeping that run's checkpoints and log, with the result of an uninterrupted run. A
    damaged state, or one whose checkpoints were deleted, is logged and the run starts from the first epoch.
    Otherwise a complete earlier run of other settings or data, or an interrupted one's training state, raises
    :class:`wherefrom.core.store.OutputExists`, before any training (an interrupted run that left no state is
    still cleared); its message names ``allow``, the caller's way to permit it. With ``overwrite=True`` what
    earlier runs left there (only the names above) is deleted first instead. The default was ``True``, so a
    Python call replaced a finished fine-tuning of other settings without a word where the command line refused.

    Raises ``TypeError`` for a ``model`` that is not a module (a :class:`wherefrom.models.loading.LoadedModel`: pass
    its ``.model``) or a ``config`` that is not a :class:`FinetuneConfig`; ``ValueError`` for a bad config
    (:meth:`FinetuneConfig.validate`), a PEFT model, a LoRA target or rank the model cannot take
    (:func:`check_lora_targets`) or an ``output_dir`` that is a file; :class:`wherefrom.core.data.DataError` for an
    empty ``records``, an invalid row, a repeated id or an example longer than ``max_length`` (or the model's
    positions): each before ``output_dir`` is made (a refused run leaves no folder).
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        hint = ": pass its .model" if hasattr(model, "model") and hasattr(model, "tokenizer") else ""
        raise TypeError(f"model must be a causal LM (torch.nn.Module), got {type(model).__name__}{hint}")
    in_the_way = file_in_the_way(Path(output_dir), Path(output_dir))
    if in_the_way:
        raise ValueError(f"output_dir {output_dir}: {in_the_way}")
    config.validate()
    records = check_records(records, "fine-tuning rows")
    if is_peft(model):
        raise ValueError(
            "finetune() expects a base model, not a peft.PeftModel; it adds the LoRA adapter "
            "itself (set FinetuneConfig.lora_rank)"
        )
    if config.chat_template and not config.append_eos and template_ends_turn(tokenizer):
        raise ValueError(  # userK: taken, recorded, then warned of as another layout when the run was attributed
            "append_eos=False (--no-eos) changes nothing with this chat template: its end-of-turn marker ends each "
            "completion and is scored; leave it out"
        )
    lora = config.lora_rank is not None
    if lora:  # before the output folder is made
        check_lora_targets(model, config.lora_targets, config.lora_rank)
    output_dir = Path(output_dir)

    identity = _identity(config, records, model, tokenizer)
    device = _device_of(model)
    reusable = _try_reuse(output_dir, identity, tokenizer)
    if reusable is not None:
        losses, checkpoints, weights_dir = reusable
        try:
            saved = _load_saved(model, weights_dir, lora, allow)
        except ModelLoadError as damaged:
            if not overwrite:
                raise
            # reviewT: it was refused with overwrite=True too, which permits replacing the folder's fine-tuning
            logger.warning("%s; replacing it (overwrite): fine-tuning again", damaged)
        else:
            _remove(output_dir / RESUME_DIR)  # left by a run killed between its last two writes
            return FinetuneResult(
                model=saved,
                output_dir=output_dir,
                weights_dir=weights_dir,
                epoch_losses=losses,
                checkpoints=checkpoints,
                reused=True,
            )

    # Encode first, so bad data fails before anything on disk is touched.
    examples = encode_records(records, tokenizer, model=model, **config.layout())
    _refuse_unrecorded_outputs(output_dir, model)  # with overwrite too: not a fine-tuning's to replace
    if not overwrite:
        _refuse_other_run(output_dir, identity, tokenizer, allow)
    output_dir.mkdir(parents=True, exist_ok=True)  # after the checks: a refused row leaves no folder

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if lora:
        model = _wrap_lora(model, config)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no trainable parameters (lora_targets={config.lora_targets})")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    padding = pad_id(tokenizer)
    steps_per_epoch = -(-len(examples) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    decay = (lambda done: 1.0 - done / total_steps) if config.lr_schedule == "linear" else (lambda done: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    state_identity = {**identity, "device": device.type}  # a state resumes on the device kind that saved it
    done, book = (
        _restore(output_dir, state_identity, tokenizer, model, optimizer, schedule, device, overwrite, allow)
        if resumable
        else (0, _new_run())
    )
    _clear_outputs(output_dir, resuming=book["checkpoints"] if done else None)
    log: list[dict[str, Any]] = book["log"]
    epoch_losses: list[float] = book["epoch_losses"]
    checkpoints = [output_dir / rel for rel in book["checkpoints"]]
    step = int(book["step"])

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="fine-tuning",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    model.train()
    diverged = False
    try:
        for epoch in range(done + 1, config.epochs + 1):
            generator = torch.Generator().manual_seed(config.seed + epoch)
            order = torch.randperm(len(examples), generator=generator).tolist()
            shuffled = [examples[i] for i in order]
            epoch_lr = float(optimizer.param_groups[0]["lr"])
            step_losses: list[float] = []
            for batch_ids, batch in iterate_batches(shuffled, config.batch_size, padding, device=device):
                lr = float(optimizer.param_groups[0]["lr"])
                logits = model(**model_inputs(model, batch)).logits
                loss = per_example_loss(logits, batch["labels"], "sum").mean()
                value = float(loss.detach())
                if not (math.isfinite(value) or diverged):  # said once: the scores of this model will be NaN
                    diverged = True
                    warnings.warn(
                        f"fine-tuning diverged: the loss of step {step + 1} (epoch {epoch}) is {value} at learning "
                        f"rate {lr:g}; the weights and every score of this model will be NaN: lower learning_rate "
                        "(--learning-rate)",
                        FinetuneDiverged,
                        stacklevel=2,
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                step_losses.append(value)
                log.append({"epoch": epoch, "step": step, "loss": value, "lr": lr, "batch_ids": batch_ids})
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
            mean_loss = sum(step_losses) / len(step_losses)
            epoch_losses.append(mean_loss)
            if config.checkpoint_every_epoch:
                state = {
                    "epoch": epoch,
                    "step": step,
                    "learning_rate": epoch_lr,
                    "mean_loss": mean_loss,
                    "steps_in_epoch": len(step_losses),
                    "batch_size": config.batch_size,
                    "num_examples": len(examples),
                    "lora": lora,
                    "loss": "mean over the batch of the summed completion-token loss",
                }

                def fill(folder: Path, state: dict[str, Any] = state) -> None:
                    _save_weights(model, tokenizer, folder, lora, progress)
                    (folder / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
                    save_adam_state(optimizer, model, folder)

                target = output_dir / CHECKPOINTS_DIR / f"epoch-{epoch}"
                atomic_write_dir(target, fill)
                checkpoints.append(target)
            if resumable and epoch < config.epochs:  # the state a killed run resumes from
                book = {
                    "log": log,
                    "epoch_losses": epoch_losses,
                    "checkpoints": [str(c.relative_to(output_dir)) for c in checkpoints],
                    "step": step,
                }
                save_training_state(
                    output_dir / RESUME_DIR, state_identity, epoch, book, model, optimizer, schedule, device
                )
    finally:
        bar.close()
        model.eval()

    weights_dir = output_dir / (ADAPTER_DIR if lora else MODEL_DIR)
    atomic_write_dir(weights_dir, lambda folder: _save_weights(model, tokenizer, folder, lora, progress))
    atomic_write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in log), output_dir / TRAIN_LOG_FILE)
    summary = dict(identity)
    summary["epoch_losses"] = epoch_losses
    summary["steps"] = step
    summary["checkpoints"] = [str(c.relative_to(output_dir)) for c in checkpoints]
    summary["weights_dir"] = weights_dir.name
    atomic_write_text(json.dumps(summary, indent=2) + "\n", output_dir / CONFIG_FILE)
    _remove(output_dir / RESUME_DIR)

    if lora:  # match load_model(base, adapter=...): a frozen adapter
        for param in model.parameters():
            param.requires_grad_(False)
    return FinetuneResult(
        model=model,
        output_dir=output_dir,
        weights_dir=weights_dir,
        epoch_losses=epoch_losses,
        checkpoints=checkpoints,
        reused=False,
        resumed_after=done,
    )
