"""What the commands write and print: earlier results are never replaced silently."""

from __future__ import annotations

import collections
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from tests.cli.conftest import invoke
from wherefrom.cli import app
from wherefrom.cli.app import COMMANDS, stdout_closed

runner = CliRunner()


def attribute_args(root, out, *extra, method="gradsim"):
    return [
        "attribute",
        "--method",
        method,
        "--train",
        root / "train.jsonl",
        "--queries",
        root / "queries.jsonl",
        "--model",
        root / "model",
        *(["--max-length", "128"] if method != "bm25" else []),  # bm25 reads none: refused (test_settings_read.py)
        "--out",
        out,
        *extra,
    ]


def test_scores_refuses_to_replace_a_score_set_of_other_queries_unless_overwrite(workspace):
    run = workspace / "overwrite-run"
    fitted = invoke(
        "fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run, "--max-length", "128"
    )
    assert fitted.exit_code == 0, fitted.output
    first = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl", "--top-k", "2")
    assert first.exit_code == 0, first.output
    with (run / "scores" / "scores.top.csv").open() as handle:  # --top-k of each end (it kept 10)
        kept = collections.Counter(
            (row["query_id"], row["kind"] in ("proponent", "highest")) for row in csv.DictReader(handle)
        )
    assert len(kept) == 2 * len((workspace / "queries.jsonl").read_text().splitlines()) and set(kept.values()) == {2}
    saved = run / "scores" / "scores.safetensors"
    same = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl")
    assert same.exit_code == 0 and "replaced the earlier scores of the same query rows" in same.stderr
    rows = [json.loads(line) for line in (workspace / "queries.jsonl").read_text().splitlines()]
    rows[0]["completion"] += " more"  # the same ids, another row: not the same query rows
    (workspace / "edited.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = saved.stat().st_mtime_ns
    edited = invoke("scores", "--run", run, "--queries", workspace / "edited.jsonl")
    assert edited.exit_code == 2 and "--overwrite" in edited.output and "query_fingerprint: recorded" in edited.output
    assert saved.stat().st_mtime_ns == before
    (workspace / "two.jsonl").write_text("\n".join((workspace / "queries.jsonl").read_text().splitlines()[:2]) + "\n")
    before = saved.stat().st_mtime_ns
    other = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl")
    assert other.exit_code == 2 and "--overwrite" in other.output and str(saved) in other.output
    assert "query_ids: recorded" in other.output and saved.stat().st_mtime_ns == before
    replaced = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert invoke("index", "--run", run).exit_code == 0  # the same queries, now scored from the index
    before = saved.stat().st_mtime_ns
    indexed = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl")
    assert indexed.exit_code == 2 and "--overwrite" in indexed.output and saved.stat().st_mtime_ns == before
    assert "provenance.train_side: recorded 'recomputed', now 'index'" in " ".join(indexed.output.split())
    assert invoke("scores", "--run", run, "--queries", workspace / "two.jsonl", "--overwrite").exit_code == 0
    again = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl")  # the same index: recomputed in place
    assert again.exit_code == 0 and "replaced the earlier scores of the same query rows" in again.stderr
    shutil.copytree(run / "index", workspace / "kept-index")
    shutil.rmtree(run / "index")
    assert invoke("index", "--run", run, "--dtype", "bfloat16").exit_code == 0  # another index: named by its dtype
    rebuilt = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl")
    said = " ".join(rebuilt.output.split())
    assert rebuilt.exit_code == 2 and "provenance.dtype: recorded 'float32', now 'bfloat16'" in said, said
    assert "provenance.store" not in said, said  # not its digest beside it
    shutil.rmtree(run / "index")
    shutil.copytree(workspace / "kept-index", run / "index")
    record = run / "scores" / "scores.json"
    for older in ("dtype", "provenance"):  # sets of older versions: another layout, or no provenance at all
        saved_json = json.loads(record.read_text())
        saved_json["provenance"].pop("index_options") if older == "dtype" else saved_json.pop("provenance")
        record.write_text(json.dumps(saved_json))
        rerun = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl")
        assert rerun.exit_code == 0 and "replaced the earlier scores" in rerun.stderr, rerun.output
    record.unlink()  # a set whose writer was killed before its .json (written last): unfinished, not refused
    unfinished = invoke("scores", "--run", run, "--queries", workspace / "edited.jsonl")
    assert unfinished.exit_code == 0 and "replaced the earlier" not in unfinished.stderr, unfinished.output
    assert json.loads(record.read_text())["query_fingerprint"] != saved_json.get("query_fingerprint")
    assert invoke("scores", "--run", run, "--queries", workspace / "two.jsonl", "--overwrite").exit_code == 0
    shard = run / "index" / "shard-00000.safetensors"
    intact = shard.read_bytes()
    for damage in ("truncated", "missing"):  # a damaged index is named with the command that rebuilds it
        shard.write_bytes(intact[:-100]) if damage == "truncated" else shard.unlink()
        damaged = invoke("scores", "--run", run, "--queries", workspace / "two.jsonl")
        said = " ".join(damaged.output.split())
        assert damaged.exit_code == 2 and "; rebuild the store: rerun `wherefrom index --run" in said, said
        assert said.count("rebuild") == 1, said  # the store's own advice is not repeated before the run's command
    assert invoke("index", "--run", run).exit_code == 0  # as the hint says (the run is shared with later tests)


def test_attribute_refuses_to_replace_scores_of_other_settings_unless_overwrite(workspace):
    out = workspace / "overwrite-attribute"
    first = invoke(*attribute_args(workspace, out, method="diagonal"))
    assert first.exit_code == 0, first.output
    assert invoke(*attribute_args(workspace, out, method="diagonal")).exit_code == 0  # the same settings: recomputed
    other = invoke(*attribute_args(workspace, out, "--damping", "0.5", method="diagonal"))
    assert other.exit_code == 2 and "--overwrite" in other.output and "scores.safetensors" in other.output
    assert "attribution.damping: recorded None, now 0.5" in other.output
    assert invoke(*attribute_args(workspace, out, "--damping", "0.5", "--overwrite", method="diagonal")).exit_code == 0
    replayed = invoke("replay", out)
    assert replayed.exit_code == 0, replayed.output


def test_attribute_refuses_to_replace_scores_of_edited_rows_under_the_same_paths(workspace, tmp_path):
    """``attribute`` records the rows' fingerprints, not only their paths: the query file edited in place (same
    ids) is other inputs, refused unless --overwrite; the training file too."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "model").symlink_to(workspace / "model")
    for name in ("train.jsonl", "queries.jsonl"):
        (root / name).write_text((workspace / name).read_text())
    out = root / "out"
    assert invoke(*attribute_args(root, out)).exit_code == 0
    saved = (out / "scores.safetensors").stat().st_mtime_ns
    for name, field in (("queries.jsonl", "query_fingerprint"), ("train.jsonl", "train_fingerprint")):
        rows = [json.loads(line) for line in (root / name).read_text().splitlines()]
        rows[0]["completion"] += " more"
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        edited = invoke(*attribute_args(root, out))
        assert edited.exit_code == 2 and f"{field}: recorded" in edited.output, edited.output
        # userI: the refusal named two digests only; it names the file whose rows changed
        clause = " ".join(edited.output.split()).split("(the rows of ")[-1]  # the queries stay edited: both, then
        assert str(root / name) in clause and clause.endswith("were edited since these results were made)"), clause
        assert (out / "scores.safetensors").stat().st_mtime_ns == saved
    assert invoke(*attribute_args(root, out, "--overwrite")).exit_code == 0
    # userI: replay gave the recorded --overwrite back, so the scores of queries edited since were replaced without a
    # word; it is not replayed (replay's own --overwrite replaces: the refusal's advice is a flag replay takes)
    (root / "queries.jsonl").write_text((workspace / "queries.jsonl").read_text())
    saved = (out / "scores.safetensors").stat().st_mtime_ns
    replayed = invoke("replay", out)
    assert replayed.exit_code == 2 and "query_fingerprint: recorded" in replayed.output, replayed.output
    said = " ".join(replayed.output.split())
    assert "pass --overwrite" in said and (out / "scores.safetensors").stat().st_mtime_ns == saved
    assert invoke("replay", out, "--overwrite").exit_code == 0
    assert (out / "scores.safetensors").stat().st_mtime_ns != saved


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


def test_scores_and_attribute_print_results_with_labels_on_stdout(workspace):
    out = workspace / "printed-attribute"
    result = invoke(*attribute_args(workspace, out, "--top-k", "2"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("test-000") for line in lines)
    assert "[" in lines[0] and "] (+" in lines[0]  # each proponent with its label and score
    assert "scores ->" in result.stderr and "scores ->" not in result.stdout


def test_attribute_saves_the_strategy_the_method_ran_with(workspace):
    for method, strategy, max_length in (("gradsim", "identity", 128), ("repsim", None, 128), ("bm25", None, 512)):
        out = workspace / f"saved-{method}"
        result = invoke(*attribute_args(workspace, out, method=method))
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "config.json").read_text())["attribution"]
        assert saved.get("strategy") == strategy and saved["max_length"] == max_length


def test_query_tables_at_80_columns_name_lowest_scores_and_keep_module_names_whole(workspace):
    from wherefrom.cli.run import short_names, table_title

    names = [f"base_model.model.model.layers.{i}.self_attn.{p}.lora_A.default" for i in (0, 12) for p in "qv"]
    assert short_names(names)[names[1]] == "0.self_attn.v" and short_names(names[:1]) == {names[0]: names[0]}
    report = {"strategy": "ekfac", "sign": "s", "opponents": [{"score": -1.0}, {"score": 2.0}]}
    assert table_title(report, "opponents").startswith("lowest scores (1 of 2 >= 0")
    report["opponents"] = [{"score": -1.0}]
    assert table_title(report, "opponents") == "opponents (ekfac; s)"
    run = workspace / "overwrite-run"
    if not run.exists():
        test_scores_refuses_to_replace_a_score_set_of_other_queries_unless_overwrite(workspace)
    result = runner.invoke(
        app, ["query", "Determine the rule: a b -> b a\nRule:", " reverse", "--run", str(run)], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "1.attn.c_attn" in result.stdout and "transformer.h" not in result.stdout
    wide = runner.invoke(
        app, ["query", "Determine the rule: a b -> b a\nRule:", " reverse", "--run", str(run)], env={"COLUMNS": "250"}
    )
    assert re.search(r"Rule: -> +[a-z]", wide.stdout)  # each row's prompt, then its completion


def test_demo_tables_into_a_file_are_not_folded_at_80_columns(monkeypatch, capsys):
    """`wherefrom demo > out.txt` printed its table and its example line on a default rich console: 80 columns
    into a file, so a proponent's labels and the example row were folded over lines. The CLI now gives the demo
    the console `query` uses (:func:`wherefrom.cli.app.stdout_console`)."""
    import wherefrom.studies.demo as demo

    line = "example: " + "a long proponent row " * 10

    def printed(console=None, **_settings):
        console.print(line, markup=False)
        return {}

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(demo, "run_demo", printed)
    app(["demo", "--n-train", "8"], standalone_mode=False)
    assert line in capsys.readouterr().out.splitlines()


def test_query_tables_into_a_file_keep_long_ids_whole(monkeypatch, capsys):
    """`wherefrom query ... > out.txt`: rich took 80 columns where stdout is no terminal and folded a long id over
    two lines (`emotion-train-00` / `03`), so the file could not be searched for it."""
    from wherefrom.cli.run import print_report

    monkeypatch.delenv("COLUMNS", raising=False)
    long_id = "emotion-train-" + "0" * 50 + "3"
    entry = {"id": long_id, "score": 1.5, "label": "joy", "prompt": "p " * 60, "completion": " c", "top_modules": []}
    print_report({"strategy": "ekfac", "sign": "s", "proponents": [entry], "opponents": [{**entry, "score": -1.0}]})
    assert capsys.readouterr().out.count(long_id) == 2


def test_help_reflows_each_paragraph_to_the_terminal(workspace):
    result = runner.invoke(app, ["diagnose", "--help"], env={"COLUMNS": "200"})
    assert "the exact GGN is formed. Every method and the exact reference use one absolute damping" in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_prints_its_help_with_brackets_as_written(name):
    """``wherefrom CMD --help`` for every command: exit 0, text in square brackets shown as written (rich once
    took the ``[/INST]`` in the template setting's help for a closing tag: bench, ablate and finetune failed)."""
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    if name == "bench":
        assert "[INST] {prompt} [/INST]" in result.stdout


def test_paths_ids_and_tokens_with_brackets_print_as_written(workspace, tmp_path):
    """Run folders, row ids, labels and tokens are data, not rich markup: with ``[/...]`` and ``[bold]`` in
    them, fit, index, scores and query (table and per-token lines) exit 0 and print them as they are."""
    from wherefrom.core.data import load_records
    from wherefrom.studies.generated import write_jsonl

    rows = [replace(row, id=f"[/INST]row-{i}[bold]") for i, row in enumerate(load_records(workspace / "train.jsonl"))]
    train = tmp_path / "train.jsonl"
    write_jsonl(rows, train)
    run = tmp_path / "[/b]run[i]"
    common = ["--max-length", "128"]
    fitted = invoke("fit", "--train", train, "--model", workspace / "model", "--run", run, "--with-index", *common)
    assert fitted.exit_code == 0, fitted.output
    assert f"-> {run / 'factors'}" in fitted.output and f"-> {run / 'index'}" in fitted.output
    scored = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl")
    assert scored.exit_code == 0, scored.output
    assert "[/INST]row-" in scored.stdout and str(run / "scores") in scored.output
    queried = runner.invoke(
        app, ["query", "[/INST] a b -> b a\nRule:", " [/x]", "--run", str(run), "--per-token"], env={"COLUMNS": "250"}
    )
    assert queried.exit_code == 0, queried.output
    assert "[/INST]row-" in queried.stdout
    assert re.search(r"\[bold\] \((proponent|highest|opponent|lowest)\) by its tokens:", queried.stdout)


def test_scores_travel_with_labels_as_a_table_and_a_top_k_csv(workspace):
    from wherefrom.core.data import load_records
    from wherefrom.core.scoring import TOP_COLUMNS, ScoreTable, load_score_table, load_scores

    out = workspace / "table-attribute"
    assert invoke(*attribute_args(workspace, out, "--top-k", "4")).exit_code == 0
    labels = {row.id: row.label for row in load_records(workspace / "train.jsonl")}
    table = load_score_table(out, as_frame=False)
    assert isinstance(table, ScoreTable) and table.labels == [labels[i] for i in table.train_ids]
    scores = load_scores(out, "scores")
    assert table.query_ids == scores.query_ids and table.total.equal(scores.total)
    with (out / "scores.top.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == TOP_COLUMNS and len(rows) == 1 + 3 * 2 * 4
    first = rows[1]
    assert first[:3] == ["test-0000", "proponent", "1"] and first[4] == labels[first[3]]
    assert float(first[5]) == pytest.approx(scores.top(0, 1)[0][1], rel=1e-6)
    assert {row[1] for row in rows[1:]} <= {"proponent", "highest", "opponent", "lowest"}
    run = workspace / "overwrite-run"
    if not run.exists():
        test_scores_refuses_to_replace_a_score_set_of_other_queries_unless_overwrite(workspace)
    in_run = load_score_table(run / "scores", as_frame=False)
    assert in_run.labels == [labels[i] for i in in_run.train_ids] and (run / "scores" / "scores.top.csv").is_file()
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_score_table(out, "nope")


def test_score_table_as_a_pandas_frame(workspace):
    pytest.importorskip("pandas", reason="pandas is not installed (optional)")
    from wherefrom.core.scoring import load_score_table

    out = workspace / "table-attribute"
    if not out.exists():
        assert invoke(*attribute_args(workspace, out)).exit_code == 0
    frame = load_score_table(out)
    assert frame.index.name == "train_id" and list(frame.columns[1:]) == ["test-0000", "test-0001", "test-0002"]
    assert frame["label"].notna().all()


def diagnose_args(workspace) -> list:
    """``diagnose`` of one small module of the workspace's tiny GPT-2 (``--out`` left to the caller)."""
    return [
        "diagnose",
        "--train",
        workspace / "train.jsonl",
        "--queries",
        workspace / "queries.jsonl",
        "--model",
        workspace / "model",
        "--max-length",
        "128",
        "--methods",
        "gradsim",
        "--include",
        "h\\.1\\.attn\\.c_proj",
    ]


def test_diagnose_refused_after_it_recorded_itself_leaves_no_output_folder(workspace, monkeypatch):
    """``diagnose`` made ``--out`` before recording itself there (as ``bench`` and ``groundtruth`` did), so a refusal
    of the diagnosis (a data error of a method, say) left an empty folder; the record makes it now."""
    import wherefrom.studies.diagnose as module
    from wherefrom.core.data import DataError

    def refused(*_args, **_kwargs):
        raise DataError("refused by the diagnosis")

    monkeypatch.setattr(module, "diagnose", refused)
    args = diagnose_args(workspace)
    result = invoke(*args, "--out", workspace / "diag-refused")
    assert result.exit_code == 2 and "refused by the diagnosis" in result.output, result.output
    assert not (workspace / "diag-refused").exists()


def test_diagnose_predicts_the_exact_reference_memory_and_stops_before_work_when_over(workspace):
    args = diagnose_args(workspace)
    over = runner.invoke(
        app, [str(a) for a in [*args, "--out", workspace / "diag-over"]], env={"WHEREFROM_MEMORY_LIMIT": "1KiB"}
    )
    assert over.exit_code == 2 and "the exact reference would need" in over.output and "--include" in over.output
    assert not (workspace / "diag-over").exists()
    fits = invoke(*args, "--out", workspace / "diag")
    assert fits.exit_code == 0, fits.output
    assert re.search(r"exact reference \(full GGN\): [\d,]+ bytes .* predicted; memory limit", fits.stderr)
    report = json.loads((workspace / "diag" / "diagnose.json").read_text())
    assert report["rows"][0]["damping"] > 0


def test_attribute_takes_an_option_given_at_its_default_as_the_same_setting(workspace):
    """``--option`` at the method's default (or a setting option at the flag's value) recomputes in place; an
    ``attribute`` folder recorded with only the options given counts the others as their defaults."""
    out = workspace / "default-attribute"
    logra = ["--option", "dim_out=8"]
    first = invoke(*attribute_args(workspace, out, *logra, method="logra"))
    assert first.exit_code == 0, first.output
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["options"] == {
        "dim_in": 16,
        "dim_out": 8,
        "kind": "gaussian",
        "curvature": True,
        "strategy": "exact",
    }
    again = invoke(
        *attribute_args(
            workspace, out, *logra, "--option", "dim_in=16", "--option", "damping_factor=0.1", method="logra"
        )
    )
    assert again.exit_code == 0, again.output
    before = {"dim_out": 8, "damping_factor": 0.1}  # as recorded before: the options given, setting options too
    (out / "config.json").write_text(json.dumps({**recorded, "options": before}))
    assert invoke(*attribute_args(workspace, out, *logra, method="logra")).exit_code == 0
    other = invoke(*attribute_args(workspace, out, *logra, "--option", "dim_in=4", method="logra"))
    assert other.exit_code == 2 and "options.dim_in: recorded 16, now 4" in other.output, other.output


def test_attribute_compares_an_older_record_with_its_defaults_in_json_form(workspace):
    """An ``attribute`` record from before options were recorded in full is given the defaults it left out in
    JSON form: tracin's default ``dtype`` (a ``torch.dtype``, recorded as ``"torch.float32"``) matches it."""
    from wherefrom.models.tiny import save_tiny

    checkpoint = workspace / "tracin-checkpoint"
    save_tiny(checkpoint, arch="gpt2", seed=1)
    out = workspace / "older-tracin"
    tracin = ["--option", f"checkpoints={json.dumps([str(checkpoint)])}", "--option", "learning_rates=[0.001]"]
    first = invoke(*attribute_args(workspace, out, *tracin, method="tracin"))
    assert first.exit_code == 0, first.output
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["options"]["dtype"] == "torch.float32"
    older = {"checkpoints": recorded["options"]["checkpoints"], "learning_rates": [0.001]}
    (out / "config.json").write_text(json.dumps({**recorded, "options": older}))
    again = invoke(*attribute_args(workspace, out, *tracin, method="tracin"))
    assert again.exit_code == 0, again.output
    (out / "config.json").write_text(json.dumps({**recorded, "options": ["not", "an", "object"]}))
    malformed = invoke(*attribute_args(workspace, out, *tracin, method="tracin"))  # refused, not a traceback
    assert malformed.exit_code == 2 and "options: recorded ['not', 'an', 'object']" in malformed.output, (
        malformed.output
    )


def test_a_write_the_system_refuses_is_one_error_line_in_any_command(workspace, monkeypatch):
    """A write that failed with an OSError the command did not list (a full disk, here a file where the scores folder
    belongs), or a memory refusal, ended `scores` (and `query`) in a traceback, exit 1: each command caught its own
    list of kinds. Now any command ends with one line naming the file or the refusal, exit 2, and what was there is
    left."""

    def last_line(result):
        return result.output.replace("\r", "\n").strip().splitlines()[-1]

    run = workspace / "refused-write-run"
    fitted = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run)
    assert fitted.exit_code == 0, fitted.output
    (run / "scores").write_text("not a folder")
    refused = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert last_line(refused).startswith("error: ") and str(run / "scores") in last_line(refused)
    assert (run / "scores").read_text() == "not a folder"
    (run / "scores").unlink()
    monkeypatch.setenv("WHEREFROM_MEMORY_LIMIT", "1000")  # a memory refusal: a traceback in scores and query too
    for args in (("scores", "--run", run, "--queries", workspace / "queries.jsonl"), ("query", "--run", run, "a", "b")):
        refused = invoke(*args)
        assert refused.exit_code == 2 and last_line(refused).startswith("error: scoring would allocate"), args
    monkeypatch.delenv("WHEREFROM_MEMORY_LIMIT")
    out = workspace / "refused-write-out"
    out.write_text("not a folder")
    refused = invoke(*attribute_args(workspace, out / "inside"))
    assert refused.exit_code == 2 and last_line(refused).startswith("error: ") and str(out) in last_line(refused)


def test_error_lines_show_values_as_given_not_as_emoji(tmp_path):
    """rich replaced ``:smile:`` in an error line with an emoji, naming a path that was not the one given (found by a
    new-user trial); error lines and notes are printed verbatim."""
    result = invoke("fit", "--train", tmp_path / "a:smile:b.jsonl", "--model", tmp_path / "m", "--run", tmp_path / "r")
    assert result.exit_code == 2 and "a:smile:b.jsonl: no such file" in result.output, result.output
    result = invoke("fit", "--train", tmp_path / "t.jsonl", "--run", tmp_path / "r", "--device", "cuda:x:")
    assert result.exit_code == 2 and "--device cuda:x:" in result.output, result.output


def test_an_output_folder_that_is_a_file_is_named_before_any_work(workspace, tmp_path, monkeypatch):
    """`attribute --out FILE` loaded the model, ran the method and then failed naming `FILE/config.json: File
    exists`; `fit --run FILE` and `finetune --out FILE` ended with a bare `[Errno 17] File exists`. A folder
    setting naming a file, or a path under one, is refused before anything loads; `report --out` (an HTML file) and
    `evaluate --out` (a file stem) name files: a file there is replaced, only a file above them is refused."""
    import wherefrom.cli.attribute as attribute_module

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(attribute_module, "load_model", never)
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    train = workspace / "train.jsonl"
    for flag, args in (
        ("--out", attribute_args(workspace, blocker)),
        ("--run", ["fit", "--train", train, "--model", workspace / "model", "--run", blocker]),
        ("--out", ["finetune", "--train", train, "--model", workspace / "model", "--out", blocker]),
        ("--run", ["scores", "--run", blocker, "--queries", workspace / "queries.jsonl"]),
        ("--cache", ["demo", "--cache", blocker]),
    ):
        refused = invoke(*[str(a) for a in args])
        assert refused.exit_code == 2 and f"error: {flag} {blocker}: is a file, not a folder" in refused.output, args
    under = invoke(*attribute_args(workspace, blocker / "inside"))
    assert under.exit_code == 2 and f"--out {blocker / 'inside'}: {blocker} is a file, not a folder" in under.output
    assert blocker.read_text() == "kept"

    run = workspace / "report-run"
    assert invoke("fit", "--train", train, "--model", workspace / "model", "--run", run).exit_code == 0
    page = tmp_path / "page.html"
    page.write_text("")  # an empty file loses nothing
    assert invoke("report", run, "--out", page).exit_code == 0 and "<html" in page.read_text().lower()
    page.write_text(page.read_text().replace("</h1>", "</h1>an earlier report"))
    assert invoke("report", run, "--out", page).exit_code == 0 and "an earlier report" not in page.read_text()
    # a file wherefrom did not write was replaced by the page (and lost): refused, kept (evaluate's stem likewise)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "notes.md").write_text("# my notes, with a # wherefrom evaluate: line further down")
    for args, said in (
        (("report", run, "--out", notes), f"--out {notes}: is a file wherefrom did not write"),
        (("query", "--run", run, "ab:", " cd", "--html", notes), f"--html {notes}: is a file wherefrom did not write"),
        (("evaluate", run, "--out", tmp_path / "notes"), f"{tmp_path / 'notes.md'} is a file wherefrom did not write"),
    ):
        refused = invoke(*args)
        assert refused.exit_code == 2 and said in " ".join(refused.output.split()), refused.output
    assert notes.read_text() == "my notes" and (tmp_path / "notes.md").read_text().startswith("# my notes")
    refused = invoke("report", run, "--out", blocker / "page.html")
    assert refused.exit_code == 2 and f"{blocker} is a file, not a folder" in refused.output
    refused = invoke("evaluate", run, "--out", blocker / "stem")
    assert refused.exit_code == 2 and f"{blocker} is a file, not a folder" in refused.output
    # a file's setting that is a folder: refused first (report failed once the page was made: "Is a directory")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for args in (("report", run, "--out", folder), ("query", "--run", run, "ab:", " cd", "--html", folder)):
        refused = invoke(*args)
        assert refused.exit_code == 2 and f"{folder}: is a folder, not a file" in refused.output, refused.output
    # evaluate's --out is a stem (STEM.json, STEM.md): a file or a folder of that name is no problem of --out
    for stem in (blocker, folder):
        refused = invoke("evaluate", run, "--out", stem)  # refused for its ground truth alone
        assert refused.exit_code == 2 and "GROUNDTRUTH" in refused.output and "--out" not in refused.output
    (tmp_path / "stem.md").mkdir()  # one of the files it writes is a folder: refused before the evaluation
    refused = invoke("evaluate", run, "--out", tmp_path / "stem")
    assert refused.exit_code == 2 and f"{tmp_path / 'stem.md'} is a folder, not a file" in refused.output
    default = run / "report.html"  # report's default page: refused before the report is made too
    default.mkdir()
    refused = invoke("report", run)
    assert refused.exit_code == 2 and f"{default}: a folder is where this file belongs" in refused.output
    default.rmdir()


@pytest.mark.parametrize(
    ("folder", "command"),
    [
        ("index", ["index"]),
        ("index", ["query", "ab cd:", " ef", "--search", "exact"]),
        ("scores", ["scores", "--queries", "QUERIES"]),
        ("factors", ["scores", "--queries", "QUERIES"]),
        ("factors", ["fit", "--train", "TRAIN", "--model", "MODEL", "--max-length", "128"]),
        ("factors/stages", ["fit", "--train", "TRAIN", "--model", "MODEL", "--max-length", "128"]),
        ("scores", ["influence"]),
        ("scores", ["report", "RUN"]),  # it said "No scores yet: run `wherefrom scores`", which was then refused
    ],
)
def test_a_run_folder_that_is_a_file_is_named_before_the_model_loads(workspace, tmp_path, monkeypatch, folder, command):
    """A file where one of a run's folders belongs gave `[Errno 20] Not a directory: 'RUN/index/settings.json'`
    (index, `query --search`), failed after the query pass (scores/), or said "no fitted curvature; run `wherefrom
    fit` first", whose fit then failed (factors/). It is named, before the model loads, and kept."""
    import wherefrom.engine.run as run_module

    run = tmp_path / "run"
    train, model, queries = workspace / "train.jsonl", workspace / "model", workspace / "queries.jsonl"
    for args in (
        ("fit", "--train", train, "--model", model, "--run", run, "--max-length", "128"),
        ("scores", "--run", run, "--queries", queries),
    ):
        assert invoke(*args).exit_code == 0
    path = run / folder
    shutil.rmtree(path, ignore_errors=True)
    path.write_text("kept")

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_model", never)
    given = {"TRAIN": train, "MODEL": model, "QUERIES": queries}
    given["RUN"] = run
    result = invoke(*[given.get(a, a) for a in command], *([] if "RUN" in command else ["--run", run]))
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{path}: a file is where the run's folder belongs" in said, result.output
    assert path.read_text() == "kept"


def test_output_into_a_closed_pipe_ends_quietly():
    """`wherefrom scores ... | head -1`: once the reader has gone, the next write fails. A command failed with
    `error: [Errno 32] Broken pipe` (exit 2), while one printing through click ended silently (exit 1): now
    every command ends as click does, exit 1 and no message (its results are written before they are printed)."""
    command = [sys.executable, "-m", "wherefrom.cli", "methods", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command prints: it takes a second or more to start
    _, err = process.communicate(timeout=300)
    assert (process.returncode, err.decode()) == (1, "")


def test_stdout_closed_tells_a_pipe_without_reader(monkeypatch):
    """Only a closed reader of stdout ends a command quietly: a broken pipe of its own work is an error."""
    read, write = os.pipe()
    with os.fdopen(write, "w") as writer:
        monkeypatch.setattr(sys, "stdout", writer)
        assert not stdout_closed()
        os.close(read)
        assert stdout_closed()
    mine, peer = socket.socketpair()  # a socket whose peer closed polls as a hang-up, not an error
    with mine, os.fdopen(os.dup(mine.fileno()), "w") as writer:
        monkeypatch.setattr(sys, "stdout", writer)
        assert not stdout_closed()
        peer.close()
        assert stdout_closed()


def _files(folder):
    """Every file under ``folder`` (lock files aside) and its bytes."""
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".lock" not in p.name
    }


def test_a_command_refuses_another_commands_output_folder_and_writes_nothing_there(workspace, tmp_path):
    """`attribute --out RUN` ran and replaced the run's settings in its config.json; `fit --run ATTRIBUTE_FOLDER`
    replaced the attribute settings; `bench`/`diagnose --out` another command's folder wrote their files beside its
    own, and `wherefrom report` showed the later command only. Each is refused naming the folder and the command
    that made it, before any work, and the folder is left byte for byte; a run made with the Python API (no
    replay record) counts as `fit`'s, a folder of an older version (no record) by its files, and a fine-tuning
    (`finetune` records none), a killed one's checkpoints alone included, as `finetune`'s (it was written into
    an attribute folder; `attribute --out` a fine-tuning wrote its scores beside the weights, and the fine-tuning
    could not be resumed). `influence --out` and `demo --cache` are refused alike.
    Commands that share folders by design (analyze in a bench folder, evaluate in a ground truth) are tested
    where they are."""
    train, queries, model = workspace / "train.jsonl", workspace / "queries.jsonl", workspace / "model"
    run, attributed, api_run = tmp_path / "run", tmp_path / "attributed", tmp_path / "api-run"
    tuned, killed, older = tmp_path / "tuned", tmp_path / "killed", tmp_path / "older"
    tune = ["finetune", "--train", train, "--model", model, "--lora-target", "c_attn", "--epochs", "1", "--out"]
    assert invoke(*tune, tuned).exit_code == 0
    assert invoke("fit", "--train", train, "--model", model, "--run", run, "--max-length", "128").exit_code == 0
    assert invoke("scores", "--run", run, "--queries", queries).exit_code == 0
    assert invoke(*attribute_args(workspace, attributed)).exit_code == 0
    for source, copy in ((run, api_run), (attributed, older)):  # the Python API's run, an older version's folder
        shutil.copytree(source, copy)
        config = json.loads((copy / "config.json").read_text())
        del config["replay"]
        (copy / "config.json").write_text(json.dumps(config))
    shutil.copytree(tuned, killed)  # a fine-tuning killed after its first epoch: its checkpoints alone
    for name in ("finetune_config.json", "train_log.jsonl", "adapter"):
        shutil.rmtree(killed / name) if (killed / name).is_dir() else (killed / name).unlink()
    intruders = {
        "attribute": attribute_args(workspace, "FOLDER"),
        "fit": ["fit", "--train", train, "--model", model, "--run", "FOLDER", "--max-length", "128"],
        "diagnose": ["diagnose", "--train", train, "--queries", queries, "--model", model, "--out", "FOLDER"],
        "bench": ["bench", "--task", "rules", "--n-train", "8", "--n-test", "2", "--model", model, "--out", "FOLDER"],
        "groundtruth": ["groundtruth", "--task", "rules", "--model", model, "--out", "FOLDER"],
        "word-order": ["word-order", "--model", model, "--out", "FOLDER"],
        "finetune": [*tune, "FOLDER"],
        "influence": ["influence", "--run", run, "--out", "FOLDER"],
        "demo": ["demo", "--model", model, "--cache", "FOLDER"],
    }
    makers = ((run, "fit"), (api_run, "fit"), (attributed, "attribute"), (older, "attribute"))
    for folder, maker in (*makers, (tuned, "finetune"), (killed, "finetune")):
        before = _files(folder)
        for intruder, args in intruders.items():
            if intruder == maker or (intruder == "influence" and folder == run):  # its own; the run's analyses
                continue
            result = invoke(*[folder if a == "FOLDER" else a for a in args], "--threads", "1")
            said = " ".join(result.output.split())
            assert result.exit_code == 2, (folder, intruder, result.output)
            assert f"{folder} is an output folder of `wherefrom {maker}`" in said, (intruder, said)
            assert f"choose another folder for {intruder}'s output" in said, said
            assert _files(folder) == before, (folder, intruder)
    # the run's own commands, given an attribute folder (a config.json, no manifest.json), read its config as a
    # run's and failed after the model loaded on a bare "manifest.json: No such file or directory"
    before = _files(attributed)
    for args in (
        ["scores", "--queries", queries],
        ["index"],
        ["query", "ab:", " cd"],
        ["influence"],
    ):
        result = invoke(*args, "--run", attributed)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and f"{attributed} is not a wherefrom run directory (no manifest.json)" in said
    assert _files(attributed) == before
    # the folder's own command still runs there
    assert invoke("fit", "--train", train, "--model", model, "--run", run, "--max-length", "128").exit_code == 0
    assert invoke(*attribute_args(workspace, attributed)).exit_code == 0
    assert "reused an identical earlier run" in invoke(*tune, tuned).output


def test_a_folder_another_command_makes_inside_its_own_is_refused(workspace, tmp_path):
    """`finetune --out GROUNDTRUTH/model --overwrite` replaced a ground truth's fine-tuning, under the losses it
    had measured with the old one (only the folder itself was checked, not the folders above it). A folder that
    another command makes inside its own, one or two levels down (`GROUNDTRUTH/model`, `BENCH/seed-0/finetune`,
    `RUN/scores`), is refused alike, naming both, and everything is left byte for byte. Not refused for where they
    lie: a folder of another name there (a run kept beside its fine-tuning: a first version refused `fit --run
    FINETUNE/run`, reviewX), `tune`'s folder in its ground truth, `analyze` on an ablation's bench, and folders
    below one whose config.json is not a JSON object (another program's)."""
    train, model = workspace / "train.jsonl", workspace / "model"
    truth = tmp_path / "truth"
    (truth / "model").mkdir(parents=True)
    (truth / "config.json").write_text(json.dumps({"replay": {"groundtruth": {"command": "groundtruth"}}}))
    (truth / "model" / "finetune_config.json").write_text("{}")
    (truth / "tune-ekfac").mkdir()
    bench = tmp_path / "ablation" / "runs" / "lora" / "seed-0" / "finetune"
    bench.mkdir(parents=True)
    (tmp_path / "ablation" / "ablate.json").write_text("{}")
    (bench.parent.parent / "bench.json").write_text("{}")
    (bench / "finetune_config.json").write_text("{}")
    before = _files(tmp_path)
    tune = ["finetune", "--train", train, "--model", model, "--lora-target", "c_attn", "--epochs", "1"]
    for folder, maker, outer in ((truth / "model", "groundtruth", truth), (bench, "bench", bench.parent.parent)):
        result = invoke(*tune, "--out", folder, "--overwrite")
        said = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert f"{folder} lies inside {outer}, an output folder of `wherefrom {maker}`" in said, said
        assert "choose another folder for finetune's output" in said, said
    fit = ["fit", "--train", train, "--model", model, "--max-length", "128", "--run"]
    assert f"lies inside {truth}" in " ".join(invoke(*fit, truth / "scores").output.split())  # new, yet its name
    assert _files(tmp_path) == before
    # by design inside another's: refused later, for what they are, not for where they lie
    for args in (
        ["tune", "--groundtruth", truth, "--method", "ekfac"],
        ["analyze", "weights", "--bench", bench.parent.parent],
    ):
        result = invoke(*args, "--threads", "1")
        assert result.exit_code == 2 and "lies inside" not in result.output, result.output
    other = tmp_path / "other"
    (other / "done").mkdir(parents=True)
    (other / "config.json").write_text("[1]")
    assert invoke(*tune, "--out", other / "done").exit_code == 0
    assert invoke(*tune, "--out", truth / "new").exit_code == 0
    tuned = truth / "new"
    for _ in range(2):  # a run beside its fine-tuning, made and then reused
        result = invoke(*fit, tuned / "run", "--adapter", tuned / "adapter")
        assert result.exit_code == 0, result.output
    (tmp_path / "plain").mkdir()
    for _ in range(2):  # a run named as a fine-tuning's folder: its own folder made the one above look like one
        result = invoke(*fit, tmp_path / "plain" / "resume")
        assert result.exit_code == 0, result.output


def test_attribute_refuses_a_folder_another_command_took_while_it_worked(workspace, tmp_path, monkeypatch):
    """The folder check ran when attribute started; a `fit` that recorded itself in the folder meanwhile had its
    settings replaced by attribute's (and attribute ended in a traceback). The check is made again where attribute
    writes its settings, under the file's lock: exit 2, the other command's config.json kept."""
    import wherefrom.cli.attribute as attribute_module

    out = tmp_path / "taken"
    taken = {"device": None, "replay": {"fit": {"command": "fit", "arguments": {}, "line": "wherefrom fit"}}}
    real = attribute_module.load_model

    def another_command_records_itself(*args, **kwargs):
        out.mkdir()
        (out / "config.json").write_text(json.dumps(taken))
        return real(*args, **kwargs)

    monkeypatch.setattr(attribute_module, "load_model", another_command_records_itself)
    result = invoke(*attribute_args(workspace, out))
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{out} is an output folder of `wherefrom fit`" in said, result.output
    assert json.loads((out / "config.json").read_text()) == taken and not (out / "scores.safetensors").exists()
