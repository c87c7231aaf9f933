"""Curvature fitted from a stream of per-example gradient blocks (the projection stage's entry point)."""

from __future__ import annotations

import pytest
import torch

from wherefrom.curvature import make_curvature


def stream(blocks: dict[str, torch.Tensor], batch: int):
    rows = next(iter(blocks.values())).shape[0]
    return lambda: ({n: g[i : i + batch] for n, g in blocks.items()} for i in range(0, rows, batch))


@pytest.fixture
def blocks():
    generator = torch.Generator().manual_seed(0)
    return {"a": torch.randn(10, 1, 6, generator=generator), "b": torch.randn(10, 2, 3, generator=generator)}


def test_exact_from_blocks_is_the_damped_mean_outer_product(blocks):
    curvature = make_curvature("exact", damping_factor=0.1).fit_gradients(stream(blocks, 3), {"a": (1, 6), "b": (2, 3)})
    queries = {n: torch.randn(4, *g.shape[1:], generator=torch.Generator().manual_seed(1)) for n, g in blocks.items()}
    solved = curvature.precondition(queries)
    for name, g in blocks.items():
        flat = g.reshape(10, -1).double()
        fisher = flat.T @ flat / 10
        damped = fisher + 0.1 * torch.trace(fisher) / fisher.shape[0] * torch.eye(fisher.shape[0], dtype=torch.float64)
        expected = torch.linalg.solve(damped, queries[name].reshape(4, -1).double().T).T
        torch.testing.assert_close(solved[name].reshape(4, -1).double(), expected, rtol=1e-5, atol=1e-6)
    assert curvature.modules == [["a", 1, 6], ["b", 2, 3]] and curvature.info["examples"] == 10


def test_diagonal_from_blocks_and_strategies_that_need_the_model(blocks):
    diagonal = make_curvature("diagonal", damping=0.5).fit_gradients(stream(blocks, 4), {"a": (1, 6), "b": (2, 3)})
    torch.testing.assert_close(diagonal.state["b.diagonal"], blocks["b"].pow(2).mean(0))
    with pytest.raises(NotImplementedError, match="'kfac' cannot be fitted from gradient blocks"):
        make_curvature("kfac").fit_gradients(stream(blocks, 4), {"a": (1, 6), "b": (2, 3)})
    with pytest.raises(ValueError, match="hessian"):
        make_curvature("exact", curvature="hessian").fit_gradients(stream(blocks, 4), {"a": (1, 6), "b": (2, 3)})
