"""The whole state of a fine-tuning run between two epochs, saved so that a killed run resumes bit for bit.

A fine-tuning run after epoch ``k`` is fully described by: the trainable parameters, the optimizer's state
(AdamW's first and second moments and step count per parameter, and its parameter groups' settings), the
learning-rate scheduler's state, the random-number generators' states (LoRA dropout draws from torch's
generator of the training device; the epoch order comes from a generator seeded per epoch and needs
nothing) and the bookkeeping the run reports at the end (training log rows, epoch losses, checkpoints
written). Restoring all of it into a freshly built model, optimizer and scheduler and running epochs
``k+1..`` gives the same bytes as an uninterrupted run on the same device and thread count (tested on CPU).

Layout of a run's resume folder: one ``epoch-<k>/`` per saved state, written under a temporary name and
renamed into place, the older ones deleted only after the newer one is in place (so a kill at any moment
leaves at least one complete state once the first epoch has ended)::

    epoch-<k>/state.safetensors  param/<name>         the trainable parameters (``model.named_parameters()``)
                                 optimizer/<i>/<key>  the optimizer's per-parameter tensors (``i``: the
                                                      parameter's position over all groups, as
                                                      ``Optimizer.state_dict`` numbers them; ``key``:
                                                      ``exp_avg``, ``exp_avg_sq``, ``step``)
                                 rng/cpu, rng/cuda    torch's generator states (uint8; cuda: the training
                                                      device's, when it is a GPU)
    epoch-<k>/state.json         format, identity (what must match to resume), epoch, bookkeeping, the
                                 optimizer's parameter groups, the scheduler's state, Python's ``random``
                                 state; non-finite losses are kept as ``NaN``/``Infinity``

Both files' checksums go into the folder's ``checksums.json``; :meth:`TrainingState.read` hashes them as they
are read, so a damaged state is refused (:class:`wherefrom.core.store.DamagedFile`), never used.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wherefrom.core.store import (
    DamagedFile,
    atomic_write_dir,
    atomic_write_text,
    json_form,
    load_tensors_checked,
    read_json_checked,
    record_checksum,
    save_tensors_checked,
    settings_differences,
)

__all__ = ["JSON_FILE", "TrainingState", "TrainingStateMismatch", "latest_training_state", "save_training_state"]

FORMAT = 1
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
EPOCH_FOLDER = re.compile(r"^epoch-(\d+)$")


class TrainingStateMismatch(ValueError):
    """A saved training state does not fit the run at hand (other format, parameters or optimizer layout)."""


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _cuda_index(device: torch.device) -> int | None:
    return (
        (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    )


def save_training_state(
    root: Path,
    identity: dict[str, Any],
    epoch: int,
    bookkeeping: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> None:
    """Write the state after ``epoch`` (1-based) as ``root/epoch-<epoch>`` (module docstring), then delete the
    older states under ``root``. ``identity`` and ``bookkeeping`` must be JSON-ready (floats may be
    non-finite); ``device`` is the training device (its generator is saved)."""
    names = _names(model)
    tensors = {f"param/{n}": p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    ordered = [param for group in optimizer.param_groups for param in group["params"]]
    for i, param in enumerate(ordered):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optimizer/{i}/{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    tensors["rng/cpu"] = torch.random.get_rng_state()
    cuda = _cuda_index(device)
    if cuda is not None:
        tensors["rng/cuda"] = torch.cuda.get_rng_state(cuda)
    version, internal, gauss = random.getstate()
    record = {
        "format": FORMAT,
        "identity": identity,
        "epoch": epoch,
        "bookkeeping": bookkeeping,
        "optimizer_groups": groups,
        "scheduler": scheduler.state_dict(),
        "python_random": [version, list(internal), gauss],
    }

    def fill(folder: Path) -> None:
        save_tensors_checked(tensors, folder / TENSORS_FILE)
        # not write_json_checked: its strict JSON writes a NaN loss sum as null, and a diverged run must resume equal
        atomic_write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", folder / JSON_FILE)
        record_checksum(folder / JSON_FILE)

    target = root / f"epoch-{epoch}"
    atomic_write_dir(target, fill)
    for entry in root.iterdir():  # older states and the leftovers of killed writes
        if entry != target and entry.is_dir():
            shutil.rmtree(entry)
        elif entry != target:
            entry.unlink()


@dataclass(frozen=True)
class TrainingState:
    """A state read back by :meth:`read` (checksums verified; nothing restored yet)."""

    folder: Path
    identity: dict[str, Any]
    epoch: int
    bookkeeping: dict[str, Any]
    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def read(cls, folder: Path) -> TrainingState:
        """The state in ``folder``. Raises :class:`wherefrom.core.store.DamagedFile` naming a missing or damaged
        file, :class:`TrainingStateMismatch` for a state of another format."""
        record = read_json_checked(folder / JSON_FILE)
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise TrainingStateMismatch(f"{folder}: a training state of format {record.get('format')!r}, not {FORMAT}")
        tensors, _ = load_tensors_checked(folder / TENSORS_FILE)
        return cls(folder, record["identity"], int(record["epoch"]), record["bookkeeping"], record, tensors)

    def differences(self, identity: dict[str, Any]) -> list[str]:
        """``"key: recorded X, now Y"`` for each (dotted) key of ``identity`` whose saved value differs (empty:
        the state belongs to this run)."""
        return settings_differences(self.identity, json_form(identity))

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
    ) -> None:
        """Load the state into ``model`` (its trainable parameters), ``optimizer``, ``scheduler`` and the
        generators (torch's CPU generator, ``device``'s when it is a GPU, Python's ``random``).

        ``model``/``optimizer``/``scheduler`` must be built as the saved run built them (the same trainable
        parameters in the same groups). Raises :class:`TrainingStateMismatch` naming what differs, before
        anything is changed."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        saved = {k.removeprefix("param/") for k in self.tensors if k.startswith("param/")}
        if saved != set(params):
            raise TrainingStateMismatch(
                f"{self.folder}: the saved trainable parameters differ from the model's "
                f"({len(saved ^ set(params))} names, e.g. {sorted(saved ^ set(params))[0]!r})"
            )
        groups = self.record["optimizer_groups"]
        names = _names(model)
        if [group["params"] for group in groups] != [
            [names[id(p)] for p in g["params"]] for g in optimizer.param_groups
        ]:
            raise TrainingStateMismatch(f"{self.folder}: the saved optimizer's parameter groups differ from this run's")
        cuda = _cuda_index(device)
        if (cuda is not None) != ("rng/cuda" in self.tensors):
            raise TrainingStateMismatch(f"{self.folder}: saved by a run on another kind of device than {device}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.tensors[f"param/{name}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/")
                state.setdefault(int(index), {})[name] = value
        settings, start = [], 0
        for group in groups:
            ids = list(range(start, start + len(group["params"])))
            settings.append({**{k: tuple(v) if k == "betas" else v for k, v in group.items()}, "params": ids})
            start += len(ids)
        optimizer.load_state_dict({"state": state, "param_groups": settings})
        scheduler.load_state_dict(self.record["scheduler"])
        torch.random.set_rng_state(self.tensors["rng/cpu"])
        if cuda is not None:
            torch.cuda.set_rng_state(self.tensors["rng/cuda"], cuda)
        version, internal, gauss = self.record["python_random"]
        random.setstate((version, tuple(internal), gauss))


def latest_training_state(root: Path) -> tuple[TrainingState | None, list[str]]:
    """The newest readable state under ``root`` (``None`` when there is none) and a note per newer state that
    could not be read (damaged, another format)."""
    epochs = (
        sorted(
            ((int(m.group(1)), entry) for entry in root.iterdir() if (m := EPOCH_FOLDER.match(entry.name))),
            reverse=True,
        )
        if root.is_dir()
        else []
    )
    notes = []
    for _, folder in epochs:
        try:
            return TrainingState.read(folder), notes
        except (DamagedFile, TrainingStateMismatch) as error:
            notes.append(str(error))
    return None, notes
