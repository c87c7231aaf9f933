"""AdamW's saved second moment: what save_adam_state writes equals v by hand, a damaged file is refused by name,
and the divisors are sqrt(v / (1 - beta2^t)) + eps in the Linear orientation (GPT-2's Conv1D transposed, its
bias an extra column)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from wherefrom.core.store import DamagedFile
from wherefrom.core.tracking import TrackedModule
from wherefrom.models.optimizer_state import OPTIMIZER_STATE_FILE, AdamState, MissingOptimizerState, save_adam_state


def stepped(module: nn.Module, grads: list[dict[str, torch.Tensor]]) -> torch.optim.AdamW:
    """AdamW (beta2 0.99, eps 1e-3) stepped once per given gradient."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    for grad in grads:
        for name, param in module.named_parameters():
            param.grad = grad[name].clone()
        optimizer.step()
    return optimizer


def test_saved_second_moment_is_adams_v_by_hand(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))  # parameters "0.weight" (2, 3) and "0.bias" (2,)
    grads = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    save_adam_state(stepped(model, grads), model, tmp_path)
    state = AdamState.load(tmp_path)
    assert state.step == 2 and state.beta2 == 0.99 and state.eps == 1e-3
    for name in ("0.weight", "0.bias"):  # v_2 = beta2 (1 - beta2) g_1^2 + (1 - beta2) g_2^2
        by_hand = 0.99 * 0.01 * grads[0][name] ** 2 + 0.01 * grads[1][name] ** 2
        assert torch.allclose(state.second_moment[name], by_hand, rtol=1e-6)
    divisor = state.divisors([TrackedModule("0", model[0], is_conv1d=False, has_bias=True)])["0"]
    v = torch.cat([state.second_moment["0.weight"], state.second_moment["0.bias"][:, None]], dim=1)
    assert divisor.shape == (2, 4) and torch.allclose(divisor, (v / (1 - 0.99**2)).sqrt() + 1e-3)

    data = bytearray((tmp_path / OPTIMIZER_STATE_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / OPTIMIZER_STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match=OPTIMIZER_STATE_FILE):
        AdamState.load(tmp_path)
    with pytest.raises(MissingOptimizerState, match=re.escape(f"{tmp_path / 'elsewhere'} holds no AdamW state")):
        AdamState.load(tmp_path / "elsewhere")


def test_conv1d_divisors_are_transposed_with_the_bias_as_a_column():
    conv = Conv1D(nf=3, nx=2)  # weight (in 2, out 3), bias (3,)
    v = {"c.weight": torch.rand(2, 3), "c.bias": torch.rand(3)}
    state = AdamState(None, v, step=5, beta2=0.999, eps=1e-8, checksum="")
    divisor = state.divisors([TrackedModule("c", conv, is_conv1d=True, has_bias=True)])["c"]
    correction = 1 - 0.999**5
    assert divisor.shape == (3, 3)  # (out, in + bias)
    assert torch.allclose(divisor[:, :2], (v["c.weight"].T / correction).sqrt() + 1e-8)
    assert torch.allclose(divisor[:, 2], (v["c.bias"] / correction).sqrt() + 1e-8)
    with pytest.raises(ValueError, match=r"no second moment of d\.weight"):
        state.divisors([TrackedModule("d", conv, is_conv1d=True, has_bias=True)])


def test_a_missing_state_says_to_fine_tune_into_a_new_folder(tmp_path):
    """`finetune` reuses an identical earlier run in its output folder as it is, so a run saved before the state
    was kept gets none by fine-tuning there again: the refusal says to use a new folder."""
    with pytest.raises(MissingOptimizerState, match=r"fine-tune again into a new output folder"):
        AdamState.fingerprint(tmp_path)
