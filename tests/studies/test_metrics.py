"""Benchmark metrics on hand-built score matrices with known answers, and against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from wherefrom.core.scoring import Scores
from wherefrom.studies.metrics import (
    auroc,
    average_precision,
    bootstrap_ci,
    class_attribution,
    identification,
    mean_ci,
    mean_stat,
    ranking,
)


def make_scores(total, query_ids=None, train_ids=None) -> Scores:
    total = torch.as_tensor(np.asarray(total, dtype=np.float64))
    q, n = total.shape
    query_ids = query_ids or [f"q{i}" for i in range(q)]
    train_ids = train_ids or [f"t{j}" for j in range(n)]
    # Two modules summing to ``total``.
    return Scores(query_ids, train_ids, ["a", "b"], torch.stack([total * 0.25, total * 0.75]))


def brute_auroc(row, positive):
    pos, neg = row[positive], row[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_ap(row, positive):
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(row.tolist()), reverse=True):
        selected = row >= t
        tp = int((selected & positive).sum())
        recall = tp / positive.sum()
        ap += (recall - prev_recall) * tp / selected.sum()
        prev_recall = recall
    return ap


# Train rows t0..t5: classes A A B B C C; queries q0 (A), q1 (B), q2 (C).
TRAIN_LABELS = {"t0": "A", "t1": "A", "t2": "B", "t3": "B", "t4": "C", "t5": "C"}
QUERY_LABELS = {"q0": "A", "q1": "B", "q2": "C"}
PERFECT = [
    [5, 4, 1, 0, 2, 1],
    [0, 1, 9, 8, 2, 3],
    [1, 0, 2, 1, 7, 6],
]


def test_perfect_class_attribution():
    result = class_attribution(make_scores(PERFECT), TRAIN_LABELS, QUERY_LABELS)
    assert result["k"] == 2 and result["n_queries"] == 3
    assert result["acc"] == result["cover"] == result["cover_ceiling"] == result["mrr"] == 1.0


def test_reversed_class_attribution():
    result = class_attribution(make_scores(-np.asarray(PERFECT)), TRAIN_LABELS, QUERY_LABELS)
    assert result["acc"] == 0.0 and result["cover"] == 0.0
    # q0: A rows at ranks 5 and 6 -> 1/5; q1: B at 5, 6 -> 1/5; q2: C at 5, 6 -> 1/5.
    assert result["mrr"] == pytest.approx(1 / 5)


def test_cover_counts_top_k_and_ceiling_when_class_smaller_than_k():
    labels = {"t0": "A", "t1": "B", "t2": "B", "t3": "B", "t4": "B", "t5": "B"}
    scores = make_scores([[6, 5, 4, 3, 2, 1], [1, 0, 3, 2, 5, 4]])
    result = class_attribution(scores, labels, {"q0": "A", "q1": "B"})
    assert result["k"] == 3  # 6 rows // 2 classes
    # q0 (A): class has 1 row < k -> ceiling 1/3, cover 1/3; q1 (B): top 3 = t4, t5, t2 all B.
    assert result["per_query"]["cover_ceiling"] == pytest.approx([1 / 3, 1.0])
    assert result["per_query"]["cover"] == pytest.approx([1 / 3, 1.0])
    assert result["cover_ceiling"] == pytest.approx(2 / 3) and result["cover_ceiling"] < 1
    explicit = class_attribution(scores, labels, {"q0": "A", "q1": "B"}, k=2)
    assert explicit["k"] == 2 and explicit["per_query"]["cover"] == pytest.approx([0.5, 1.0])


def test_ties_break_by_train_order():
    labels = {"t0": "A", "t1": "B", "t2": "A"}
    # All tied: t0 ranks first -> acc 1 for label A, 0 for label B (t1 comes at rank 2).
    scores = make_scores([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    result = class_attribution(scores, labels, {"q0": "A", "q1": "B"}, k=1)
    assert result["per_query"]["acc"] == [1.0, 0.0]
    assert result["per_query"]["mrr"] == [1.0, 0.5]
    assert ranking(np.array([2.0, 3.0, 2.0, 3.0])).tolist() == [1, 3, 0, 2]


def test_nan_rows_never_ranked_above_scored_rows():
    # The NaN rows are the same-label ones: they must not count as hits anywhere.
    labels = {"t0": "A", "t1": "A", "t2": "B", "t3": "B"}
    scores = make_scores([[math.nan, math.nan, -5.0, -float("inf")]])
    result = class_attribution(scores, labels, {"q0": "A"}, k=2)
    assert result["acc"] == 0.0 and result["cover"] == 0.0 and result["mrr"] == 0.0
    assert ranking(np.array([math.nan, 1.0, math.nan, -np.inf])).tolist() == [1, 3]

    ident = identification(scores, {"q0": ["t0", "t1"]})
    assert ident["auroc"] == 0.0 and ident["mrr"] == 0.0 and ident["recall_at_k"] == 0.0
    assert ident["auprc"] == pytest.approx(0.5)  # all four rows at the last threshold: precision 2/4
    # A NaN negative sits below a scored positive, even one scoring -inf.
    assert auroc(np.array([-np.inf, math.nan]), np.array([True, False])) == 1.0


def test_perfect_and_reversed_identification():
    scores = make_scores(PERFECT)
    targets = {"q0": ["t0", "t1"], "q1": ["t2", "t3"], "q2": ["t4", "t5"]}
    result = identification(scores, targets)
    assert result["auprc"] == result["auroc"] == result["mrr"] == result["recall_at_k"] == 1.0
    assert result["n_queries"] == 3
    reversed_ = identification(make_scores(-np.asarray(PERFECT)), targets)
    assert reversed_["auroc"] == 0.0 and reversed_["recall_at_k"] == 0.0


def test_random_scores_give_auroc_near_half():
    rng = np.random.default_rng(0)
    values = []
    for _ in range(300):
        row = rng.normal(size=40)
        positive = np.zeros(40, dtype=bool)
        positive[rng.choice(40, size=5, replace=False)] = True
        values.append(auroc(row, positive))
    assert abs(np.mean(values) - 0.5) < 0.03


def test_ap_and_auroc_match_brute_force_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(2, 15))
        row = rng.integers(0, 4, size=n).astype(np.float64)  # many ties
        positive = rng.random(n) < 0.4
        if not positive.any():
            positive[0] = True
        assert average_precision(row, positive) == pytest.approx(brute_ap(row, positive))
        if not positive.all():
            assert auroc(row, positive) == pytest.approx(brute_auroc(row, positive))
        else:
            assert math.isnan(auroc(row, positive))
        # AP does not depend on the order of tied rows.
        perm = rng.permutation(n)
        assert average_precision(row[perm], positive[perm]) == pytest.approx(average_precision(row, positive))


def test_identification_per_query_values():
    scores = make_scores([[0.1, 0.9, 0.5, 0.3]])
    result = identification(scores, {"q0": ["t2", "t3"]})
    # Ranking t1, t2, t3, t0: first target at rank 2; top-2 holds one target.
    assert result["mrr"] == 0.5 and result["recall_at_k"] == 0.5
    assert result["auroc"] == pytest.approx(0.5)
    assert result["auprc"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_identification_recall_at_a_given_k_and_top1_acc():
    scores = make_scores([[0.1, 0.9, 0.5, 0.3], [0.8, 0.1, 0.2, 0.3]])
    targets = {"q0": ["t2", "t0"], "q1": ["t0"]}
    # q0 ranks t1, t2, t3, t0; q1 ranks t0 first
    default = identification(scores, targets)
    assert default["k"] is None and default["per_query"]["recall_at_k"] == [0.5, 1.0]
    at3 = identification(scores, targets, k=3)
    assert at3["k"] == 3 and at3["per_query"]["recall_at_k"] == [0.5, 1.0]
    at4 = identification(scores, targets, k=4)
    assert at4["per_query"]["recall_at_k"] == [1.0, 1.0]
    assert default["per_query"]["acc"] == [0.0, 1.0] and default["acc"] == 0.5
    with pytest.raises(ValueError, match="k must be >= 1"):
        identification(scores, targets, k=0)


def test_mismatched_ids_raise_and_name_them():
    scores = make_scores(PERFECT)
    with pytest.raises(ValueError, match=r"train ids.*\['t0', 't1'\]"):
        class_attribution(scores, {"t2": "B", "t3": "B", "t4": "C", "t5": "C"}, QUERY_LABELS)
    with pytest.raises(ValueError, match=r"query ids.*\['q2'\]"):
        class_attribution(scores, TRAIN_LABELS, {"q0": "A", "q1": "B"})
    many = {f"x{i}": "A" for i in range(9)}
    with pytest.raises(ValueError, match=r"6 train ids.*first 5: \['t0', 't1', 't2', 't3', 't4'\]"):
        class_attribution(scores, many, QUERY_LABELS)
    good = {"q0": ["t0"], "q1": ["t2"], "q2": ["t4"]}
    with pytest.raises(ValueError, match=r"not train ids.*\['zz'\]"):
        identification(scores, {**good, "q1": ["t2", "zz"]})
    with pytest.raises(ValueError, match=r"not query ids.*\['q9'\]"):
        identification(scores, {**good, "q9": ["t0"]})
    with pytest.raises(ValueError, match=r"no entry in targets.*\['q2'\]"):
        identification(scores, {"q0": ["t0"], "q1": ["t2"]})
    with pytest.raises(ValueError, match=r"no targets.*\['q0'\]"):
        identification(scores, {**good, "q0": []})
    with pytest.raises(ValueError, match="k must be"):
        class_attribution(scores, TRAIN_LABELS, QUERY_LABELS, k=7)


def test_mean_ci_matches_scipy_t_interval():
    values = [0.61, 0.64, 0.58, 0.66, 0.60]
    mean, low, high = mean_ci(values, confidence=0.9)
    ref_low, ref_high = stats.t.interval(0.9, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx((ref_low, ref_high))
    single = mean_ci([0.7])
    assert single[0] == 0.7 and math.isnan(single[1]) and math.isnan(single[2])
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_mean_stat_skips_missing_values_and_clips_to_the_range():
    stat = mean_stat([0.9, None, 1.0, float("nan"), 0.6])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(2.5 / 3) and stat["high"] > 1.0  # the raw t interval
    clipped = mean_stat([0.9, 1.0, 0.6], within=(0.0, 1.0))
    assert clipped["high"] == 1.0 and clipped["low"] == pytest.approx(stat["low"])
    assert mean_stat([0.7])["low"] is None and mean_stat([None, float("inf")]) is None


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(2).random(50)
    mean, low, high = bootstrap_ci(values, n_boot=500, seed=3)
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert bootstrap_ci(values, n_boot=500, seed=3) == (mean, low, high)
    # Width close to the normal approximation 2 * 1.96 * sem.
    assert high - low == pytest.approx(2 * 1.96 * stats.sem(values), rel=0.25)
    assert bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)
