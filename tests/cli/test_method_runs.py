"""``wherefrom fit --method NAME`` writes a run folder that ``scores`` and ``query`` use without refitting,
from any working directory; ``index`` refuses a method without per-row gradients."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.conftest import invoke
from wherefrom.core.data import load_records
from wherefrom.core.vectors import VectorStore
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import make_method
from wherefrom.models.loading import load_model


@pytest.mark.parametrize(("method", "option"), [("bm25", "k1=1.2"), ("trak", "dim=8"), ("gradsim", None)])
def test_fit_method_then_scores_from_another_directory(workspace, tmp_path, monkeypatch, method, option):
    monkeypatch.chdir(workspace)  # paths as typed, relative to here
    extra = ["--option", option] if option else []
    fit = ["fit", "--method", method, *extra, "--train", "train.jsonl", "--model", "model", "--run", tmp_path / "run"]
    model_flags = ["--max-length", "128", "--include", r"h\.1\.mlp\.c_proj"] if method != "bm25" else []
    fitted = invoke(*fit, "--batch-size", "8", *model_flags)  # bm25 reads no model setting: they are refused
    assert fitted.exit_code == 0, fitted.output
    assert f"{method} fitted" in fitted.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["train"] == str(workspace / "train.jsonl") and recorded["method"] == method

    monkeypatch.chdir(tmp_path)
    result = invoke("scores", "--run", "run", "--queries", workspace / "queries.jsonl", "--name", "q")
    assert result.exit_code == 0, result.output
    saved = load_file(str(tmp_path / "run" / "scores" / "q.safetensors"))["total"]

    loaded = load_model(workspace / "model", device="cpu")
    config = AttributionConfig(batch_size=8, max_length=128, include=[r"h\.1\.mlp\.c_proj"])
    options = dict([option.split("=")]) if option else {}
    chosen = make_method(
        method, loaded.model, loaded.tokenizer, config, **{k: json.loads(v) for k, v in options.items()}
    )
    train, queries = load_records(workspace / "train.jsonl"), load_records(workspace / "queries.jsonl")
    chosen.fit(train)
    assert torch.equal(saved, chosen.scores(queries, train).total)
    provenance = json.loads((tmp_path / "run" / "scores" / "q.json").read_text())["provenance"]
    assert provenance == {"train_side": "recomputed"}
    assert "training side read from" not in result.output
    if method == "trak":  # scored from its float16 index: recorded so, and said on screen
        assert invoke("index", "--run", "run", "--dtype", "float16").exit_code == 0
        indexed = invoke("scores", "--run", "run", "--queries", workspace / "queries.jsonl", "--name", "i")
        assert indexed.exit_code == 0, indexed.output
        said = " ".join(indexed.output.split())
        assert "training side read from run/index (float16 rows, precondition fitted, unit_norm False)" in said
        one = invoke("query", "--run", "run", "x ->", " sort", "--top-k", "2")
        assert "training side read from run/index (float16 rows" in " ".join(one.output.split())
        provenance = json.loads((tmp_path / "run" / "scores" / "i.json").read_text())["provenance"]
        store = VectorStore.open(tmp_path / "run" / "index")
        options = {"precondition": "fitted", "unit_norm": False}
        expected = {"dtype": "float16", "store": store.content_key(), "index_options": options}
        assert provenance == {"train_side": "index", **expected}

    report = invoke("query", "--run", "run", "x ->", " sort", "--json", "--top-k", "2")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout[report.stdout.index("{") :])["strategy"] == method


def test_index_refuses_a_method_without_gradients(workspace, tmp_path):
    args = ["--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", tmp_path / "run"]
    fitted = invoke("fit", "--method", "bm25", *args)
    assert fitted.exit_code == 0 and "bm25 fitted: 20 rows ->" in fitted.output  # it tracks no modules
    refused = invoke("index", "--run", tmp_path / "run")
    assert refused.exit_code != 0 and "method 'bm25' has no per-row gradient index" in refused.output
    mixed = invoke("fit", "--method", "bm25", "--strategy-option", "rank=2", *args)
    assert mixed.exit_code != 0 and "--strategy-option is for --strategy" in mixed.output
    ignored = invoke("fit", "--strategy", "identity", "--option", "lissa.depth=5", *args)  # was silently unused
    assert ignored.exit_code == 2 and "--option is for --method; give strategy 'identity' its options" in ignored.output
