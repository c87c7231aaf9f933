"""``benchmarks/gpu_check.sh``, the prepared GPU check, works before a GPU session spends minutes on it.

Its CPU dry run (``GPU_CHECK_DEVICE=cpu``) runs every step on a tiny Llama (fit, index, query, scores, the same
run again and the comparison of the two score sets, bfloat16 and float16 autocast, the throughput benchmark) and must
finish each; without CUDA the real run exits 3 before any work, saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wherefrom.models.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dry_run_finishes_every_step_and_compares_the_two_runs(tmp_path):
    model = save_tiny(tmp_path / "tiny", arch="llama")
    out = tmp_path / "check"
    done = run_script(out, GPU_CHECK_DEVICE="cpu", THROUGHPUT_MODEL=str(model), THROUGHPUT_ROWS="8")
    assert done.returncode == 0, done.stdout + done.stderr
    table = (out / "timings.md").read_text()
    steps = dict(re.findall(r"^\| ([a-z0-9-]+) \| ([^|]+) \|", table, flags=re.MULTILINE))
    expected = ["fit-float32", "index", "query", "scores", "fit-cpu", "index-cpu", "scores-cpu", "compare-cpu"]
    expected += ["fit-bfloat16", "scores-bfloat16", "fit-float16", "scores-float16"]
    expected += ["throughput-float32", "throughput-bfloat16"]
    assert {name: steps.get(name, "missing").strip().isdigit() for name in expected} == dict.fromkeys(expected, True)
    # CPU against CPU: the same bytes, so the comparison's numbers are exact
    assert "relative Frobenius difference 0.00e+00; Spearman per query min 1.000000" in table
    assert "(20, 400) scores" in table
    # each step's command as a shell reads it back (userG: the query's spaces were lost)
    assert r"query Determine\ the\ rewriting\ rule:\ a\ b\ c\ -\>\ c\ b\ a\ Rule: \ reverse --run OUT/run" in table
    throughput = (out / "index_throughput-bfloat16.md").read_text()
    assert "Autocast: bfloat16. 8 rows" in throughput and "(b) logra index" in throughput


def test_dry_run_records_a_spent_budget_as_skipped_steps(tmp_path):
    done = run_script(tmp_path / "check", GPU_CHECK_DEVICE="cpu", GPU_CHECK_SECONDS="5")
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "check" / "timings.md").read_text()
    assert "| fit-float32 | skipped (time budget spent) | |" in table
    # every setting it was given: a rerun of the line is a dry run again (userG: GPU_CHECK_DEVICE, PYTHON were left out)
    made = f"Made by `GPU_CHECK_SECONDS=5 GPU_CHECK_DEVICE=cpu PYTHON={sys.executable} bash benchmarks/gpu_check.sh "
    assert made + f"{tmp_path / 'check'}` (from the repository's root)" in table, table


def test_a_failed_step_makes_the_check_exit_1_naming_it(tmp_path):
    """userN: a step that failed (in its dry run, bfloat16 throughput past its time cap) was a row of the table and the
    script exited 0, which reads as a passed readiness check. A model folder that is not there fails the first steps
    (the budget skips the rest); the table is written and the script exits 1 naming them."""
    out = tmp_path / "check"
    done = run_script(out, str(tmp_path / "no-model"), GPU_CHECK_DEVICE="cpu", GPU_CHECK_SECONDS="20")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu_check.sh: failed steps: fit-float32" in done.stderr and f"(their logs are in {out})" in done.stderr
    assert "| fit-float32 | failed (exit " in (out / "timings.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_exits_3_before_any_work(tmp_path):
    done = run_script(tmp_path / "check")
    assert done.returncode == 3
    assert "gpu_check.sh needs CUDA: torch.cuda.is_available() is False here (torch " in done.stderr
    assert not (tmp_path / "check").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_called_from_another_folder_it_finds_the_repositorys_python(tmp_path):
    """userG: `bash /path/to/benchmarks/gpu_check.sh out` from another folder looked for `.venv/bin/python` there,
    failed, and said "needs CUDA ... is False here ()" whatever the machine. It works from the repository's root,
    naming a relative OUT from where it was called (here: the CUDA probe itself runs, and says so)."""
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("needs the repository's .venv (make demo)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    done = subprocess.run(
        ["bash", str(SCRIPT), "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3 and "is False here (torch " in done.stderr, done.stderr
    assert not (tmp_path / "check").exists() and not (ROOT / "check").exists()
