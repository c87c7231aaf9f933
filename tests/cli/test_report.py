"""`wherefrom influence` on a tiny Llama: the tail and layer tables of a run's scores as influence.{json,md}."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests.cli.conftest import invoke
from wherefrom.core.scoring import load_scores
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import rule_identification, write_jsonl
from wherefrom.studies.influence import layer_profile, tail_profile
from wherefrom.studies.report.folders import ScoreSetLeftOut, score_sets


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """`fit` (EK-FAC) and `scores` on a tiny Llama: 60 training rows, 3 queries."""
    root = tmp_path_factory.mktemp("influence")
    save_tiny(root / "model", arch="llama")
    train, queries = rule_identification(n_train=60, n_test=3, seed=0)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(queries, root / "queries.jsonl")
    run = root / "run"
    fit = invoke("fit", "--train", root / "train.jsonl", "--model", root / "model", "--run", run, "--max-length", "128")
    assert fit.exit_code == 0, fit.output
    scores = invoke("scores", "--run", run, "--queries", root / "queries.jsonl")
    assert scores.exit_code == 0, scores.output
    return run


def test_influence_writes_the_analyses_of_the_saved_scores(scored_run):
    result = invoke("influence", "--run", scored_run, "--top-k", "5")
    assert result.exit_code == 0, result.output
    folder = scored_run / "analyses" / "scores"  # the default --out
    payload = json.loads((folder / "influence.json").read_text())
    scores = load_scores(scored_run / "scores", "scores")
    assert payload["shape"] == [3, 60, len(scores.module_names)]
    assert payload["command"].startswith("wherefrom influence --run") and payload["seconds"] >= 0
    # the numbers are the analyses of the saved scores, by layer (2 blocks) and module type
    layers, tail = layer_profile(scores, top_k=5), tail_profile(scores)
    for part in ("all", "top"):
        for key in ("by_layer", "by_kind"):
            saved, expected = payload["layers"][part][key]["abs_share"], layers[part][key]["abs_share"]
            assert saved.keys() == expected.keys()
            assert [saved[k]["mean"] for k in saved] == pytest.approx([expected[k]["mean"] for k in expected])
    assert sorted(payload["layers"]["all"]["by_layer"]["labels"]) == ["0", "1"]
    assert sum(s["mean"] for s in payload["layers"]["all"]["by_kind"]["abs_share"].values()) == pytest.approx(1.0)
    assert payload["layers"]["top_k"] == 5
    fitted = [e["fit"]["alpha"] if e["fit"] else np.nan for e in tail["per_query"]]
    saved_alpha = [e["fit"]["alpha"] if e["fit"] else np.nan for e in payload["tail"]["per_query"]]
    np.testing.assert_allclose(saved_alpha, fitted)
    # the Markdown: one row per query in the tail table, one per layer and per module type
    markdown = (folder / "influence.md").read_text()
    assert markdown.strip() == result.stdout.strip()
    for query_id in scores.query_ids:
        assert re.search(rf"^\| {re.escape(query_id)} \| \d\.\d{{3}} \| \d\.\d{{3}} \|", markdown, re.M), query_id
    assert re.search(r"^\| 0 \| 0\.\d{3} \[", markdown, re.M) and re.search(r"^\| mlp \| 0\.\d{3} \[", markdown, re.M)
    # every table keeps its column count: the pipes of |influence| are escaped
    for block in re.findall(r"(?:^\|.*\n)+", markdown, re.M):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in block.splitlines()}
        assert len(widths) == 1, block
    assert r"| layer | \|influence\|, all rows | positive, all rows | \|influence\|, top 5 proponents |" in markdown


def test_influence_names_a_missing_score_set_before_any_work(scored_run, tmp_path):
    result = invoke("influence", "--run", scored_run, "--name", "nope", "--out", tmp_path / "out")
    message = re.sub(r"[\s│]+", " ", result.output)
    assert result.exit_code == 2 and "--name 'nope': no score set" in message and "sets: ['scores']" in message
    assert not (tmp_path / "out").exists()
    # a --run that is no run at all was named as one without score sets ("no score set nonexist/scores/...")
    missing = tmp_path / "nonexist"
    result = invoke("influence", "--run", missing)
    message = re.sub(r"[\s│]+", " ", result.output)
    assert (
        result.exit_code == 2 and f"{missing} is not a wherefrom run directory (no config.json or manifest" in message
    ), message
    assert not missing.exists()


def test_influence_names_an_unfinished_score_set_as_such(scored_run, tmp_path):
    """A set whose writer was stopped before its .json was named "no score set" while the sets found listed it. It
    is named unfinished with the command to rerun, and the list of sets holds finished ones only (the report of
    the run leaves it out, saying so: it left it out without a word)."""
    folder = scored_run / "scores"
    shutil.copy(folder / "scores.safetensors", folder / "stopped.safetensors")  # the killed write's first file
    try:
        result = invoke("influence", "--run", scored_run, "--name", "stopped", "--out", tmp_path / "out")
        message = re.sub(r"[\s│]+", " ", result.output)
        assert result.exit_code == 2 and "the score set" in message and "stopped is unfinished" in message
        assert f"rerun that `wherefrom scores --run {scored_run} ... --name stopped`" in message
        other = invoke("influence", "--run", scored_run, "--name", "nope", "--out", tmp_path / "out")
        message = re.sub(r"[\s│]+", " ", other.output)
        assert "finished sets: ['scores']; unfinished: ['stopped']" in message
        assert not (tmp_path / "out").exists()
        with pytest.warns(ScoreSetLeftOut, match="leaves out a score set: the score set .*stopped is unfinished"):
            sets, left_out = score_sets(folder)  # the report shows the others, and says why this one is left out
        assert list(sets) == ["scores"] and len(left_out) == 1
    finally:
        (folder / "stopped.safetensors").unlink()


def test_influence_and_the_studies_keep_a_file_of_their_report_names_they_did_not_write(scored_run, tmp_path):
    """userZ: `influence --out FOLDER` replaced the user's own FOLDER/influence.md (exit 0). A report's .json or .md
    that wherefrom did not write is now kept and named, by every command writing one (a study before its work)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "influence.md").write_text("# my own notes\n")
    result = invoke("influence", "--run", scored_run, "--out", mine)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "influence.md is a file wherefrom did not write" in said, result.output
    assert (mine / "influence.md").read_text() == "# my own notes\n" and not (mine / "influence.json").exists()
    (mine / "influence.json").write_text('{"notes": 1}')  # a JSON of its own beside it
    result = invoke("influence", "--run", scored_run, "--out", mine)
    assert result.exit_code == 2 and "influence.json is a file wherefrom did not write" in " ".join(
        result.output.split()
    )
    assert invoke("influence", "--run", scored_run, "--out", tmp_path / "fresh").exit_code == 0
    again = invoke("influence", "--run", scored_run, "--out", tmp_path / "fresh")  # its own report: replaced
    assert again.exit_code == 0, again.output
    (mine / "influence.json").unlink()
    (mine / "bench.md").write_text("# my bench notes\n")
    model = scored_run.parent / "model"
    bench = invoke(
        "bench", "--task", "facts", "--methods", "bm25", "--n-train", "40", "--n-test", "8", "--out", mine,
        "--model", model,
    )  # fmt: skip
    assert bench.exit_code == 2 and "bench.md is a file wherefrom did not write" in " ".join(bench.output.split())
    # reviewX: diagnose met it after all its work, as a traceback; word-order replaced a user's wordorder.md
    (mine / "diagnose.md").write_text("# notes\n")
    rows = ("--train", scored_run.parent / "train.jsonl", "--queries", scored_run.parent / "queries.jsonl")
    diagnosed = invoke("diagnose", *rows, "--model", model, "--methods", "gradsim", "--out", mine)
    assert diagnosed.exit_code == 2 and "diagnose.md is a file wherefrom did not write" in " ".join(
        diagnosed.output.split()
    ), diagnosed.output
    (mine / "wordorder.md").write_text("# notes\n")
    ordered = invoke("word-order", "--out", mine, "--model", model, "--seeds", "0")
    assert ordered.exit_code == 2 and "wordorder.md is a file wherefrom did not write" in " ".join(
        ordered.output.split()
    ), ordered.output
    assert sorted(p.name for p in mine.iterdir()) == ["bench.md", "diagnose.md", "influence.md", "wordorder.md"]
