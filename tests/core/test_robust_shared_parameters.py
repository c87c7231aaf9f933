"""Shared parameters: a tracked weight that another module also uses is refused, naming both owners;
a module called several times in one forward pass gets the gradient of all its uses.

Chosen rule (``wherefrom.core.tracking.check_unshared``): refuse, because the hook-based per-example
gradient of a module only sees that module's own calls (tied ``lm_head.weight is
embed_tokens.weight`` would lose the embedding half: 40% off on shared/cases/03).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.conftest import make_records
from wherefrom.core.data import Record
from wherefrom.core.encoding import collate, encode_records
from wherefrom.core.gradients import per_example_gradients
from wherefrom.core.task import LanguageModelingTask
from wherefrom.core.tracking import select_modules
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.models.tiny import tiny_gpt2, tiny_llama, with_lora

CASE_TRAIN = [Record("r0", "ab cd:", " ef"), Record("r1", "gh:", " ij kl")]
CASE_QUERIES = [Record("q0", "ab cd:", " ef")]
TASK = LanguageModelingTask()


def autograd_identity(model, tokenizer, queries, train, parameter):
    """``grad(-f)(q)^T grad L(m)`` of one parameter, one example at a time (README's identity check)."""

    def grad(record, is_query):
        batch = collate(encode_records([record], tokenizer), 0)
        value = -TASK.measurement(model, batch).sum() if is_query else TASK.train_loss(model, batch).sum()
        return torch.autograd.grad(value, [parameter])[0]

    return torch.tensor([[float((grad(q, True) * grad(r, False)).sum()) for r in train] for q in queries])


def test_case03_untied_lm_head_matches_autograd(tokenizer):
    model = tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1, tie_word_embeddings=False)
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", include=["lm_head"]))
    ours = attributor.scores(CASE_QUERIES, CASE_TRAIN).total
    torch.testing.assert_close(
        ours, autograd_identity(model, tokenizer, CASE_QUERIES, CASE_TRAIN, model.lm_head.weight), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "build, embedding", [(tiny_llama, "model.embed_tokens.weight"), (tiny_gpt2, "transformer.wte.weight")]
)
def test_tied_lm_head_is_refused_naming_both_modules(tokenizer, build, embedding):
    model = build(len(tokenizer), hidden=16, layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="another module also uses") as error:
        Attributor(model, tokenizer, AttributionConfig(strategy="identity", include=["lm_head"]))
    assert embedding in str(error.value) and "lm_head.weight" in str(error.value)


@pytest.mark.parametrize("lora", [False, True])
def test_default_selection_on_tied_models_is_allowed_and_exact(tokenizer, lora):
    """lm_head and embeddings are excluded by default, so a tied model attributes as before."""
    model = tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1, tie_word_embeddings=True)
    model = with_lora(model, r=2) if lora else model
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity"))
    train, queries = make_records(3, seed=31), make_records(1, seed=32, prefix="q")
    ours = attributor.scores(queries, train).per_module
    for i, m in enumerate(attributor.modules):
        expected = autograd_identity(model, tokenizer, queries, train, m.module.weight)
        torch.testing.assert_close(ours[i], expected, rtol=1e-4, atol=1e-5)


class TinyLM(nn.Module):
    """Embedding -> ``mix`` twice (the same Linear called twice per forward) -> head; ``alias`` names
    ``mix`` a second time; ``twin`` shares ``head``'s weight tensor when ``share_head`` is set."""

    def __init__(self, vocab: int, share_head: bool = False):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, 8)
        self.mix = nn.Linear(8, 8)
        self.alias = self.mix
        self.head = nn.Linear(8, vocab, bias=False)
        self.twin = nn.Linear(8, vocab, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.5
        if share_head:
            self.twin.weight = self.head.weight

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.embed(input_ids)))
        h = self.alias(h)  # the second use of the same module
        return SimpleNamespace(logits=self.head(h) + 0.5 * self.twin(h))


def test_module_called_twice_gets_the_gradient_of_both_uses(tokenizer):
    model = TinyLM(len(tokenizer))
    modules = select_modules(model, include=["mix", "alias"])
    assert [m.name for m in modules] == ["mix"]  # one module, registered under two names: tracked once
    rows = make_records(4, seed=33)
    batch = collate(encode_records(rows, tokenizer), 0)
    ours = per_example_gradients(model, modules, batch, lambda mdl, b: TASK.train_loss(mdl, b))["mix"]
    for i, row in enumerate(rows):
        single = collate(encode_records([row], tokenizer), 0)
        weight, bias = torch.autograd.grad(TASK.train_loss(model, single).sum(), [model.mix.weight, model.mix.bias])
        torch.testing.assert_close(ours[i], torch.cat([weight, bias[:, None]], dim=1), rtol=1e-4, atol=1e-6)


def test_two_modules_sharing_one_weight_are_refused(tokenizer):
    model = TinyLM(len(tokenizer), share_head=True)
    for include in (["^head$"], ["^twin$"], ["head", "twin"]):
        with pytest.raises(ValueError, match=r"head\.weight is twin\.weight"):
            select_modules(model, include=include)
    assert [m.name for m in select_modules(model, include=["mix"])] == ["mix"]
    assert [m.name for m in select_modules(TinyLM(len(tokenizer)), include=["head", "twin"])] == ["head", "twin"]


class PooledLM(TinyLM):
    """:class:`TinyLM` plus ``pool``, a Linear run once per row on its first token's embedding (one position per
    call; the first token is real in a right-padded batch), its output added at every position."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.pool = nn.Linear(8, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        return SimpleNamespace(logits=out.logits + self.pool(self.embed(input_ids[:, :1])))


@pytest.mark.parametrize("include", [["mix"], ["mix", "head"]])
def test_token_scores_of_a_module_called_twice_sum_its_calls_per_position(tokenizer, include):
    """A module called twice per forward captures ``2T`` positions; its calls are summed per position, so each
    row's tokens sum to its score (train and query side). They were sliced to the first call's positions (the
    tokens' sum 700 off a score of 1200), and with a second module the per-module parts did not even add up."""
    attributor = Attributor(TinyLM(len(tokenizer)), tokenizer, AttributionConfig(strategy="identity", include=include))
    train, queries = make_records(4, seed=33), make_records(2, seed=34, prefix="q")
    total = attributor.scores(queries, train).total
    scale = float(total.abs().max())
    _, rows = attributor.token_scores(queries, train)
    for j, (_row, input_ids, per_token) in enumerate(rows):
        assert per_token.shape == (2, len(input_ids))
        torch.testing.assert_close(per_token.sum(-1), total[:, j], rtol=0, atol=1e-5 * scale)
    _, rows = attributor.query_token_scores(queries, train)
    for i, (_query, input_ids, per_token) in enumerate(rows):
        assert per_token.shape == (4, len(input_ids))
        torch.testing.assert_close(per_token.sum(-1), total[i], rtol=0, atol=1e-5 * scale)


def test_token_scores_refuse_a_module_that_does_not_run_on_every_position(tokenizer):
    """``pool`` runs on one position per row: its part of a score has no token; refused naming it (its part was
    added to every token, or the shapes failed to broadcast), while the scores themselves are exact."""
    model = PooledLM(len(tokenizer))
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", include=["mix", "pool"]))
    train, queries = make_records(3, seed=35), make_records(1, seed=36, prefix="q")
    ours = attributor.scores(queries, train).per_module[1]
    torch.testing.assert_close(
        ours, autograd_identity(model, tokenizer, queries, train, model.pool.weight), rtol=1e-4, atol=1e-4
    )
    for split in (attributor.token_scores, attributor.query_token_scores):
        with pytest.raises(ValueError, match=r"module 'pool' ran on 1 positions per call.*--exclude"):
            split(queries, train)
