"""The query measurement f: with the appended EOS by default, without it on request."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model, make_records
from wherefrom.core.encoding import collate, encode_records, pad_id
from wherefrom.core.task import IGNORE_INDEX, LanguageModelingTask, without_last_label
from wherefrom.engine.api import AttributionConfig, Attributor


def test_without_last_label_drops_each_rows_final_labelled_token():
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 9, -100, -100], [-100, 3, 4, -100, -100]])
    expected = torch.tensor([[-100, 5, 6, -100, -100], [-100, -100, 9, -100, -100], [-100, 3, -100, -100, -100]])
    assert torch.equal(without_last_label(labels), expected)
    assert (labels != IGNORE_INDEX).sum() == 6  # the input is left as it was


def test_query_without_eos_measures_the_completion_tokens_alone(tokenizer):
    """A causal LM's log p of the completion tokens does not depend on the EOS after them, so leaving the
    EOS out of f equals encoding the rows without it."""
    model, rows = build_model("lora"), make_records(4, seed=3)
    with_eos = collate(encode_records(rows, tokenizer), pad_id(tokenizer))
    without = collate(encode_records(rows, tokenizer, append_eos=False), pad_id(tokenizer))
    with torch.no_grad():
        full = LanguageModelingTask().measurement(model, with_eos)
        dropped = LanguageModelingTask(query_without_eos=True).measurement(model, with_eos)
        reference = LanguageModelingTask().measurement(model, without)
    torch.testing.assert_close(dropped, reference, rtol=1e-5, atol=1e-5)
    assert bool((full < dropped).all())  # log p(EOS | ...) < 0 is part of the default f
    attributor = Attributor(model, tokenizer, AttributionConfig(query_without_eos=True))
    assert attributor.task.query_without_eos


def test_query_without_eos_needs_a_tokenizer_with_an_eos(tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="query_without_eos=True: this tokenizer has no eos_token_id"):
        Attributor(build_model("lora"), NoEos(), AttributionConfig(query_without_eos=True))
