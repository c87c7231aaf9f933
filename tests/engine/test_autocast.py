"""``autocast``: the model's forward passes in bfloat16, the statistics in float32/float64."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model, scale_lora_b
from wherefrom.core.tracking import LOSS_SCALES, capturing, select_modules
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


def test_float16_scales_the_loss_so_small_gradients_keep_their_digits(tokenizer, train_records, monkeypatch):
    """reviewV: under float16 autocast the output gradients are float16, whose smallest subnormal is 6e-8: the
    ``lora_A`` gradients of a LoRA adapter whose ``lora_B`` is small (about 1e-8 here) came back as exact zeros
    (relative error 1.0; 27% of EK-FAC's scores on such a model). The objective is scaled by 2^8 and the scale
    divided out in float32 (:data:`wherefrom.core.tracking.LOSS_SCALES`), in one backward pass (reviewW: 2^16
    overflowed on every batch, so each took two); measured 1.4e-2 on q_proj's block."""
    passes = []
    backward = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *args, **kwargs: passes.append(1) or backward(*args, **kwargs))
    grads = {}
    for autocast in (None, "float16"):
        model = scale_lora_b(build_model("lora"), 1e-4)
        attributor = Attributor(model, tokenizer, AttributionConfig(autocast=autocast, batch_size=8))
        ((_, grads[autocast]),) = list(attributor.gradients(train_records[:8]))
    assert len(passes) == 2  # one backward pass a batch, at float16 too: 2^8 did not overflow
    for name, full in grads[None].items():
        half = grads["float16"][name]
        assert half.dtype == torch.float32 and not torch.equal(half, full), name  # the pass ran in float16
        error = float((half - full).norm() / full.norm())
        assert error < 5e-2, (name, error, float(full.pow(2).mean().sqrt()))


@pytest.mark.parametrize(("gain", "scale"), [(1e-3, 2.0**8), (1e3, 1.0)])
def test_a_loss_scale_that_overflows_float16_is_backed_off(gain, scale):
    """An output gradient of ``gain`` overflows float16 (65504) at a scale above ``65504 / gain``: the largest
    scale of :data:`~wherefrom.core.tracking.LOSS_SCALES` that does not overflow is taken, so the gradient comes
    back exact and finite (scaled by 2^8, a gradient above 256 would be ``inf``). A float32 output is not
    scaled."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3))
    (tracked,) = select_modules(layer)
    x = torch.randn(2, 5, 4)
    with capturing([tracked], layer) as capture, torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
        assert out.dtype == torch.float16
        seen = []
        objective = (out.float() * gain).sum()
        objective.register_hook(lambda g: seen.append(float(g)))
        ((_a, g),) = capture.output_gradients(objective)[tracked.name]
    assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    assert seen[-1] == scale and torch.allclose(g, torch.full_like(g, float(torch.tensor(gain, dtype=torch.float16))))
    assert seen == [s for s in LOSS_SCALES if s >= scale]  # the scales tried, largest first
    with capturing([tracked], layer) as capture:
        ((_a, g),) = capture.output_gradients((layer(x) * gain).sum())[tracked.name]
    assert torch.equal(g, torch.full_like(g, gain))  # float32: one pass, unscaled
