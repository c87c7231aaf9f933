"""``autocast``: the model's forward passes in bfloat16, the statistics in float32/float64."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model
from wherefrom.engine.api import AttributionConfig, Attributor


@pytest.fixture(scope="module")
def scored(tokenizer, train_records, query_records):
    out = {}
    for autocast in (None, "bfloat16"):
        attributor = Attributor(build_model("llama"), tokenizer, AttributionConfig(autocast=autocast, batch_size=4))
        attributor.fit(train_records)
        out[autocast] = attributor, attributor.scores(query_records, train_records).total
    return out


def test_autocast_keeps_statistics_in_float32(scored):
    attributor, _ = scored["bfloat16"]
    for key, value in attributor.curvature.state.items():
        # not bfloat16: float32, and float64 for the eigenbases' eigenvalues (their float32 squares underflow)
        assert value.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(value).all()), key
    assert next(attributor.model.parameters()).dtype == torch.float32  # the weights are not cast


def test_bfloat16_scores_follow_the_float32_ones(scored):
    _, full = scored[None]
    _, half = scored["bfloat16"]
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # the passes did run in bfloat16
    ranks = [s.flatten().argsort().argsort().double() for s in (full, half)]
    spearman = torch.corrcoef(torch.stack(ranks))[0, 1]
    assert spearman > 0.95  # bfloat16 keeps ~3 significant digits of each activation


def test_autocast_refuses_another_dtype():
    with pytest.raises(ValueError, match=r"autocast must be None or one of \['bfloat16', 'float16'\], got 'int8'"):
        AttributionConfig(autocast="int8")
