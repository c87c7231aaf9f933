"""Helpers of the tests/test_robust_*.py files: a tiny saved model with rows, the CLI in process and
as a real subprocess (to be killed or run concurrently), and a poll on the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import wherefrom
from tests.conftest import make_records
from wherefrom.cli import app
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import write_jsonl

SRC = Path(wherefrom.__file__).resolve().parents[1]


def make_workspace(root: Path, n_train: int) -> Path:
    """``root/model`` (tiny Llama), ``root/train.jsonl`` (``n_train`` short rows), ``root/queries.jsonl`` (3 rows)."""
    save_tiny(root / "model", arch="llama")
    write_jsonl(make_records(n_train, seed=1), root / "train.jsonl")
    write_jsonl(make_records(3, seed=2, prefix="q"), root / "queries.jsonl")
    return root


def fit_args(root: Path, run: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--train",
        str(root / "train.jsonl"),
        "--model",
        str(root / "model"),
        "--run",
        str(root / run),
        "--device",
        "cpu",
        *extra,
    ]


def invoke(*args):
    """The CLI in this process: ``(exit_code, output)``."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def spawn(*args) -> subprocess.Popen:
    """``python -m wherefrom.cli ARGS`` as a real process, with this process's thread count (so its
    float results match an in-process run bit for bit); stdout and stderr merged into ``.stdout``."""
    threads = str(torch.get_num_threads())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "wherefrom.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``condition`` every 2 ms; fails if ``process`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"the process ended (rc {process.returncode}) before the awaited state:\n{process.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the awaited state")
        time.sleep(0.002)


def tensors_equal(a: Path, b: Path) -> bool:
    """Both safetensors files hold the same names with bit-identical tensors."""
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def partials(folder: Path) -> list[Path]:
    """Temporary leftovers (``.*.partial-*``) anywhere under ``folder``."""
    return [p for p in folder.rglob(".*") if ".partial-" in p.name]
