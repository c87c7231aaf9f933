"""LDS / leave-one-out math against hand-computed small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wherefrom.studies.groundtruth.lds import (
    lds_per_query,
    loo_correlations,
    loo_effect,
    loo_noise,
    sample_subsets,
    subset_predictions,
    summarize,
)
from wherefrom.studies.metrics import bootstrap_ci, pearson_rows, spearman_rows


def test_sample_subsets_sizes_seed_and_errors():
    masks = sample_subsets(10, alpha=0.3, count=5, seed=7)
    assert masks.shape == (5, 10) and masks.dtype == bool
    assert (masks.sum(axis=1) == 3).all()
    assert (sample_subsets(10, 0.3, 5, seed=7) == masks).all()
    assert not (sample_subsets(10, 0.3, 5, seed=8) == masks).all()
    with pytest.raises(ValueError, match="alpha"):
        sample_subsets(10, alpha=1.0)
    with pytest.raises(ValueError, match="count"):
        sample_subsets(10, count=1)
    with pytest.raises(ValueError, match="subsets of 0 rows"):
        sample_subsets(4, alpha=0.1, count=3)


def test_correlations_by_hand():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    b = np.array([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    pearson = pearson_rows(a, b)
    assert pearson[:2] == pytest.approx([1.0, -1.0])
    # a = [1, 2, 3], b = [1, 3, 2]: centred a = [-1, 0, 1], centred b = [-1, 1, 0] -> 1 / (sqrt 2 sqrt 2) = 0.5
    assert pearson[2] == pytest.approx(0.5)
    assert math.isnan(pearson[3])  # constant row: undefined
    # Spearman = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 24 = 0.5 for ranks (1, 2, 3) vs (1, 3, 2)
    assert spearman_rows(np.array([[10.0, 20.0, 30.0]]), np.array([[0.1, 9.0, 3.0]]))[0] == pytest.approx(0.5)
    assert math.isnan(pearson_rows(np.ones((1, 1)), np.ones((1, 1)))[0])
    # over two points a correlation is +-1 whatever the values (--pbrf-rows 2 reported a mean Spearman of 1.000):
    # undefined, as the single-pair spearman already was
    two_a, two_b = np.array([[1.0, 2.0], [0.0, 5.0]]), np.array([[3.0, 3.1], [1.0, -7.0]])
    assert np.isnan(pearson_rows(two_a, two_b)).all() and np.isnan(spearman_rows(two_a, two_b)).all()
    with pytest.raises(ValueError, match="shapes differ"):
        pearson_rows(np.ones((2, 3)), np.ones((2, 4)))


def test_lds_by_hand():
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    scores = np.array([[1.0, 2.0, 4.0], [-1.0, -2.0, -4.0]])  # (Q=2, n=3)
    assert subset_predictions(masks, scores) == pytest.approx(np.array([[3.0, -3.0], [6.0, -6.0], [5.0, -5.0]]))
    # seed means per subset: query 0 -> [0.1, 0.3, 0.2] (same order as the predictions 3, 6, 5)
    outputs = np.zeros((3, 2, 2))
    outputs[:, 0, 0], outputs[:, 1, 0] = [0.0, 0.2, 0.1], [0.2, 0.4, 0.3]
    outputs[:, :, 1] = outputs[:, :, 0]  # query 1 measures the same, but its scores are negated
    lds = lds_per_query(masks, outputs, scores)
    assert lds == pytest.approx([1.0, -1.0])
    # ranks (1, 2, 3) of [0.1, 0.2, 0.3] vs (1, 3, 2) of the predictions -> 0.5
    assert lds_per_query(masks, np.array([[0.1], [0.2], [0.3]]), scores[:1]) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="disagree"):
        subset_predictions(masks, np.ones((1, 4)))
    with pytest.raises(ValueError, match="do not match"):
        lds_per_query(masks, np.ones((3, 2, 5)), scores)


def test_loo_effect_noise_and_correlations_by_hand():
    full = np.array([[1.0], [3.0]])  # (R=2, Q=1): mean 2
    without = np.array([[[0.5], [1.5]], [[2.5], [3.5]]])  # (L=2, R=2, Q=1): means 1 and 3
    effect = loo_effect(full, without)
    assert effect.shape == (1, 2) and effect == pytest.approx(np.array([[1.0, -1.0]]))
    noise = loo_noise(full, effect)
    # std over seeds (ddof 1) of [1, 3] = sqrt 2; standard error of a difference of two R=2 means = sqrt 2 * sqrt(2/2)
    assert noise["seed_std"] == pytest.approx(math.sqrt(2)) and noise["effect_std_error"] == pytest.approx(math.sqrt(2))
    assert noise["mean_abs_effect"] == pytest.approx(1.0) and noise["signal_to_noise"] == pytest.approx(
        1 / math.sqrt(2)
    )
    assert math.isnan(loo_noise(full[:1], effect)["seed_std"])
    pearson, spearman = loo_correlations(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0]]))
    assert pearson == pytest.approx([0.5]) and spearman == pytest.approx([0.5])
    with pytest.raises(ValueError, match="without must be"):
        loo_effect(full, np.ones((2, 2, 3)))


def test_summarize_skips_undefined_queries():
    summary = summarize(np.array([0.2, np.nan, 0.4, 0.9]))
    assert summary["n"] == 3 and summary["n_undefined"] == 1
    assert summary["per_query"] == [0.2, None, 0.4, 0.9]
    assert (summary["mean"], summary["low"], summary["high"]) == pytest.approx(bootstrap_ci([0.2, 0.4, 0.9]))
    assert summary["low"] <= summary["mean"] <= summary["high"]
    assert summarize(np.array([np.nan]))["mean"] is None
