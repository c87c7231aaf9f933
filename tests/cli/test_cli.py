"""The command line end to end on a tiny saved model: fit, resume, index, scores, query, errors."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from tests.cli.conftest import invoke
from wherefrom.core.scoring import end_kind
from wherefrom.models.tiny import save_tiny


def fit_args(root, run="run"):
    return [
        "fit",
        "--train",
        root / "train.jsonl",
        "--model",
        root / "model",
        "--run",
        root / run,
        "--batch-size",
        "8",
        "--max-length",
        "128",
    ]


def test_fit_index_scores_query(workspace):
    root = workspace
    first = invoke(*fit_args(root))
    assert first.exit_code == 0, first.output
    assert "fitted" in first.output and (root / "run" / "factors" / "curvature.safetensors").exists()
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    assert manifest["data"]["rows"] == 20 and manifest["modules"] and manifest["model"]["fingerprint"]
    again = invoke(*fit_args(root))
    assert again.exit_code == 0 and "reused" in again.output

    streamed = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "streamed")
    assert streamed.exit_code == 0, streamed.output
    indexed = invoke("index", "--run", root / "run", "--shard-size", "8")
    assert indexed.exit_code == 0, indexed.output
    assert sorted(p.name for p in (root / "run" / "index").glob("shard-*")) == [
        f"shard-0000{i}.safetensors" for i in range(3)
    ]
    from_index = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "indexed")
    assert from_index.exit_code == 0, from_index.output
    import torch
    from safetensors.torch import load_file

    a = load_file(str(root / "run" / "scores" / "streamed.safetensors"))["total"]
    b = load_file(str(root / "run" / "scores" / "indexed.safetensors"))["total"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ids = json.loads((root / "run" / "scores" / "indexed.json").read_text())
    assert len(ids["train_ids"]) == 20 and len(ids["query_ids"]) == 3
    from wherefrom.core.vectors import VectorStore

    store = VectorStore.open(root / "run" / "index")
    expected = {"train_side": "index", "dtype": store.dtype, "store": store.content_key(), "index_options": {}}
    assert ids["provenance"] == expected  # an influence run's raw gradients: no precondition or unit norm
    recomputed = json.loads((root / "run" / "scores" / "streamed.json").read_text())["provenance"]
    assert recomputed == {"train_side": "recomputed"}

    result = invoke(
        "query",
        "--run",
        root / "run",
        "Determine the rewriting rule: a b c -> c b a\nRule:",
        " reverse",
        "--json",
        "--top-k",
        "4",
        "--per-token",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    scores = [p["score"] for p in report["proponents"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    for entry in [*report["proponents"], *report["opponents"]]:  # userZ: opponents and the query side had none
        for side in ("tokens", "query_tokens"):  # the row's tokens, the query's: each sums to the score
            assert sum(v for _, v in entry[side]) == pytest.approx(entry["score"], rel=1e-3, abs=1e-3)
        assert "".join(t for t, _ in entry["query_tokens"]).endswith(" reverse<eos>")  # the query, lower-cased
    for kind, lowest in (("proponents", False), ("opponents", True)):  # each entry's kind by the one rule
        assert [e["kind"] for e in report[kind]] == [end_kind(e["score"], lowest) for e in report[kind]]
    table = invoke("query", "--run", root / "run", "x ->", " sort", "--top-k", "2")
    assert table.exit_code == 0 and "proponents" in table.output


def test_query_view_shows_the_token_splits_per_token_computed(workspace, tmp_path, monkeypatch):
    """reviewY: ``query --per-token --html`` split every listed row over its tokens twice and the query side twice
    (the view computed again what the report held). Each split is computed once now, and the view shows the
    report's."""
    from wherefrom.engine.api import Attributor

    root = workspace
    assert invoke(*fit_args(root, "viewed")).exit_code == 0
    calls = []
    for name in ("token_scores", "query_token_scores"):
        original = getattr(Attributor, name)
        monkeypatch.setattr(Attributor, name, lambda self, *a, _f=original, _n=name: calls.append(_n) or _f(self, *a))
    page = tmp_path / "q.html"
    query = ("query", "--run", root / "viewed", "a b -> b a\nRule:", " swap", "--top-k", "3", "--json")
    result = invoke(*query, "--per-token", "--html", page)
    assert result.exit_code == 0, result.output
    assert sorted(calls) == ["query_token_scores", "token_scores"]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    shown = page.read_text()
    for entry in report["proponents"][:1]:  # the view's heatmaps are the report's splits
        assert entry["id"] in shown and entry["query_tokens"] and entry["tokens"]
    calls.clear()
    alone = invoke(*query[:-1], "--html", tmp_path / "alone.html")  # without --per-token the view splits once
    assert alone.exit_code == 0 and sorted(calls) == ["query_token_scores", "token_scores"]
    assert (tmp_path / "alone.html").read_text().count("<svg") == shown.count("<svg")


def test_attribute_takes_the_fitting_settings_fit_takes(workspace, tmp_path):
    """userE: ``attribute`` had no ``--seed`` (EK-FAC draws its true-Fisher labels with it: a word-order seed's
    scores could not be redone, 34% apart) nor ``--fisher``, ``--reduction``, ``--query-rank``, ``--autocast``. Given
    the same settings, ``attribute`` and ``fit`` + ``scores`` agree; another seed gives other scores."""
    from safetensors.torch import load_file

    root, rows = workspace, ("--train", workspace / "train.jsonl", "--queries", workspace / "queries.jsonl")
    model = ("--model", root / "model", "--batch-size", "8", "--max-length", "128")
    for seed in ("0", "1"):
        done = invoke("attribute", "--method", "ekfac", *rows, *model, "--out", tmp_path / seed, "--seed", seed)
        assert done.exit_code == 0, done.output
    fitted = invoke("fit", "--train", root / "train.jsonl", *model, "--run", tmp_path / "run", "--seed", "1")
    assert fitted.exit_code == 0, fitted.output
    assert invoke("scores", "--run", tmp_path / "run", "--queries", root / "queries.jsonl").exit_code == 0
    by_seed = {seed: load_file(str(tmp_path / seed / "scores.safetensors"))["total"] for seed in ("0", "1")}
    run = load_file(str(tmp_path / "run" / "scores" / "scores.safetensors"))["total"]
    torch.testing.assert_close(by_seed["1"], run, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(by_seed["0"], by_seed["1"], rtol=1e-3)
    empirical = invoke(
        "attribute", "--method", "ekfac", *rows, *model, "--out", tmp_path / "e", "--fisher", "empirical"
    )
    assert empirical.exit_code == 0, empirical.output
    assert json.loads((tmp_path / "e" / "config.json").read_text())["attribution"]["fisher"] == "empirical"


def test_index_resumes_from_finished_shards(workspace):
    root = workspace
    assert invoke(*fit_args(root, "resume")).exit_code == 0
    assert invoke("index", "--run", root / "resume", "--shard-size", "8").exit_code == 0
    folder = root / "resume" / "index"
    kept = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    (folder / "index.json").unlink()
    (folder / "shard-00002.safetensors").unlink()  # as if interrupted during the last shard
    result = invoke("index", "--run", root / "resume", "--shard-size", "8")
    assert result.exit_code == 0 and "1 shard written now" in result.output
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == kept


def test_errors_name_the_culprit(workspace, tmp_path):
    root = workspace
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    result = invoke("fit", "--train", bad, "--model", root / "model", "--run", tmp_path / "r")
    assert (
        result.exit_code == 2
        and "bad.jsonl" in result.output
        and "line 2" in result.output
        and "completion" in result.output
    )

    missing = invoke("fit", "--train", root / "train.jsonl", "--model", tmp_path / "nope", "--run", tmp_path / "r")
    assert missing.exit_code == 2 and "nope" in missing.output

    assert invoke(*fit_args(root, "check")).exit_code == 0
    changed = tmp_path / "model2"
    save_tiny(changed, arch="gpt2", seed=1)  # same architecture and tokenizer, other weights
    config_path = root / "check" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"] = str(changed)
    config_path.write_text(json.dumps(config))
    result = invoke("scores", "--run", root / "check", "--queries", root / "queries.jsonl")
    assert result.exit_code == 2 and "model weights" in result.output
    assert f"(in {changed}) changed since this run was made" in " ".join(result.output.split())  # the folder named

    other = invoke(*fit_args(root, "check")[:-4], "--batch-size", "4", "--max-length", "128", "--strategy", "kfac")
    assert other.exit_code == 2 and "other settings" in other.output


def test_errors_print_long_paths_whole_and_brackets_verbatim(workspace, tmp_path):
    """An error naming a long path with brackets in it prints that path on one line, as it is (CI once
    failed when rich wrapped a long tmp path across lines and parsed ``[...]`` as markup)."""
    folder = tmp_path / ("a-folder-with-a-long-name-" * 4 + "[bold]")
    folder.mkdir()
    bad = folder / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    result = invoke("fit", "--train", bad, "--model", workspace / "model", "--run", tmp_path / "r")
    assert result.exit_code == 2 and str(bad) in result.output


@pytest.mark.parametrize("strategy,option", [("cg", "max_iter=300"), ("arnoldi", "rank=16")])
def test_operator_strategies_through_run_directories(workspace, strategy, option):
    """cg is re-attached to the model and training rows when a run is reopened; arnoldi loads its eigenpairs."""
    root = workspace
    run = root / f"run-{strategy}"
    args = fit_args(root, run.name)
    args[args.index("--batch-size") + 1] = "10"
    fitted = invoke(*args, "--strategy", strategy, "--strategy-option", option, "--include", r"h\.1\.mlp\.c_proj")
    assert fitted.exit_code == 0, fitted.output
    saved = json.loads((run / "factors" / "curvature.json").read_text())
    key, value = option.split("=")
    assert saved["options"][key] == int(value)
    result = invoke("scores", "--run", run, "--queries", root / "queries.jsonl")
    assert result.exit_code == 0, result.output


def test_run_made_before_a_setting_existed_is_reused(workspace):
    """A config.json without settings added later (they take their defaults) still matches."""
    root = workspace
    assert invoke(*fit_args(root, "older")).exit_code == 0
    path = root / "older" / "config.json"
    config = json.loads(path.read_text())
    del config["attribution"]["normalize"], config["attribution"]["strategy_options"]
    path.write_text(json.dumps(config))
    again = invoke(*fit_args(root, "older"))
    assert again.exit_code == 0 and "reused" in again.output, again.output


@pytest.mark.parametrize("mode", [["--lora-target", "c_attn", "--lora-rank", "2"], ["--full"]])
def test_finetune_command_trains_then_reuses(workspace, mode):
    out = workspace / f"finetune{len(mode)}"
    args = [
        "finetune",
        "--train",
        workspace / "train.jsonl",
        "--model",
        workspace / "model",
        "--out",
        out,
        "--epochs",
        "2",
        "--max-length",
        "128",
        "--device",
        "cpu",
        *mode,
    ]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "trained" in first.output and "2 checkpoints" in first.output
    assert (out / ("model" if mode == ["--full"] else "adapter")).is_dir()
    assert (out / "checkpoints" / "epoch-2" / "trainer_state.json").is_file()
    again = invoke(*args)
    assert again.exit_code == 0 and "reused" in again.output


def test_a_diverged_finetune_exits_1_and_a_finite_one_0(workspace):
    """userK: a fine-tuning whose loss went NaN (every later score NaN) exited 0 after its warning, so a script went on
    to attribute it. It is kept as configured (a rerun reuses it) and exits 1, naming the epoch and what to change."""
    args = ["finetune", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--out",
            workspace / "ft-nan", "--epochs", "2", "--full", "--device", "cpu"]  # fmt: skip
    for attempt in ("trained", "reused"):
        result = invoke(*args, "--learning-rate", "10000")
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and attempt in said, result.output
        assert "error: the fine-tuning diverged (the mean loss of epoch 1 is not finite)" in said
        assert "lower the learning rate (--learning-rate), and rerun with --overwrite" in said
    fine = invoke(*args, "--learning-rate", "0.001", "--overwrite")
    assert fine.exit_code == 0 and "error:" not in fine.output, fine.output


def test_a_finetune_whose_last_step_made_the_weights_nan_exits_1(workspace, nan_last_step):
    """reviewU: the divergence exit read the epochs' mean losses only, so a fine-tuning whose last step (after its
    last, finite, loss) overflowed exited 0 with NaN weights. One step here (20 rows, one batch, one epoch), made to
    leave NaN weights; a rerun that reuses the saved run exits 1 too."""
    args = ["finetune", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--out",
            workspace / "ft-last-step", "--epochs", "1", "--batch-size", "20", "--full", "--device", "cpu"]  # fmt: skip
    for attempt in ("trained", "reused"):
        result = invoke(*args)
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and attempt in said, result.output
        assert "error: the fine-tuning diverged in its last step (every mean loss is finite): 1 parameter(s)" in said


def test_ctrl_c_says_the_work_is_kept_and_the_same_command_goes_on(workspace, monkeypatch):
    """userK: Ctrl-C in `finetune` ended in click's bare "Aborted!" (exit 1). It says what is kept and that the same
    command goes on (exit 130, as a shell reports SIGINT), and the same command resumes after the finished epoch."""
    import wherefrom.models.finetune as module

    real, steps = module.per_example_loss, []

    def interrupted_at_step_5(*args, **kwargs):
        steps.append(1)
        if len(steps) == 5:  # 3 steps an epoch: epoch 1 is finished
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    args = ["finetune", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--out",
            workspace / "ft-ctrl-c", "--epochs", "2", "--full", "--device", "cpu"]  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(module, "per_example_loss", interrupted_at_step_5)
        stopped = invoke(*args)
    said = " ".join(stopped.output.split())
    assert stopped.exit_code == 130 and "Traceback" not in stopped.output, stopped.output
    assert "interrupted: the work already written is kept" in said and "the same command run again goes on" in said
    again = invoke(*args)
    assert again.exit_code == 0 and "resumed an interrupted identical run after epoch 1" in again.output, again.output


def test_finetune_command_names_bad_input(workspace):
    result = invoke(
        "finetune",
        "--train",
        workspace / "missing.jsonl",
        "--model",
        workspace / "model",
        "--out",
        workspace / "ft-bad",
        "--device",
        "cpu",
    )
    assert result.exit_code == 2 and "missing.jsonl" in result.output
    result = invoke(
        "finetune",
        "--train",
        workspace / "train.jsonl",
        "--model",
        workspace / "model",
        "--out",
        workspace / "ft-bad",
        "--epochs",
        "0",
        "--device",
        "cpu",
    )
    assert result.exit_code == 2 and "epochs" in result.output


def layout_warnings(*args) -> tuple[object, list[str]]:
    """``invoke(*args)`` and the messages of the LayoutMismatch warnings it gave."""
    from wherefrom.models.finetune import LayoutMismatch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(*args)
    return result, [" ".join(str(w.message).split()) for w in caught if issubclass(w.category, LayoutMismatch)]


def test_fit_and_attribute_take_the_fine_tunings_layout_and_warn_when_it_differs(workspace, tmp_path):
    """userA: `finetune --no-eos` (or `--template`, `--truncate`, ...) made an adapter that `fit` and `attribute`
    attributed with the EOS appended, without a word: they took no layout flags. They take them now, and warn
    (LayoutMismatch, naming each setting and its flag) when the fine-tuning recorded another layout."""
    template = "q {prompt} a {completion}"
    tuned = tmp_path / "ft"
    made = invoke(
        "finetune", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--lora-target", "c_attn",
        "--out", tuned, "--epochs", "1", "--max-length", "128", "--no-eos", "--template", template,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    common = ["--train", workspace / "train.jsonl", "--model", workspace / "model", "--adapter", tuned / "adapter"]
    plain, said = layout_warnings("fit", *common, "--run", tmp_path / "plain", "--strategy", "identity")
    assert plain.exit_code == 0 and len(said) == 1, plain.output
    assert "append_eos False there, True here (--no-eos)" in said[0] and "(--template)" in said[0]
    matched = [*common, "--max-length", "128", "--no-eos", "--template", template]
    fitted, said = layout_warnings("fit", *matched, "--run", tmp_path / "matched", "--strategy", "identity")
    assert fitted.exit_code == 0 and said == [], fitted.output
    recorded = json.loads((tmp_path / "matched" / "config.json").read_text())
    assert recorded["attribution"]["append_eos"] is False and recorded["attribution"]["template"] == template
    queries = ["--queries", workspace / "queries.jsonl"]
    attributed, said = layout_warnings("attribute", "--method", "gradsim", *matched, *queries, "--out", tmp_path / "a")
    assert attributed.exit_code == 0 and said == [], attributed.output
    other, said = layout_warnings("attribute", "--method", "gradsim", *common, *queries, "--out", tmp_path / "b")
    assert other.exit_code == 0 and len(said) == 1, other.output
    # reviewZ: bm25 reads no layout setting (given, --no-eos is refused): nothing to warn of
    lexical, said = layout_warnings("attribute", "--method", "bm25", *common, *queries, "--out", tmp_path / "c")
    assert lexical.exit_code == 0 and said == [], lexical.output


def test_query_splits_over_tokens_only_an_influence_runs_scores(workspace, tmp_path):
    """reviewY: `query --html` on a repsim run ended in a KeyError (the view splits each score over tokens from
    influence gradients); --per-token was refused by name. Both are now, before any scoring."""
    fitted = invoke("fit", *["--train", workspace / "train.jsonl", "--model", workspace / "model"],
                    "--run", tmp_path / "r", "--method", "repsim")  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    for flags in (["--html", tmp_path / "q.html"], ["--per-token"], ["--per-token", "--html", tmp_path / "q.html"]):
        result = invoke("query", "a ->", " b", "--run", tmp_path / "r", *flags)
        said = " ".join(result.output.split())
        verb = "needs" if len([f for f in flags if str(f).startswith("--")]) == 1 else "need"
        assert result.exit_code == 2 and f"{verb} an influence method's gradients" in said, result.output
        assert "this run holds 'repsim'" in said and not (tmp_path / "q.html").exists()


def test_attribute_names_every_file_it_would_replace(workspace, tmp_path):
    """userC: the refusal to replace earlier scores named scores.safetensors and scores.json, not scores.top.csv,
    which --overwrite replaces too."""
    rows = ["--train", workspace / "train.jsonl", "--queries", workspace / "queries.jsonl"]
    common = ["attribute", "--method", "gradsim", *rows, "--model", workspace / "model", "--out", tmp_path / "a"]
    assert invoke(*common).exit_code == 0
    refused = invoke(*common, "--top-k", "3", "--prefilter", "5")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "earlier results would be overwritten" in said, refused.output
    for name in ("scores.safetensors", "scores.json", "scores.top.csv"):
        assert str(tmp_path / "a" / name) in said, name


def test_methods_table_keeps_each_name_on_one_line():
    """userC: into a pipe the table took 80 columns and folded `gradsim-cosine` into `gradsim-cosin` / `e`, so
    `wherefrom methods | grep gradsim-cosine` found nothing."""
    from wherefrom.methods.registry import METHODS

    listed = invoke("methods")
    assert listed.exit_code == 0
    for name, spec in METHODS.items():
        assert re.search(rf"│ {re.escape(name)} +│ {re.escape(spec.family)} +│", listed.stdout), name


@pytest.mark.parametrize(("lost", "records"), [("manifest.json", "the model and data"), ("config.json", "the run's")])
def test_a_run_that_lost_its_manifest_is_named_by_every_command(workspace, lost, records):
    """userM: a finished run without manifest.json (the fingerprints its results were made with) was "not a wherefrom
    run directory; run `wherefrom fit` first" to fit itself, and "unfinished: finish it with replay" to report, whose
    replay refused it again: no command led anywhere. Each names the lost file and what to do; a lost config.json
    alike (report said "not a result wherefrom can report on")."""
    run = workspace / f"lost-{lost}"
    assert invoke(*fit_args(workspace, run)).exit_code == 0
    (run / lost).unlink()
    (kept,) = {"manifest.json", "config.json"} - {lost}
    for args in (fit_args(workspace, run), ["replay", run], ["report", run], ["scores", "--run", run]):
        result = invoke(*args, *(["--queries", workspace / "queries.jsonl"] if args[0] == "scores" else []))
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "Traceback" not in said, (args, result.output)
        assert (
            f"{run} holds a run's results (factors/) and its {kept} but not its {lost}, which records {records}" in said
        )
        assert f"restore {lost}, or delete {run} to fit the run again" in said
    assert not (run / lost).exists()  # nothing written in its place
