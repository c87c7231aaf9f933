"""What the commands write and print: earlier results are never replaced silently."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from wherefrom.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def attribute_args(root, out, *extra):
    return [
        "attribute",
        "--method",
        "gradsim",
        "--train",
        root / "train.jsonl",
        "--queries",
        root / "queries.jsonl",
        "--model",
        root / "model",
        "--max-length",
        "128",
        "--out",
        out,
        *extra,
    ]


def test_scores_refuses_to_replace_a_score_set_unless_overwrite(workspace):
    run = workspace / "overwrite-run"
    fitted = invoke(
        "fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run, "--max-length", "128"
    )
    assert fitted.exit_code == 0, fitted.output
    first = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl")
    assert first.exit_code == 0, first.output
    saved = run / "scores" / "scores.safetensors"
    before = saved.stat().st_mtime_ns
    again = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl")
    assert again.exit_code == 2 and "--overwrite" in again.output and str(saved) in again.output
    assert saved.stat().st_mtime_ns == before
    replaced = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl", "--overwrite")
    assert replaced.exit_code == 0, replaced.output


def test_attribute_refuses_to_replace_scores_unless_overwrite_and_replay_recomputes(workspace):
    out = workspace / "overwrite-attribute"
    first = invoke(*attribute_args(workspace, out))
    assert first.exit_code == 0, first.output
    again = invoke(*attribute_args(workspace, out))
    assert again.exit_code == 2 and "--overwrite" in again.output and "scores.safetensors" in again.output
    assert invoke(*attribute_args(workspace, out, "--overwrite")).exit_code == 0
    replayed = invoke("replay", out)
    assert replayed.exit_code == 0, replayed.output


def test_finetune_refuses_to_replace_another_run_unless_overwrite(workspace):
    out = workspace / "overwrite-finetune"
    common = ["finetune", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--out", out]
    common += ["--max-length", "128", "--device", "cpu", "--lora-target", "c_attn", "--lora-rank", "2"]
    assert invoke(*common, "--epochs", "1").exit_code == 0
    saved = json.loads((out / "finetune_config.json").read_text())
    other = invoke(*common, "--epochs", "2")
    assert other.exit_code == 2 and "--overwrite" in other.output and "finetune_config.json" in other.output
    assert json.loads((out / "finetune_config.json").read_text()) == saved
    same = invoke(*common, "--epochs", "1")
    assert same.exit_code == 0 and "reused" in same.output
    replaced = invoke(*common, "--epochs", "2", "--overwrite")
    assert replaced.exit_code == 0 and "trained" in replaced.output
