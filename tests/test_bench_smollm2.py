"""Slow tier: `wherefrom bench` on the default model (SmolLM2 + LoRA), every study method, one class task
and one identification task, at a size CI affords. Checks the real-model path end to end; the numbers
themselves are measured at larger sizes by ``benchmarks/study.sh``."""

from __future__ import annotations

import pytest

from wherefrom.bench import BenchConfig, run_bench

STUDY_METHODS = ["ekfac", "kfac", "lissa", "datainf", "gradsim", "tracin", "repsim", "bm25"]
CHEAP_LISSA = {"depth": 3, "batch_size": 2, "power_iterations": 2, "probes": 2}


@pytest.mark.slow
@pytest.mark.parametrize("task, n_train", [("rules", 12), ("backdoor", 20)])
def test_every_study_method_runs_on_the_default_model(tmp_path, task, n_train):
    config = BenchConfig(task=task, out=str(tmp_path / task), methods=STUDY_METHODS, n_train=n_train, n_test=2,
                         epochs=1, batch_size=4, max_length=128, method_options={"lissa": CHEAP_LISSA})
    report = run_bench(config)
    for method in STUDY_METHODS:
        entry = report["aggregate"][method]
        assert entry["n_ok"] == 1, f"{method}: {entry['errors']}"
        assert entry["seconds"] > 0
    names = ("acc", "cover", "mrr") if task == "rules" else ("auprc", "auroc", "mrr")
    for method in STUDY_METHODS:
        for name in names:
            assert 0.0 <= report["aggregate"][method]["metrics"][name]["mean"] <= 1.0
