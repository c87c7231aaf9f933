"""The math of the ground-truth targets: LDS (Park et al., 2023) and leave-one-out correlations.

Shapes and conventions (``n`` training rows, ``Q`` queries, ``S`` subsets, ``R`` seeds, ``L`` rows
left out):

* ``scores``: ``(Q, n)`` attribution scores, positive = proponent (upweighting the row raises
  ``f(z_q) = log p(completion | prompt)``);
* LDS: ``masks`` ``(S, n)`` bool (row ``i`` in subset ``s``), ``outputs`` ``(S, R, Q)`` float64: ``f``
  of the model trained on subset ``s`` with seed ``r``. The prediction for subset ``s`` is
  ``sum_{i in s} scores[q, i]``; LDS of query ``q`` is the Spearman correlation across the ``S``
  subsets of the seed-averaged measurement and the prediction;
* LOO: ``full`` ``(R, Q)`` (trained on all rows) and ``without`` ``(L, R, Q)`` (trained without row
  ``l``). The effect ``loo[q, l] = mean_r full[r, q] - mean_r without[l, r, q]`` is how much row ``l``
  *raised* the query's log-likelihood, so it correlates positively with good scores.

Summaries (:func:`summarize`) give the mean over queries with a 95% percentile-bootstrap interval
over queries (:func:`wherefrom.studies.metrics.bootstrap_ci`, 1000 resamples, seed 0); a query whose
correlation is undefined (constant measurement or prediction) is left out and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wherefrom.studies.metrics import as_2d, bootstrap_ci, pearson_rows, spearman_rows

__all__ = [
    "lds_per_query",
    "loo_correlations",
    "loo_effect",
    "loo_noise",
    "sample_subsets",
    "subset_predictions",
    "summarize",
]

INTERVAL = "95% percentile bootstrap over queries (wherefrom.studies.metrics.bootstrap_ci, 1000 resamples)"
"""How :func:`summarize` computes ``low``/``high``."""


def sample_subsets(n_train: int, alpha: float = 0.5, count: int = 32, seed: int = 0) -> np.ndarray:
    """``(count, n_train)`` bool masks, each with exactly ``round(alpha * n_train)`` rows, drawn
    without replacement from ``numpy.random.default_rng(seed)`` (independently per subset)."""
    if n_train < 2:
        raise ValueError(f"n_train must be >= 2, got {n_train}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if count < 2:
        raise ValueError(f"count (number of subsets) must be >= 2 for a rank correlation, got {count}")
    size = round(alpha * n_train)
    if not 1 <= size < n_train:
        raise ValueError(f"alpha={alpha} x n_train={n_train} gives subsets of {size} rows; need 1..{n_train - 1}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, n_train), dtype=bool)
    for s in range(count):
        masks[s, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def subset_predictions(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(S, Q)``: the sum of each query's scores over the rows of each subset (``masks @ scores.T``)."""
    masks = np.asarray(masks, dtype=bool)
    scores = as_2d("scores", scores)
    if masks.ndim != 2 or masks.shape[1] != scores.shape[1]:
        raise ValueError(f"masks {masks.shape} and scores {scores.shape} disagree on the number of training rows")
    return masks.astype(np.float64) @ scores.T


def lds_per_query(masks: np.ndarray, outputs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """LDS of each query, ``(Q,)``: Spearman across subsets of the seed-mean ``outputs`` ``(S, R, Q)``
    (or ``(S, Q)``) and :func:`subset_predictions`."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 3:
        outputs = outputs.mean(axis=1)
    predictions = subset_predictions(masks, scores)
    if outputs.shape != predictions.shape:
        raise ValueError(
            f"outputs {outputs.shape} (after the seed mean) do not match subsets x queries {predictions.shape}"
        )
    return spearman_rows(outputs.T, predictions.T)


def loo_effect(full: np.ndarray, without: np.ndarray) -> np.ndarray:
    """``(Q, L)``: ``mean_r full[r, q] - mean_r without[l, r, q]`` (positive: row ``l`` raised ``f(z_q)``)."""
    full = as_2d("full", full)
    without = np.asarray(without, dtype=np.float64)
    if without.ndim != 3 or without.shape[2] != full.shape[1]:
        raise ValueError(f"without must be (L, R, Q={full.shape[1]}), got {without.shape}")
    return (full.mean(axis=0)[None, :] - without.mean(axis=1)).T


def loo_correlations(effect: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query ``(Pearson, Spearman)`` across the left-out rows, each ``(Q,)``; ``effect`` and
    ``scores`` are both ``(Q, L)`` (``scores`` restricted to the left-out rows)."""
    return pearson_rows(effect, scores), spearman_rows(effect, scores)


def loo_noise(full: np.ndarray, effect: np.ndarray) -> dict[str, float]:
    """The LOO noise floor: ``seed_std`` (mean over queries of the std of ``f_full`` over seeds,
    ``ddof=1``; NaN with one seed), ``effect_std_error`` (``seed_std * sqrt(2 / R)``: the standard
    error of one effect if the ``full`` and ``without`` runs were independent), ``mean_abs_effect``
    (mean of ``|loo|``) and ``signal_to_noise`` = ``mean_abs_effect / effect_std_error``. Near or
    below 1 the measured effects are mostly training noise."""
    full = as_2d("full", full)
    effect = as_2d("effect", effect)
    repeats = full.shape[0]
    seed_std = float(full.std(axis=0, ddof=1).mean()) if repeats > 1 else float("nan")
    std_error = seed_std * float(np.sqrt(2.0 / repeats))
    mean_abs = float(np.abs(effect).mean())
    ratio = mean_abs / std_error if std_error > 0 else float("nan")
    return {
        "seed_std": seed_std,
        "effect_std_error": std_error,
        "mean_abs_effect": mean_abs,
        "signal_to_noise": ratio,
        "seeds": repeats,
    }


def summarize(per_query: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{mean, low, high, n, n_undefined, per_query, interval}`` of per-query correlations.

    NaN entries (undefined correlations) are left out of the mean and counted in ``n_undefined``;
    ``per_query`` keeps them as ``None`` (JSON). All undefined gives ``mean = low = high = None``.
    """
    values = np.asarray(per_query, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    result: dict[str, Any] = {
        "n": int(finite.size),
        "n_undefined": int(values.size - finite.size),
        "per_query": [float(v) if np.isfinite(v) else None for v in values],
        "interval": INTERVAL,
        "mean": None,
        "low": None,
        "high": None,
    }
    if finite.size:
        result["mean"], result["low"], result["high"] = bootstrap_ci(finite, n_boot=n_boot, seed=seed)
    return result
