"""Slow tier: the demo end to end on the default SmolLM2 model, at a reduced size, twice (reuse)."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from wherefrom.studies.demo import run_demo


@pytest.mark.slow
def test_demo_runs_and_reuses_its_cache(tmp_path):
    console = Console(file=io.StringIO(), width=200)
    started = time.perf_counter()
    share = run_demo(cache=tmp_path, n_train=40, n_queries=5, epochs=1, console=console)
    first = time.perf_counter() - started
    output = console.file.getvalue()
    assert set(share) == {"ekfac", "identity"} and all(0.0 <= v <= 1.0 for v in share.values())
    assert "top-1 proponent has the query's label" in output
    assert (tmp_path / "run-ekfac" / "factors" / "curvature.safetensors").exists()
    assert (tmp_path / "run-ekfac" / "index" / "index.json").exists()

    started = time.perf_counter()
    again = run_demo(cache=tmp_path, n_train=40, n_queries=5, epochs=1, console=console)
    second = time.perf_counter() - started
    print(f"demo (40 rows, 1 epoch): first run {first:.0f} s, second run {second:.0f} s; top-1 label share {share}")
    assert again == share
    assert "reused earlier fine-tuning" in console.file.getvalue()
    assert second < first
