"""AdamW's second moment saved with a fine-tuning checkpoint, and the elementwise preconditioner it gives.

AdamW (Loshchilov and Hutter, 2019; ``torch.optim.AdamW``) keeps per parameter the running second moment
``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2`` and moves the weights along ``m_hat / (sqrt(v_hat) + eps)`` with
the bias-corrected ``v_hat = v_t / (1 - beta2^t)`` (``t`` the step count). LESS (Xia et al. 2024, LESS:
Selecting Influential Data for Targeted Instruction Tuning: the Adam update direction ``Gamma(z, theta)`` of
its Adam influence) and TrackStar (Chang et al. 2024, Scalable Influence and Fact Tracing for Large Language
Model Pretraining: the optimizer state correction) precondition a training example's gradient ``g`` the same
way: ``g / (sqrt(v_hat) + eps)``, elementwise, with ``v_hat`` and ``eps`` of the checkpoint the gradient is
taken at. (LESS's ``Gamma`` also carries the first moment; with ``beta1``'s memory of other rows it is not
a function of ``g`` alone, so only the second moment is used, as TrackStar does.)

A checkpoint folder of :func:`wherefrom.models.finetune.finetune` holds ``optimizer_state.safetensors``:
one float32 tensor ``v`` per trainable parameter, named as in ``model.named_parameters()`` and shaped like
the parameter, with metadata ``step``, ``beta1``, ``beta2``, ``eps`` and ``weight_decay``; its checksum is
recorded in the folder's ``checksums.json`` (:func:`wherefrom.core.store.save_tensors_checked`), so a
damaged file is refused by name, never read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wherefrom.core.store import (
    check_size,
    checksum_of,
    load_tensors_checked,
    recorded_checksums,
    save_tensors_checked,
)
from wherefrom.core.tracking import TrackedModule

__all__ = ["OPTIMIZER_STATE_FILE", "AdamState", "MissingOptimizerState", "save_adam_state"]

OPTIMIZER_STATE_FILE = "optimizer_state.safetensors"


class MissingOptimizerState(FileNotFoundError):
    """A checkpoint folder has no saved AdamW state (fine-tuned before it was saved, or not by wherefrom)."""


def save_adam_state(optimizer: torch.optim.Optimizer, model: nn.Module, folder: Path) -> None:
    """Write ``folder/optimizer_state.safetensors``: ``exp_avg_sq`` of every parameter ``optimizer`` has
    stepped, by its name in ``model``, with the step count and the hyper-parameters of its (single) group.

    Raises ``ValueError`` for an optimizer that is not AdamW-like (no ``betas``/``eps``), several parameter
    groups, or parameters at different step counts."""
    if len(optimizer.param_groups) != 1 or not {"betas", "eps"} <= set(optimizer.param_groups[0]):
        raise ValueError("save_adam_state needs an Adam/AdamW optimizer with one parameter group")
    group = optimizer.param_groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, steps = {}, set()
    for param in group["params"]:
        state = optimizer.state.get(param)
        if state:
            tensors[names[id(param)]] = state["exp_avg_sq"].detach().to("cpu", torch.float32).contiguous()
            steps.add(int(state["step"]))
    if len(steps) > 1:
        raise ValueError(f"the optimizer's parameters are at different steps {sorted(steps)}")
    meta = {
        "step": steps.pop() if steps else 0,
        "beta1": float(group["betas"][0]),
        "beta2": float(group["betas"][1]),
        "eps": float(group["eps"]),
        "weight_decay": float(group.get("weight_decay", 0.0)),
    }
    save_tensors_checked(tensors, Path(folder) / OPTIMIZER_STATE_FILE, meta={"adam": json.dumps(meta)})


@dataclass
class AdamState:
    """The AdamW state of one checkpoint folder: ``second_moment`` ``{parameter name: v}`` (float32, shaped
    like the parameter), ``step`` ``t``, ``beta2`` and ``eps``; ``checksum``: the file's recorded hex digest (a
    fingerprint: :func:`AdamState.fingerprint`)."""

    folder: Path
    second_moment: dict[str, torch.Tensor]
    step: int
    beta2: float
    eps: float
    checksum: str

    @staticmethod
    def fingerprint(folder: str | Path) -> dict[str, str]:
        """What identifies checkpoint ``folder``'s state in an index's settings, without reading its tensors:
        the folder (absolute) and the file's recorded checksum, ``{"checkpoint": folder, hash name: hex}`` (the
        hash name is ``xxh3_128``, or ``sha256`` for a state saved by an older wherefrom: its fingerprint, and so
        an index's settings that record it, stay as they were).

        Raises :class:`MissingOptimizerState` naming the folder when it has no state and
        :class:`wherefrom.core.store.DamagedFile` when the file's checksum is not recorded."""
        folder = Path(folder).resolve()
        path = folder / OPTIMIZER_STATE_FILE
        if not path.is_file():
            raise MissingOptimizerState(
                f"checkpoint folder {folder} holds no AdamW state ({OPTIMIZER_STATE_FILE}): --precondition adam "
                "needs a checkpoint that `wherefrom finetune` saved with its optimizer state; fine-tune again into a "
                "new output folder (in the same folder an identical earlier run is reused as it is, without the state)"
            )
        check_size(path)
        name, digest = checksum_of(recorded_checksums(folder)[OPTIMIZER_STATE_FILE])
        return {"checkpoint": str(folder), name: digest}

    @classmethod
    def load(cls, folder: str | Path) -> AdamState:
        """The state saved in checkpoint ``folder``, its checksum verified.

        Raises :class:`MissingOptimizerState` naming the folder when it has none,
        :class:`wherefrom.core.store.DamagedFile` naming a damaged file and ``ValueError`` for a state saved
        before the first step."""
        _, checksum = checksum_of(cls.fingerprint(folder))
        folder = Path(folder)
        tensors, meta = load_tensors_checked(folder / OPTIMIZER_STATE_FILE)
        adam = json.loads(meta["adam"])
        if adam["step"] < 1:
            raise ValueError(f"the AdamW state in {folder} is from before the first step (step 0)")
        return cls(folder, tensors, int(adam["step"]), float(adam["beta2"]), float(adam["eps"]), checksum)

    def divisors(self, modules: Sequence[TrackedModule]) -> dict[str, torch.Tensor]:
        """``{module: sqrt(v_hat) + eps}`` float32, ``(out, in + has_bias)`` (the Linear orientation of every
        gradient wherefrom handles), with ``v_hat = v / (1 - beta2^step)`` as AdamW computes it; a gradient
        divided by it elementwise is the LESS/TrackStar preconditioned gradient. A module's parameters are found
        by its name in the model (``name.weight``, ``name.bias``), which is theirs in the fine-tuned model.

        Raises ``ValueError`` naming a tracked module whose weight (or bias) has no saved second moment (and the
        folder), or one saved with another shape."""
        correction = 1.0 - self.beta2**self.step
        out = {}
        for module in modules:
            parts = []
            for kind, param in zip(("weight", "bias"), module.parameters()):
                name = f"{module.name}.{kind}"
                if name not in self.second_moment:
                    raise ValueError(
                        f"the AdamW state in {self.folder} has no second moment of {name} (it trained other "
                        "parameters); track modules the fine-tuning trained, or use --precondition fitted|none"
                    )
                v = self.second_moment[name]
                if tuple(v.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: saved second moment {tuple(v.shape)}, parameter {tuple(param.shape)}")
                parts.append((v / correction).sqrt() + self.eps)
            out[module.name] = module.from_param_layout(parts[0], parts[1] if len(parts) > 1 else None)
        return out
