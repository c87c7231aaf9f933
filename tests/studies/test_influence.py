"""Grosse et al.'s analyses: shares by layer and module type, the tail, and per-token splits on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import build_model
from wherefrom.core.scoring import Scores
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.studies.influence import (
    group_shares,
    layer_profile,
    module_kind,
    module_layer,
    power_law_fit,
    tail_profile,
    tail_shares,
    top_name,
)

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.1.mlp.down_proj",
    "base_model.model.model.layers.2.self_attn.v_proj.lora_A.default",
    "base_model.model.model.layers.2.self_attn.v_proj.lora_B.default",
    "lm_head",
]


def test_module_kind_and_layer_from_names():
    assert [module_kind(n) for n in NAMES] == ["attention", "mlp", "attention", "mlp", "lora_A", "lora_B", "other"]
    assert [module_layer(n) for n in NAMES] == [0, 0, 1, 1, 2, 2, None]
    assert module_kind("transformer.h.3.attn.c_attn") == "attention" and module_layer("transformer.h.3.mlp.c_fc") == 3
    assert module_kind("transformer.h.3.mlp.c_fc") == "mlp"


def test_layer_shares_sum_to_one_and_match_per_module_by_hand():
    rng = np.random.default_rng(0)
    per_module = rng.normal(size=(len(NAMES), 3, 20))
    scores = Scores(["q0", "q1", "q2"], [f"r{i}" for i in range(20)], NAMES, torch.from_numpy(per_module))
    labels, absolute, positive = group_shares(per_module, [str(module_layer(n)) for n in NAMES])
    assert labels == ["0", "1", "2", "None"]
    np.testing.assert_allclose(absolute.sum(1), 1.0)
    np.testing.assert_allclose(positive.sum(1), 1.0)
    # By hand: layer 1 holds modules 2 and 3.
    q = 1
    by_hand = np.abs(per_module[2:4, q]).sum() / np.abs(per_module[:, q]).sum()
    assert absolute[q, 1] == pytest.approx(by_hand)
    by_hand_pos = np.clip(per_module[2:4, q], 0, None).sum() / np.clip(per_module[:, q], 0, None).sum()
    assert positive[q, 1] == pytest.approx(by_hand_pos)

    profile = layer_profile(scores, top_k=5)
    by_kind = profile["all"]["by_kind"]
    assert by_kind["labels"] == ["attention", "mlp", "lora_A", "lora_B", "other"]
    assert sum(s["mean"] for s in by_kind["abs_share"].values()) == pytest.approx(1.0)
    attention = [np.abs(per_module[[0, 2], i]).sum() / np.abs(per_module[:, i]).sum() for i in range(3)]
    assert by_kind["abs_share"]["attention"]["mean"] == pytest.approx(np.mean(attention))
    low, high = by_kind["abs_share"]["attention"]["low"], by_kind["abs_share"]["attention"]["high"]
    assert low <= np.mean(attention) <= high
    # Top proponents: only each query's 5 largest totals enter.
    top = np.argsort(-per_module.sum(0), axis=1)[:, :5]
    layer0 = [np.abs(per_module[0:2, i, top[i]]).sum() / np.abs(per_module[:, i, top[i]]).sum() for i in range(3)]
    assert profile["top"]["by_layer"]["abs_share"]["0"]["mean"] == pytest.approx(np.mean(layer0))
    assert profile["top_k"] == 5
    with pytest.raises(ValueError, match="top_k"):
        layer_profile(scores, top_k=0)


def test_top_proponents_are_the_rows_of_positive_score_among_the_top_k():
    """userZ: the "top 10 proponents" share of a query with one positive score was taken over its 10 highest rows,
    9 of them <= 0; with --top-k past the positive rows, every row entered. Only rows scoring > 0 enter now; a query
    with none is left out of the top profile (n), and the name says how many queries have fewer than k."""
    rng = np.random.default_rng(3)
    per_module = np.abs(rng.normal(size=(len(NAMES), 3, 12)))
    per_module[:, 0, 2:] *= -1  # q0: rows 0 and 1 positive, the rest negative
    per_module[:, 1] *= -1  # q1: every row negative
    scores = Scores(["q0", "q1", "q2"], [f"r{i}" for i in range(12)], NAMES, torch.from_numpy(per_module))
    profile = layer_profile(scores, top_k=5)
    assert profile["proponents"] == [2, 0, 5]
    assert top_name(profile) == "top 5 proponents (score > 0; 2 of 3 queries have fewer)"
    top2 = np.argsort(-per_module[:, 2].sum(0))[:5]
    layer0 = [
        np.abs(per_module[0:2, 0, :2]).sum() / np.abs(per_module[:, 0, :2]).sum(),
        np.abs(per_module[0:2, 2, top2]).sum() / np.abs(per_module[:, 2, top2]).sum(),
    ]
    share = profile["top"]["by_layer"]["abs_share"]["0"]
    assert share["n"] == 2 and share["mean"] == pytest.approx(np.mean(layer0))
    assert top_name(layer_profile(scores, top_k=2)) == "top 2 proponents (score > 0; 1 of 3 queries have fewer)"


def test_tail_shares_on_a_hand_made_vector():
    # 200 rows: one holds 50 of the positive influence, the next 19 hold 1 each, 30 hold 0.5, the rest are negative.
    row = np.concatenate([[50.0], np.ones(19), np.full(30, 0.5), -np.ones(150)])
    total_positive = 50 + 19 + 15
    shares = tail_shares(np.random.default_rng(0).permutation(row))
    assert shares["top_1%"] == pytest.approx((50 + 1) / total_positive)  # ceil(0.01 * 200) = 2 rows
    assert shares["top_10%"] == pytest.approx((50 + 19) / total_positive)  # 20 rows
    assert np.isnan(tail_shares(-np.ones(10))["top_10%"])
    with pytest.raises(ValueError, match="fractions"):
        tail_shares(row, fractions=(0.0,))


def test_power_law_fit_recovers_a_known_exponent():
    alpha = 2.5  # p(x) ~ x^-2.5 for x >= 0.01, as numpy's Lomax shifted by one
    rng = np.random.default_rng(0)
    samples = (rng.pareto(alpha - 1, size=3000) + 1) * 0.01
    with_noise = np.concatenate([samples, -rng.random(500)])  # negative scores are left out
    fit = power_law_fit(with_noise)
    assert fit["alpha_low"] <= alpha <= fit["alpha_high"]
    assert fit["alpha_high"] - fit["alpha_low"] < 0.3 and fit["n_positive"] == 3000
    assert fit["lognormal_R"] >= -1.0  # the log-normal alternative is not preferred significantly
    with pytest.raises(ValueError, match="at least"):
        power_law_fit(np.ones(5))


def test_tail_profile_over_queries():
    rng = np.random.default_rng(1)
    total = np.stack([(rng.pareto(2.0, size=400) + 1), -np.ones(400)])  # the second query has no positive score
    scores = Scores(["q0", "q1"], [f"r{i}" for i in range(400)], ["m"], torch.from_numpy(total[None]))
    profile = tail_profile(scores)
    assert profile["per_query"][0]["fit"] is not None and profile["per_query"][1]["fit"] is None
    assert "at least" in profile["per_query"][1]["fit_error"]
    assert profile["alpha"]["n"] == 1 and profile["shares"]["top_10%"]["n"] == 1


@pytest.fixture(scope="module")
def lora_attributor(tokenizer, train_records):
    attributor = Attributor(build_model("lora"), tokenizer, AttributionConfig(strategy="ekfac", batch_size=5))
    attributor.fit(train_records)
    return attributor


@pytest.mark.parametrize("normalize", [None, "cosine"])
def test_token_scores_on_both_sides_sum_to_the_row_score(lora_attributor, query_records, train_records, normalize):
    lora_attributor.config.normalize = normalize
    try:
        scores = lora_attributor.scores(query_records, train_records)
        query_ids, train_side = lora_attributor.token_scores(query_records, train_records)
        train_ids, query_side = lora_attributor.query_token_scores(query_records, train_records)
    finally:
        lora_attributor.config.normalize = None
    assert train_ids == scores.train_ids and query_ids == scores.query_ids
    for j, (_row, input_ids, values) in enumerate(train_side):
        assert values.shape == (len(query_records), len(input_ids))
        torch.testing.assert_close(values.sum(1), scores.total[:, j], rtol=1e-4, atol=1e-6)
    for q, (query_id, input_ids, values) in enumerate(query_side):
        assert query_id == query_records[q].id and values.shape == (len(train_records), len(input_ids))
        torch.testing.assert_close(values.sum(1), scores.total[q], rtol=1e-4, atol=1e-6)
        assert values.abs().sum() > 0
    if normalize == "cosine":
        assert scores.total.abs().max() <= 1 + 1e-6
