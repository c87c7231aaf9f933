"""Benchmark metrics for attribution scores: class attribution, identification, correlations, confidence intervals.

Conventions (as in :mod:`wherefrom.core.scoring`): a **positive** score marks a proponent and a **higher**
score means **more influential**, so rankings are by descending ``Scores.total``.

**Not scored rows.** A NaN score (e.g. a row outside a BM25 candidate set, see
:func:`wherefrom.methods.lexical.restrict`) means "not ranked": it is below every scored row. For the
rank-based metrics (top-1, top-k, reciprocal rank, recall) a NaN row is never counted as a hit,
whatever its position; for AUROC and AP all NaN rows of a query share one score below every real
score (``-inf`` included), i.e. they are tied at the bottom.

**Ties.** Top-1 / top-k / reciprocal-rank metrics break ties between equal scores deterministically
by train order: the row that comes first in ``Scores.train_ids`` ranks higher. AUROC gives tied
pairs half credit (the Mann-Whitney statistic with average ranks). AP treats each distinct score as
one threshold (no tie is broken, the result is independent of row order):

    AP = sum over distinct thresholds t, descending, of (R(t) - R(t_prev)) * P(t)

where ``P(t)`` and ``R(t)`` are precision and recall of the rows scoring ``>= t`` (the definition
used by scikit-learn's ``average_precision_score``).

Every metric function returns means over queries plus a ``per_query`` dict of lists (in
``Scores.query_ids`` order) so that :func:`bootstrap_ci` can give an interval over queries;
:func:`mean_ci` gives a Student-t interval over seeds.

**Correlations** (the one implementation every study calls): :func:`pearson_rows` and
:func:`spearman_rows` correlate row ``q`` of one matrix with row ``q`` of another (Spearman = Pearson of
average ranks, ties averaged, as ``scipy.stats.spearmanr``); a row with a constant side, or of fewer than
:data:`FEWEST_CORRELATED` points, is NaN (undefined). :func:`spearman` is the single-pair form over the finite pairs, ``None`` when undefined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from wherefrom.core.scoring import Scores


def _missing(ids: Iterable[str], known: Iterable[str]) -> list[str]:
    known_set = set(known)
    return [i for i in ids if i not in known_set]


def _check_covered(ids: Sequence[str], mapping: Mapping[str, object], what: str) -> None:
    missing = _missing(ids, mapping)
    if missing:
        raise ValueError(f"{len(missing)} {what} missing (first 5: {missing[:5]})")


def _total(scores: Scores) -> np.ndarray:
    total = scores.total.detach().cpu().double().numpy()
    if total.shape != (len(scores.query_ids), len(scores.train_ids)):
        raise ValueError(
            f"scores.total has shape {total.shape}, expected ({len(scores.query_ids)}, {len(scores.train_ids)})"
        )
    return total


def ranking(row: np.ndarray) -> np.ndarray:
    """Indices of the scored (non-NaN) entries of ``row``, highest first; ties by index (train order).

    NaN entries are not ranked and do not appear in the result.
    """
    row = np.asarray(row, dtype=np.float64)
    idx = np.flatnonzero(~np.isnan(row))
    return idx[np.argsort(-row[idx], kind="stable")]


def _dense_key(row: np.ndarray) -> np.ndarray:
    """Integer keys with the order of ``row`` (equal values -> equal keys); NaN -> 0, below all scored values."""
    row = np.asarray(row, dtype=np.float64)
    key = np.zeros(row.shape[0], dtype=np.int64)
    scored = ~np.isnan(row)
    if scored.any():
        key[scored] = stats.rankdata(row[scored], method="dense").astype(np.int64)
    return key


def average_precision(row: np.ndarray, positive: np.ndarray) -> float:
    """AP of ``row`` as a detector of the boolean mask ``positive``; one threshold per distinct score.

    NaN scores are tied below every real score. Raises if there is no positive.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("average_precision needs at least one positive")
    key = _dense_key(row)
    order = np.argsort(-key, kind="stable")
    key_sorted, pos_sorted = key[order], positive[order]
    tp = np.cumsum(pos_sorted)
    seen = np.arange(1, key.shape[0] + 1)
    # Last position of each group of equal keys = one threshold.
    ends = np.flatnonzero(np.r_[key_sorted[1:] != key_sorted[:-1], True])
    tp_t = tp[ends]
    precision = tp_t / seen[ends]
    recall = tp_t / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auroc(row: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``row`` as a detector of ``positive``: P(score_pos > score_neg) + 0.5 P(tie).

    NaN scores are tied below every real score. NaN when every row is positive; raises if none is.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0:
        raise ValueError("auroc needs at least one positive")
    if n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(_dense_key(row), method="average")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _reciprocal_rank(order: np.ndarray, hit: np.ndarray) -> float:
    hits = np.flatnonzero(hit[order])
    return 1.0 / (hits[0] + 1) if hits.size else 0.0


def class_attribution(
    scores: Scores,
    train_labels: Mapping[str, str],
    query_labels: Mapping[str, str],
    k: int | None = None,
) -> dict:
    """Does each query's attribution favour training rows of its own class?

    - ``acc``: share of queries whose top-1 train row has the query's label.
    - ``cover``: mean over queries of (# same-label rows among the top ``k``) / ``k``.
    - ``cover_ceiling``: mean over queries of ``min(class size, k) / k`` -- the best ``cover``
      possible (1.0 when every query's class has at least ``k`` train rows).
    - ``mrr``: mean reciprocal rank of the first same-label train row (0 for a query with none).
    - ``k`` (default ``n_train // n_classes``, classes counted over the scored train rows, at
      least 1) and ``n_queries``; ``per_query``: lists of ``acc``, ``cover``, ``cover_ceiling``, ``mrr``.

    Ranking is by descending ``scores.total`` (higher = more influential, positive = proponent),
    ties broken by train order; NaN rows are never hits (see the module docstring). Label dicts
    may hold extra ids; every id of ``scores`` must have a label.
    """
    _check_covered(scores.train_ids, train_labels, "train ids of the scores have no label in train_labels")
    _check_covered(scores.query_ids, query_labels, "query ids of the scores have no label in query_labels")
    n_train = len(scores.train_ids)
    if n_train == 0 or not scores.query_ids:
        raise ValueError("class_attribution needs at least one query and one train row")
    total = _total(scores)
    labels = np.array([train_labels[i] for i in scores.train_ids], dtype=object)
    classes, counts = np.unique(labels.astype(str), return_counts=True)
    class_size = dict(zip(classes.tolist(), counts.tolist()))
    if k is None:
        k = max(1, n_train // len(classes))
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be in [1, {n_train}], got {k}")

    acc, cover, ceiling, mrr = [], [], [], []
    for qi, qid in enumerate(scores.query_ids):
        label = query_labels[qid]
        hit = labels == label
        order = ranking(total[qi])
        acc.append(float(order.size > 0 and hit[order[0]]))
        cover.append(float(hit[order[:k]].sum()) / k)
        ceiling.append(min(class_size.get(str(label), 0), k) / k)
        mrr.append(_reciprocal_rank(order, hit))
    return {
        "acc": float(np.mean(acc)),
        "cover": float(np.mean(cover)),
        "cover_ceiling": float(np.mean(ceiling)),
        "mrr": float(np.mean(mrr)),
        "k": k,
        "n_queries": len(acc),
        "per_query": {"acc": acc, "cover": cover, "cover_ceiling": ceiling, "mrr": mrr},
    }


def identification(scores: Scores, targets: Mapping[str, Sequence[str]], k: int | None = None) -> dict:
    """Each query's score row as a detector of its target train rows (e.g. the rows it was built from).

    Per query: ``auprc`` (:func:`average_precision`), ``auroc`` (:func:`auroc`; NaN when every train
    row is a target, and then left out of the mean), ``mrr`` (reciprocal rank of the first target),
    ``recall_at_k`` (share of targets in the top ``k``; ``k`` ``None``: the number of targets, when
    recall equals precision at ``k``, i.e. the reference study's "Cover" of the relevant rows) and
    ``acc`` (1 when the top-ranked row is a target: the reference study's "Acc"; Li et al. 2024).
    Returns the means over queries, ``n_queries`` and ``per_query`` lists (``scores.query_ids``
    order); ``k`` is returned as given.

    Every query of ``scores`` needs a non-empty target list; every target and every key of
    ``targets`` must be an id of ``scores``; ``k`` must be at least 1. Higher score = more
    influential (positive = proponent).
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 (or None for the number of targets), got {k}")
    _check_covered(scores.query_ids, targets, "query ids of the scores have no entry in targets")
    unknown_queries = _missing(targets, scores.query_ids)
    if unknown_queries:
        raise ValueError(
            f"{len(unknown_queries)} targets keys are not query ids of the scores (first 5: {unknown_queries[:5]})"
        )
    all_targets = [t for qid in scores.query_ids for t in targets[qid]]
    unknown = list(dict.fromkeys(_missing(all_targets, scores.train_ids)))
    if unknown:
        raise ValueError(f"{len(unknown)} target ids are not train ids of the scores (first 5: {unknown[:5]})")
    empty = [qid for qid in scores.query_ids if not targets[qid]]
    if empty:
        raise ValueError(f"{len(empty)} queries have no targets (first 5: {empty[:5]})")

    total = _total(scores)
    position = {tid: j for j, tid in enumerate(scores.train_ids)}
    ap, roc, mrr, recall, top1 = [], [], [], [], []
    for qi, qid in enumerate(scores.query_ids):
        positive = np.zeros(len(scores.train_ids), dtype=bool)
        positive[[position[t] for t in targets[qid]]] = True
        n_pos = int(positive.sum())
        order = ranking(total[qi])
        ap.append(average_precision(total[qi], positive))
        roc.append(auroc(total[qi], positive))
        mrr.append(_reciprocal_rank(order, positive))
        recall.append(float(positive[order[: k or n_pos]].sum()) / n_pos)
        top1.append(float(order.size > 0 and positive[order[0]]))
    finite_roc = [v for v in roc if not np.isnan(v)]
    return {
        "auprc": float(np.mean(ap)),
        "auroc": float(np.mean(finite_roc)) if finite_roc else float("nan"),
        "mrr": float(np.mean(mrr)),
        "recall_at_k": float(np.mean(recall)),
        "acc": float(np.mean(top1)),
        "k": k,
        "n_queries": len(ap),
        "per_query": {"auprc": ap, "auroc": roc, "mrr": mrr, "recall_at_k": recall, "acc": top1},
    }


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: two-sided Student-t interval of the mean (e.g. over seeds).

    Uses the sample standard deviation (``ddof=1``); one value gives ``(v, nan, nan)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def mean_stat(values: Sequence[float | None], within: tuple[float, float] | None = None) -> dict[str, Any] | None:
    """``{mean, low, high, n}`` over the finite ``values`` (95% Student-t interval, :func:`mean_ci`);
    ``low``/``high`` are ``None`` for one value, and clipped to ``within`` when given (with few seeds a
    t interval reaches past the range a bounded quantity can take). ``None`` for no finite value."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    mean, low, high = mean_ci(finite)
    if len(finite) < 2 or not (math.isfinite(low) and math.isfinite(high)):
        low = high = None
    elif within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return {"mean": mean, "low": low, "high": high, "n": len(finite)}


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap interval of the mean (e.g. over per-query values).

    ``n_boot`` resamples with replacement, drawn from ``numpy.random.default_rng(seed)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(low), float(high)


def as_2d(name: str, value: Any) -> np.ndarray:
    """``value`` as a 2-d float64 array; ``ValueError`` naming ``name`` otherwise."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-d, got shape {array.shape}")
    return array


FEWEST_CORRELATED = 3
"""The fewest points a correlation is computed over: over two it is +-1 whatever the values (a ground truth with
``--pbrf-rows 2`` or ``--loo-rows 2`` reported a mean Spearman of 1.000 with an interval)."""


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (``(Q, m)`` each) -> ``(Q,)``;
    NaN for a row where either side is constant, and for every row when ``m`` < :data:`FEWEST_CORRELATED`."""
    a, b = as_2d("a", a), as_2d("b", b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.shape[1] < FEWEST_CORRELATED:
        return np.full(a.shape[0], np.nan)
    constant = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).sum(axis=1) / denominator
    out[constant | ~(denominator > 0)] = np.nan
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation row by row (Pearson of average ranks, ties averaged) -> ``(Q,)``."""
    a, b = as_2d("a", a), as_2d("b", b)
    return pearson_rows(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1))


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman rank correlation (:func:`spearman_rows`) of the pairs where both values are finite;
    ``None`` with fewer than 3 such pairs or a constant side (undefined)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < FEWEST_CORRELATED or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    value = float(spearman_rows([[a for a, _ in pairs]], [[b for _, b in pairs]])[0])
    return value if math.isfinite(value) else None
