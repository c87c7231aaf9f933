"""The demo: end to end on the default SmolLM2 model at a reduced size, twice (reuse; slow tier), and a cache of
other settings refused (fast)."""

from __future__ import annotations

import io
import json
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


def test_a_demo_of_other_settings_is_refused_before_its_cache_changes(tmp_path):
    """userC: `demo --cache C --n-train 20` after `--n-train 30` retrained into C/finetune (replacing the adapter,
    the rows and the checkpoints), then the run refused the new adapter on every rerun. Each cache holds one
    setting; another is refused naming it, before anything there is touched."""
    from wherefrom.core.store import OutputExists
    from wherefrom.studies.demo import SETTINGS_FILE

    (tmp_path / "finetune").mkdir()
    (tmp_path / "train.jsonl").write_text("the earlier rows\n")
    made = {"n_train": 30, "epochs": 1, "model": None}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(made))
    with pytest.raises(OutputExists, match=r"other settings \(n_train: recorded 30, now 20\).*give another --cache"):
        run_demo(cache=tmp_path, n_train=20, n_queries=2, epochs=1, console=Console(file=io.StringIO()))
    assert (tmp_path / "train.jsonl").read_text() == "the earlier rows\n"
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == made


def test_a_demo_whose_fine_tuning_is_not_finite_stops_naming_it(tmp_path, monkeypatch):
    """reviewW: the demo went on to fit EK-FAC on, and score, a fine-tuning whose weights were not finite."""
    from wherefrom.models.finetune import FinetuneResult
    from wherefrom.models.tiny import save_tiny

    model = save_tiny(tmp_path / "model", arch="llama")
    monkeypatch.setattr(FinetuneResult, "divergence", lambda result: "the fine-tuning diverged (say)")
    with pytest.raises(ValueError, match=r"^the demo's fine-tuning: the fine-tuning diverged \(say\)$"):
        run_demo(
            cache=tmp_path / "c",
            n_train=20,
            n_queries=2,
            epochs=1,
            model=str(model),
            console=Console(file=io.StringIO()),
        )
    assert (tmp_path / "c" / "finetune").is_dir() and not (tmp_path / "c" / "run-ekfac").exists()
