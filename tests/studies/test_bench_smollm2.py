"""Slow tier: `wherefrom bench` on the default model (SmolLM2 + LoRA) with every study method on every
task, at a size CI affords (one seed, one epoch, a few rows). Checks the real-model path end to end;
the numbers themselves are measured at larger sizes by ``benchmarks/study.sh``. The file tasks
(emotion, grammars) read ``../shared/datasets`` and skip without it."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED
from wherefrom.studies.bench import BenchConfig, run_bench

STUDY_METHODS = ["ekfac", "kfac", "lissa", "datainf", "gradsim", "tracin", "repsim", "bm25"]
CHEAP_LISSA = {"depth": 3, "batch_size": 2, "power_iterations": 2, "probes": 2}
# The smallest sizes each task accepts with every class or target present: backdoor-multi's 3
# triggers at a 6% poison share need 50 rows; emotion has 5 classes, grammars and math 10.
SIZES = {"rules": 12, "math": 10, "backdoor": 20, "backdoor-multi": 50, "unwanted": 20, "emotion": 10, "grammars": 10}


def _task(name: str) -> str:
    if name in ("emotion", "grammars"):
        if not SHARED.is_dir():
            pytest.skip("shared datasets not present")
        return f"path:{SHARED / name}.train.jsonl:{SHARED / name}.test.jsonl"
    return name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIZES))
def test_every_study_method_runs_on_the_default_model(tmp_path, name):
    config = BenchConfig(
        task=_task(name),
        out=str(tmp_path / name),
        methods=STUDY_METHODS,
        n_train=SIZES[name],
        n_test=2,
        epochs=1,
        batch_size=4,
        max_length=128,
        method_options={"lissa": CHEAP_LISSA},
    )
    report = run_bench(config)
    for method in STUDY_METHODS:
        entry = report["aggregate"][method]
        assert entry["n_ok"] == 1, f"{method}: {entry['errors']}"
        assert entry["seconds"] > 0
    names = ("acc", "cover", "mrr") if report["kind"] == "class" else ("auprc", "auroc", "mrr")
    for method in STUDY_METHODS:
        for metric in names:
            assert 0.0 <= report["aggregate"][method]["metrics"][metric]["mean"] <= 1.0
