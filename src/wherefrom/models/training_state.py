"""The whole state of a fine-tuning run between two epochs, saved so that a killed run resumes bit for bit.

A fine-tuning run after epoch ``k`` is fully described by: the trainable parameters, the optimizer's state
(AdamW's first and second moments and step count per parameter, and its parameter group's settings), the
learning-rate scheduler's state, the random-number generators' states (LoRA dropout draws from torch's
global generator; the epoch order comes from a generator seeded per epoch and needs nothing) and the
bookkeeping the run reports at the end (training log rows, epoch losses, checkpoints written). Restoring all
of it into a freshly built model, optimizer and scheduler and running epochs ``k+1..`` gives the same bytes
as an uninterrupted run on the same device and thread count (tested on CPU).

Layout of the folder (written by :func:`save_training_state` under a temporary name and renamed into place by
the caller, so it is either complete or absent)::

    state.safetensors    param/<name>        the trainable parameters (``model.named_parameters()`` names)
                         optimizer/<i>/<key> the optimizer's per-parameter tensors (``i``: the parameter's
                                             position over all groups, as ``Optimizer.state_dict`` numbers
                                             them; ``key``: ``exp_avg``, ``exp_avg_sq``, ``step``)
                         rng/cpu, rng/cuda/<d>  torch's generator states (uint8)
    state.json           identity (what must match to resume), epoch, bookkeeping, the optimizer's
                         parameter groups, the scheduler's state and Python's ``random`` state

Both files' sha256 go into the folder's ``checksums.json``; :func:`load_training_state` hashes them as they
are read, so a damaged state is refused (:class:`wherefrom.core.store.DamagedFile`), never used.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wherefrom.core.store import load_tensors_checked, read_json_checked, save_tensors_checked, write_json_checked

__all__ = ["TrainingStateMismatch", "load_training_state", "save_training_state"]

TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"


class TrainingStateMismatch(ValueError):
    """A saved training state does not fit the run at hand (other identity, parameters or optimizer layout)."""


def save_training_state(
    folder: Path,
    identity: dict[str, Any],
    epoch: int,
    bookkeeping: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Write the state after ``epoch`` (1-based) into ``folder`` (see the module docstring). ``identity`` and
    ``bookkeeping`` must be JSON-ready."""
    names = {id(p): n for n, p in model.named_parameters()}
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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{d}"] = state
    save_tensors_checked(tensors, folder / TENSORS_FILE)
    version, internal, gauss = random.getstate()
    write_json_checked(
        {
            "identity": identity,
            "epoch": epoch,
            "bookkeeping": bookkeeping,
            "optimizer_groups": groups,
            "scheduler": scheduler.state_dict(),
            "python_random": [version, list(internal), gauss],
        },
        folder / JSON_FILE,
    )


def load_training_state(
    folder: Path,
    identity: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, Any]]:
    """Restore the state saved in ``folder`` into ``model`` (its trainable parameters), ``optimizer``,
    ``scheduler`` and the random generators; returns ``(epoch, bookkeeping)``.

    ``model``/``optimizer``/``scheduler`` must be built as the saved run built them (same trainable parameters
    in the same order). Raises :class:`TrainingStateMismatch` naming what differs when the saved identity or
    the parameter layout does not match (nothing is restored then), :class:`wherefrom.core.store.DamagedFile`
    for a file whose checksum differs, ``FileNotFoundError`` when a file is missing."""
    saved = read_json_checked(folder / JSON_FILE)
    differing = sorted(k for k in set(saved["identity"]) | set(identity) if saved["identity"].get(k) != identity.get(k))
    if differing:
        raise TrainingStateMismatch(f"{folder}: saved by a run with other {', '.join(differing)}")
    tensors, _ = load_tensors_checked(folder / TENSORS_FILE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved_params = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    if saved_params != set(params):
        raise TrainingStateMismatch(
            f"{folder}: the saved trainable parameters differ from the model's "
            f"({len(saved_params ^ set(params))} names, e.g. {sorted(saved_params ^ set(params))[0]!r})"
        )
    groups = saved["optimizer_groups"]
    names = {id(p): n for n, p in model.named_parameters()}
    now = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    if [group["params"] for group in groups] != now:
        raise TrainingStateMismatch(f"{folder}: the saved optimizer's parameter groups differ from this run's")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param/{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/")
            state.setdefault(int(index), {})[name] = value
    group_settings, start = [], 0
    for group in groups:
        ids = list(range(start, start + len(group["params"])))
        group_settings.append({**{k: tuple(v) if k == "betas" else v for k, v in group.items()}, "params": ids})
        start += len(ids)
    optimizer.load_state_dict({"state": state, "param_groups": group_settings})
    scheduler.load_state_dict(saved["scheduler"])
    torch.random.set_rng_state(tensors["rng/cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = saved["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return int(saved["epoch"]), saved["bookkeeping"]
