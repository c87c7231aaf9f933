"""The HTML report: what each kind of folder shows, that it is self-contained, and that a real browser
renders it (headless Chromium: no console message, plots and heatmaps drawn, a screenshot kept)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.cli.conftest import workspace as cli_workspace  # noqa: F401  (a fixture)
from tests.cli.test_cli import fit_args
from wherefrom.cli import app
from wherefrom.core.scoring import Scores, save_scores
from wherefrom.studies.diagnose import Diagnosis
from wherefrom.studies.diagnose import write_report as write_diagnosis
from wherefrom.studies.generated import rule_identification, write_jsonl
from wherefrom.studies.report import write_report
from wherefrom.studies.report.folders import ScoreSetLeftOut
from wherefrom.studies.report.plots import share_axis_top
from wherefrom.studies.report.sections import compact_json, query_sections, scores_sections

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
ARTIFACTS = Path(__file__).resolve().parents[2] / ".cache" / "test-artifacts"
"""Screenshots the browser test keeps for a person to look at."""
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
MODULES = [f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.q_proj", "mlp.up_proj")]
runner = CliRunner()


def self_contained(html: str) -> bool:
    """No resource or link that needs the network (``src``/``href`` to http(s) or protocol-relative)."""
    return EXTERNAL.search(html) is None


def heavy_tailed_scores(seed: int, train_ids: list[str], n_query: int = 3) -> Scores:
    rng = np.random.default_rng(seed)
    size = (len(MODULES), n_query, len(train_ids))
    per_module = (rng.pareto(2.0, size=size) + 1) * rng.choice([-1.0, 1.0], size=size, p=[0.3, 0.7])
    return Scores([f"q{i}" for i in range(n_query)], train_ids, MODULES, torch.from_numpy(per_module))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as `fit` and `scores` leave it, with two score sets over the same ids (no model needed)."""
    root = tmp_path_factory.mktemp("report-run")
    train, _ = rule_identification(n_train=200, n_test=2, seed=0)
    write_jsonl(train, root / "train.jsonl")
    (root / "config.json").write_text(
        json.dumps({"train": str(root / "train.jsonl"), "attribution": {"strategy": "ekfac"}})
    )
    (root / "manifest.json").write_text(json.dumps({"versions": {"torch": torch.__version__}, "data": {"rows": 200}}))
    ids = [r.id for r in train]
    save_scores(heavy_tailed_scores(0, ids), root / "scores", "ekfac")
    save_scores(heavy_tailed_scores(1, ids), root / "scores", "gradsim")
    return root, train


def test_an_attribute_folder_reports_its_rows_from_any_directory(tmp_path, monkeypatch):
    """`attribute` records its paths as given (`--train data/train.jsonl`): a report made from another directory
    read no rows ("ids only", the labels too). The replay record's directory resolves them."""
    train, _ = rule_identification(n_train=20, n_test=2, seed=0)
    write_jsonl(train, tmp_path / "data" / "train.jsonl")
    out = tmp_path / "out" / "gradsim"
    save_scores(heavy_tailed_scores(0, [r.id for r in train]), out, "scores")
    record = {"command": "attribute", "arguments": {}, "line": "wherefrom attribute ...", "cwd": "../.."}
    config = {"method": "gradsim", "train": "data/train.jsonl", "replay": {"attribute": record}}
    (out / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    page = write_report(out).read_text()
    assert "could not be read" not in page and train[0].prompt.split("\n")[0][:30] in html.unescape(page)


def test_a_report_whose_training_file_is_gone_names_it_and_shows_the_saved_labels(tmp_path):
    """The rows' text comes from the training file; without it the report showed bare ids, dropping the labels
    the score set holds, and did not say which file it tried."""
    train, _ = rule_identification(n_train=20, n_test=2, seed=0)
    out = tmp_path / "gradsim"
    scores = heavy_tailed_scores(0, [r.id for r in train])
    save_scores(scores, out, "scores", labels={r.id: r.label for r in train})
    gone = tmp_path / "moved" / "train.jsonl"
    (out / "config.json").write_text(json.dumps({"method": "gradsim", "train": str(gone)}))
    page = html.unescape(write_report(out).read_text())
    assert f"could not be read ({gone}: file not found)" in page
    top_id, _ = scores.top(0, 1)[0]
    label = next(r.label for r in train if r.id == top_id)
    assert f"#1 <b>{top_id}</b> score {scores.total[0].max().item():+.4g} · label {label}" in page
    # a training file that no longer holds every id (edited since): those rows by id, with their saved label
    kept = [r for r in train if r.id != top_id]
    write_jsonl(kept, gone)
    page = html.unescape(write_report(out).read_text())
    assert "1 of the 20 training ids of these scores are not in the training file" in page
    assert f"#1 <b>{top_id}</b> score {scores.total[0].max().item():+.4g} · label {label}" in page
    assert "could not be read" not in page


def test_a_report_shows_no_edited_text_beside_the_scores_of_the_old_rows(tmp_path):
    """userC: a training file edited after the scores (`sed -i` on one prompt) showed the new text beside the old
    score, with no word; `query` on the same run refused. The fingerprint the folder records (an `attribute`
    folder's `train_fingerprint`, a run's manifest `data`) is compared: rows by id, with a note, when it differs."""
    from wherefrom.core.data import data_fingerprint

    train, _ = rule_identification(n_train=20, n_test=2, seed=0)
    path = write_jsonl(train, tmp_path / "train.jsonl")
    ids = [r.id for r in train]
    for kind in ("attribute", "run"):
        out = tmp_path / kind
        save_scores(heavy_tailed_scores(0, ids), out / ("scores" if kind == "run" else ""), "scores")
        config = {"method": "gradsim", "train": str(path)}
        made = {"fingerprint": data_fingerprint(train), "rows": 20}
        if kind == "attribute":
            config["train_fingerprint"] = made["fingerprint"]
        else:
            config = {"train": str(path), "attribution": {"strategy": "identity"}}
            (out / "manifest.json").write_text(json.dumps({"data": made}))
        (out / "config.json").write_text(json.dumps(config))
    edited = [replace(train[0], prompt="TOTALLY DIFFERENT TEXT"), *train[1:]]
    for kind in ("attribute", "run"):
        write_jsonl(train, path)
        page = html.unescape(write_report(tmp_path / kind, tmp_path / f"{kind}-before.html").read_text())
        assert "changed since these results were made" not in page and train[1].prompt[:20] in page, kind
        write_jsonl(edited, path)
        page = html.unescape(write_report(tmp_path / kind, tmp_path / f"{kind}-after.html").read_text())
        assert f"The training file {path} changed since these results were made" in page, kind
        assert "TOTALLY DIFFERENT TEXT" not in page and train[1].prompt[:20] not in page, kind


def test_a_run_report_says_where_each_score_sets_training_side_came_from(tmp_path):
    """`scores` records whether the training side was read from the run's index (its dtype and options decide the
    scores) or recomputed; the report showed neither, so two sets of one run could differ for no visible reason."""
    train, _ = rule_identification(n_train=20, n_test=2, seed=0)
    ids = [r.id for r in train]
    (tmp_path / "config.json").write_text(json.dumps({"train": str(tmp_path / "gone.jsonl")}))
    (tmp_path / "manifest.json").write_text(json.dumps({"data": {"rows": 20}}))
    index = {"train_side": "index", "dtype": "float16", "store": "x", "index_options": {"precondition": "fitted"}}
    save_scores(heavy_tailed_scores(0, ids), tmp_path / "scores", "a", provenance=index)
    save_scores(heavy_tailed_scores(1, ids), tmp_path / "scores", "b", provenance={"train_side": "recomputed"})
    save_scores(heavy_tailed_scores(2, ids), tmp_path / "scores", "c")  # saved before provenance was recorded
    older = {"train_side": "index", "dtype": "bfloat16", "store": "y", "precondition": "none", "unit_norm": True}
    save_scores(heavy_tailed_scores(3, ids), tmp_path / "scores", "d", provenance=older)  # an earlier layout
    page = html.unescape(write_report(tmp_path).read_text())
    from_index = "Training side: read from the run's index (float16 rows, precondition fitted), not gradients"
    assert page.count(from_index) == 1 and page.count("Training side: recomputed at the run's settings.") == 1
    at = {name: page.index(f"<h2>Scores {name}: top rows</h2>") for name in "abc"}  # its section, not the contents
    assert at["a"] < page.index(from_index) < at["b"] < page.index("Training side: recomputed") < at["c"]
    assert page.count("Training side:") == 3  # none said for the set saved without it
    assert "read from the run's index (bfloat16 rows, precondition none, unit_norm True)" in page


def test_run_report_is_self_contained_with_every_section(run_folder, tmp_path):
    root, train = run_folder
    html = write_report(root, tmp_path / "run.html").read_text()
    assert self_contained(html)
    for heading in (
        "Scores ekfac: top rows",
        "Scores gradsim: influence by layer and module type",
        "The tail: how concentrated influence is",
        "Method-vs-method agreement",
        "Settings",
        "Provenance",
    ):
        assert heading in html, heading
    # 2 score sets x (4 share plots: layer and type x |influence| and positive; 3 tail plots) + the agreement matrix
    assert html.count("<svg") == 2 * (4 + 3) + 1
    scores = heavy_tailed_scores(0, [r.id for r in train])
    top_id, _ = scores.top(0, 1)[0]
    top_row = next(r for r in train if r.id == top_id)
    assert f"<b>{top_id}</b>" in html and escape(top_row.prompt.split("\n")[0]) in html
    assert "alpha" in html and "top_1%" in html
    assert write_report(root).name == "report.html"  # default: inside the folder


def test_bench_evaluate_and_diagnose_reports(tmp_path):
    bench = write_report(RESULTS / "study-smollm2" / "emotion", tmp_path / "bench.html").read_text()
    assert self_contained(bench) and "ekfac" in bench and bench.count("<svg") >= 3 and "Provenance" in bench
    assert "heatmaps: red" not in bench  # userF: a page without token heatmaps explained their colours
    evaluate = write_report(RESULTS / "groundtruth-tiny", tmp_path / "evaluate.html").read_text()
    assert self_contained(evaluate) and "lds" in evaluate and "0.688 [0.613, 0.760]" in evaluate  # ekfac's LDS
    # userI: the noise floors and the memory were only in evaluate.md; one LDS seed read "– x the seed noise"
    assert "LOO signal-to-noise 0.747 over 3 seeds" in evaluate and "<th>peak memory, MiB</th>" in evaluate
    # userP: columns titled by their keys (lds, loo_pearson) and methods sorted, where evaluate.md has them in order
    assert "<th>LDS</th>" in evaluate and "<th>LOO Pearson</th>" in evaluate and "<th>loo_pearson</th>" not in evaluate
    given = json.loads((RESULTS / "groundtruth-tiny" / "evaluate.json").read_text())["config"]["methods"]
    assert [evaluate.index(f"<td>{m}</td>") for m in given] == sorted(evaluate.index(f"<td>{m}</td>") for m in given)
    assert "LDS seed noise not measured (one seed per subset; --subset-seeds 2 or more measures it)" in evaluate
    # `evaluate --out STEM` writes STEM.json: reported as a file (only the default evaluate.json was recognised)
    stem = tmp_path / "mine.json"
    stem.write_bytes((RESULTS / "groundtruth-tiny" / "evaluate.json").read_bytes())
    page = write_report(stem).read_text()
    assert (tmp_path / "mine.html").is_file() and "Evaluate: mine" in page and "0.688 [0.613, 0.760]" in page
    rows = [Diagnosis("ekfac", 1.5, 10.0, 0.2, 0.9, 0.85), Diagnosis("cg", 2.0, None, error="diverged")]
    write_diagnosis(rows, None, tmp_path / "diag", {"command": "wherefrom diagnose ..."})
    assert "\n\nFailed (each error in full):\n\n- cg: diverged\n" in (tmp_path / "diag" / "diagnose.md").read_text()
    diagnosis = write_report(tmp_path / "diag").read_text()
    assert "failed: diverged" in diagnosis and "0.850" in diagnosis and diagnosis.count("<svg") == 1


def test_report_on_an_unknown_path_names_what_it_expects(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bench\.json, evaluate\.json"):
        write_report(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path)])
    message = re.sub(r"[\s│]+", " ", result.output)  # typer's error box wraps the message
    assert result.exit_code == 2 and "is not a result wherefrom can report on" in message
    # a folder holding `evaluate --out DIR/STEM` or `query --json > DIR/q.json` files: named with their commands
    folder = tmp_path / "my results"
    folder.mkdir()
    (folder / "lds.json").write_bytes((RESULTS / "groundtruth-tiny" / "evaluate.json").read_bytes())
    (folder / "q.json").write_text(json.dumps({"query": {"prompt": "p"}, "proponents": []}))
    (folder / "other.json").write_text("[]")
    (folder / "config.json").write_text(json.dumps({"replay": {"evaluate lds": {}}}))  # as evaluate --out leaves it
    with pytest.raises(FileNotFoundError, match="holding result files") as refused:
        write_report(folder)
    quoted = [f"`wherefrom report '{folder / name}'`" for name in ("lds.json", "q.json")]
    assert f"({', '.join(quoted)})" in str(refused.value)  # each a command to paste, quoted for the shell


@pytest.fixture(scope="module")
def query_view(request):
    """`wherefrom fit` then `wherefrom query --html` on the tiny GPT-2 of the command-line tests."""
    root = request.getfixturevalue("cli_workspace")
    fit = runner.invoke(app, [str(a) for a in fit_args(root, "run-report")])
    assert fit.exit_code == 0, fit.output
    prompt, completion = "Determine the rewriting rule: a b c -> c b a\nRule:", " reverse"
    args = ["query", prompt, completion, "--run", str(root / "run-report"), "--top-k", "3"]
    result = runner.invoke(app, [*args, "--html", str(root / "query.html"), "--json"])
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_query_html_shows_rows_heatmaps_on_both_sides_layers_and_tail(query_view):
    root, report = query_view
    html = (root / "query.html").read_text()
    assert self_contained(html)
    assert "tokens" not in report["proponents"][0]  # --html leaves the JSON report as it was
    # Heatmaps: the 3 proponents and 3 opponents on the training side, 3 rows on the query side.
    assert html.count('class="heatmap"') == 6 + 3
    assert "token heatmaps: red = positive, blue = negative" in html  # explained where there are some
    assert "Query tokens&#39; part of the score on row" in html
    assert "influence by layer" in html.lower() and "The tail" in html and "Provenance" in html
    assert report["proponents"][0]["id"] in html
    from_json = root / "query.json"
    from_json.write_text(json.dumps(report))
    again = runner.invoke(app, ["report", str(from_json), "--out", str(root / "from-json.html")])
    assert again.exit_code == 0, again.output
    rendered = (root / "from-json.html").read_text()
    assert self_contained(rendered) and report["opponents"][0]["id"] in rendered


def test_the_report_of_a_per_token_query_json_shows_the_query_side_too(query_view):
    """userC: `wherefrom report` of a `query --json --per-token` file left out the query tokens' heatmaps that the
    JSON holds and `query --html` shows: the first 3 proponents' (score > 0)."""
    root, _ = query_view
    prompt, completion = "Determine the rewriting rule: a b c -> c b a\nRule:", " reverse"
    args = ["query", prompt, completion, "--run", str(root / "run-report"), "--top-k", "3", "--json", "--per-token"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (root / "split.json").write_text(json.dumps(report))
    made = runner.invoke(app, ["report", str(root / "split.json"), "--out", str(root / "split.html")])
    assert made.exit_code == 0, made.output
    page = (root / "split.html").read_text()
    shown = [e for e in report["proponents"][:3] if e["score"] > 0]
    assert page.count("Query tokens&#39; part of the score on row") == len(shown) > 0
    assert page.count('class="heatmap"') == 6 + len(shown)


def chromium() -> str:
    """Path of the Chromium binary; skips when it is missing, except where CI requires it
    (``WHEREFROM_REQUIRE_BROWSER=1``, set by ``.ci/run`` after installing Debian's ``chromium``)."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("WHEREFROM_REQUIRE_BROWSER") == "1":
            pytest.fail("WHEREFROM_REQUIRE_BROWSER=1 but no chromium on PATH: `apt-get install -y chromium`")
        pytest.skip("no chromium on PATH (Debian package `chromium`; .ci/run installs it as root)")
    return found


def browse(page: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """Open ``page`` in headless Chromium: ``(dom, console_lines)``, the DOM after load and every console
    message the page produced (Chromium's ``--enable-logging=stderr`` prints each as ``...:CONSOLE...``);
    with ``screenshot``, also a 1280x2400 PNG of the page."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr"]
    flags += ["--v=0", "--window-size=1280,2400", "--virtual-time-budget=2000"]
    if screenshot is not None:
        flags.append(f"--screenshot={screenshot}")
    else:
        flags.append("--dump-dom")
    done = subprocess.run([*flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_console_capture_sees_a_broken_page(tmp_path):
    """The check below can fail: a page that logs an error and throws is caught."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><p>x</p><script>console.error("boom"); notDefined();</script></body></html>')
    _, console = browse(page)
    assert any("boom" in line for line in console) and any("notDefined" in line for line in console)


def test_query_view_renders_in_a_real_browser(query_view):
    from PIL import Image

    root, _ = query_view
    page = root / "query.html"
    dom, console = browse(page)
    assert console == []
    assert (
        dom.count('class="tok"') > 20 and dom.count("<svg") == 4 + 1
    )  # shares by layer and type (|influence|, positive), the tail and "</html>" in dom
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-query.png"
    _, console = browse(page, shot)
    assert console == []
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    not_white = (pixels < 235).any(-1).mean()
    heat_red = ((red > 180) & (green < 140) & (blue < 140)).sum()  # proponent token backgrounds (RdBu_r)
    heat_blue = ((blue > 150) & (red < 120) & (green < 170)).sum()  # opponent tokens and matplotlib's blue
    print(f"screenshot {shot}: {not_white:.1%} non-white pixels, {heat_red} red, {heat_blue} blue")
    assert not_white > 0.03 and heat_red > 50 and heat_blue > 50


def test_share_axis_fits_thirty_small_layer_shares():
    small = [{"mean": 1 / 30, "low": 0.02, "high": 0.04, "n": 20}] * 30
    assert share_axis_top(small) == pytest.approx(0.054)
    assert share_axis_top([*small, {"mean": 0.8, "low": 0.7, "high": 0.9, "n": 20}]) == 1.0  # never above 1
    assert share_axis_top([{"mean": 0.05, "low": None, "high": None, "n": 1}, None]) == pytest.approx(0.0675)
    assert share_axis_top([None]) == 1.0


def test_a_figure_does_not_record_when_it_was_drawn():
    """userZ: two reports of the same results differed in the SVGs' ``dc:date`` (5 places): the figures now carry
    no date, and their ids are salted by the figure's place in its page (:func:`plots.new_page`)."""
    from wherefrom.studies.report import plots

    stats = [{"mean": 0.4, "low": 0.3, "high": 0.5, "n": 3}, {"mean": 0.6, "low": 0.5, "high": 0.7, "n": 3}]
    plots.new_page()
    drawn = plots.share_plot({"all rows": dict(zip("ab", stats))}, ["a", "b"], "share", "layer")
    assert "<svg" in drawn and "dc:date" not in drawn, drawn[:600]
    plots.new_page()  # reviewX: the ids' salt went on counting, so a page made again in one process differed
    assert plots.share_plot({"all rows": dict(zip("ab", stats))}, ["a", "b"], "share", "layer") == drawn


def test_settings_json_is_compact_and_unchanged_in_content():
    manifest = {
        "modules": [["model.layers.0.mlp.up_proj", 16, 8]] * 120,
        "seeds": [0, 1],
        "empty": [],
        "x": {"y": None},
    }
    text = compact_json(manifest)
    assert json.loads(text) == manifest
    assert len(text.splitlines()) == 120 + 9 and '    ["model.layers.0.mlp.up_proj", 16, 8],' in text
    assert '"seeds": [0, 1]' in text


def test_report_on_a_damaged_score_set_or_json_names_the_file(run_folder, tmp_path):
    """A flipped byte in a score set was a traceback (exit 1), and a damaged JSON file an error naming no file
    (found by a new-user trial): named. userZ: one damaged set then ended the whole report (exit 2, nothing of the
    intact sets), and an unfinished set was left out without a word: the report shows the other sets and names
    each set it leaves out and why, on the page and as a warning; a damaged run file is still an error."""
    root, _ = run_folder
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    path = copy / "scores" / "ekfac.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    shutil.copy(root / "scores" / "ekfac.safetensors", copy / "scores" / "stopped.safetensors")  # no stopped.json
    with pytest.warns(ScoreSetLeftOut) as said:
        result = runner.invoke(app, ["report", str(copy)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    said = sorted(str(w.message) for w in said if issubclass(w.category, ScoreSetLeftOut))
    assert len(said) == 2 and "ekfac is damaged" in said[0] and "ekfac.safetensors" in said[0], said
    assert "stopped is unfinished" in said[1], said
    page = html.unescape((copy / "report.html").read_text())
    assert "Score sets left out" in page and "ekfac is damaged" in page and "stopped is unfinished" in page
    others = sorted(p.stem for p in (root / "scores").glob("*.safetensors") if p.stem != "ekfac")
    assert others and all(f"Scores {name}: top rows" in page for name in others), others
    assert "Scores ekfac: top rows" not in page
    shutil.copy(root / "scores" / "ekfac.safetensors", path)
    (copy / "manifest.json").write_text("{'no': 1}")
    result = runner.invoke(app, ["report", str(copy)])
    assert result.exit_code == 2 and "manifest.json is not valid JSON" in result.output, result.output


def test_query_html_of_a_row_among_proponents_and_opponents(query_view):
    """With more proponents and opponents asked for than the run has rows (20 rows, --top-k 15), some rows are
    both; `query --html` passed them twice to the token scores and ended in a traceback (duplicate id). Each is
    scored once and shown in both lists, with the same tokens."""
    root, _ = query_view
    prompt, completion = "Determine the rewriting rule: a b c -> c b a\nRule:", " reverse"
    page = root / "overlap.html"
    args = ["query", prompt, completion, "--run", str(root / "run-report"), "--top-k", "15", "--json"]
    result = runner.invoke(app, [*args, "--html", str(page)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    both = {e["id"] for e in report["proponents"]} & {e["id"] for e in report["opponents"]}
    assert both and page.read_text().count('class="heatmap"') == 15 + 15 + 3


DAMPINGS = (("gradsim", 0.5), ("bm25", 0.5), ("ekfac", None), ("datainf", 0.5))
"""Diagnose rows' (method, damping): two methods that read none, one without an exact reference, one with it."""


def test_the_html_diagnose_table_formats_numbers_as_the_markdown_tables_do():
    """The HTML report formatted numbers with its own helper, which showed ``-0.000`` for a Spearman that rounds to
    zero where the Markdown tables (``toolkit.number``) show ``0.000``, and ``nan`` as ``–`` only there."""
    from wherefrom.studies.report.sections import diagnose_section

    rows = [{"method": "gradsim", "ihvp_rel_error": 0.5, "spearman": -0.0001, "spearman_per_query": float("nan")}]
    table = diagnose_section(rows)["blocks"][0]["rows"]
    assert table == [["gradsim", "0.5", "0.000", "–", "–", "–", "not read"]]


def test_the_html_diagnose_report_shows_the_warnings_damping_and_memory_of_diagnose_md():
    """userF: `report` of a diagnose folder left out what `diagnose.md` says: each method's warnings (cg and lissa
    that did not converge looked converged), the shared damping and the peak memory, and why there is no exact
    reference."""
    from wherefrom.studies.report.sections import diagnose_section

    rows = [
        {"method": "cg", "ihvp_rel_error": 5.8e-4, "spearman": 1.0, "spearman_per_query": 1.0, "seconds": 2.0,
         "peak_mib": 12.4, "damping": 0.0023, "warnings": ["ConvergenceWarning: cg did not converge in max_iter=100"]},
    ]  # fmt: skip
    blocks = diagnose_section(rows, "over the memory limit")["blocks"]
    assert blocks[0]["columns"][-2:] == ["peak memory, MiB", "damping (absolute)"]
    assert blocks[0]["rows"][0][-2:] == ["12", "0.0023"]
    # userF: a method that reads no damping showed the shared one; an influence method without a reference its own
    cells = {m: diagnose_section([{"method": m, "damping": d}])["blocks"][0]["rows"][0][-1] for m, d in DAMPINGS}
    assert cells == {"gradsim": "not read", "bm25": "not read", "ekfac": "own default", "datainf": "0.5"}
    notes = [b["text"] for b in blocks if b["type"] == "note"]
    assert notes == [
        "No exact reference: over the memory limit",
        "Warning of cg: ConvergenceWarning: cg did not converge in max_iter=100",
    ]
    unrecorded = [b["text"] for b in diagnose_section([{"method": "lissa"}])["blocks"] if b["type"] == "note"]
    assert unrecorded == ["Warnings of lissa: not recorded (a row written by an earlier version)"]


def test_report_on_a_killed_bench_names_it_unfinished_with_its_replay_line(tmp_path):
    """A bench killed before ``bench.json`` was "not a result wherefrom can report on" though its ``config.json``
    records the command; the message names the unfinished command and the ``replay`` line that finishes it."""
    out = tmp_path / "killed bench"
    result = runner.invoke(app, ["bench", "--task", "rules", "--methods", "bm25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("bench.json", "bench.md"):
        (out / name).unlink()  # as a kill before the result files leaves it
    with pytest.raises(FileNotFoundError, match="is an unfinished bench folder") as refused:
        write_report(out)
    assert f"`wherefrom replay '{out}'`" in str(refused.value)
    assert runner.invoke(app, ["replay", str(out)]).exit_code == 0
    assert "bm25" in write_report(out).read_text()


@pytest.mark.parametrize("command", ["groundtruth", "tune", "finetune"])
def test_report_on_a_finished_folder_it_has_no_page_for_says_so(tmp_path, command):
    """userS: a finished ground truth (not evaluated yet) or tune folder was called "unfinished" and sent to
    ``replay``, as if killed; it is named finished, with what to do instead."""
    out = tmp_path / command
    out.mkdir()
    record = {"replay": {command: {"command": command, "arguments": {}, "line": f"wherefrom {command}"}}}
    (out / "config.json").write_text(json.dumps(record))
    marker = {"groundtruth": "groundtruth.json", "tune": "tune.json", "finetune": "finetune_config.json"}[command]
    (out / marker).write_text("{}")
    with pytest.raises(FileNotFoundError) as refused:
        write_report(out)
    said = str(refused.value)
    assert f"is a finished {command} folder ({marker}), which report does not read: " in said
    assert "unfinished" not in said and "replay" not in said
    (out / marker).unlink()  # killed before its result: unfinished, with the replay line
    with pytest.raises(FileNotFoundError, match=f"is an unfinished {command} folder"):
        write_report(out)


def test_rows_of_the_wrong_sign_are_not_called_proponents_or_opponents():
    """userZ: the report and the query view titled rows of negative score "top proponents" (the terminal table
    said "highest scores (2 of 3 <= 0, not proponents)"): every table is now titled by that one rule."""
    total = torch.tensor([[7.5, -15.0, -18.0, -20.0], [3.0, 2.0, 1.0, 0.5]], dtype=torch.float64)
    scores = Scores(["e1", "ok"], ["a", "b", "c", "d"], ["m"], total[None])
    tops = scores_sections("edge", scores, None, top_k=3, labels={}, unread="no rows")[0]
    captions = [block.get("caption") for block in tops["blocks"] if block["type"] == "entries"]
    assert captions == [
        "Query e1: highest scores (2 of 3 <= 0, not proponents)",
        "Query e1: opponents",
        "Query ok: proponents",
        "Query ok: lowest scores (3 of 3 >= 0, not opponents)",
    ], captions
    entry = {"prompt": "p", "completion": "c", "top_modules": []}
    report = {
        "query": {"prompt": "x", "completion": "y"},
        "proponents": [{**entry, "id": "a", "score": 7.5}, {**entry, "id": "b", "score": -15.0}],
        "opponents": [{**entry, "id": "d", "score": -20.0}],
    }
    blocks = query_sections(report)[0]["blocks"]
    captions = [block.get("caption") for block in blocks if block["type"] == "entries"]
    assert captions[0] == "Highest scores (1 of 2 <= 0, not proponents)" and captions[1] == "Opponents"


def test_the_query_view_promises_a_heatmap_only_where_the_rows_have_token_values():
    """userF: the view of `query --json` without `--per-token` titled its proponents "(heatmap: each training token's
    part of the score)" over rows with no token values, so no heatmap."""
    from wherefrom.studies.report.sections import query_sections

    def report(tokens):
        row = {"id": "t1", "score": 2.0, "prompt": "a", "completion": " b", **({"tokens": tokens} if tokens else {})}
        return {"query": {"prompt": "a", "completion": " b"}, "proponents": [row], "opponents": []}

    def caption(tokens) -> str:
        return query_sections(report(tokens))[0]["blocks"][2]["caption"]

    assert caption(None) == "Proponents"
    assert caption([["a", 1.0], [" b", 1.0]]) == "Proponents (heatmap: each training token's part of the score)"


@pytest.mark.parametrize(
    ("prompt", "title"),
    [
        ("Rule:\n a  b", "Query: Rule: a b"),
        ("w" * 80, "Query: " + "w" * 80),
        ("word " * 30, "Query: " + ("word " * 16)[:79].rstrip() + "…"),
    ],
)
def test_a_query_views_title_says_where_it_cut_the_prompt(tmp_path, prompt, title):
    """userM: the query view's title was the prompt's first 80 characters, cut mid-word with no ellipsis and its
    line breaks kept; it is one line, and an ellipsis ends one that was cut (the query's table shows it whole)."""
    row = {"id": "t1", "score": 2.0, "kind": "proponent", "label": None, "prompt": "a", "completion": " b"}
    query = {"query": {"prompt": prompt, "completion": " b"}, "strategy": "ekfac", "sign": "s"}
    (tmp_path / "q.json").write_text(json.dumps({**query, "proponents": [row], "opponents": []}))
    page = write_report(tmp_path / "q.json").read_text()
    assert re.search(r"<title>([^<]*)</title>", page).group(1) == html.escape(title, quote=False)


def test_diagnose_md_shows_not_read_for_a_method_that_takes_no_damping(tmp_path):
    """userF: ``diagnose.md``'s damping column showed the shared damping for ``gradsim`` and ``bm25``, which read
    none (``MethodSpec.takes``); the HTML report's cells are the same (``diagnose.damping_cell``)."""
    rows = [Diagnosis(m, 1.0, 2.0, damping=d) for m, d in DAMPINGS]
    _, md = write_diagnosis(rows, None, tmp_path, {"command": "wherefrom diagnose ..."})
    table = [line.split("|") for line in md.read_text().splitlines() if line.startswith("| ")]
    ends = {cells[1].strip(): cells[-2].strip() for cells in table}
    assert {m: ends.get(m) for m, _ in DAMPINGS} == {
        "gradsim": "not read",
        "bm25": "not read",
        "ekfac": "own default",
        "datainf": "0.5",
    }


def test_the_bench_report_shows_failed_methods_and_seeds_as_bench_md_does(tmp_path):
    """userI: a method whose every seed failed showed as a row of dashes (``bench.md``: ``failed: IndexError ...``),
    a seed that failed left no trace (the mean was over the others), methods came in alphabetical order, and
    ``cover_ceiling`` (not a method's metric) had a column. The report follows ``bench.md``: ``--methods`` order,
    the task kind's metrics, "seeds ok", each failed seed's error."""
    folder = tmp_path / "bench"
    shutil.copytree(RESULTS / "study-smollm2" / "emotion", folder)
    data = json.loads((folder / "bench.json").read_text())
    data["aggregate"]["repsim"].update(n_ok=0, errors={"0": "IndexError: layer 50 is out of range"}, metrics={})
    data["aggregate"]["bm25"].update(n_ok=data["aggregate"]["bm25"]["n_seeds"] - 1, errors={"2": "ValueError: x"})
    data["sizes"] = {"n_train": 40, "n_test": 8}  # as a bench writes them (this older one has none)
    (folder / "bench.json").write_text(json.dumps(data))
    page = write_report(folder).read_text()
    table = page[page.index("<table>") : page.index("</table>")]
    methods = re.findall(r"<tr><td>([a-z0-9-]+)</td>", table)
    assert methods == data["config"]["methods"], methods
    assert "<th>seeds ok</th>" in table and "cover_ceiling" not in table
    widths = {len(re.findall(r"<t[hd]>", row)) for row in re.findall(r"<tr>.*?</tr>", table, re.S)}
    assert widths == {len(re.findall(r"<th>", table))}, widths  # reviewS: a failed row had one cell too many
    assert f"<td>0/{data['aggregate']['repsim']['n_seeds']}</td>" in table
    assert "<td>failed: IndexError: layer 50 is out of range</td>" in table
    assert "repsim, seed 0 failed: IndexError" in page and "bm25, seed 2 failed: ValueError: x" in page
    n = data["aggregate"]["bm25"]["n_seeds"]
    assert f"<td>{n - 1}/{n}</td>" in table
    assert f"Bench: task {data['config']['task']} (class; 40 training rows, 8 queries)" in html.unescape(page)


def test_the_ablate_report_has_what_ablate_md_says(tmp_path):
    """userI: the ablation page left out what each run switches, the seeds' Student-t intervals and the short-rows
    table, titled the change plots as the metrics themselves, printed the changes without their sign and put the
    methods in alphabetical order. It now says what ``ablate.md`` says, with the same cells."""
    folder = RESULTS / "ablation-smollm2" / "emotion"
    page = write_report(folder, tmp_path / "ablate.html").read_text()
    text = (folder / "ablate.md").read_text()
    assert "intervals are 95% Student-t over seeds" in page and "Short rows among the top-1" in page
    assert "<th>Δ acc</th>" in page and "<figcaption>Δ cover</figcaption>" in page
    for cell in ("+0.267 [-0.113, +0.646]", "+0.283 [+0.127, +0.440]"):  # template, ekfac: as ablate.md has it
        assert cell in text and f"<td>{cell}</td>" in page
    first = page[page.index("<table>") : page.index("</table>")]
    assert re.findall(r"<tr><td>([a-z0-9-]+)</td>", first) == ["ekfac", "gradsim", "repsim"]


def test_the_word_order_report_keeps_the_groups_order_and_names_the_method(tmp_path):
    """userI: the rows came in alphabetical order (the ratio reversed/same among the mean influences), and neither
    the title nor the table named the method or what was averaged."""
    folder = tmp_path / "wo"
    folder.mkdir()
    stat = {"mean": 1.0, "low": 0.5, "high": 1.5}
    summary = {"control": stat, "reversed": stat, "reversed/same": {**stat, "mean": 0.1188}, "same": stat}
    (folder / "wordorder.json").write_text(json.dumps({"config": {"method": "kfac"}, "summary": summary}))
    page = write_report(folder).read_text()
    table = page[page.index("<table>") : page.index("</table>")]
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == [
        "same",
        "reversed",
        "control",
        "reversed / same (each seed&#39;s ratio, then their mean)",
    ]
    assert "Word order (kfac)" in page and "mean influence score per training row" in table


@pytest.mark.parametrize(("method", "family"), [("bm25", "lexical"), ("repsim", "representation"), ("gradsim", None)])
def test_a_similarity_methods_report_says_so_and_fits_no_influence_profile(tmp_path, method, family):
    """userI: the report of a bm25 attribute folder read its scores as influence ("positive = proponent (raises log
    p(completion | prompt))"), with a layer profile of one "other" module and power-law tail fits. A representation
    or lexical method's page says its scores are a similarity and shows their top rows only."""
    train, _ = rule_identification(n_train=20, n_test=2, seed=0)
    write_jsonl(train, tmp_path / "train.jsonl")
    out = tmp_path / method
    save_scores(heavy_tailed_scores(0, [r.id for r in train]), out, "scores")
    (out / "config.json").write_text(json.dumps({"method": method, "train": str(tmp_path / "train.jsonl")}))
    page = write_report(out).read_text()
    said = f"higher = more similar (a {family} similarity, not influence)"
    assert (said in page) == (family is not None) and ("raises log p(completion | prompt))." in page) == (not family)
    assert ("influence by layer" in page) == (family is None) and ("The tail" in page) == (family is None)
    # userM: its ends were titled "proponents" / "lowest scores (... not opponents)", and the page's head said
    # "Influence sign: positive = proponent" alone
    titles = re.findall(r"Query [^:<]+: ([a-z ]+)", page)
    assert titles and (set(titles) <= {"highest scores", "lowest scores"}) == (family is not None), titles
    assert "Sign of influence scores: positive = proponent" in page and "Influence sign" not in page
