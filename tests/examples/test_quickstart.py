"""``examples/quickstart.py`` is executed, not just present: on a tiny Llama in the fast tier, on the
default SmolLM2 in the slow tier; a second run reuses every cached step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from wherefrom.models.tiny import save_tiny

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def run_quickstart(*args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def check_output(stdout: str, n_queries: int) -> None:
    assert stdout.count("4. query ") == n_queries
    match = re.search(r"top-1 proponent has the query's label for (\d+)/(\d+) queries", stdout)
    assert match and int(match.group(2)) == n_queries
    # the printed token split of the strongest proponent sums to its printed score
    first_score = float(re.search(r"4\. query .*\n\s+([+-][0-9.e+-]+)", stdout).group(1))
    token_sum = float(re.search(r"\(sum ([+-][0-9.e+-]+)\)", stdout).group(1))
    assert token_sum == pytest.approx(first_score, rel=1e-3)


def test_quickstart_on_a_tiny_model(tmp_path):
    model = save_tiny(tmp_path / "model", arch="llama")
    args = ["--model", str(model), "--out", str(tmp_path / "out"), "--n-train", "12", "--n-queries", "2"]
    args += ["--epochs", "1", "--max-length", "128"]
    check_output(run_quickstart(*args), 2)
    for part in ("train.jsonl", "finetune/adapter", "run/config.json", "run/factors", "run/index/index.json"):
        assert (tmp_path / "out" / part).exists(), part
    factors = (tmp_path / "out" / "run" / "factors").stat().st_mtime_ns
    check_output(run_quickstart(*args), 2)  # cached: the factors are reused, not refitted
    assert (tmp_path / "out" / "run" / "factors").stat().st_mtime_ns == factors
    # userI: another --n-train there rewrote train.jsonl and the fine-tuning, then stopped at the run's weights
    before = (tmp_path / "out" / "train.jsonl").read_bytes()
    other = subprocess.run([sys.executable, str(SCRIPT), *args[:5], "13", *args[6:]], capture_output=True, text=True)
    assert other.returncode == 2 and "holds a quickstart made with other arguments (n_train: recorded 12, now 13)" in (
        " ".join(other.stderr.split())
    ), other.stderr
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == before
    check_output(run_quickstart(*args[:7], "3", *args[8:]), 3)  # reviewS: --n-queries changes nothing cached


@pytest.mark.slow
def test_quickstart_on_the_default_model(tmp_path):
    stdout = run_quickstart("--out", str(tmp_path / "out"), "--n-train", "20", "--n-queries", "2", "--epochs", "1")
    check_output(stdout, 2)
