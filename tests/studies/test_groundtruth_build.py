"""``build_groundtruth`` + ``evaluate`` end to end on a tiny Llama fully fine-tuned from a saved random
init, the CLI, resume, and the id checks of ``evaluate_scores``."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_model, make_records
from tests.models.tokenizers import version_1
from tests.studies.failing import failing_methods
from tests.studies.replayed import config_of_line, off_default
from wherefrom.core.scoring import Scores
from wherefrom.core.store import OutputExists
from wherefrom.engine.api import AttributionConfig
from wherefrom.models.tiny import tiny_tokenizer
from wherefrom.studies.groundtruth.build import (
    GroundTruth,
    GroundTruthConfig,
    build_groundtruth,
    command_line,
    pbrf_rows_of,
)
from wherefrom.studies.groundtruth.evaluate import evaluate, evaluate_scores

N_TRAIN, N_QUERIES, N_SUBSETS, LOO_ROWS, LOO_SEEDS = 16, 4, 8, 4, 2


def build_small(root, **settings) -> GroundTruth:
    """A 1-layer tiny Llama (hidden 16, saved random init) fully fine-tuned on ``make_records`` rows
    (a ``path:`` task); small enough that ``exact`` takes seconds."""
    root.mkdir(parents=True, exist_ok=True)
    model = build_model("llama")
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for name, rows in (("train", make_records(N_TRAIN, seed=1)), ("test", make_records(N_QUERIES, seed=2, prefix="q"))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows), encoding="utf-8")
    config = GroundTruthConfig(
        task=f"path:{root / 'train.jsonl'}:{root / 'test.jsonl'}",
        out=str(root / "gt"),
        model=str(root / "model"),
        lora_rank=None,
        epochs=3,
        learning_rate=1e-2,
        batch_size=8,
        max_length=64,
        n_subsets=N_SUBSETS,
        loo_rows=LOO_ROWS,
        loo_seeds=LOO_SEEDS,
        device="cpu",
    )
    for key, value in settings.items():
        setattr(config, key, value)
    return build_groundtruth(config)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_small(tmp_path_factory.mktemp("gt-build")).folder


def test_folder_layout_and_loaded_arrays(folder):
    gt = GroundTruth.load(folder)
    assert gt.lds_masks.shape == (N_SUBSETS, N_TRAIN) and gt.lds_masks.dtype == bool
    assert (gt.lds_masks.sum(1) == N_TRAIN // 2).all()
    assert gt.lds_outputs.shape == (N_SUBSETS, 1, N_QUERIES) and np.isfinite(gt.lds_outputs).all()
    assert (gt.lds_outputs < 0).all()  # log-likelihoods
    assert gt.loo_rows.shape == (LOO_ROWS,) and (np.diff(gt.loo_rows) > 0).all()
    assert gt.loo_full.shape == (LOO_SEEDS, N_QUERIES) and gt.loo_without.shape == (LOO_ROWS, LOO_SEEDS, N_QUERIES)
    assert gt.loo_effect.shape == (N_QUERIES, LOO_ROWS)
    assert gt.pbrf_rows is None and gt.pbrf_influence is None
    assert gt.train_ids == [r.id for r in gt.task.train] and len(gt.query_ids) == N_QUERIES
    assert [p.name for p in gt.checkpoints] == ["epoch-1", "epoch-2", "epoch-3"]
    assert not (folder / "scratch").exists()  # the retraining jobs' scratch folder goes when they end
    meta = gt.meta
    assert meta["command"].startswith("wherefrom groundtruth --task path:") and meta["versions"]["torch"]
    assert meta["n_jobs"] == N_SUBSETS + LOO_SEEDS * (LOO_ROWS + 1)
    # the kept model and the seed-0 retraining of the full set are the same training run
    assert meta["retrain_reproducibility_max_abs"] < 1e-4
    assert meta["noise"]["loo"]["seeds"] == LOO_SEEDS and meta["noise"]["loo"]["seed_std"] >= 0
    model, tokenizer = gt.load_model()
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token is not None  # full fine-tune


def test_evaluate_exact_and_identity_with_table_and_resume(folder, tmp_path):
    report = evaluate(folder, ["exact", "identity"], out=tmp_path / "report")
    for method in ("exact", "identity"):
        row = report["methods"][method]
        assert row["error"] is None, row["error"]
        metrics = row["metrics"]
        for target in ("lds", "loo_pearson", "loo_spearman"):
            assert math.isfinite(metrics[target]["mean"]) and -1 <= metrics[target]["mean"] <= 1
            assert metrics[target]["low"] <= metrics[target]["mean"] <= metrics[target]["high"]
            assert len(metrics[target]["per_query"]) == N_QUERIES
        assert metrics["pbrf_spearman"] is None
    table = (tmp_path / "report.md").read_text()
    assert "| method | LDS | LOO Pearson | LOO Spearman | PBRF Spearman |" in table and "| exact | " in table
    # userF: the noise floors groundtruth.json records were in no table (LOO's signal-to-noise was 1.1)
    loo = GroundTruth.load(folder).meta["noise"]["loo"]
    assert f"Noise floors: LOO signal-to-noise {loo['signal_to_noise']:.3g} over {loo['seeds']} seeds" in table
    lds = GroundTruth.load(folder).meta["noise"]["lds"]  # one seed per subset: nothing to compare the spread with
    assert lds["seeds"] == 1 and "LDS seed noise not measured (one seed per subset; --subset-seeds 2" in table
    assert json.loads((tmp_path / "report.json").read_text())["methods"]["exact"]["seconds"] > 0

    row_file = folder / "scores" / "exact.row.json"
    stamp = row_file.stat().st_mtime_ns
    again = evaluate(folder, ["exact"], out=tmp_path / "again")
    assert row_file.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert again["methods"]["exact"]["metrics"] == report["methods"]["exact"]["metrics"]
    # other attribution settings are another key: recomputed
    evaluate(
        folder,
        ["exact"],
        attribution=AttributionConfig(damping=1.0, batch_size=8, max_length=64),
        out=tmp_path / "x",
        overwrite=True,
    )
    assert row_file.stat().st_mtime_ns != stamp


def test_a_failing_method_does_not_stop_the_others(folder, tmp_path):
    from typer.testing import CliRunner

    from wherefrom.cli import app

    with failing_methods(lambda name, _config: name == "kfac"):
        report = evaluate(folder, ["identity", "kfac"], out=tmp_path / "r")
        args = ["evaluate", str(folder), "--methods", "identity,kfac", "--out", str(tmp_path / "c")]
        result = CliRunner().invoke(app, args)
    assert report["methods"]["kfac"]["error"] and report["methods"]["kfac"]["metrics"] is None
    assert report["methods"]["identity"]["error"] is None
    assert "| kfac | failed: " in (tmp_path / "r.md").read_text()
    assert (
        "Failed (each error in full):\n\n- kfac: RuntimeError: out of memory, say\n" in (tmp_path / "r.md").read_text()
    )
    assert result.exit_code == 1 and "| identity | " in result.output, result.output  # it exited 0
    assert "error: kfac: RuntimeError: out of memory, say" in result.output


def test_a_method_with_non_finite_scores_fails_alone(folder, tmp_path, monkeypatch):
    """reviewX: the NaN refusal of `evaluate_scores` was raised outside the per-method handling, so one method (or
    tune point) with a non-finite score ended the whole evaluate with no report. It fails alone, as a method that
    raises does, and the others are reported."""
    import importlib

    evaluate_module = importlib.import_module(
        "wherefrom.studies.groundtruth.evaluate"
    )  # the package's name is the function
    real = evaluate_module.load_method_scores

    def poisoned(where, method):
        scores = real(where, method)
        if method == "identity":
            scores.per_module[0, 0, 0] = float("nan")
        return scores

    monkeypatch.setattr(evaluate_module, "load_method_scores", poisoned)
    report = evaluate(folder, ["identity", "gradsim"], out=tmp_path / "r")
    assert report["methods"]["gradsim"]["error"] is None and report["methods"]["gradsim"]["metrics"]["lds"]
    failed = report["methods"]["identity"]
    assert failed["metrics"] is None and "scores are NaN or infinite" in failed["error"], failed


def test_evaluate_reports_each_methods_passes_to_its_progress(folder, tmp_path):
    """`evaluate` and `tune` gave their progress to the loop over methods (points) only, not to a method's passes;
    a method computed now reports them (its train and query gradient passes), one reused reports none."""
    seen: list[str] = []

    def progress(items, description):
        for item in items:
            seen.append(description)
            yield item

    evaluate(folder, ["gradsim-cosine"], out=tmp_path / "p", progress=progress)
    assert seen[0] == "methods" and {"train gradients", "query gradients"} <= set(seen), seen
    seen.clear()
    evaluate(folder, ["gradsim-cosine"], out=tmp_path / "p", progress=progress)
    assert seen == ["methods"]


def test_rebuild_reuses_every_job(folder):
    gt = GroundTruth.load(folder)
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "jobs").iterdir()}
    stale = folder / "scratch" / "wherefrom-retrain-killed"  # what a job killed by SIGKILL leaves
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    again = build_groundtruth(gt.config)
    assert not (folder / "scratch").exists()
    (folder / "scratch").mkdir()
    (folder / "scratch" / "notes.txt").write_text("mine")  # not a job's: kept, and so is the folder
    build_groundtruth(gt.config)
    assert (folder / "scratch" / "notes.txt").read_text() == "mine"
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "jobs").iterdir()} == stamps
    np.testing.assert_array_equal(again.lds_outputs, gt.lds_outputs)


def test_evaluate_refuses_a_bad_method_option_before_any_method_runs(folder, tmp_path):
    """It failed that method's row after the methods before it ran, and evaluate ended with exit 0."""
    scores = folder / "scores"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in scores.iterdir()) if scores.exists() else []
    with pytest.raises(ValueError, match=r"method 'identity' has no option\(s\) \['depth'\]"):
        evaluate(folder, ["exact", "identity"], {"identity": {"depth": 3}}, out=tmp_path / "bad")
    assert not (tmp_path / "bad.json").exists()
    assert before == (sorted((p.name, p.stat().st_mtime_ns) for p in scores.iterdir()) if scores.exists() else [])


def test_evaluate_scores_checks_ids_and_selects_queries(folder):
    gt = GroundTruth.load(folder)
    rng = np.random.default_rng(0)
    total = torch.from_numpy(rng.normal(size=(N_QUERIES, N_TRAIN)))

    def scores(query_ids, train_ids, values):
        return Scores(list(query_ids), list(train_ids), ["m"], values[None])

    full = evaluate_scores(gt, scores(gt.query_ids, gt.train_ids, total))
    # train columns in another order give the same numbers
    order = rng.permutation(N_TRAIN)
    shuffled = evaluate_scores(gt, scores(gt.query_ids, [gt.train_ids[j] for j in order], total[:, order]))
    assert shuffled["lds"]["per_query"] == pytest.approx(full["lds"]["per_query"])
    # a query selection, from all-query scores or from scores of the selection only
    picked = evaluate_scores(gt, scores(gt.query_ids, gt.train_ids, total), queries=[2, 0])
    assert picked["n_queries"] == 2
    assert picked["lds"]["per_query"] == pytest.approx([full["lds"]["per_query"][2], full["lds"]["per_query"][0]])
    only = evaluate_scores(gt, scores([gt.query_ids[2], gt.query_ids[0]], gt.train_ids, total[[2, 0]]), queries=[2, 0])
    assert only["loo_pearson"]["per_query"] == pytest.approx(picked["loo_pearson"]["per_query"])
    with pytest.raises(ValueError, match="train ids differ"):
        evaluate_scores(gt, scores(gt.query_ids, ["x", *gt.train_ids[1:]], total))
    with pytest.raises(ValueError, match="query ids"):
        evaluate_scores(gt, scores(["nope"] * N_QUERIES, gt.train_ids, total))
    with pytest.raises(ValueError, match="out of range"):
        evaluate_scores(gt, scores(gt.query_ids, gt.train_ids, total), queries=[N_QUERIES])
    # userX: a NaN score made its query's correlations undefined, and the summary left the query out (LDS rose)
    poisoned = total.clone()
    poisoned[1, 3] = float("nan")
    said = rf"1 scores are NaN or infinite, e.g. of training row '{gt.train_ids[3]}' for query '{gt.query_ids[1]}'"
    with pytest.raises(ValueError, match=said):
        evaluate_scores(gt, scores(gt.query_ids, gt.train_ids, poisoned))
    with pytest.raises(
        ValueError, match=rf"missing \['{gt.train_ids[1]}'\], extra \[\], repeated \['{gt.train_ids[0]}'\]"
    ):
        evaluate_scores(gt, scores(gt.query_ids, [gt.train_ids[0], *gt.train_ids[:1], *gt.train_ids[2:]], total))


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        GroundTruthConfig(task="nope", out=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="n_subsets"):
        GroundTruthConfig(task="rules", out=str(tmp_path), n_subsets=1).validate()
    with pytest.raises(ValueError, match="loo_seeds"):
        GroundTruthConfig(task="rules", out=str(tmp_path), loo_seeds=0).validate()
    with pytest.raises(ValueError, match="nothing to build"):
        GroundTruthConfig(task="rules", out=str(tmp_path), n_subsets=0, loo_rows=0).validate()
    # the layout is checked before the base model loads, as bench's is
    with pytest.raises(ValueError, match=r"template '\{prompt\}' must contain \{prompt\} once and end with"):
        GroundTruthConfig(task="rules", out=str(tmp_path), template="{prompt}").validate()
    with pytest.raises(ValueError, match=r"loss_tokens must be one of \('completion', 'all'\), got 'prompt'"):
        GroundTruthConfig(task="rules", out=str(tmp_path), loss_tokens="prompt").validate()
    with pytest.raises(FileNotFoundError, match="not a ground-truth folder"):
        GroundTruth.load(tmp_path)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--subsets", "1"], "n_subsets (--subsets) must be 0 (no LDS) or >= 3"),
        # over 2 subsets the LDS is +-1 whatever the scores: tune picked a point from such values
        (["--subsets", "2"], "(the LDS is a correlation across subsets, undefined over fewer), got 2"),
        (["--subsets", "0", "--loo-rows", "0"], "n_subsets (--subsets), loo_rows (--loo-rows) and pbrf_rows"),
        (["--loo-rows", "1000"], "loo_rows (--loo-rows) is 1000, more than the 240 training rows of task 'rules'"),
        (["--pbrf-rows", "999"], "pbrf_rows (--pbrf-rows) is 999, more than the 240 training rows"),
    ],
)
def test_groundtruth_refusals_name_the_flag(tmp_path, flags, said):
    """The command line's refusals named only the configuration's fields (``n_subsets`` for ``--subsets``), and
    ``--loo-rows 1000`` said ``loo_rows=1000 / pbrf_rows=0 exceed the 240 training rows``, naming the one that did
    not too; the flag is named beside the field, and nothing is left behind."""
    from typer.testing import CliRunner

    from wherefrom.cli import app

    out = tmp_path / "gt"
    result = CliRunner().invoke(app, ["groundtruth", "--task", "rules", *flags, "--out", str(out)])
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not out.exists()
    config = GroundTruthConfig(task="rules", out="o", lora_rank=None, pbrf_options={"steps": 5})
    line = command_line(config)
    assert "--lora-rank 0" in line and "--pbrf-option steps=5" in line


def test_cli_groundtruth_and_evaluate(folder, tmp_path):
    from typer.testing import CliRunner

    from wherefrom.cli import app

    gt = GroundTruth.load(folder)
    config = gt.config
    out = tmp_path / "cli-gt"
    args = [
        "groundtruth",
        "--task",
        config.task,
        "--model",
        config.model,
        "--lora-rank",
        "0",
        "--epochs",
        "1",
        "--learning-rate",
        "0.01",
        "--max-length",
        "64",
        "--subsets",
        "3",
        "--loo-rows",
        "2",
        "--loo-seeds",
        "1",
        "--out",
        str(out),
    ]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    built = GroundTruth.load(out)
    assert built.lds_masks.shape == (3, N_TRAIN) and built.loo_rows.shape == (2,) and built.config.lora_rank is None
    before = files_of(out)
    other = [*args[: args.index("--epochs") + 1], "2", *args[args.index("--epochs") + 2 :]]
    result = runner.invoke(app, other)  # another --epochs into the same folder: refused, nothing replaced
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    said = " ".join(result.output.split())
    assert "model/finetune_config.json, made from other inputs (config.epochs: recorded 1, now 2)" in said, said
    assert "pass overwrite=True (--overwrite on the command line) to replace them" in said and files_of(out) == before
    result = runner.invoke(app, ["evaluate", str(out), "--methods", "identity,bm25", "--device", "cpu"])
    assert result.exit_code == 0, result.output  # --device: README's "every command" (evaluate had none)
    assert "| identity | " in result.output and (out / "evaluate.md").is_file()
    # userM: --loo-rows 2 gave blank LOO columns, and evaluate.md did not say why
    assert "--loo-rows 2: LOO correlations need at least 3 points" in (out / "evaluate.md").read_text()
    again = ["evaluate", str(out), "--methods", "identity,bm25", "--out", str(out / "evaluate"), "--device", "cpu"]
    again = runner.invoke(app, again)
    assert again.exit_code == 0, again.output  # --out naming an earlier report (both its files) replaces it
    scores = files_of(out / "scores")
    other = runner.invoke(app, ["evaluate", str(out), "--methods", "identity,bm25", "--option", "bm25.k1=2.0"])
    said = " ".join(other.output.split())
    assert other.exit_code == 2 and "Traceback" not in other.output, other.output
    assert f"{out / 'scores' / 'bm25.row.json'}, made from other inputs (options.k1: not recorded, now 2.0)" in said
    assert files_of(out / "scores") == scores
    assert "--device cpu" in json.loads((out / "config.json").read_text())["replay"]["evaluate evaluate"]["line"]
    assert (
        GroundTruth.load(out, "meta").config.device == "meta"
        and GroundTruth.load(out).config.device == built.config.device
    )
    unused = runner.invoke(app, ["evaluate", str(out), "--methods", "identity", "--option", "lissa.depth=3"])
    assert unused.exit_code == 2 and "method 'lissa' does not run here (methods run: identity)" in unused.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing"), "--methods", "identity"])
    assert result.exit_code == 2 and "no such folder" in result.output  # userF: "not a ground-truth folder"
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "empty"), "--methods", "identity"])
    assert result.exit_code == 2 and "not a ground-truth folder" in result.output


def files_of(folder) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_with_other_settings_is_refused_before_it_replaces_anything(tmp_path):
    """A ground truth rerun into its folder with another setting replaced the full-data model, every retraining job
    and every PBRF row it touched, without a word (hours of retraining lost to a mistyped flag). Without
    ``overwrite`` (``wherefrom groundtruth`` without ``--overwrite``) such a rerun is refused before anything is
    computed, naming the first replaced file, how many more, and the settings that differ; the folder is unchanged.
    More subsets are added beside the earlier ones; ``overwrite=True`` (the Python default) replaces."""
    config = build_small(tmp_path, n_subsets=3, loo_rows=0, pbrf_rows=1, pbrf_options={"steps": 2}).config
    folder = Path(config.out)
    before = files_of(folder)
    refused = {
        "model/finetune_config.json, made from other inputs (config.epochs: recorded 3, now 2)": {"epochs": 2},
        # userF: named only the rows ("indices"), not the setting that drew them
        "jobs/lds-0000-r0.json and the other LDS jobs, made with another --alpha: subsets of 8 of 16 rows (alpha "
        "0.5), now --alpha 0.25 draws 4": {"alpha": 0.25},
        f"pbrf-rows/row-{pbrf_rows_of(config, N_TRAIN)[0]}.json, made from other inputs (config.steps: recorded 2, "
        "now 3)": {"pbrf_options": {"steps": 3}},
    }
    for said, change in refused.items():
        with pytest.raises(OutputExists) as error:
            build_groundtruth(replace(config, **change), overwrite=False)
        assert f"{folder}/{said}" in str(error.value) and str(error.value).endswith(
            "pass overwrite=True (--overwrite on the command line) to replace them"
        )
        assert files_of(folder) == before, change
    build_groundtruth(replace(config, n_subsets=4), overwrite=False)
    after = files_of(folder)
    assert "jobs/lds-0003-r0.json" in after and all(
        after[f"jobs/lds-000{s}-r0.json"] == before[f"jobs/lds-000{s}-r0.json"] for s in range(3)
    )
    build_groundtruth(replace(config, alpha=0.25), overwrite=True)
    assert files_of(folder)["jobs/lds-0000-r0.json"] != before["jobs/lds-0000-r0.json"]


def test_groundtruth_command_line_gives_back_its_config(tmp_path):
    """Every setting of a ground truth, each off its default, survives :func:`command_line` and the CLI, the
    fine-tuning settings ``bench`` takes included (the input layout, LoRA alpha and dropout, the schedule: ground
    truth had none of them, so no ground truth could be built for a bench run with them)."""
    import wherefrom.studies.groundtruth.build as module

    (tmp_path / "config.json").write_text("{}")  # a model folder as --model's check sees one (nothing is loaded)
    config = GroundTruthConfig(
        task="rules", out=str(tmp_path / "gt"), n_train=10, n_test=3, model=str(tmp_path), epochs=3,
        learning_rate=2e-3, lora_rank=2, lora_targets=["q_proj"], batch_size=4, max_length=96, lora_alpha=16,
        lora_dropout=0.1, lr_schedule="linear", template="Q: {prompt} A: {completion}", append_eos=False,
        pad_left=True, loss_tokens="all", truncate=True, alpha=0.25, n_subsets=5, subset_seeds=2, loo_rows=3,
        loo_seeds=3, pbrf_rows=2, pbrf_options={"steps": 5}, workers=2, seed=4, device="cpu",
    )  # fmt: skip
    assert off_default(config, set()) == []
    assert config_of_line(command_line(config), module, "build_groundtruth") == asdict(config)


def test_a_ground_truth_fine_tunes_measures_and_attributes_with_its_layout(tmp_path):
    """A ground truth's input layout reaches its fine-tuning (recorded with the model), the measured queries
    ``f(z_q)`` (the fine-tuned model's loss under that layout) and the attribution that ``evaluate`` starts from."""
    from wherefrom.core.encoding import encode_records, iterate_batches, pad_id
    from wherefrom.core.task import LanguageModelingTask
    from wherefrom.models.loading import load_model

    layout = {"template": "Q {prompt} A {completion}", "append_eos": False, "loss_tokens": "all"}
    gt = build_small(tmp_path, n_subsets=0, loo_rows=1, loo_seeds=1, epochs=1, **layout)
    recorded = json.loads((gt.folder / "model" / "finetune_config.json").read_text())["config"]
    assert {k: recorded[k] for k in layout} == layout
    attribution = gt.config.attribution()
    assert {k: getattr(attribution, k) for k in layout} == layout

    tuned = load_model(gt.folder / "model" / "model", device="cpu")
    queries = gt.task.test

    def measured(**given) -> np.ndarray:
        examples = encode_records(queries, tuned.tokenizer, max_length=64, **given)
        batches = iterate_batches(examples, 8, pad_id(tuned.tokenizer))
        with torch.no_grad():
            return torch.cat([LanguageModelingTask().measurement(tuned.model, b) for _, b in batches]).double().numpy()

    full = json.loads((gt.folder / "groundtruth.json").read_text())["full_model_f"]
    np.testing.assert_allclose(full, measured(**layout), rtol=1e-5)
    assert np.abs(np.asarray(full) - measured()).max() > 1e-2  # the default layout measures another function


def test_a_ground_truth_made_before_version_2_of_the_tokenizer_fingerprint_reuses_its_jobs(folder, tmp_path):
    """A ground truth whose records hold the version-1 tokenizer fingerprint (its fine-tuning's record and every
    retraining job's key, rewritten here as that version wrote them) is rebuilt without retraining anything."""
    from wherefrom.models.loading import Version1TokenizerRecord, load_model, tokenizer_fingerprint

    copy = tmp_path / "gt"
    shutil.copytree(folder, copy)
    tokenizer = load_model(GroundTruth.load(copy).config.model, device="cpu").tokenizer
    current, old = tokenizer_fingerprint(tokenizer), version_1(tokenizer)
    records = [copy / "model" / "finetune_config.json", *sorted((copy / "jobs").glob("*.json"))]
    for path in records:
        assert current in path.read_text()
        path.write_text(path.read_text().replace(current, old))
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "jobs").iterdir()}
    config = replace(GroundTruth.load(copy).config, out=str(copy))
    with pytest.warns(Version1TokenizerRecord):
        build_groundtruth(config)
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "jobs").iterdir()} == stamps  # no job retrained


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("bogus=1", {"bogus": 1}, "PBRF has no option(s) ['bogus'] (given {'bogus': 1}); its options are ['eps',"),
        ("eps=nan", {"eps": "nan"}, "PBRF: option 'eps' got 'nan'; allowed: a finite number or null"),
        (
            "optimizer=sgd",
            {"optimizer": "sgd"},
            "PBRF: option 'optimizer' got 'sgd'; allowed: one of \"lbfgs\", \"adam\"",
        ),
        ("steps=-3", {"steps": -3}, "steps must be >= 1, got -3"),
        ("steps=true", {"steps": True}, "PBRF: option 'steps' got True; allowed: an integer"),
    ],
)
def test_pbrf_options_are_checked_before_any_fine_tuning(tmp_path, option, value, said):
    """``--pbrf-option`` was checked when PBRF ran, after the fine-tuning and every retraining job (an unknown key or
    ``eps=nan`` then a ``TypeError`` traceback), and not at all without ``--pbrf-rows``; now by ``validate``, naming
    the flag, whether or not PBRF rows are asked for, and the command writes nothing."""
    from typer.testing import CliRunner

    from wherefrom.cli import app

    for rows in (0, 2):
        with pytest.raises(ValueError) as error:
            GroundTruthConfig(task="rules", out="o", pbrf_rows=rows, pbrf_options=value).validate()
        assert str(error.value).startswith("pbrf_options (--pbrf-option): ") and said in str(error.value)
    out = tmp_path / "gt"
    args = ["groundtruth", "--task", "rules", "--pbrf-rows", "2", "--pbrf-option", option, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not out.exists()
    # userJ: without --pbrf-rows a (valid) --pbrf-option was taken, recorded and read by nothing
    unread = CliRunner().invoke(app, ["groundtruth", "--task", "rules", "--pbrf-option", "steps=5", "--out", str(out)])
    said = "pbrf_options (--pbrf-option) {'steps': 5}: PBRF's options, which a ground truth reads with pbrf_rows"
    assert unread.exit_code == 2 and said in " ".join(unread.output.split()), unread.output
    assert not out.exists()
    with pytest.raises(ValueError, match=r"\(--pbrf-rows\) > 0 only"):  # in Python too
        GroundTruthConfig(task="rules", out="o", pbrf_options={"steps": 5}).validate()


def test_a_full_data_model_with_nan_weights_is_refused_before_any_retraining(tmp_path, nan_last_step):
    """reviewU: a ground truth went on from a full-data model whose weights were NaN (every measurement NaN)."""
    with pytest.raises(
        ValueError, match=r"the full-data model: the fine-tuning diverged \(the mean loss of epoch 1 is not finite\)"
    ):
        build_small(tmp_path)
    assert not (tmp_path / "gt" / "jobs").exists()


def test_a_retraining_that_diverged_is_named_not_measured(tmp_path, monkeypatch):
    """A retraining on a subset whose weights end non-finite failed nowhere: its NaN measurements were left out of
    LDS unsaid. The first such job stops the build naming it (finished jobs stay cached)."""
    from wherefrom.models.finetune import FinetuneResult
    from wherefrom.studies.groundtruth.retrain import SCRATCH_PREFIX

    def diverged_retraining(result):  # the full-data model is fine; each retraining (in a scratch folder) is not
        return "the fine-tuning diverged (say)" if SCRATCH_PREFIX in str(result.output_dir) else None

    monkeypatch.setattr(FinetuneResult, "divergence", diverged_retraining)
    with pytest.raises(ValueError, match=r"retraining on \d+ rows \(seed \d+\): the fine-tuning diverged \(say\)"):
        build_small(tmp_path)


def test_targets_of_too_few_rows_to_correlate_are_said_before_any_fine_tuning(tmp_path, monkeypatch):
    """``--pbrf-rows 2`` (or ``--loo-rows 2``) gave correlations of +-1 whatever the scores, reported with intervals;
    they are undefined now (``metrics.pearson_rows``), and ``groundtruth`` says so before it trains (``--subsets 2``
    is refused: tune ranked its points by such LDS values)."""
    import wherefrom.studies.groundtruth.build as module

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(module, "load_model", stop)
    lines: list[str] = []
    config = GroundTruthConfig(task="rules", out=str(tmp_path / "gt"), n_subsets=3, loo_rows=1, pbrf_rows=2)
    with pytest.raises(Stop):
        build_groundtruth(config, log=lines.append)
    said = [line.split(":")[0] for line in lines if "correlations need at least 3 points" in line]
    assert said == ["--loo-rows 1", "--pbrf-rows 2"]


def test_a_ground_truth_reads_its_relative_paths_from_where_it_was_built(tmp_path, monkeypatch):
    """userX: `evaluate`/`tune` read a ground truth's recorded relative `--model` (and `path:` task files) from the
    directory they ran in: from another one holding a folder of that name with other weights of the same shapes, the
    LoRA adapter ran on that model with no error (kfac's LOO Pearson 0.136 for 0.761) and the row was cached. The
    paths are now named from the directory the ground truth's config.json records it was built in; one built with
    the Python API (no record) has its base model checked against the fingerprint its fine-tuning recorded."""
    from typer.testing import CliRunner

    from wherefrom.cli import app
    from wherefrom.models.tiny import save_tiny

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    save_tiny(project / "model", "gpt2", seed=1)
    save_tiny(elsewhere / "model", "gpt2", seed=2)  # the same name and shapes, other weights
    for name, rows in (("train", make_records(12, seed=1)), ("test", make_records(3, seed=2, prefix="q"))):
        lines = [
            json.dumps({"id": r.id, "prompt": r.prompt, "completion": r.completion, "label": r.label}) for r in rows
        ]
        (project / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    runner = CliRunner()
    monkeypatch.chdir(project)
    built = runner.invoke(
        app,
        ["groundtruth", "--task", "path:train.jsonl:test.jsonl", "--model", "model", "--lora-rank", "2",
         "--lora-target", "c_attn", "--epochs", "1", "--max-length", "64", "--subsets", "3", "--loo-rows", "0",
         "--out", "gt"],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    shutil.copytree(project / "gt", project / "api-gt")  # as the Python API leaves it: no record of the command
    (project / "api-gt" / "config.json").unlink()
    here = runner.invoke(app, ["evaluate", "gt", "--methods", "identity", "--out", str(tmp_path / "here")])
    assert here.exit_code == 0, here.output
    scores = project / "gt" / "scores" / "identity.safetensors"
    computed_here = scores.read_bytes()
    shutil.rmtree(project / "gt" / "scores")  # computed afresh from elsewhere
    monkeypatch.chdir(elsewhere)
    there = runner.invoke(app, ["evaluate", "../project/gt", "--methods", "identity", "--out", str(tmp_path / "there")])
    assert there.exit_code == 0, there.output
    assert scores.read_bytes() == computed_here  # the project's model, not elsewhere/model
    for name in ("train.jsonl", "test.jsonl"):  # the rows found from here too: only the model differs
        shutil.copy(project / name, elsewhere / name)
    refused = runner.invoke(
        app, ["evaluate", "../project/api-gt", "--methods", "identity", "--out", str(tmp_path / "x")]
    )
    said = " ".join(refused.output.split())
    assert "holds other weights than the base model this was made from" in said, refused.output
    assert not (project / "api-gt" / "scores" / "identity.safetensors").exists()


@pytest.mark.parametrize("target", ["lds", "loo"])
def test_a_missing_or_truncated_target_file_is_named_with_the_command_that_rewrites_it(folder, tmp_path, target):
    """userX: a truncated lds.safetensors ended `evaluate` in a safetensors traceback (exit 1), and a deleted one
    left the LDS out of the report ("-") though groundtruth.json records 8 subsets. Both are refused naming the
    file and the replay that writes it again from the finished jobs."""
    copy = tmp_path / "gt"
    shutil.copytree(folder, copy)
    path = copy / f"{target}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{path} cannot be read .*wherefrom replay {copy}"):
        GroundTruth.load(copy)
    path.unlink()
    with pytest.raises(ValueError, match=rf"{path} is missing, though .*groundtruth.json records its {target} target"):
        GroundTruth.load(copy)
