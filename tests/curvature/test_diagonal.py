"""The diagonal Fisher (``diagonal``) against its closed form computed independently.

Per module, ``score(q, n) = sum_p q_p g_{n,p} / (F_pp + lambda)`` with ``F_pp = mean_n g_{n,p}^2`` (the empirical
Fisher's diagonal) and the default damping ``lambda = 0.1 x mean_p F_pp`` (0.1 x the mean eigenvalue, Grosse et al.
2023, Sec. 3.1). The reference takes per-example gradients with plain autograd, one unpadded example at a time, in
float64, so it shares no hook code with the implementation.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model, make_records
from tests.curvature.test_datainf import autograd_module_gradients
from wherefrom.core.encoding import pad_id
from wherefrom.engine.api import AttributionConfig, Attributor


@pytest.mark.parametrize("damping", [None, 0.05])
def test_diagonal_equals_closed_form(tokenizer, damping):
    model = build_model("lora")
    train, queries = make_records(10, seed=31), make_records(3, seed=32, prefix="q")
    config = AttributionConfig(strategy="diagonal", fisher="empirical", batch_size=4, damping=damping)
    attributor = Attributor(model, tokenizer, config)
    attributor.fit(train)
    scores = attributor.scores(queries, train)

    pad = pad_id(tokenizer)
    tr = [autograd_module_gradients(model, attributor.modules, e, pad) for e in attributor.encode(train)]
    qu = [autograd_module_gradients(model, attributor.modules, e, pad) for e in attributor.encode(queries)]
    parts = []
    for module in attributor.modules:
        g = torch.stack([t[module.name] for t in tr])
        q = torch.stack([t[module.name] for t in qu])
        fisher = g.pow(2).mean(0)
        lam = 0.1 * fisher.mean() if damping is None else torch.tensor(damping, dtype=torch.float64)
        parts.append((q / (fisher + lam)) @ g.T)
        assert float(attributor.curvature.state[f"{module.name}.damping"]) == pytest.approx(float(lam), rel=1e-4)
    expected = torch.stack(parts)
    torch.testing.assert_close(scores.per_module.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.total.double(), expected.sum(0), rtol=1e-4, atol=1e-6)
