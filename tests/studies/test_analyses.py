"""``wherefrom analyze ihvp | convergence | weights`` on a tiny bench (tiny Llama + LoRA, a file task)."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from wherefrom.core.data import Record
from wherefrom.core.encoding import REFERENCE_TEMPLATE, encode_records, iterate_batches, pad_id
from wherefrom.core.store import OutputExists
from wherefrom.models.loading import load_model
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.analyses import (
    ConvergenceSettings,
    IhvpSettings,
    open_bench,
    run_convergence,
    run_ihvp,
    run_weights,
)
from wherefrom.studies.analyses.convergence import chosen_methods
from wherefrom.studies.analyses.weights import (
    behaviour_change,
    completion_log_probs,
    full_changes,
    lora_changes,
    measure_model,
    reverted,
)
from wherefrom.studies.bench import BenchConfig, build_task, run_bench
from wherefrom.studies.generated import write_jsonl
from wherefrom.studies.metrics import spearman

METHODS = ["gradsim", "ekfac", "exact", "repsim"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A 2-epoch bench of gradsim, ekfac, exact (whole GGN) and repsim on 12 short labelled rows."""
    root = tmp_path_factory.mktemp("analyses")
    model = str(save_tiny(root / "model", arch="llama"))
    rows = [
        {"id": f"{split}{i}", "prompt": f"{i % 7} {w}:", "completion": f" {w}{w}", "label": w}
        for split in ("a", "b")
        for i, w in enumerate(["x", "y", "z"] * 6)
    ]
    for split in ("a", "b"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"].startswith(split)))
    config = BenchConfig(
        task=f"path:{root / 'a.jsonl'}:{root / 'b.jsonl'}",
        out=str(root / "bench"),
        methods=METHODS,
        n_train=12,
        n_test=3,
        model=model,
        epochs=2,
        max_length=64,
        device="cpu",
        method_options={"exact": {"blocks": "full"}},
    )
    run_bench(config)
    return root / "bench"


@pytest.fixture(scope="module")
def reports(bench_dir):
    """Every analysis once: ``{name: payload}``."""
    convergence = ConvergenceSettings(methods=["gradsim", "ekfac", "repsim"])  # exact is the slow one
    return {
        "ihvp": run_ihvp(bench_dir),
        "convergence": run_convergence(bench_dir, convergence),
        "weights": run_weights(bench_dir),
    }


def test_ihvp_exact_is_exact_and_identity_is_not(reports, bench_dir):
    payload = reports["ihvp"]
    assert payload["methods"] == ["gradsim", "ekfac", "exact"]  # repsim preconditions nothing
    reference = payload["references"]["0"]
    assert reference["strategy"] == "exact" and reference["damping"] > 0 and reference["trace_estimate"] > 0
    errors = {r["method"]: r["ihvp_rel_error"] for r in payload["rows"]}
    assert all(r["error"] is None for r in payload["rows"])
    assert errors["exact"] < 1e-10  # the same damped inverse as the reference
    scaled = {r["method"]: r["ihvp_rel_error_scaled"] for r in payload["rows"]}
    # EK-FAC's plain error here is 1.0 +- 0.07 over label seeds (true-Fisher Monte-Carlo noise, 12 rows:
    # 0.92-1.11 for seeds 0-5, gradsim 0.996), so the order is checked on the scale-free error
    # (measured: ekfac 0.78-0.82, gradsim 0.93)
    assert errors["gradsim"] > 0.1 and errors["ekfac"] > 0 and 0 < scaled["ekfac"] < scaled["gradsim"]
    for row in payload["rows"]:  # the best per-query scale can only lower the error
        assert 0 <= row["ihvp_rel_error_scaled"] <= row["ihvp_rel_error"] + 1e-12
    assert next(r for r in payload["rows"] if r["method"] == "gradsim")["ihvp_rel_error_scaled"] > 0.1
    for method in payload["methods"]:
        metrics = payload["per_method"][method]["metrics"]
        assert set(metrics) == {"acc", "cover"} and all(0 <= metrics[n]["mean"] <= 1 for n in metrics)
    assert set(payload["spearman"]) == {
        f"{e}:{m}" for e in ("ihvp_rel_error", "ihvp_rel_error_scaled") for m in ("acc", "cover")
    }
    assert payload["spearman"]["ihvp_rel_error:cover"]["n_methods"] == 3
    text = (bench_dir / "ihvp.md").read_text()
    assert "| method | iHVP rel. error | scale-free | acc | cover |" in text and "| gradsim |" in text
    assert json.loads((bench_dir / "ihvp.json").read_text())["versions"]["torch"]
    # userZ: an undefined Spearman printed "–" without a reason
    undefined = [c for c in payload["spearman"].values() if None in (c["across_methods"], c["across_pairs"])]
    assert ("– : undefined: fewer than 3 finite pairs, or one side constant" in text) == bool(undefined), undefined


def test_ihvp_cg_reference_matches_exact(bench_dir):
    # a tight cg at the same damping agrees with the exact reference: exact's error is then cg's accuracy
    # (a larger damping than the default keeps cg short)
    settings = IhvpSettings(methods=["exact", "gradsim"], reference="cg", damping=0.5, cg_tol=1e-6, cg_max_iter=400)
    payload = run_ihvp(open_bench(bench_dir), settings)
    cg = payload["references"]["0"]
    assert cg["strategy"] == "cg" and cg["damping"] == 0.5 and cg["cg"]["relative_residual"] < 1e-5
    errors = {r["method"]: r["ihvp_rel_error"] for r in payload["rows"]}
    assert errors["exact"] < 1e-3 and errors["gradsim"] > 0.1
    assert "relative residual" in (bench_dir / "ihvp.md").read_text()


def test_convergence_table_and_last_epoch_equals_bench(reports, bench_dir):
    payload = reports["convergence"]
    assert chosen_methods(open_bench(bench_dir), ConvergenceSettings()) == ["gradsim", "ekfac", "exact", "repsim"]
    assert payload["methods"] == ["gradsim", "ekfac", "repsim"] and payload["epochs"] == [1, 2]
    assert len(payload["rows"]) == 2 * 3 and all(r["error"] is None for r in payload["rows"])
    for row in payload["rows"]:
        assert 0 <= row["metrics"]["acc"] <= 1 and math.isfinite(row["train_loss"])
    bench = json.loads((bench_dir / "bench.json").read_text())
    final = {r["method"]: r["metrics"] for r in bench["rows"]}
    for row in payload["rows"]:  # the epoch-2 checkpoint holds the final weights: same scores, same metrics
        if row["epoch"] == 2:
            assert row["metrics"]["acc"] == final[row["method"]]["acc"]
            assert row["metrics"]["cover"] == final[row["method"]]["cover"]
    text = (bench_dir / "convergence.md").read_text()
    assert "## acc" in text and "| method | epoch 1 | epoch 2 | bench (final model) |" in text


def test_weights_records(reports, bench_dir):
    payload = reports["weights"]
    assert payload["checkpoints"] == ["epoch-1", "epoch-2", "final"]
    final, last = payload["records"]["0/final"], payload["records"]["0/epoch-2"]
    assert [m["name"] for m in final["modules"]] == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    assert final["total_delta_norm"] == pytest.approx(last["total_delta_norm"], rel=1e-6)
    assert payload["records"]["0/epoch-1"]["total_delta_norm"] > 0
    for record in payload["records"].values():
        assert record["behaviour"]["kl_per_token"] >= 0 and math.isfinite(record["behaviour"]["mean_delta_f"])
    for module in final["modules"]:
        assert module["delta_norm"] > 0 and module["ablation"]["kl_per_token"] >= 0
    assert set(final["spearman"]) == {"delta_norm_vs_kl", "delta_norm_vs_abs_delta_f", "relative_vs_kl"}
    assert "| checkpoint | training loss |" in (bench_dir / "weights.md").read_text()


def _test_batches(bench_dir, tokenizer):
    task = build_task(open_bench(bench_dir).config, 0)
    return list(iterate_batches(encode_records(task.test, tokenizer, 64), 4, pad_id(tokenizer)))


def test_zero_lora_b_has_no_change_and_no_ablation_effect(bench_dir):
    config = open_bench(bench_dir).config
    loaded = load_model(config.model, adapter=bench_dir / "seed-0" / "finetune" / "adapter", device="cpu")
    batches = _test_batches(bench_dir, loaded.tokenizer)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "layers.1.self_attn.q_proj.lora_B" in name:
                param.zero_()
    record = measure_model(loaded.model, lora_changes(loaded.model), batches, ablate=True)
    modules = {m["name"]: m for m in record["modules"]}
    zeroed = modules["model.layers.1.self_attn.q_proj"]
    assert zeroed["delta_norm"] == 0.0 and zeroed["relative"] == 0.0
    assert zeroed["ablation"] == {"mean_delta_f": 0.0, "mean_abs_delta_f": 0.0, "kl_per_token": 0.0}
    assert modules["model.layers.0.self_attn.v_proj"]["ablation"]["kl_per_token"] > 0

    # every change reverted = the base model itself, loaded separately
    base = load_model(config.model, device="cpu").model
    with reverted(lora_changes(loaded.model)):
        same = behaviour_change(completion_log_probs(base, batches), loaded.model, batches)
    assert same["kl_per_token"] < 1e-9 and same["mean_abs_delta_f"] < 1e-5


def test_full_fine_tuning_changes(bench_dir):
    config = open_bench(bench_dir).config
    base = load_model(config.model, device="cpu")
    tuned = copy.deepcopy(base.model)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight[0, :3] += torch.tensor([3.0, 0.0, 4.0])
    changes = {c.name: c for c in full_changes(tuned, base.model)}
    assert changes["model.layers.0.mlp.up_proj"].delta_norm == pytest.approx(5.0, rel=1e-6)
    assert sum(c.delta_norm for n, c in changes.items() if n != "model.layers.0.mlp.up_proj") == 0.0
    batches = _test_batches(bench_dir, base.tokenizer)
    reference = completion_log_probs(base.model, batches)
    assert behaviour_change(reference, tuned, batches)["kl_per_token"] > 0
    with changes["model.layers.0.mlp.up_proj"].revert():
        assert behaviour_change(reference, tuned, batches)["kl_per_token"] == 0.0
    assert behaviour_change(reference, tuned, batches)["kl_per_token"] > 0  # restored after the block


def test_second_run_recomputes_nothing(reports, bench_dir, monkeypatch):
    units = [
        p
        for p in bench_dir.glob("seed-0/*/**/*.*")
        if p.relative_to(bench_dir).parts[1] in ("ihvp", "convergence", "weights")
    ]
    assert len(units) > 10
    before = {p: p.stat().st_mtime_ns for p in units}

    def no_model(*args, **kwargs):
        raise AssertionError("a cached analysis loaded a model")

    monkeypatch.setattr("wherefrom.studies.analyses.common.load_model", no_model)
    assert (
        run_convergence(bench_dir, ConvergenceSettings(methods=["gradsim", "ekfac", "repsim"]))["rows"]
        == reports["convergence"]["rows"]
    )
    assert run_weights(bench_dir)["records"] == reports["weights"]["records"]
    assert run_ihvp(bench_dir)["rows"] == reports["ihvp"]["rows"]
    # userJ: --n-queries beyond the task's test rows was keyed apart from "all" and recomputed everything
    said: list[str] = []
    assert run_weights(bench_dir, n_queries=1000, log=said.append)["records"] == reports["weights"]["records"]
    assert run_ihvp(bench_dir, IhvpSettings(n_queries=1000), log=said.append)["rows"] == reports["ihvp"]["rows"]
    assert sum("--n-queries 1000: the task has" in line for line in said) >= 2, said
    assert {p: p.stat().st_mtime_ns for p in units} == before


def test_convergence_recomputes_only_the_rows_whose_method_reads_a_changed_setting(reports, bench_dir, tmp_path):
    """A convergence row is keyed like a bench row (``row_key``: the settings its method reads): the bench folder
    with another damping (as a rerun of ``bench --damping`` leaves it) recomputes EK-FAC's rows and reuses the
    others'."""
    folder = tmp_path / "bench"
    shutil.copytree(bench_dir, folder)
    report = json.loads((folder / "bench.json").read_text())
    report["config"]["damping"] = 0.5
    (folder / "bench.json").write_text(json.dumps(report))
    units = {p: p.stat().st_mtime_ns for p in folder.glob("seed-0/convergence/*.json")}
    assert len(units) == 6  # 2 epochs x gradsim, ekfac, repsim
    from typer.testing import CliRunner

    from wherefrom.cli import app

    # the command refuses to replace them (before any work), naming the first unit and what differs
    refused = CliRunner().invoke(
        app, ["analyze", "convergence", "--bench", str(folder), "--methods", "gradsim,ekfac,repsim"]
    )
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert "epoch-1-ekfac.json and 1 more, made from other inputs (row.damping: not recorded, now 0.5)" in said
    assert {p: p.stat().st_mtime_ns for p in units} == units
    with pytest.raises(OutputExists, match="overwrite"):  # the Python default refuses too (it replaced: userK)
        run_convergence(folder, ConvergenceSettings(methods=["gradsim", "ekfac", "repsim"]))
    run_convergence(folder, ConvergenceSettings(methods=["gradsim", "ekfac", "repsim"]), overwrite=True)
    changed = {p.stem for p, stamp in units.items() if p.stat().st_mtime_ns != stamp}
    assert changed == {"epoch-1-ekfac", "epoch-2-ekfac"}


def test_cli_and_bad_input(reports, bench_dir, tmp_path):
    from typer.testing import CliRunner

    from wherefrom.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["analyze", "weights", "--bench", str(bench_dir), "--cg-max-iter", "1000"])
    assert result.exit_code == 0, result.output  # an ihvp setting given at its default: taken, not recorded
    assert "| checkpoint | training loss |" in result.output
    # userS: the command line of an analysis named ihvp's settings at their defaults, which it does not read
    line = json.loads((bench_dir / "weights.json").read_text())["command"]
    assert line.startswith("wherefrom analyze weights --bench "), line
    assert not any(flag in line for flag in ("--damping", "--reference", "--probes", "--cg-tol")), line
    missing = runner.invoke(app, ["analyze", "ihvp", "--bench", str(tmp_path)])
    assert missing.exit_code == 2 and "bench.json" in missing.output
    damaged = tmp_path / "damaged"  # userJ: a cut-short bench.json said only "Expecting value: line 2 column 1"
    damaged.mkdir()
    (damaged / "bench.json").write_text('{\n  "aggr')
    cut = runner.invoke(app, ["analyze", "ihvp", "--bench", str(damaged)])
    assert cut.exit_code == 2 and f"{damaged / 'bench.json'} is not valid JSON" in " ".join(cut.output.split())
    zero = runner.invoke(app, ["analyze", "ihvp", "--bench", str(bench_dir), "--cg-tol", "0"])
    assert zero.exit_code == 2 and "--cg-tol 0.0: must be a finite number > 0" in zero.output  # named cg's 'tol'
    unknown = runner.invoke(app, ["analyze", "nope", "--bench", str(bench_dir)])
    assert unknown.exit_code == 2 and "unknown analysis" in unknown.output
    unused = runner.invoke(app, ["analyze", "weights", "--bench", str(bench_dir), "--option", "lissa.depth=3"])
    assert unused.exit_code == 2 and "analyze weights takes no --option" in unused.output  # was silently unused
    # ihvp's settings, and --n-queries under convergence, were taken, ignored and recorded in the command line
    for kind, flags, named in [
        ("weights", ["--damping", "1e6", "--reference", "cg"], "analyze weights does not read --damping 1000000.0"),
        ("convergence", ["--probes", "3"], "analyze convergence does not read --probes 3"),
        (
            "convergence",
            ["--n-queries", "1"],
            "--n-queries 1 (analyze ihvp does; analyze weights reads --n-queries too)",
        ),
    ]:
        ignored = runner.invoke(app, ["analyze", kind, "--bench", str(bench_dir), *flags])
        assert ignored.exit_code == 2 and named in " ".join(ignored.output.split()), ignored.output
    with pytest.raises(ValueError, match="ran seeds"):
        open_bench(bench_dir, seeds=[5])
    with pytest.raises(ValueError, match=r"methods \(--methods\) \['repsim'\]: not influence methods"):
        run_ihvp(bench_dir, IhvpSettings(methods=["repsim"]))
    with pytest.raises(ValueError, match="cg_tol must be > 0, got 0"):
        IhvpSettings(cg_tol=0).validate()
    # one damping for every method and the reference: a method's own was compared at it, its row showing the shared
    own = runner.invoke(app, ["analyze", "ihvp", "--bench", str(bench_dir), "--option", "ekfac.damping=0.5"])
    assert own.exit_code == 2 and "ihvp compares every method with the exact reference at one damping" in " ".join(
        own.output.split()
    )
    copied = tmp_path / "bench-own-damping"  # a bench run with its own damping for a method: refused before work
    shutil.copytree(bench_dir, copied)
    saved = json.loads((copied / "bench.json").read_text())
    saved["config"]["method_options"] = {**saved["config"]["method_options"], "ekfac": {"damping": 0.5}}
    (copied / "bench.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"the bench's --option ekfac.damping=0.5: ihvp compares"):
        run_ihvp(copied, IhvpSettings(methods=["ekfac"]))


def test_spearman_is_undefined_for_constants_and_few_points():
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1, 2, 3, None], [3, 2, 1, 0]) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"damping": math.inf}, "damping must be a finite number > 0"),
        ({"damping": 1e-46}, "damping must be a finite number > 0"),
        ({"damping_factor": math.inf}, "damping_factor must be a finite number > 0"),
        ({"damping_factor": 0.0}, "damping_factor must be a finite number > 0"),
    ],
)
def test_ihvp_and_pbrf_damping_is_checked_by_the_strategies_rule(settings, said):
    """``IhvpSettings`` and ``PBRFConfig`` checked their damping with their own ``> 0``: ``inf`` and ``1e-46`` (0 in
    float32) were taken, and PBRF, which uses its damping without a strategy, solved with them; both call
    ``curvature.base.check_damping`` now, as every strategy does."""
    from wherefrom.studies.groundtruth.pbrf import PBRFConfig

    with pytest.raises(ValueError, match=said):
        IhvpSettings(**settings).validate()
    with pytest.raises(ValueError, match=said):
        PBRFConfig(**settings)


def test_an_analysis_run_elsewhere_reads_the_files_and_model_the_bench_ran_with(tmp_path, monkeypatch):
    """userW: `analyze` of a bench whose task and model are relative paths read them from the current directory:
    from elsewhere "file not found", and with other files of those names there, the rows and base model found there
    (the seed's saved fine-tuning reused on that model). They are now named from the directory `bench` recorded in the
    bench's config.json, as `evaluate` does for a ground truth."""
    from tests.cli.conftest import invoke

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    rows = [Record(f"r{i}", f"{i % 5} is", f" w{i % 3}", label=f"w{i % 3}") for i in range(9)]
    queries = [Record(f"q{i}", f"{i} is", f" w{i % 3}", label=f"w{i % 3}") for i in range(3)]
    for where, seed in ((project, 1), (elsewhere, 2)):
        save_tiny(where / "model", arch="llama", seed=seed)  # the same name and shapes, other weights
        write_jsonl(rows, where / "train.jsonl")
        write_jsonl(queries, where / "queries.jsonl")
    monkeypatch.chdir(project)
    bench = ["bench", "--task", "path:train.jsonl:queries.jsonl", "--model", "model", "--methods", "gradsim,tracin"]
    made = invoke(*bench, "--seeds", "0", "--epochs", "2", "--max-length", "32", "--out", "bx", "--threads", "1")
    assert made.exit_code == 0, made.output
    finetuning = project / "bx" / "seed-0" / "finetune"
    saved = sorted((p, p.stat().st_mtime_ns) for p in finetuning.rglob("*"))
    here = {}
    for kind in ("weights", "convergence"):
        result = invoke("analyze", kind, "--bench", "bx", "--threads", "1")
        assert result.exit_code == 0, result.output
        here[kind] = _computed(project / "bx", kind)
        shutil.rmtree(project / "bx" / "seed-0" / kind)  # computed afresh from elsewhere
    monkeypatch.chdir(elsewhere)
    for kind in ("weights", "convergence"):
        result = invoke("analyze", kind, "--bench", project / "bx", "--threads", "1")
        assert result.exit_code == 0, result.output
        assert _computed(project / "bx", kind) == here[kind], kind  # elsewhere/model changes every number
    assert sorted((p, p.stat().st_mtime_ns) for p in finetuning.rglob("*")) == saved  # reused, not trained again
    for name in ("train.jsonl", "queries.jsonl"):  # nor do the rows need to be here
        (elsewhere / name).unlink()
    result = invoke("analyze", "ihvp", "--bench", project / "bx", "--threads", "1", "--n-queries", "1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model"]  # nothing written here

    # reviewY: the bench folder moved without its project, where its relative `model` names another model: the
    # seed's fine-tuning was trained again in place of the bench's; now refused, naming the base model
    moved = elsewhere / "moved"
    shutil.copytree(project / "bx", moved / "bx")
    save_tiny(moved / "model", arch="llama", seed=3)
    for name in ("train.jsonl", "queries.jsonl"):
        shutil.copy(project / name, moved / name)
    kept = sorted((p.relative_to(moved), p.stat().st_mtime_ns) for p in (moved / "bx").rglob("finetune/**/*"))
    # the cached weights and ihvp rows are of the bench's model: they were served for the other one as they were
    refused = invoke("analyze", "weights", "--bench", moved / "bx", "--threads", "1")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "made from other inputs (model_weights: recorded" in said, refused.output
    refused = invoke("analyze", "ihvp", "--bench", moved / "bx", "--threads", "1", "--n-queries", "1")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "base_model_fingerprint" in said, refused.output
    shutil.rmtree(moved / "bx" / "seed-0" / "weights")
    refused = invoke("analyze", "weights", "--bench", moved / "bx", "--threads", "1")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "base_model_fingerprint" in said, refused.output
    assert "pass --overwrite to `wherefrom bench` for" in said and "(an analysis never replaces a fine-tuning)" in said
    assert sorted((p.relative_to(moved), p.stat().st_mtime_ns) for p in (moved / "bx").rglob("finetune/**/*")) == kept


def _computed(folder, kind: str) -> list:
    """What analysis ``kind`` computed in ``folder``: its rows or records without the time and memory measured."""
    payload = json.loads((folder / f"{kind}.json").read_text())
    entries = payload["rows"] if kind == "convergence" else list(payload["records"].values())
    return [{k: v for k, v in entry.items() if k not in ("seconds", "peak_mib")} for entry in entries]


def test_a_run_of_ablate_names_its_paths_from_where_ablate_ran(tmp_path, monkeypatch):
    """An ablation's runs (``ABLATE/runs/<name>``) record no command of their own: their paths are named from the
    directory `ablate` recorded; a folder with no record (the Python API's) from the current directory."""
    from wherefrom.studies.analyses.common import bench_directory

    run = tmp_path / "abl" / "runs" / "start"
    run.mkdir(parents=True)
    (tmp_path / "abl" / "config.json").write_text(json.dumps({"replay": {"ablate": {"cwd": "../project"}}}))
    assert bench_directory(run) == tmp_path / "project"
    (run / "config.json").write_text(json.dumps({"replay": {"bench": {"cwd": "../../../bench-here"}}}))
    assert bench_directory(run) == tmp_path / "bench-here"
    monkeypatch.chdir(tmp_path)
    assert bench_directory(tmp_path / "api-bench") == tmp_path


def test_weights_measures_the_queries_as_the_bench_encodes_them(tmp_path):
    """`analyze weights` encoded its test prompts with `max_length` alone: under a bench's template (the reference
    study's `[INST] ... [/INST]`) or `--no-eos` it measured f on rows the model was neither tuned nor attributed on.
    Checked against f summed by hand over the labelled positions of the bench's own encoding, base vs tuned."""
    model = str(save_tiny(tmp_path / "model", arch="llama"))
    rows = [Record(f"{s}{i}", f"{i % 5} is", f" w{i % 3}", label=f"w{i % 3}") for s in "ab" for i in range(9)]
    write_jsonl(rows[:9], tmp_path / "a.jsonl")
    write_jsonl(rows[9:], tmp_path / "b.jsonl")
    config = BenchConfig(
        task=f"path:{tmp_path / 'a.jsonl'}:{tmp_path / 'b.jsonl'}",
        out=str(tmp_path / "bench"),
        methods=["bm25"],
        model=model,
        epochs=1,
        learning_rate=0.05,
        max_length=48,
        template=REFERENCE_TEMPLATE,
        append_eos=False,
        device="cpu",
    )
    run_bench(config)
    payload = run_weights(tmp_path / "bench", n_queries=3)
    behaviour = payload["records"]["0/final"]["behaviour"]

    task = build_task(config, 0)
    base = load_model(model, device="cpu")
    tuned = load_model(model, adapter=tmp_path / "bench" / "seed-0" / "finetune" / "adapter", device="cpu").model
    encoded = encode_records(task.test[:3], base.tokenizer, **config.attribution_config(0).layout())
    assert "inst" in base.tokenizer.decode(encoded[0].input_ids)  # the tiny tokenizer: lower case, no brackets

    def f(network, example) -> float:
        with torch.no_grad():
            logits = network(torch.tensor([example.input_ids])).logits[0].double()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        labelled = [t for t in range(1, len(example.labels)) if example.labels[t] != -100]
        return sum(float(log_probs[t - 1, example.input_ids[t]]) for t in labelled)

    by_hand = [f(tuned, e) - f(base.model, e) for e in encoded]
    assert behaviour["n_tokens"] == sum(sum(label != -100 for label in e.labels[1:]) for e in encoded)
    assert behaviour["delta_f"] == pytest.approx(by_hand, abs=1e-6)
    assert max(abs(d) for d in by_hand) > 1e-3  # the tuning changed f: the comparison can fail


def test_an_analysis_says_when_it_fine_tunes_a_missing_seed_again(bench_dir, tmp_path):
    """userJ: with ``seed-0/finetune`` deleted, ``analyze weights`` fine-tuned the seed again without a word, while
    the bench metrics other analyses pair with came from the deleted model."""
    folder = tmp_path / "bench"
    shutil.copytree(bench_dir, folder)
    shutil.rmtree(folder / "seed-0" / "finetune")
    shutil.rmtree(folder / "seed-0" / "weights", ignore_errors=True)  # made by an earlier test of this module
    said: list[str] = []
    run_weights(folder, log=said.append)
    assert any(line.startswith("seed 0: the bench's fine-tuning was not in ") for line in said), said
    said.clear()
    run_weights(folder, log=said.append)  # reused now: nothing said
    assert not any("fine-tuned again" in line for line in said), said


def test_an_analysis_of_a_seed_whose_fine_tuning_is_not_finite_is_refused(bench_dir, tmp_path, monkeypatch):
    """An analysis read a bench's fine-tuning whose weights were NaN (its bench rows had failed on it) and went on."""
    from wherefrom.models.finetune import FinetuneResult

    folder = tmp_path / "bench"
    shutil.copytree(bench_dir, folder)
    shutil.rmtree(folder / "seed-0" / "weights", ignore_errors=True)  # made by an earlier test of this module
    monkeypatch.setattr(FinetuneResult, "divergence", lambda result: "the fine-tuning diverged (say)")
    with pytest.raises(ValueError, match=r"^seed 0: the fine-tuning diverged \(say\)$"):
        run_weights(folder, log=lambda line: None)


def test_the_note_on_exacts_missing_cross_module_terms_is_only_under_a_full_reference(reports, bench_dir):
    """userJ: under ``--exact-blocks module`` (the reference per module too, ``exact``'s error 0) the report still
    said ``exact``'s error against the full-GGN reference is what the cross-module terms carry."""
    from wherefrom.studies.analyses.ihvp import _markdown

    payload, bench = reports["ihvp"], open_bench(bench_dir)
    note = "its error against the full-GGN reference is what those terms carry"
    per_module = {**payload["settings"], "method_options": {"exact": {"blocks": "module"}}}  # exact as the bench's
    full = {**payload, "settings": per_module}
    assert per_module["exact_blocks"] == "full" and note in " ".join(_markdown(bench, full).split())
    module = {**payload, "settings": {**per_module, "exact_blocks": "module"}}
    assert note not in " ".join(_markdown(bench, module).split())
