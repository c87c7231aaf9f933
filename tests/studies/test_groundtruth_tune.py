"""``wherefrom tune`` (``wherefrom.studies.groundtruth.tune``) on a real tiny ground truth (:mod:`tests.studies.tiny_groundtruth`:
a tiny GPT-2 fully fine-tuned on 24 rows, 8 queries, 10 LDS subsets).

Measured on it (EK-FAC, split seed 0, 4 + 4 queries): damping_factor 0.001 / 0.1 / 10 give selection
LDS 0.594 / 0.609 / 0.558 and held-out LDS 0.630 / 0.661 / 0.576; 0.1 is chosen.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from tests.studies.failing import failing_methods
from wherefrom.cli import app
from wherefrom.engine.api import AttributionConfig
from wherefrom.studies.groundtruth.tune import grid_points, markdown, split_queries, tune

from .tiny_groundtruth import build_tiny_groundtruth

GRID = {"damping_factor": [0.001, 0.1, 10.0]}


@pytest.fixture(scope="module")
def groundtruth(tmp_path_factory):
    return build_tiny_groundtruth(tmp_path_factory.mktemp("tiny-gt"))


def test_chosen_point_is_the_argmax_of_selection_lds_and_every_point_is_reported(groundtruth, tmp_path):
    lines: list[str] = []
    report = tune(groundtruth, "ekfac", GRID, out=tmp_path / "tune", log=lines.append)
    points = report["points"]
    assert [p["point"] for p in points] == [{"damping_factor": v} for v in GRID["damping_factor"]]
    assert all(
        p["error"] is None and p["selection"]["mean"] is not None and p["held_out"]["mean"] is not None for p in points
    )
    selection = [p["selection"]["mean"] for p in points]
    held_out = [p["held_out"]["mean"] for p in points]
    print("selection LDS", [round(v, 3) for v in selection], "held-out LDS", [round(v, 3) for v in held_out])
    best = max(range(len(points)), key=lambda i: selection[i])
    assert report["chosen"]["index"] == best and report["chosen"]["point"] == points[best]["point"]
    assert report["chosen"]["held_out"] == points[best]["held_out"]
    assert len(set(selection)) > 1  # the damping matters on this ground truth (else the test proves nothing)
    # the default point (damping_factor 0.1) equals a grid point: reused, not run again
    assert report["default"]["held_out"] == points[1]["held_out"] and len(lines) == 3
    # the halves split the queries
    split = report["split"]
    assert len(split["selection"]) == len(split["held_out"]) == 4 and not set(split["selection"]) & set(
        split["held_out"]
    )
    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert (
        saved["command"].startswith("wherefrom tune")
        and "torch" in saved["versions"]
        and "cpu_count" in saved["hardware"]
    )
    table = (tmp_path / "tune" / "tune.md").read_text()
    assert all(f"| {json.dumps(v)} |" in table for v in GRID["damping_factor"]) and "**chosen**" in table
    assert "| LDS selection | LDS held-out | time, s | chosen |" in table  # userP: the last header cell was empty
    # userJ: points tied on the selection LDS were not said (the first was "chosen"); none tie here
    assert report["chosen"]["ties"] == [] and "It ties" not in table
    other = next(i for i in range(len(points)) if i != best)
    tied = markdown({**report, "chosen": {**report["chosen"], "ties": [other]}})
    assert f"It ties 1 other point(s) on the selection LDS (`{json.dumps(points[other]['point'])}`)" in tied

    # a rerun reuses every point's scores and gives the same report
    lines.clear()
    again = tune(groundtruth, "ekfac", GRID, out=tmp_path / "tune", log=lines.append)
    assert all(line.endswith("reused") for line in lines) and len(lines) == 3
    assert [p["held_out"] for p in again["points"]] == [p["held_out"] for p in points]


def test_default_point_runs_when_the_grid_lacks_it_and_errors_are_reported(groundtruth, tmp_path):
    with failing_methods(lambda _name, config: config.damping == 0.5):
        report = tune(groundtruth, "ekfac", {"damping": [0.5]}, out=tmp_path / "t")
    assert report["points"][0]["error"] and "out of memory" in report["points"][0]["error"]
    assert report["chosen"] is None and report["default"]["held_out"]["mean"] is not None
    assert "failed" in (tmp_path / "t" / "tune.md").read_text()
    assert '- `{"damping": 0.5}`: RuntimeError: out of memory, say\n' in (tmp_path / "t" / "tune.md").read_text()


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"damping": [0.5], "bogus_option": [1]}, r"method 'ekfac' has no option\(s\) \['bogus_option'\]"),
        ({"damping_factor": [0.1, -1.0]}, "damping_factor"),
    ],
)
def test_a_grid_key_or_value_the_method_does_not_take_is_refused_before_any_point(groundtruth, tmp_path, grid, match):
    """Every point failed with the method's error, after running the others, and tune ended with exit 0."""
    with pytest.raises(ValueError, match=match):
        tune(groundtruth, "ekfac", grid, out=tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_grid_split_and_routing():
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    for bad in ({}, {"a": []}, {"a": [1, 1]}, {"a": "12"}):
        with pytest.raises(ValueError, match="grid"):
            grid_points(bad)
    selection, held_out = split_queries(9, 0.5, seed=3)
    assert sorted(selection + held_out) == list(range(9)) and len(selection) == 4  # round(4.5) = 4
    assert split_queries(9, 0.5, seed=3) == (selection, held_out) and split_queries(9, 0.5, seed=4) != (
        selection,
        held_out,
    )
    assert [len(half) for half in split_queries(8, 0.2)] == [2, 6]  # round(1.6)
    for args in ((1, 0.5), (5, 0.0), (5, 1.0), (3, 0.5)):
        with pytest.raises(ValueError):
            split_queries(*args)
    for share, said in ((0.05, "selects on 0 of the 8 queries and holds out 8"), (0.95, "selects on 8 of the 8")):
        with pytest.raises(ValueError, match=rf"selection_share {share} \(--selection-share\) {said}.*above 0\.188"):
            split_queries(8, share)  # userJ: one query each side gave intervals [0.902, 0.902]; 0.05 took 1


def test_bad_arguments_raise(groundtruth, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        tune(groundtruth, "nope", GRID, out=tmp_path)
    with pytest.raises(FileNotFoundError, match="ground-truth"):
        tune(tmp_path, "ekfac", GRID, out=tmp_path)
    # a fixed option that is also a grid key won at every point while the table named the grid's value
    key = next(iter(GRID))
    with pytest.raises(ValueError, match=f"{key}: given both as a grid key"):
        tune(groundtruth, "ekfac", GRID, out=tmp_path, method_options={key: 100.0})


def test_cli_tune(groundtruth, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "tune",
            str(groundtruth),
            "--method",
            "ekfac",
            "--grid",
            "damping_factor=0.01,1",
            "--out",
            str(tmp_path / "cli"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output  # --device: README's "every command" (tune had none)
    unnamed = runner.invoke(app, ["tune", str(groundtruth), "--grid", "damping_factor=0.01,1"])
    assert unnamed.exit_code == 2 and "--method is required for this command" in unnamed.output  # "unknown method None"
    assert not (groundtruth / "tune-None").exists()
    report = json.loads((tmp_path / "cli" / "tune.json").read_text())
    assert "--device cpu" in report["command"]
    assert [p["point"] for p in report["points"]] == [{"damping_factor": 0.01}, {"damping_factor": 1}]
    assert "Chosen" in result.output
    nothing = runner.invoke(
        app, ["tune", str(groundtruth), "--method", "ekfac", "--grid", "damping=0.5", "--out", str(tmp_path / "none")]
    )
    assert nothing.exit_code == 0, nothing.output  # control for the failing run below
    with failing_methods(lambda _name, config: config.damping == 0.5):
        failed = runner.invoke(
            app, ["tune", str(groundtruth), "--method", "ekfac", "--grid", "damping=0.5", "--out", str(tmp_path / "f")]
        )
    # tune exited 0 with no LDS at all: now the table, then what failed, exit 1
    assert failed.exit_code == 1 and "| 0.5 |" in failed.output, failed.output
    assert 'error: point {"damping": 0.5}: RuntimeError: out of memory' in failed.output
    assert "error: no grid point gave an LDS on the selection queries" in failed.output
    # a failed grid point that is also the default point (the damping factor's default, 0.1) is listed once
    with failing_methods(lambda _name, config: config.damping_factor == 0.1 and config.damping is None):
        args = ["tune", str(groundtruth), "--method", "ekfac", "--grid", "damping_factor=0.1,1", "--out"]
        failed = runner.invoke(app, [*args, str(tmp_path / "d")])
    assert failed.exit_code == 1 and 'error: point {"damping_factor": 0.1}: RuntimeError' in failed.output
    assert failed.output.count("error: point") == 1, failed.output  # not again as the default point, `point {}`
    # refused for an option no method has, after recording itself: no output folder is left (it left config.json)
    refused = runner.invoke(
        app, ["tune", str(groundtruth), "--method", "ekfac", "--grid", "bogus=1", "--out", str(tmp_path / "t")]
    )
    assert refused.exit_code == 2 and "bogus" in refused.output and not (tmp_path / "t").exists(), refused.output
    stem = tmp_path / "ev" / "mine"
    refused = runner.invoke(
        app, ["evaluate", str(groundtruth), "--methods", "gradsim", "--option", "gradsim.bogus=1", "--out", str(stem)]
    )
    assert refused.exit_code == 2 and "bogus" in refused.output and not stem.parent.exists(), refused.output
    bad = runner.invoke(app, ["tune", str(groundtruth), "--method", "ekfac", "--grid", "damping_factor"])
    assert bad.exit_code != 0 and "key=value1,value2" in bad.output


def test_a_grid_point_at_an_options_default_is_the_default_point(groundtruth, tmp_path):
    """A grid value equal to the option's default (datainf's max_bytes) is the default point: reused, not run again;
    the method key of scored rows is the same whether the default is given or left out."""
    from wherefrom.studies.groundtruth.build import GroundTruth
    from wherefrom.studies.groundtruth.evaluate import method_key

    lines: list[str] = []
    report = tune(groundtruth, "datainf", {"max_bytes": [2**31, 2**30]}, out=tmp_path / "t", log=lines.append)
    assert len(lines) == 2 and report["default"]["held_out"] == report["points"][0]["held_out"], lines
    gt, attribution = GroundTruth.load(groundtruth), AttributionConfig()
    assert method_key(gt, "datainf", {"max_bytes": 2**31}, attribution) == method_key(gt, "datainf", {}, attribution)


def test_a_method_key_holds_only_the_attribution_settings_the_method_reads(groundtruth):
    """An evaluated row is keyed on the settings its method reads (``MethodSpec.read``): a damping or Fisher changes
    EK-FAC's key, not gradsim's, RepSim's or BM25's; a batch size changes every key but BM25's."""
    from wherefrom.studies.groundtruth.build import GroundTruth
    from wherefrom.studies.groundtruth.evaluate import method_key

    gt, plain = GroundTruth.load(groundtruth), AttributionConfig()
    for changed, differs in (
        (AttributionConfig(damping=0.5, fisher="empirical"), {"ekfac"}),
        (AttributionConfig(batch_size=3), {"ekfac", "gradsim", "repsim"}),
    ):
        keys = {
            m: (method_key(gt, m, {}, plain), method_key(gt, m, {}, changed))
            for m in ("ekfac", "gradsim", "repsim", "bm25")
        }
        assert {m for m, (a, b) in keys.items() if a != b} == differs


@pytest.mark.parametrize(
    ("method", "grid", "named"),
    [
        ("bm25", {"damping_factor": [0.001, 1.0]}, "method 'bm25' has no option(s) ['damping_factor']"),
        ("gradsim", {"damping_factor": [0.001, 1.0]}, "method 'gradsim' has no option(s) ['damping_factor']"),
        ("repsim", {"damping": [0.1, 1.0]}, "method 'repsim' has no option(s) ['damping']"),
    ],
)
def test_a_grid_key_the_method_does_not_read_is_refused(groundtruth, tmp_path, method, grid, named):
    """Every point scored alike and one was reported as chosen; now refused before any point runs."""
    with pytest.raises(ValueError, match=re.escape(named)):
        tune(groundtruth, method, grid, out=tmp_path / "tune")
    assert not (tmp_path / "tune").exists()


def test_a_fisher_grid_reads_true_as_the_option_text(groundtruth, tmp_path):
    """``--grid fisher=true,empirical`` parses ``true`` as JSON; it was set on the attribution config as the boolean
    and refused ("fisher must be 'true' or 'empirical', got True"); as an option it is the text "true"."""
    report = tune(groundtruth, "kfac", {"fisher": [True, "empirical"]}, out=tmp_path / "tune")
    assert [p["point"] for p in report["points"]] == [{"fisher": True}, {"fisher": "empirical"}]
    assert all(p["error"] is None for p in report["points"])


def test_a_ground_truth_of_fewer_than_3_subsets_is_refused(groundtruth, tmp_path, monkeypatch):
    """Over 2 subsets the LDS is +-1 whatever the scores (undefined now): a ground truth built with ``--subsets 2``
    (which ``groundtruth`` refuses now) ranked tune's points by such values, then would rank none; refused up front."""
    from dataclasses import replace

    import wherefrom.studies.groundtruth.tune as module

    loaded = module.GroundTruth.load(groundtruth)
    two = replace(loaded, lds_masks=loaded.lds_masks[:2], lds_outputs=loaded.lds_outputs[:2])
    monkeypatch.setattr(module.GroundTruth, "load", staticmethod(lambda *_args, **_kwargs: two))
    with pytest.raises(ValueError, match="has 2 LDS subsets; tuning needs at least 3"):
        tune(groundtruth, "ekfac", GRID, out=tmp_path / "tune")
    assert not (tmp_path / "tune").exists()


def test_points_that_tie_the_chosen_one_are_named(groundtruth, tmp_path, monkeypatch):
    """userJ: three LiSSA points of one LDS, and one "chosen" without a word. Every point measured as the first
    here (a setting that changes no score): the first is taken and the others are named as its ties."""
    import wherefrom.studies.groundtruth.tune as module

    first: list = []
    measured = module.measured_metrics

    def as_the_first(*args, **kwargs):
        if not first:
            first.append(measured(*args, **kwargs))
        return first[0]

    monkeypatch.setattr(module, "measured_metrics", as_the_first)
    report = tune(groundtruth, "ekfac", GRID, out=tmp_path / "tied")
    assert report["chosen"]["index"] == 0 and report["chosen"]["ties"] == [1, 2]
    assert "It ties 2 other point(s) on the selection LDS" in (tmp_path / "tied" / "tune.md").read_text()


def test_a_points_warnings_are_recorded_in_tune_and_evaluate_reports(groundtruth, tmp_path):
    """userJ: tune.md showed LiSSA points whose iHVP had not converged (the terminal said so) as plain numbers. A
    study's row now records wherefrom's warnings said while its method ran (cg stopped after one iteration here),
    and tune.md / evaluate.md list them under the table; a point that converges lists none, and a rerun that reuses
    the cached rows keeps them."""
    from wherefrom.studies.groundtruth.evaluate import evaluate

    grid, fixed = {"tol": [1e-6, 10.0]}, {"max_iter": 1}  # one cg iteration: 10 is reached, 1e-6 is not
    with pytest.warns(RuntimeWarning, match="did not converge"):
        report = tune(groundtruth, "cg", grid, out=tmp_path / "t", method_options=fixed)
    first, second = report["points"]
    assert any(w.startswith("ConvergenceWarning: cg did not converge") for w in first["warnings"]), first["warnings"]
    assert second["warnings"] == [] and first["error"] is None
    table = (tmp_path / "t" / "tune.md").read_text()
    notes = table[table.index("Warnings while computing") :]
    assert '- `{"tol": 1e-06}`: ConvergenceWarning: ' in notes and '"tol": 10.0' not in notes
    again = tune(groundtruth, "cg", grid, out=tmp_path / "t", method_options=fixed)  # every row reused
    assert [p["warnings"] for p in again["points"]] == [first["warnings"], []]
    with pytest.warns(RuntimeWarning, match="did not converge"):
        evaluate(groundtruth, ["cg", "gradsim"], {"cg": {"max_iter": 1}}, out=tmp_path / "e")
    text = (tmp_path / "e.md").read_text()
    assert "- cg: ConvergenceWarning: " in text and "- gradsim:" not in text
    from wherefrom.studies.report import write_report

    page = write_report(tmp_path / "e.json").read_text()
    assert "Warning of cg: ConvergenceWarning: cg did not converge" in page and "Warning of gradsim" not in page
