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


class _Wrapped(torch.nn.Module):
    """A model outside the transformers library (no ``logits_to_keep``): full logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora"])
def test_losses_at_the_labelled_positions_equal_the_full_logits_losses(tokenizer, kind):
    """The output layer runs at the positions that predict a labelled token only (its input has K < T
    positions), and the training loss (sum and mean, data labels and per-row sampled labels), the
    measurement and its no-EOS variant equal those computed from the full logits, as does a model outside
    transformers (full logits, positions taken from them). Rows of unequal length, so padding and rows with
    fewer labelled tokens than K are covered; tolerance 1e-6 relative (float32 round-off of a smaller
    output product; measured 0 to 3e-7)."""
    from wherefrom.core.task import (
        completion_predictions,
        example_seeds,
        per_example_loss,
        reduced,
        shifted_targets,
        token_losses,
    )

    model = build_model(kind)
    batch = collate(encode_records(make_records(6, seed=5), tokenizer), pad_id(tokenizer))
    batch["labels"][0, :] = IGNORE_INDEX  # a row without any loss: 0
    head = model.get_output_embeddings()
    widths = []
    head.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    seeds = example_seeds(batch, 3)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        most = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).max())
        for reduction in ("sum", "mean"):
            task = LanguageModelingTask(reduction=reduction)
            for sample in (False, True):
                widths.clear()
                ours = task.train_loss(model, batch, sample=sample, seeds=seeds)
                assert widths == [most] and most < batch["input_ids"].shape[1]
                losses = token_losses(full, batch["labels"], sample=sample, seeds=seeds)
                reference = reduced(losses, shifted_targets(batch["labels"]), reduction)
                torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
                assert ours[0] == 0
                outside = task.train_loss(_Wrapped(model), batch, sample=sample, seeds=seeds)
                torch.testing.assert_close(outside, reference, rtol=1e-6, atol=1e-6)
        for task in (LanguageModelingTask(), LanguageModelingTask(query_without_eos=True)):
            labels = without_last_label(batch["labels"]) if task.query_without_eos else batch["labels"]
            torch.testing.assert_close(
                task.measurement(model, batch), -per_example_loss(full, labels, "sum"), rtol=1e-6, atol=1e-6
            )
        # the flat form PBRF and the weights analysis use: every labelled position, rows in order
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        for predicted in (model, _Wrapped(model)):
            logits, targets, rows = completion_predictions(predicted, batch)
            torch.testing.assert_close(logits, full[:, :-1][keep], rtol=1e-6, atol=1e-6)
            assert torch.equal(targets, batch["labels"][:, 1:][keep]) and torch.equal(rows, keep.nonzero()[:, 0])


def test_the_losses_of_one_batch_share_one_forward_pass():
    """Each loss derives its positions from the labels (new tensors of equal values): ForwardOnce still runs
    the model once; other values are refused."""
    from wherefrom.core.gradients import ForwardOnce

    calls = []
    model = build_model("llama")
    model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    once = ForwardOnce(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    first = once(input_ids=ids, logits_to_keep=torch.tensor([[1, 2]]))
    assert once(input_ids=ids, logits_to_keep=torch.tensor([[1, 2]])) is first and calls == [1]
    with pytest.raises(ValueError, match="same arguments"):
        once(input_ids=ids, logits_to_keep=torch.tensor([[0, 2]]))


def test_the_output_layer_runs_at_the_labelled_positions_inside_a_shared_pass(tokenizer):
    """Under ForwardOnce (the shared pass's wrapper) a plain transformers model still takes logits_to_keep."""
    from wherefrom.core.gradients import ForwardOnce

    model = build_model("llama")
    batch = collate(encode_records(make_records(4, seed=5), tokenizer), pad_id(tokenizer))
    widths = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    with torch.no_grad():
        LanguageModelingTask().train_loss(ForwardOnce(model), batch)
    assert widths == [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).max())]


def test_a_tracked_output_layer_sees_every_position(tokenizer):
    """With lm_head tracked, its K-FAC input factor A counts every real token (as with full logits): the
    Attributor's task asks for every position; A's eigenvalues equal those of a task forced to full logits."""
    from wherefrom.curvature.kronecker import KFAC

    model = build_model("llama")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: trackable
    rows = make_records(6, seed=5)
    config = AttributionConfig(strategy="kfac", fisher="empirical", include=["lm_head"])
    tracked = Attributor(model, tokenizer, config)
    assert tracked.task.every_position and not Attributor(model, tokenizer, AttributionConfig()).task.every_position
    fitted = tracked.fit(rows).state
    forced = Attributor(model, tokenizer, config, task=LanguageModelingTask(every_position=True)).fit(rows).state
    trimmed = Attributor(model, tokenizer, config, task=LanguageModelingTask()).fit(rows).state
    assert isinstance(tracked.curvature, KFAC)
    torch.testing.assert_close(fitted["lm_head.a_eigvals"], forced["lm_head.a_eigvals"], rtol=0, atol=0)
    # the K positions alone would give another A
    assert not torch.allclose(fitted["lm_head.a_eigvals"], trimmed["lm_head.a_eigvals"])


def test_prompt_tuning_virtual_tokens_are_refused(tokenizer):
    """PEFT prompt tuning prepends virtual tokens: no logits_to_keep (its positions would be shifted), and the
    full logits' extra positions are refused naming the cause."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(build_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    batch = collate(encode_records(make_records(2, seed=5), tokenizer), pad_id(tokenizer))
    with torch.no_grad(), pytest.raises(ValueError, match="virtual tokens"):
        LanguageModelingTask().train_loss(model, batch)


def test_tensors_that_require_grad_are_merged_by_identity_only():
    from wherefrom.core.gradients import ForwardOnce

    once = ForwardOnce(lambda **kwargs: object())
    embeds = torch.ones(1, 2, 3, requires_grad=True)
    once(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="same arguments"):
        once(inputs_embeds=torch.ones(1, 2, 3, requires_grad=True))


def test_a_model_without_position_ids_takes_left_padded_rows_as_before(tokenizer):
    """Left-padded rows get `position_ids` only from a model whose forward takes them: a model outside
    transformers without that parameter failed on an unexpected keyword (review); it places the rows itself,
    here a Llama (rotary, so its scores equal the ones with positions counted from the first real token)."""
    from wherefrom.engine.api import AttributionConfig, Attributor

    model = build_model("llama")
    rows = make_records(6, seed=5)
    config = AttributionConfig(strategy="identity", pad_left=True, max_length=48, batch_size=3)
    expected = Attributor(model, tokenizer, config).scores(rows[:2], rows).total
    wrapped = Attributor(_Wrapped(model), tokenizer, config).scores(rows[:2], rows).total
    torch.testing.assert_close(wrapped, expected, rtol=1e-4, atol=1e-5)
