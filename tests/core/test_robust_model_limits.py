"""Rows a model cannot take (longer than its position table, or token ids past its embedding) are a
DataError naming the row and both numbers, raised before any pass over the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wherefrom.core.data import DataError, Record
from wherefrom.core.encoding import encode_records, model_positions, model_vocabulary
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.registry import make_method
from wherefrom.models.finetune import FinetuneConfig, finetune
from wherefrom.models.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer, with_lora
from wherefrom.studies.groundtruth.pbrf import pbrf_influence
from wherefrom.studies.groundtruth.retrain import measure_queries

TRAIN = [Record("r0", "ab cd:", " ef"), Record("r1", "gh:", " ij kl")]


def row_of(n_tokens: int, row_id: str = "long") -> Record:
    """A row of exactly ``n_tokens`` tokens for the character tokenizer (prompt + completion + EOS)."""
    return Record(row_id, "a" * (n_tokens - 3), " b")


def models(tok) -> dict[str, torch.nn.Module]:
    vocab = len(tok)
    return {
        "gpt2": tiny_gpt2(vocab, hidden=16, layers=1),
        "llama": tiny_llama(vocab, hidden=16, intermediate=32, layers=1),
        "lora": with_lora(tiny_llama(vocab, hidden=16, intermediate=32, layers=1), r=2),
    }


def forbid_forward(monkeypatch, model) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the rows were checked")

    monkeypatch.setattr(model, "forward", boom)


def test_limits_read_from_config() -> None:
    tok = tiny_tokenizer()
    found = {name: model_positions(m) for name, m in models(tok).items()}
    assert found == {
        "gpt2": (128, "config.n_positions"),
        "llama": (128, "config.max_position_embeddings"),
        "lora": (128, "config.max_position_embeddings"),
    }
    assert {name: model_vocabulary(m) for name, m in models(tok).items()} == dict.fromkeys(found, len(tok))
    assert model_positions(torch.nn.Linear(2, 2)) is None and model_vocabulary(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("kind", ["gpt2", "llama", "lora"])
@pytest.mark.parametrize("n_tokens", [129, 212, 512])
def test_encode_caps_max_length_at_positions(kind: str, n_tokens: int) -> None:
    tok = tiny_tokenizer()
    model = models(tok)[kind]
    assert len(encode_records([row_of(n_tokens)], tok)[0]) == n_tokens  # the tokenizer alone lets it pass
    assert len(encode_records([row_of(128)], tok, model=model)[0]) == 128  # exactly the limit fits
    with pytest.raises(DataError) as excinfo:
        encode_records([row_of(127, "ok"), row_of(n_tokens)], tok, max_length=512, model=model)
    field = "n_positions" if kind == "gpt2" else "max_position_embeddings"
    assert str(excinfo.value).startswith(
        f"record 'long': {n_tokens} tokens > the model's 128 positions (config.{field})"
    )
    assert "max_length=512" in str(excinfo.value)


def test_max_length_below_positions_still_rules() -> None:
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=r"record 'long': .* = 100 tokens > max_length=64"):
        encode_records([row_of(100)], tok, max_length=64, model=models(tok)["gpt2"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_attributor_refuses_before_any_pass(monkeypatch, kind: str) -> None:
    tok = tiny_tokenizer()
    att = Attributor(models(tok)[kind], tok, AttributionConfig(strategy="identity"))
    att.fit(TRAIN)
    forbid_forward(monkeypatch, att.model)
    # the cures name truncation too (userE: "shorten the record" of a generated or shared set)
    message = r"record 'long': 212 tokens > the model's 128 positions .*shorten the record, or cut such rows with trunc"
    for call in (
        lambda: att.scores([row_of(212)], TRAIN),
        lambda: att.scores(TRAIN[:1], [*TRAIN, row_of(212)]),
        lambda: att.fit([*TRAIN, row_of(212)]),
        lambda: att.self_influence([row_of(212)]),
        lambda: att.token_scores(TRAIN[:1], [row_of(212)]),
    ):
        with pytest.raises(DataError, match=message):
            call()


@pytest.mark.parametrize("name", ["ekfac", "trak", "repsim"])
def test_methods_refuse_long_rows(monkeypatch, name: str) -> None:
    tok = tiny_tokenizer()
    model = models(tok)["gpt2"]
    method = make_method(name, model, tok, AttributionConfig(), **({"dim": 4} if name == "trak" else {}))
    method.fit(TRAIN)
    forbid_forward(monkeypatch, model)
    with pytest.raises(DataError, match=r"record 'long': 130 tokens > the model's 128 positions"):
        method.scores(TRAIN[:1], [*TRAIN, row_of(130)])


def test_finetune_and_groundtruth_refuse_long_rows(tmp_path) -> None:
    tok = tiny_tokenizer()
    message = r"record 'long': 200 tokens > the model's 128 positions \(config.n_positions\)"
    with pytest.raises(DataError, match=message):
        finetune(
            models(tok)["gpt2"],
            tok,
            [*TRAIN, row_of(200)],
            FinetuneConfig(epochs=1, lora_targets=["c_attn"]),  # GPT-2's (the default names LLaMA's modules)
            tmp_path / "ft",
            progress=False,
        )
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").iterdir())
    with pytest.raises(DataError, match=message):
        measure_queries(models(tok)["gpt2"], tok, [row_of(200)])
    with pytest.raises(DataError, match=message):
        pbrf_influence(models(tok)["gpt2"], tok, TRAIN, [row_of(200)], [0])
    assert np.isfinite(measure_queries(models(tok)["gpt2"], tok, TRAIN)).all()


def test_token_ids_outside_the_embedding() -> None:
    tok = tiny_tokenizer()
    small = tiny_gpt2(20, hidden=16, layers=1)  # the tokenizer has 56 tokens; ids >= 20 have no embedding
    ids = tok("zz", add_special_tokens=False)["input_ids"]
    assert min(ids) >= 20
    with pytest.raises(DataError) as excinfo:
        encode_records([Record("r", "zz:", " a")], tok, model=small)
    message = str(excinfo.value)
    assert message.startswith(f"record 'r': token id {ids[0]} ('z') is outside the model's vocabulary of 20 embeddings")
    assert f"the tokenizer has {len(tok)} tokens" in message
    att = Attributor(small, tok, AttributionConfig(strategy="identity"))
    with pytest.raises(DataError, match="outside the model's vocabulary of 20 embeddings"):
        att.fit([Record("r", "zz:", " a")])


def test_pad_id_outside_the_embedding() -> None:
    tok = tiny_tokenizer()
    tok.pad_token = "z"
    with pytest.raises(DataError, match=r"the padding id \d+ .* outside the model's vocabulary of 20 embeddings"):
        encode_records(TRAIN, tok, model=tiny_gpt2(20, hidden=16, layers=1))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_truncated_rows_must_still_fit_the_positions(kind: str) -> None:
    """``truncate`` cuts a row to ``max_length``; when that is beyond the model's position table the cut row is
    refused by name as an uncut one is (it was taken to the model unchecked: a GPT-2 index error)."""
    tok = tiny_tokenizer()
    model = models(tok)[kind]
    long = Record("long", "a" * 100, " b" * 300)
    with pytest.raises(DataError, match=r"record 'long': 512 tokens > the model's 128 positions .* max_length <= 128"):
        encode_records([long], tok, max_length=512, model=model, truncate=True)
    cut = encode_records([long], tok, max_length=128, model=model, truncate=True)[0]
    assert len(cut) == 128 and cut.input_ids == encode_records([long], tok, max_length=1000)[0].input_ids[:128]
