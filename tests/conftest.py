"""Shared fixtures: the tiny character tokenizer, tiny models of each supported kind, small data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from wherefrom.core.data import Record
from wherefrom.models.tiny import tiny_gpt2, tiny_llama, tiny_opt, tiny_tokenizer, with_lora

# Parallel test runs on a 2-core machine: set WHEREFROM_TEST_THREADS=1 to avoid oversubscription.
torch.set_num_threads(int(os.environ.get("WHEREFROM_TEST_THREADS", "2")))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
"""The evaluation sets beside the project (``../shared/datasets``); tests that read them skip without them."""

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl"]


def make_records(n: int, seed: int, prefix: str = "r") -> list[Record]:
    """Rows of varying length (so batches carry padding): prompt ``"w w:"`` or ``"w w w:"``, completion ``" w"``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3]))) + ":"
        completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2])))
        rows.append(Record(f"{prefix}{i}", prompt, completion, label=completion.split()[0]))
    return rows


def build_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """``llama`` (Linear), ``gpt2`` (Conv1D), ``opt`` (``fc1``/``fc2`` fed positions folded into rows) or
    ``lora`` (LoRA A/B on a tiny Llama), tiny sizes."""
    vocab = len(tiny_tokenizer())
    if kind == "opt":
        return tiny_opt(vocab, hidden=16, layers=1, heads=2, seed=seed)
    if kind == "llama":
        return tiny_llama(vocab, hidden=16, intermediate=32, layers=1, seed=seed)
    if kind == "gpt2":
        return tiny_gpt2(vocab, hidden=16, layers=1, seed=seed)
    if kind == "lora":
        return with_lora(tiny_llama(vocab, hidden=16, intermediate=32, layers=1, seed=seed), r=2, seed=seed)
    raise ValueError(kind)


def scale_lora_b(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """``model`` with every ``lora_B`` weight multiplied by ``scale`` in place: its ``lora_A`` gradients are
    multiplied by ``scale`` (about 1e-4 x ``scale`` for the tests' tiny Llama), and for a small scale the model is
    its base model."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def train_records() -> list[Record]:
    return make_records(12, seed=1)


@pytest.fixture(scope="session")
def query_records() -> list[Record]:
    return make_records(4, seed=2, prefix="q")


@pytest.fixture
def nan_last_step(monkeypatch):
    """Within the test, every AdamW step leaves the first parameter it updates NaN, as a last step that overflowed
    would: a fine-tuning whose every loss is finite ends with non-finite weights (reviewU)."""
    real = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
