"""Projected-gradient influence (trak, logra): exact at full dimension, converging as the dimension grows,
curvature in the projected space equal to a hand computation from dense gradients."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch
from scipy.stats import spearmanr

from tests.conftest import build_model, make_records
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.projection import (
    KroneckerProjection,
    ProjectedInfluence,
    RandomProjection,
)
from wherefrom.models.tiny import tiny_llama

FULL = 10**6  # larger than any tiny module: the projection is left out (identity)


@pytest.fixture(scope="module")
def setting(tokenizer):
    model = build_model("llama")
    train, queries = make_records(24, seed=11), make_records(6, seed=12, prefix="q")
    exact = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=8)).scores(queries, train)
    return model, train, queries, exact


def test_kronecker_projection_equals_projected_dense_gradient(tokenizer, train_records):
    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=5))
    projection = KroneckerProjection(dim_in=4, dim_out=3, seed=3, kind="rademacher")
    ids, factors = next(attributor.token_factor_stream(train_records))
    for m in attributor.modules:
        p_in, p_out = projection.matrices_for(m.name, m.shape)
        assert p_in.shape == (4, m.shape[1]) and p_out.shape == (3, m.shape[0])
        expected = (p_out @ factors[m.name].dense() @ p_in.T).reshape(len(ids), -1)
        torch.testing.assert_close(projection.project(m.name, factors[m.name]), expected, rtol=1e-4, atol=1e-6)
    # seeded: a new object gives the same matrices, another seed other ones
    name, shape = attributor.modules[0].name, attributor.modules[0].shape
    assert torch.equal(
        KroneckerProjection(4, 3, seed=3, kind="rademacher").matrices_for(name, shape)[0],
        projection.matrices_for(name, shape)[0],
    )
    assert not torch.equal(
        KroneckerProjection(4, 3, seed=4, kind="rademacher").matrices_for(name, shape)[0],
        projection.matrices_for(name, shape)[0],
    )


def test_random_projection_blocks_are_reproducible():
    flat = torch.randn(5, 1000)
    cached = RandomProjection(32, seed=1, block_columns=300)
    uncached = RandomProjection(32, seed=1, block_columns=300, cache_bytes=0)
    once = cached.project_flat("m", flat)
    torch.testing.assert_close(once, cached.project_flat("m", flat))
    torch.testing.assert_close(once, uncached.project_flat("m", flat))
    assert not torch.allclose(once, RandomProjection(32, seed=2, block_columns=300).project_flat("m", flat))
    assert not torch.allclose(once, cached.project_flat("other module", flat))
    # E[P^T P] = I: squared norms are preserved on average
    big = RandomProjection(2048, kind="rademacher", seed=0).project_flat("m", flat)
    assert (big.norm(dim=1) / flat.norm(dim=1) - 1).abs().max() < 0.1


def test_random_projection_memory_counts_only_projected_modules():
    """A module with no more gradient entries than ``dim`` is left unprojected: no matrix, no block (a
    ``dim`` of 10**6 once predicted a 16 GB block for a tiny model, and was refused on a loaded machine)."""
    assert RandomProjection(FULL).matrix_bytes({"a": (4, 8), "b": (16, 16)}) == 0
    small = RandomProjection(8, block_columns=4096, cache_bytes=2**28)
    # cached: 8 x 32 and 8 x 256 float32; the uncached block is no wider than the widest module (256)
    assert small.matrix_bytes({"a": (4, 8), "b": (16, 16), "c": (2, 4)}) == 4 * 8 * (32 + 256) + 4 * 8 * 256
    capped = RandomProjection(8, block_columns=64, cache_bytes=100)
    assert capped.matrix_bytes({"b": (16, 16)}) == 100 + 4 * 8 * 64


def test_full_dimension_projections_equal_unprojected_scores(setting, tokenizer):
    model, train, queries, exact = setting
    config = AttributionConfig(batch_size=8)
    attributor = Attributor(model, tokenizer, config)
    orthogonal = {}
    generator = torch.Generator().manual_seed(0)
    for m in attributor.modules:
        out, inp = m.shape
        orthogonal[m.name] = (
            torch.linalg.qr(torch.randn(inp, inp, generator=generator))[0],
            torch.linalg.qr(torch.randn(out, out, generator=generator))[0],
        )
    projections = {
        "trak": RandomProjection(FULL),
        "logra": KroneckerProjection(FULL, FULL),
        "logra orthogonal": KroneckerProjection(1, 1, matrices=orthogonal),  # explicit P: the projection code path runs
    }
    for label, projection in projections.items():
        method = ProjectedInfluence(model, tokenizer, config, projection, curvature=False)
        scores = method.scores(queries, train)
        assert (
            scores.module_names == exact.module_names
            and scores.train_ids == exact.train_ids
            and scores.query_ids == exact.query_ids
        )
        torch.testing.assert_close(scores.per_module, exact.per_module, rtol=1e-4, atol=1e-5, msg=label)


@pytest.fixture(scope="module")
def wider(tokenizer):
    """A wider one-layer Llama (gradient blocks of 512 to 2048 entries), so dims up to 256 all project."""
    model = tiny_llama(len(tokenizer), hidden=32, intermediate=64, layers=1, seed=0)
    train, queries = make_records(24, seed=11), make_records(6, seed=12, prefix="q")
    exact = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=8)).scores(queries, train)
    return model, train, queries, exact


def _curve(model, tokenizer, train, queries, exact, make_projection, dims, seeds=(0, 1, 2)):
    rows = []
    config = AttributionConfig(batch_size=8)
    reference = exact.total.flatten()
    for dim in dims:
        errors, correlations = [], []
        for seed in seeds:
            method = ProjectedInfluence(model, tokenizer, config, make_projection(dim, seed), curvature=False)
            total = method.scores(queries, train).total.flatten()
            errors.append(float((total - reference).norm() / reference.norm()))
            correlations.append(float(spearmanr(total, reference).statistic))
        k = sum(method.dims().values())
        rows.append(
            {
                "dim": dim,
                "k_total": k,
                "rel_error": sum(errors) / len(errors),
                "spearman": sum(correlations) / len(correlations),
            }
        )
    return rows


def test_projected_dot_products_approach_unprojected_as_dim_grows(wider, tokenizer):
    model, train, queries, exact = wider
    curves = {
        "trak gaussian": _curve(
            model,
            tokenizer,
            train,
            queries,
            exact,
            lambda d, s: RandomProjection(d, "gaussian", seed=s),
            [4, 16, 64, 256, FULL],
        ),
        "trak rademacher": _curve(
            model,
            tokenizer,
            train,
            queries,
            exact,
            lambda d, s: RandomProjection(d, "rademacher", seed=s),
            [4, 16, 64, 256, FULL],
        ),
        "logra gaussian": _curve(
            model, tokenizer, train, queries, exact, lambda d, s: KroneckerProjection(d, d, seed=s), [2, 4, 8, 16, FULL]
        ),
        "logra orthogonal": _curve(
            model,
            tokenizer,
            train,
            queries,
            exact,
            lambda d, s: KroneckerProjection(d, d, seed=s, kind="orthogonal"),
            [2, 4, 8, 16, FULL],
        ),
    }
    print("\nprojected vs unprojected gradient dot products (mean of 3 seeds; dim = per-module dim, or k_in = k_out):")
    for label, rows in curves.items():
        print(
            f"  {label:17s} "
            + "  ".join(
                f"dim={'full' if r['dim'] == FULL else r['dim']}(k={r['k_total']}): err {r['rel_error']:.3f} rho {r['spearman']:.3f}"
                for r in rows
            )
        )
    for label, rows in curves.items():
        errors = [r["rel_error"] for r in rows]
        assert all(b <= a * 1.1 for a, b in pairwise(errors)), (label, errors)  # monotone up to noise
        assert errors[3] < errors[0] / 2, (label, errors)
        assert errors[-1] < 1e-4 and rows[-1]["spearman"] > 0.9999, label
        assert rows[3]["spearman"] > 0.8, (label, rows[3])


def by_hand(projection, module, grads: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` float64 projection of dense gradients ``(n, out, in')`` with the method's matrices."""
    if isinstance(projection, KroneckerProjection):
        p_in, p_out = projection.matrices_for(module.name, module.shape)
        return (p_out.double() @ grads @ p_in.double().T).flatten(1)
    return projection.project_flat(module.name, grads.flatten(1).float()).double()


def test_projected_curvature_equals_hand_computation(setting, tokenizer):
    """(F~ + 0.1 mean-eig I)^-1 with the empirical Fisher, from dense gradients projected by hand."""
    model, train, queries, _ = setting
    config = AttributionConfig(fisher="empirical", batch_size=8)
    attributor = Attributor(model, tokenizer, config)
    train_grads = {
        n: torch.cat([g[n] for _, g in attributor.gradients(train)]).double() for n in attributor.module_names
    }
    query_grads = {
        n: torch.cat([g[n] for _, g in attributor.gradients(queries, attributor.query_loss_fn())]).double()
        for n in attributor.module_names
    }
    for projection in (RandomProjection(FULL), KroneckerProjection(4, 3, seed=5), RandomProjection(48, seed=5)):
        method = ProjectedInfluence(model, tokenizer, config, projection)
        method.fit(train)
        scores = method.scores(queries, train)
        expected = []
        for m in attributor.modules:
            g, q = (by_hand(projection, m, grads[m.name]) for grads in (train_grads, query_grads))
            fisher = g.T @ g / len(train)
            damping = 0.1 * torch.trace(fisher) / fisher.shape[0]
            expected.append(
                q @ torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype), g.T)
            )
            assert method.info[m.name]["damping"] == pytest.approx(float(damping), rel=1e-4)
        torch.testing.assert_close(
            scores.per_module.double(),
            torch.stack(expected),
            rtol=1e-4,
            atol=1e-5 * float(torch.stack(expected).abs().max()),
        )


def test_true_fisher_fit_is_seeded_and_self_scores_are_positive(tokenizer, train_records):
    model = build_model("lora")
    config = AttributionConfig(batch_size=5, seed=7)
    method = ProjectedInfluence.logra(model, tokenizer, config, dim_in=2, dim_out=2)
    assert method.name == "logra" and all(".lora_" in n for n in method.module_names)
    method.fit(train_records)
    again = ProjectedInfluence.logra(model, tokenizer, config, dim_in=2, dim_out=2)
    again.fit(train_records)
    for n in method.module_names:
        torch.testing.assert_close(method.inverses[n], again.inverses[n])
    streamed = method.scores(train_records, train_records)
    method.index(train_records)
    indexed = method.scores(train_records, train_records)
    torch.testing.assert_close(indexed.per_module, streamed.per_module)
    assert (streamed.total.diagonal() > 0).all()  # q^T (F + lambda I)^-1 q > 0
    json.dumps(method.metadata())
    trak = ProjectedInfluence.trak(model, tokenizer, config, dim=8, damping=1e-3)
    assert trak.name == "trak"
    with pytest.raises(RuntimeError, match="fit"):
        trak.scores(train_records[:1], train_records[:2])
    trak.fit(train_records)
    assert all(info["damping"] == 1e-3 for info in trak.info.values())


def test_cosine_normalisation_at_full_dimension(setting, tokenizer):
    if "normalize" not in AttributionConfig.__dataclass_fields__:
        pytest.skip("AttributionConfig has no normalize option")
    model, train, queries, exact = setting
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=8))
    names = attributor.module_names

    def norms(records, loss_fn=None):
        return torch.cat(
            [sum(g[n].flatten(1).square().sum(1) for n in names) for _, g in attributor.gradients(records, loss_fn)]
        ).sqrt()

    expected = exact.per_module / norms(queries, attributor.query_loss_fn())[:, None] / norms(train)[None, :]
    config = AttributionConfig(batch_size=8, normalize="cosine")
    scores = ProjectedInfluence(model, tokenizer, config, RandomProjection(FULL), curvature=False).scores(
        queries, train
    )
    torch.testing.assert_close(scores.per_module, expected, rtol=1e-4, atol=1e-6)
    assert scores.total.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_projected_kronecker_curvature_at_full_dimension_is_the_unprojected_one(setting, tokenizer, strategy):
    """LoGra with K-FAC/EK-FAC in the projected space: at full dimensions (identity projections) its scores
    are the unprojected K-FAC/EK-FAC scores (empirical Fisher: no sampled labels to differ)."""
    model, train, queries, _ = setting
    config = AttributionConfig(strategy=strategy, fisher="empirical", batch_size=8)
    unprojected = Attributor(model, tokenizer, config)
    unprojected.fit(train)
    want = unprojected.scores(queries, train)
    method = ProjectedInfluence(model, tokenizer, config, KroneckerProjection(FULL, FULL), strategy=strategy)
    method.fit(train)
    got = method.scores(queries, train)
    assert got.train_ids == want.train_ids and got.module_names == want.module_names
    scale = float(want.per_module.abs().max())
    torch.testing.assert_close(got.per_module, want.per_module, rtol=1e-3, atol=1e-4 * scale)


def test_projected_kfac_factors_are_the_projected_unprojected_factors(setting, tokenizer):
    """Below full dimension: A~ = P_in A P_in^T and S~ = P_out S P_out^T of the unprojected K-FAC fit."""
    model, train, _, _ = setting
    config = AttributionConfig(strategy="kfac", fisher="empirical", batch_size=8)
    unprojected = Attributor(model, tokenizer, config)
    unprojected.fit(train)
    projection = KroneckerProjection(4, 3, seed=5)
    method = ProjectedInfluence(model, tokenizer, config, projection, strategy="kfac")
    method.fit(train)

    def factor(state, name, side):
        vectors, values = state[f"{name}.{side}_eigvecs"].double(), state[f"{name}.{side}_eigvals"].double()
        return vectors @ torch.diag(values) @ vectors.T

    for m in unprojected.modules:
        p_in, p_out = projection.matrices_for(m.name, tuple(m.shape))
        a, s = factor(unprojected.curvature.state, m.name, "a"), factor(unprojected.curvature.state, m.name, "s")
        a_want = a if p_in is None else p_in.double() @ a @ p_in.double().T
        s_want = s if p_out is None else p_out.double() @ s @ p_out.double().T
        state = method.curvature.state
        torch.testing.assert_close(factor(state, m.name, "a"), a_want, rtol=1e-4, atol=1e-6 * float(a_want.abs().max()))
        torch.testing.assert_close(factor(state, m.name, "s"), s_want, rtol=1e-4, atol=1e-6 * float(s_want.abs().max()))
    assert method.info[unprojected.modules[0].name]["dim"] == 12


def test_projected_kronecker_strategy_needs_logra(setting, tokenizer):
    model, _, _, _ = setting
    with pytest.raises(ValueError, match="strategy 'ekfac' needs LoGra's Kronecker projection"):
        ProjectedInfluence(model, tokenizer, AttributionConfig(), RandomProjection(16), strategy="ekfac")


def test_projected_ekfac_state_round_trip_and_strategy_mismatch(setting, tokenizer):
    """Saved and restored through the registry's state (what a run directory stores); another strategy is named."""
    from wherefrom.methods.registry import make_method

    model, train, queries, _ = setting
    config = AttributionConfig(fisher="empirical", batch_size=8)
    method = make_method("logra", model, tokenizer, config, dim_in=4, dim_out=4, strategy="ekfac")
    method.fit(train)
    tensors, state = method.fitted_state()
    assert state["strategy"] == "ekfac"
    again = make_method("logra", model, tokenizer, config, dim_in=4, dim_out=4, strategy="ekfac")
    again.restore_state(tensors, json.loads(json.dumps(state)), train)
    torch.testing.assert_close(again.scores(queries, train).total, method.scores(queries, train).total)
    exact = make_method("logra", model, tokenizer, config, dim_in=4, dim_out=4)
    with pytest.raises(ValueError, match="saved strategy 'ekfac' differs from this method's 'exact'"):
        exact.restore_state(tensors, state, train)


def test_kept_projected_rows_are_reused_only_while_the_weights_are_unchanged(tokenizer, train_records, monkeypatch):
    """``index`` keeps the projected training gradients; ``scores`` used them for the same rows even after the
    weights changed (further fine-tuning): old rows against new queries, silently. The kept rows are keyed on
    :meth:`Attributor.gradient_key` (rows, batch settings, every weight's bytes)."""
    model = build_model("lora")
    config = AttributionConfig(batch_size=5, fisher="empirical")
    method = ProjectedInfluence.logra(model, tokenizer, config, dim_in=2, dim_out=2, curvature=False)
    method.fit(train_records)
    method.index(train_records)
    queries = train_records[:2]
    passes = []
    projected = ProjectedInfluence.projected_gradients
    monkeypatch.setattr(
        ProjectedInfluence, "projected_gradients", lambda self, *a, **k: passes.append(1) or projected(self, *a, **k)
    )
    method.scores(queries, train_records)
    assert len(passes) == 1  # the queries' pass only: the kept rows served
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).data.add_(0.5)  # no version counter sees .data
    changed = method.scores(queries, train_records)
    assert len(passes) == 3  # the training rows projected again
    fresh = ProjectedInfluence.logra(model, tokenizer, config, dim_in=2, dim_out=2, curvature=False)
    fresh.fit(train_records)
    torch.testing.assert_close(changed.total, fresh.scores(queries, train_records).total)
