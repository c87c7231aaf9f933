"""One pass shared by K-FAC/EK-FAC's stages and scoring (engine/passes.py) gives the separate passes' numbers.

Measured (tiny LoRA Llama, 12 rows, 4 queries): K-FAC factors and scores bit-identical; EK-FAC covariances and
eigenbases bit-identical, corrected eigenvalues within 4e-7 and scores within 2e-7 of the largest (the
correction rotates per-example gradients instead of token factors), so the tolerance is 1e-5.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import build_model
from wherefrom.core.memory import LIMIT_ENV
from wherefrom.core.store import StageFolder
from wherefrom.core.tracking import Capture
from wherefrom.curvature.base import DataShape
from wherefrom.curvature.kronecker import PER_EXAMPLE, FactorSource
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.engine.passes import kept_rows

TOLERANCE = 1e-5
"""Largest difference of EK-FAC's corrected eigenvalues and scores, relative to the largest value (measured 4e-7)."""


def forwards(model) -> list[int]:
    """A counter of the model's forward passes (one entry per call)."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def backwards(monkeypatch) -> list[int]:
    """A counter of the backward passes to the tracked modules' outputs (one entry per pass)."""
    calls: list[int] = []
    through = Capture.output_gradients

    def counted(self, *args, **kwargs):
        calls.append(1)
        return through(self, *args, **kwargs)

    monkeypatch.setattr(Capture, "output_gradients", counted)
    return calls


def fit_needs_only(monkeypatch, attributor: Attributor, train) -> None:
    """Set the memory limit to the fit's own predicted needs: the fit fits, a shared pass's kept gradients do not."""
    batches = lambda: attributor.batches(train).without_ids()  # noqa: E731
    data = DataShape.measure(attributor.model, batches)
    monkeypatch.setenv(LIMIT_ENV, str(sum(attributor.curvature.memory_needs(attributor.modules, data).values())))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# backward passes per batch of the shared pass (fitting, correction, training losses; distinct ones only)
BACKWARDS = {("ekfac", "true"): 3, ("ekfac", "empirical"): 1, ("kfac", "true"): 2, ("kfac", "empirical"): 1}


@pytest.mark.parametrize("strategy,fisher", list(BACKWARDS))
def test_shared_pass_equals_separate_passes(strategy, fisher, tokenizer, train_records, query_records, monkeypatch):
    model = build_model("lora")
    config = AttributionConfig(strategy=strategy, fisher=fisher, batch_size=5)
    shared = Attributor(model, tokenizer, config)
    calls, backward = forwards(model), backwards(monkeypatch)
    shared.fit(train_records)
    assert len(calls) == 3  # one forward pass per batch of 12 rows: the stages share it
    assert len(backward) == 3 * BACKWARDS[strategy, fisher]
    assert shared.kept is not None
    for name in shared.module_names:  # kept in one buffer per module (rows 5, 5, 2 of it), not one per batch
        pieces = [grads[name] for _ids, grads in shared.kept[1]]
        assert [p.shape[0] for p in pieces] == [5, 5, 2]
        assert len({p.untyped_storage().data_ptr() for p in pieces}) == 1
        assert pieces[0].untyped_storage().nbytes() == 12 * pieces[0][0].numel() * pieces[0].element_size()
    if strategy == "ekfac":
        assert shared.curvature.info["correction_from"] == PER_EXAMPLE
    calls.clear()
    shared_scores = shared.scores(query_records, train_records)
    assert len(calls) == 1  # the queries' batch only: the training gradients were kept

    separate = Attributor(model, tokenizer, config)
    fit_needs_only(monkeypatch, separate, train_records)
    calls.clear()
    separate.fit(train_records)
    assert len(calls) == (6 if strategy == "ekfac" else 3)  # a pass per stage
    assert separate.kept is None and "correction_from" not in separate.curvature.info
    separate_scores = separate.scores(query_records, train_records)
    assert shared_scores.train_ids == separate_scores.train_ids

    for key, value in separate.curvature.state.items():
        if strategy == "kfac" or not key.endswith((".eigenvalues", ".damping")):
            assert torch.equal(shared.curvature.state[key], value), key
        else:
            assert relative(shared.curvature.state[key], value) < TOLERANCE, key
    if strategy == "kfac":
        assert torch.equal(shared_scores.per_module, separate_scores.per_module)
    else:
        assert relative(shared_scores.per_module, separate_scores.per_module) < TOLERANCE


def test_fallback_when_memory_says_no_is_logged(tokenizer, train_records, query_records, monkeypatch, caplog):
    model = build_model("lora")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="ekfac", batch_size=5))
    fit_needs_only(monkeypatch, attributor, train_records)
    with caplog.at_level(logging.INFO, logger="wherefrom.engine.passes"):
        attributor.fit(train_records)
    assert attributor.kept is None
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "fitting 'ekfac' in separate passes" in message
    assert "kept per-example gradients" in message and "over the limit" in message


def test_expensive_correction_keeps_its_own_pass(tokenizer, train_records, caplog):
    """Full Linear modules with ~10 tokens a row: rotating per-example gradients costs more than token factors."""
    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="ekfac", batch_size=5))
    calls = forwards(model)
    with caplog.at_level(logging.INFO, logger="wherefrom.engine.passes"):
        attributor.fit(train_records)
    assert "makes its own pass" in " ".join(r.getMessage() for r in caplog.records)
    assert len(calls) == 6  # covariances (keeping the training gradients), then the correction's own pass
    assert attributor.kept is not None and "correction_from" not in attributor.curvature.info


@pytest.mark.parametrize("through_data", [False, True])
def test_kept_gradients_not_used_after_the_model_changes(through_data, tokenizer, train_records, query_records):
    """Also a write through ``param.data`` (old-style manual updates), which bumps no in-place version counter."""
    model = build_model("lora")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="kfac", batch_size=5))
    attributor.fit(train_records)
    if through_data:
        attributor.modules[0].module.weight.data.mul_(1.5)
    else:
        with torch.no_grad():
            attributor.modules[0].module.weight.mul_(1.5)  # an in-place update, like an optimizer step
    calls = forwards(model)
    changed = attributor.scores(query_records, train_records)
    assert len(calls) == 4  # the queries' batch and the three training batches again
    fresh = Attributor(model, tokenizer, attributor.config)
    fresh.use_curvature(attributor.curvature)
    assert torch.equal(changed.per_module, fresh.scores(query_records, train_records).per_module)


def test_other_rows_get_a_train_pass(tokenizer, train_records, query_records):
    model = build_model("lora")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="kfac", batch_size=5))
    attributor.fit(train_records)
    calls = forwards(model)
    scores = attributor.scores(query_records, train_records[:7])
    assert len(calls) == 3 and scores.train_ids == [r.id for r in train_records[:7]]


@pytest.mark.parametrize("lost", [["eigenvalue correction"], ["eigenbases", "eigenvalue correction"]])
def test_resumed_shared_fit_gives_the_same_bytes(lost, tokenizer, train_records, tmp_path):
    """A shared true-Fisher EK-FAC fit killed after its covariances: the resumed fit makes a model pass for the
    correction, with the recorded form and the same draws, and ends with the uninterrupted fit's bytes."""
    model = build_model("lora")
    config = AttributionConfig(strategy="ekfac", fisher="true", batch_size=5)
    stages = StageFolder(tmp_path / "stages")
    whole = Attributor(model, tokenizer, config).fit(train_records, stages=stages)
    for stage in lost:
        stages.path(stage).unlink()
    calls = forwards(model)
    resumed = Attributor(model, tokenizer, config).fit(train_records, stages=stages)
    assert len(calls) == 3  # the correction's own pass (the covariances were reused)
    assert resumed.info["correction_from"] == PER_EXAMPLE
    assert resumed.state.keys() == whole.state.keys()
    assert all(torch.equal(resumed.state[k], v) for k, v in whole.state.items())


def test_only_kfac_and_ekfac_take_a_source(tokenizer, train_records):
    model = build_model("lora")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="diagonal", batch_size=5))
    loss = attributor.train_loss_fn()
    batches = lambda: attributor.batches(train_records).without_ids()  # noqa: E731
    source = FactorSource(model, attributor.modules, batches, loss)
    with pytest.raises(ValueError, match=r"strategy 'diagonal'.*only kfac and ekfac"):
        attributor.curvature.fit(model, attributor.modules, batches, loss, source=source)


def test_kept_rows_slice_across_batches():
    kept = [(["a", "b", "c"], {"m": torch.arange(3.0)}), (["d", "e"], {"m": torch.arange(3.0, 5.0)})]
    pieces = list(kept_rows(kept, 2, 4))
    assert [ids for ids, _ in pieces] == [["c"], ["d"]]
    assert torch.equal(torch.cat([g["m"] for _, g in pieces]), torch.tensor([2.0, 3.0]))
    assert list(kept_rows(kept, 5, 8)) == [] and [ids for ids, _ in kept_rows(kept, 0, 5)] == [
        ["a", "b", "c"],
        ["d", "e"],
    ]
