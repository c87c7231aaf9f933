"""The retraining harness, LDS and LOO on a convex model where influence is exact.

L2-regularised logistic regression on fixed Gaussian features (2 classes, n = 100, d = 5), trained
to convergence by Newton's method in float64. Training objective on rows ``S``:
``(1/|S|) sum_{i in S} l_i(w) + (lam/2) ||w||^2``. The exact influence of row ``m`` on query ``q`` is
``grad l_q^T H^-1 grad l_m`` with ``H`` the Hessian of the full-data objective at its optimum (the
README's convention, positive = proponent): leaving ``m`` out changes ``f_q = log p(y_q | x_q)`` by
about ``-I / n``, so the LOO effect ``f_full - f_without ~ I / n``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from wherefrom.studies.groundtruth.lds import (
    lds_per_query,
    loo_correlations,
    loo_effect,
    sample_subsets,
    summarize,
)
from wherefrom.studies.groundtruth.retrain import FunctionRetrainer, run_jobs

N, D, N_QUERY, LAM = 100, 5, 12, 1e-2


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=D) * 0.7

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, size=n).astype(np.float64) * 2 - 1  # labels in {-1, +1}
        x = rng.normal(size=(n, D)) + y[:, None] * mean
        return np.c_[x, np.ones(n)], y  # a bias feature

    x, y = draw(N)
    xq, yq = draw(N_QUERY)
    return x, y, xq, yq


def _fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Newton's method on the regularised mean logistic loss (converges to machine precision)."""
    w = np.zeros(x.shape[1])
    for _ in range(50):
        margin = y * (x @ w)
        p = 1 / (1 + np.exp(margin))  # sigma(-margin)
        grad = -(x * (y * p)[:, None]).mean(0) + LAM * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + LAM * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-13:
            break
    return w


def _log_lik(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -y * (x @ w))


def logistic_f(indices: np.ndarray, seed: int, data_seed: int = 0) -> np.ndarray:
    """Module level (picklable): f of the queries after training on ``train[indices]``; ``seed`` is
    irrelevant for a convex model trained to convergence."""
    x, y, xq, yq = _data(data_seed)
    return _log_lik(_fit(x[indices], y[indices]), xq, yq)


def exact_influence(data_seed: int = 0, identity: bool = False) -> np.ndarray:
    """``(n_query, n)`` ``grad l_q^T H^-1 grad l_m`` at the full-data optimum (``identity``: ``H = I``)."""
    x, y, xq, yq = _data(data_seed)
    w = _fit(x, y)

    def grads(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # per-example gradient of l = log(1 + exp(-b a.w))
        return -(a * (b / (1 + np.exp(b * (a @ w))))[:, None])

    p = 1 / (1 + np.exp(-x @ w))
    hess = (x * (p * (1 - p))[:, None]).T @ x / N + LAM * np.eye(x.shape[1])
    if identity:
        hess = np.eye(x.shape[1])
    return grads(xq, yq) @ np.linalg.solve(hess, grads(x, y).T)


def _retrainer(data_seed: int = 0) -> FunctionRetrainer:
    return FunctionRetrainer(logistic_f, {"model": "logistic", "n": N, "lam": LAM, "data_seed": data_seed})


def test_exact_influence_matches_loo_and_lds(tmp_path):
    retrainer = _retrainer()
    rows = np.arange(0, N, 4)  # 25 rows left out
    masks = sample_subsets(N, alpha=0.5, count=40, seed=0)
    jobs = [(f"lds-{s}", np.flatnonzero(m).tolist(), 0) for s, m in enumerate(masks)]
    jobs += [("full", list(range(N)), 0)] + [(f"loo-{r}", [i for i in range(N) if i != r], 0) for r in rows]
    values = run_jobs(retrainer, jobs, tmp_path / "jobs")
    outputs = np.stack([values[f"lds-{s}"] for s in range(len(masks))])[:, None, :]  # (S, R=1, Q)
    effect = loo_effect(values["full"][None, :], np.stack([values[f"loo-{r}"] for r in rows])[:, None, :])

    exact = exact_influence()
    pearson, spearman = loo_correlations(effect, exact[:, rows])
    loo_p, loo_s = summarize(pearson), summarize(spearman)
    # measured: LOO Pearson 0.9987 (interval [0.9984, 0.9990]), Spearman 0.998
    assert loo_p["low"] > 0.99 and loo_s["mean"] > 0.97
    # the scale matches too: effect ~ I / n (measured median ratio 1.067)
    assert np.median(effect / (exact[:, rows] / N)) == pytest.approx(1.0, abs=0.15)
    lds = summarize(lds_per_query(masks, outputs, exact))
    # measured: LDS 0.959 [0.951, 0.967] (half-size subsets are far from the linear regime of one removal)
    assert lds["mean"] > 0.9

    # the gradient dot product (no curvature) is worse on both (measured LOO Pearson 0.947, LDS 0.917)
    identity = exact_influence(identity=True)
    assert summarize(loo_correlations(effect, identity[:, rows])[0])["mean"] < loo_p["mean"] - 0.02
    assert summarize(lds_per_query(masks, outputs, identity))["mean"] < lds["mean"]

    rng = np.random.default_rng(0)
    random_scores = rng.normal(size=exact.shape)
    random_lds = summarize(lds_per_query(masks, outputs, random_scores))
    random_loo = summarize(loo_correlations(effect, random_scores[:, rows])[0])
    # measured: LDS -0.021 [-0.127, 0.083], LOO Pearson 0.111
    assert abs(random_lds["mean"]) < 0.15 and abs(random_loo["mean"]) < 0.2
    assert random_lds["low"] < 0 < random_lds["high"]


def test_run_jobs_resumes_and_reruns_on_a_changed_key(tmp_path):
    retrainer = _retrainer()
    jobs = [("a", [0, 1, 2, 3, 4, 5], 0), ("b", list(range(10, 30)), 1)]
    first = run_jobs(retrainer, jobs, tmp_path)
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["key"]["retrainer"] == retrainer.key() and saved["key"]["indices"] == [0, 1, 2, 3, 4, 5]
    assert first["a"].shape == (N_QUERY,) and first["a"].dtype == np.float64

    calls = []

    def counting(indices, seed):
        calls.append(seed)
        return logistic_f(indices, seed)

    counted = FunctionRetrainer(counting, retrainer.identity)
    again = run_jobs(counted, jobs, tmp_path)
    assert calls == [] and all(np.array_equal(again[k], first[k]) for k in first)  # nothing re-ran

    # another job set over the same cache: only the new / changed jobs run
    run_jobs(counted, [("a", [0, 1, 2, 3, 4, 5], 0), ("b", list(range(10, 30)), 2), ("c", [1, 2, 3], 0)], tmp_path)
    assert sorted(calls) == [0, 2]
    # a changed retrainer key reruns everything
    calls.clear()
    run_jobs(FunctionRetrainer(counting, {**retrainer.identity, "lam": 0.5}), jobs, tmp_path)
    assert sorted(calls) == [0, 1]

    with pytest.raises(ValueError, match="repeats"):
        run_jobs(retrainer, [("a", [0], 0), ("a", [1], 0)], tmp_path)
    with pytest.raises(ValueError, match="names a file"):
        run_jobs(retrainer, [("../x", [0], 0)], tmp_path)
    with pytest.raises(ValueError, match="no training rows"):
        run_jobs(retrainer, [("e", [], 0)], tmp_path)
    with pytest.raises(TypeError, match="train_and_measure"):
        run_jobs(object(), jobs, tmp_path)


def test_run_jobs_in_two_worker_processes(tmp_path):
    jobs = [(f"j{k}", list(range(k, k + 60)), k) for k in range(4)]
    parallel = run_jobs(_retrainer(), jobs, tmp_path / "par", workers=2)
    serial = {job_id: logistic_f(np.array(rows), seed) for job_id, rows, seed in jobs}
    assert list(parallel) == [j for j, _, _ in jobs]
    for job_id, expected in serial.items():
        np.testing.assert_allclose(parallel[job_id], expected, rtol=1e-10)
        assert (tmp_path / "par" / f"{job_id}.json").is_file()


def test_more_workers_than_cores_run_one_process_per_core(tmp_path, monkeypatch):
    """``--workers 12`` on 2 cores started 12 processes of 1 thread each (82 s where 2 took 9 s); the processes are
    capped at the cores with a warning, and the values are those of one process."""
    from wherefrom.studies.groundtruth import retrain

    started = []

    class Recorded(retrain.ProcessPoolExecutor):
        def __init__(self, **kwargs):
            started.append(kwargs["max_workers"])
            super().__init__(**kwargs)

    monkeypatch.setattr(retrain, "ProcessPoolExecutor", Recorded)
    monkeypatch.setattr(retrain, "available_cores", lambda: 2)
    jobs = [(f"j{k}", list(range(k, k + 60)), k) for k in range(4)]
    with pytest.warns(retrain.OversubscribedWorkers, match=r"workers=12 \(--workers\) but this process may use 2"):
        parallel = run_jobs(_retrainer(), jobs, tmp_path / "par", workers=12)
    assert started == [2]
    for job_id, rows, seed in jobs:
        np.testing.assert_allclose(parallel[job_id], logistic_f(np.array(rows), seed), rtol=1e-10)
    # on one core more workers run the jobs in this process (it spawned one worker process)
    monkeypatch.setattr(retrain, "available_cores", lambda: 1)
    with pytest.warns(retrain.OversubscribedWorkers, match="may use 1 CPU cores: running 1"):
        run_jobs(_retrainer(), jobs, tmp_path / "one", workers=4)
    assert started == [2]
