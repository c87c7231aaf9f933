"""``wherefrom bench`` end to end on a tiny Llama: outputs, metric ranges, resume, identify tasks."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace

import pytest

from tests.studies.failing import failing_methods
from tests.studies.replayed import config_of_line, off_default
from wherefrom.core.data import DataError
from wherefrom.models.finetune import FinetuneConfig
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.bench import (
    BenchConfig,
    aggregate,
    check_task_name,
    command_line,
    make_task,
    markdown,
    run_bench,
)

METHODS = ["gradsim", "bm25", "repsim", "tracin", "ekfac"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("bench") / "model", arch="llama"))


def tiny_config(task: str, out, model: str, methods: list[str], n_train: int, n_test: int, **settings) -> BenchConfig:
    """A one-epoch bench of the tiny model on CPU (``max_length`` 128 unless given)."""
    settings.setdefault("max_length", 128)
    return BenchConfig(
        task=task, out=str(out), methods=methods, n_train=n_train, n_test=n_test, model=model, epochs=1, device="cpu",
        **settings,
    )  # fmt: skip


def test_bench_class_task_via_cli_and_resume(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from wherefrom.cli import app

    out = tmp_path / "bench"
    args = [
        "bench",
        "--task",
        "rules",
        "--n-train",
        "16",
        "--n-test",
        "3",
        "--methods",
        ",".join(METHODS),
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--max-length",
        "128",
        "--model",
        tiny_model,
        "--device",
        "cpu",
        "--option",
        'repsim.pooling="mean"',
        "--out",
        str(out),
    ]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| method | acc | cover | mrr |" in result.output
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").is_file() and "wherefrom bench --task rules" in (out / "bench.md").read_text()
    assert report["kind"] == "class" and report["versions"]["torch"] and "cpu_count" in report["hardware"]
    assert report["config"]["method_options"] == {"repsim": {"pooling": "mean"}}
    for method in METHODS:
        row = json.loads((out / "seed-0" / f"{method}.json").read_text())
        assert row["error"] is None, f"{method}: {row['error']}"
        assert 0.0 <= row["metrics"]["acc"] <= 1.0 and 0.0 <= row["metrics"]["cover"] <= 1.0
        assert row["seconds"] > 0
        entry = report["aggregate"][method]
        assert entry["n_ok"] == 1 and entry["metrics"]["acc"]["low"] is None
    assert (out / "seed-0" / "finetune" / "adapter").is_dir()

    # a second run reuses every (seed, method) row: no per-method file is rewritten
    mtimes = {m: (out / "seed-0" / f"{m}.json").stat().st_mtime_ns for m in METHODS}
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {m: (out / "seed-0" / f"{m}.json").stat().st_mtime_ns for m in METHODS} == mtimes
    assert json.loads((out / "bench.json").read_text())["aggregate"] == report["aggregate"]

    # another damping into the same folder: refused before any work, naming the row and the setting; nothing replaced
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    refused = runner.invoke(app, [*args, "--damping-factor", "0.01"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert f"{out / 'seed-0' / 'ekfac.json'}, made from other inputs (" in said
    assert (
        "(damping_factor: not recorded, now 0.01)" in said
        and "pass overwrite=True (--overwrite on the command line) to replace them" in said
    )
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files
    replaced = runner.invoke(app, [*args, "--damping-factor", "0.01", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    rows = {m: json.loads((out / "seed-0" / f"{m}.json").read_text()) for m in METHODS}
    changed = {m for m in METHODS if (out / "seed-0" / f"{m}.json").stat().st_mtime_ns != mtimes[m]}
    assert changed == {"ekfac"} and rows["ekfac"]["key"]["damping_factor"] == 0.01


def test_bench_reports_each_methods_passes_to_its_progress(tmp_path, tiny_model):
    """A bench gave its progress to the loop over methods only: a SmolLM2 bench showed one bar per seed, unmoved for
    minutes while a method fitted. Each method's passes over rows report to it too (bm25 makes none)."""
    seen: list[str] = []

    def progress(items, description):
        for item in items:
            seen.append(description)
            yield item

    config = tiny_config("backdoor", tmp_path / "bd", tiny_model, ["gradsim", "ekfac", "bm25"], 12, 2, batch_size=4)
    run_bench(config, progress=progress)
    # 12 rows in batches of 4: gradsim's train pass, EK-FAC's shared pass, one batch of queries each
    expected = {
        "seed 0": 3,
        "train gradients": 3,
        "shared pass (covariances, correction, train)": 3,
        "query gradients": 2,
    }
    assert Counter(seen) == expected, seen


def test_bench_identify_task(tmp_path, tiny_model):
    config = tiny_config("backdoor", tmp_path / "bd", tiny_model, ["gradsim", "bm25"], 40, 2)
    report = run_bench(config)
    assert report["kind"] == "identify"
    for method in ("gradsim", "bm25"):
        metrics = report["aggregate"][method]["metrics"]
        assert 0.0 <= metrics["auprc"]["mean"] <= 1.0 and 0.0 <= metrics["auroc"]["mean"] <= 1.0
    assert "| method | auprc | auroc |" in (tmp_path / "bd" / "bench.md").read_text()
    assert command_line(config).startswith("wherefrom bench --task backdoor")


def test_bench_command_line_leaves_out_options_of_methods_it_does_not_run():
    """A preset's ``lissa`` options in a bench without lissa: ``bench`` refuses such a pair as unused, so the
    equivalent command must not hold it (replaying it failed)."""
    options = {"lissa": {"depth": 3}, "*": {"seed_offset": 1}, "gradsim": {"normalize": True}}
    line = command_line(BenchConfig(task="rules", out="o", methods=["gradsim"], method_options=options))
    assert "--option gradsim.normalize=true" in line and "--option seed_offset=1" in line and "lissa" not in line


def _write_labelled(folder, labels):
    """``a.jsonl`` and ``b.jsonl`` in ``folder``: one row per label, the label as completion."""
    for split in ("a", "b"):
        rows = [
            {"id": f"{split}{i}", "prompt": f"{i} {w}:", "completion": f" {w}", "label": w}
            for i, w in enumerate(labels)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bench_task_from_files_is_subsampled(tmp_path, tiny_model):
    _write_labelled(tmp_path, ["x", "y", "z"] * 6)
    task = f"path:{tmp_path / 'a.jsonl'}:{tmp_path / 'b.jsonl'}"
    config = tiny_config(task, tmp_path / "p", tiny_model, ["bm25"], 9, 3, max_length=64)
    report = run_bench(config)
    metrics = report["rows"][0]["metrics"]
    assert report["kind"] == "class" and metrics["n_queries"] == 3 and metrics["k"] == 3  # 9 rows / 3 classes
    assert report["sizes"] == {"n_train": 9, "n_test": 3}
    # more rows asked for than the files have: all are used, and the sizes say so (bench.json recorded 100/50)
    said: list[str] = []
    report = run_bench(replace(config, n_train=100, n_test=50, out=str(tmp_path / "all")), log=said.append)
    assert report["sizes"] == {"n_train": 18, "n_test": 18} and report["rows"][0]["metrics"]["n_queries"] == 18
    assert "--n-train 100 (n_train): the task has only 18 training rows; all of them are used" in said
    assert "18 training rows, 18 queries)" in (tmp_path / "all" / "bench.md").read_text()


def test_a_file_task_edited_in_place_is_recomputed_not_reused(tmp_path, tiny_model):
    """A row's key named a file task by its paths only: after the labelled files were edited in place (labels
    shuffled), the same --out reused every row and printed the old metrics. The rows' fingerprint is in the key."""
    _write_labelled(tmp_path, ["x", "y", "z"] * 6)
    task = f"path:{tmp_path / 'a.jsonl'}:{tmp_path / 'b.jsonl'}"
    config = tiny_config(task, tmp_path / "p", tiny_model, ["bm25"], 9, 3, max_length=64)
    row = tmp_path / "p" / "seed-0" / "bm25.json"
    run_bench(config)
    first = row.read_text()
    run_bench(config)
    assert row.read_text() == first  # unchanged files: reused
    _write_labelled(tmp_path, ["z", "x", "y"] * 6)
    said: list[str] = []
    run_bench(config, log=said.append, overwrite=True)  # the default refuses (test_run_bench's rerun cases)
    assert "seed 0 bm25: reused" not in said and json.loads(row.read_text())["key"] != json.loads(first)["key"]


def test_a_model_folder_saved_again_with_other_weights_is_recomputed_not_reused(tmp_path):
    """userL 01: a row's key named the model by its path: after `model/` was saved again with other weights, the same
    --out reused every row and printed the old model's metrics. The weights' digest is in the key of every method
    that runs the model (bm25, which runs none, keeps its row); the rows then equal a fresh folder's."""
    model = tmp_path / "model"
    save_tiny(model, arch="llama", seed=0)
    config = tiny_config("rules", tmp_path / "b", str(model), ["bm25", "gradsim"], 10, 2)
    run_bench(config)
    rows = {m: tmp_path / "b" / "seed-0" / f"{m}.json" for m in ("bm25", "gradsim")}
    first = {m: json.loads(path.read_text()) for m, path in rows.items()}
    save_tiny(model, arch="llama", seed=5)
    said: list[str] = []
    run_bench(config, log=said.append, overwrite=True)
    again = {m: json.loads(path.read_text()) for m, path in rows.items()}
    assert again["bm25"] == first["bm25"] and again["gradsim"]["key"] != first["gradsim"]["key"]
    run_bench(replace(config, out=str(tmp_path / "fresh")))
    fresh = json.loads((tmp_path / "fresh" / "seed-0" / "gradsim.json").read_text())
    assert again["gradsim"]["key"] == fresh["key"] and again["gradsim"]["metrics"] == fresh["metrics"]
    assert "seed 0 gradsim: reused" not in said and "seed 0 bm25: reused" in said


def test_failed_method_is_recorded_and_retried(tmp_path, tiny_model):
    # gradsim fails as it runs (here: made to); bm25 still runs, the failure is in the table, and a rerun
    # retries the failed method but reuses the good one
    config = tiny_config("rules", tmp_path / "f", tiny_model, ["bm25", "gradsim"], 10, 2)
    with failing_methods(lambda name, _config: name == "gradsim"):
        report = run_bench(config)
    assert report["aggregate"]["bm25"]["n_ok"] == 1
    assert (
        report["aggregate"]["gradsim"]["n_ok"] == 0 and "out of memory" in report["aggregate"]["gradsim"]["errors"]["0"]
    )
    table = (tmp_path / "f" / "bench.md").read_text()
    assert "| gradsim | failed: RuntimeError: out of memory, say |  |  |  |  | 0/1 |" in table  # seeds ok: was empty
    assert "Failed (each error in full):\n\n- gradsim, seed 0: RuntimeError: out of memory, say\n" in table
    folder = tmp_path / "f" / "seed-0"
    before = {m: (folder / f"{m}.json").stat().st_mtime_ns for m in ("bm25", "gradsim")}
    again = run_bench(config)
    assert (folder / "bm25.json").stat().st_mtime_ns == before["bm25"]
    assert (folder / "gradsim.json").stat().st_mtime_ns != before["gradsim"]
    assert again["aggregate"]["gradsim"]["n_ok"] == 1


def test_a_command_whose_method_failed_prints_its_table_then_exits_1(tmp_path, tiny_model):
    """bench exited 0 with every method failed; now the table, then one error line per failed method, exit 1."""
    from typer.testing import CliRunner

    from wherefrom.cli import app

    args = [
        "bench",
        "--task",
        "rules",
        "--n-train",
        "10",
        "--n-test",
        "2",
        "--methods",
        "bm25,gradsim",
        "--epochs",
        "1",
    ]
    args += ["--model", tiny_model, "--device", "cpu", "--max-length", "128", "--out", str(tmp_path / "b")]
    with failing_methods(lambda name, _config: name == "gradsim"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "| bm25 |" in result.output
    assert "error: gradsim: failed on 1 of 1 seeds (RuntimeError: out of memory, say)" in result.output
    again = CliRunner().invoke(app, args)  # retried, the rest reused
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"gradsim": {"no_such_option": 1}}, r"method 'gradsim' has no option\(s\) \['no_such_option'\]"),
        ({"ekfac": {"damping_factor": -1}}, "damping_factor"),
        ({"tracin": {"dim": 0}}, "method 'tracin'.*dim"),
    ],
)
def test_a_bad_method_option_is_refused_before_any_fine_tuning(tmp_path, tiny_model, options, match):
    """It failed each seed's row of the method after the fine-tuning, and bench ended with exit 0; tracin's
    required checkpoints come from the fine-tuning, so its other options are checked without them."""
    config = tiny_config("rules", tmp_path / "f", tiny_model, ["bm25", *options], 10, 2, method_options=options)
    with pytest.raises(ValueError, match=match):
        run_bench(config)
    assert not (tmp_path / "f" / "seed-0").exists()
    fine = tiny_config("rules", tmp_path / "g", tiny_model, ["tracin"], 10, 2)
    fine.validate()  # tracin without checkpoints: the fine-tuning gives them


def test_a_row_is_recomputed_only_for_the_settings_its_method_reads(tmp_path, tiny_model):
    """A row's key holds the attribution settings its method reads (``MethodSpec.read``) and, for a method that runs
    the fine-tuned model, the fine-tuning settings: a changed damping or Fisher recomputes kfac's row only, a changed
    epoch count every row but BM25's."""
    methods = ("bm25", "gradsim", "repsim", "kfac")
    config = tiny_config("rules", tmp_path / "k", tiny_model, list(methods), 10, 2)
    folder = tmp_path / "k" / "seed-0"

    def stamps() -> dict[str, int]:
        return {m: (folder / f"{m}.json").stat().st_mtime_ns for m in methods}

    def rerun() -> set[str]:
        before = stamps()
        run_bench(config, overwrite=True)
        return {m for m, stamp in stamps().items() if stamp != before[m]}

    run_bench(config)
    config.damping, config.fisher = 0.5, "empirical"
    assert rerun() == {"kfac"}
    config.epochs = 2
    assert rerun() == {"gradsim", "repsim", "kfac"}


def test_aggregate_over_seeds_gives_intervals():
    rows = [
        {
            "seed": s,
            "method": "m",
            "error": None,
            "seconds": 1.0 + s,
            "peak_mib": None,
            "metrics": {"acc": v, "cover": v, "mrr": v, "k": 3, "n_queries": 2, "per_query": {}},
        }
        for s, v in enumerate([0.2, 0.4, 0.6])
    ]
    summary = aggregate(rows, ["m"])
    acc = summary["m"]["metrics"]["acc"]
    assert acc["mean"] == pytest.approx(0.4) and acc["low"] < 0.4 < acc["high"]
    assert summary["m"]["seconds"] == pytest.approx(2.0) and summary["m"]["peak_mib"] is None
    assert "0.400 [" in markdown(summary, "class", "wherefrom bench", "t")

    # two far-apart seeds: the t interval (df = 1) spans far past [0, 1]; a [0, 1] metric is clipped
    wide = aggregate(
        [
            {**rows[0], "metrics": {"acc": 0.1, "cover": 0.1, "mrr": 0.1}},
            {**rows[1], "metrics": {"acc": 0.9, "cover": 0.9, "mrr": 0.9}},
        ],
        ["m"],
    )["m"]["metrics"]["acc"]
    assert (wide["low"], wide["high"]) == (0.0, 1.0) and wide["mean"] == pytest.approx(0.5)


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        run_bench(BenchConfig(task="nope", out=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown method"):
        run_bench(BenchConfig(task="rules", out=str(tmp_path), methods=["nope"]))


def test_file_identification_task_and_missing_file(tmp_path):
    _write_labelled(tmp_path, ["harmful", "benign", "benign"] * 4)
    spec = f"path:{tmp_path / 'a.jsonl'}:{tmp_path / 'b.jsonl'}"
    check_task_name(spec + ":identify")
    task = make_task(spec + ":identify", 6, 3, seed=0)
    assert task.kind == "identify" and len(task.train) == 6 and len(task.test) == 3
    for query in task.test:
        assert task.targets[query.id] == [r.id for r in task.train if r.label == query.label]
    assert make_task(spec, 6, 3, seed=0).kind == "class"
    with pytest.raises(ValueError, match="identify"):
        check_task_name(spec + ":other")
    with pytest.raises(DataError, match=r"nothere\.jsonl: file not found"):
        check_task_name(f"path:{tmp_path / 'nothere.jsonl'}:{tmp_path / 'b.jsonl'}:identify")


def test_bm25_alone_needs_no_model(tmp_path):
    config = BenchConfig(task="facts", out=str(tmp_path), methods=["bm25"], seeds=[0, 1], n_train=40, n_test=8)
    config.model = str(tmp_path / "no-such-model")  # would fail to load: BM25 alone must not load it
    report = run_bench(config)
    assert not list(tmp_path.glob("seed-*/finetune"))
    assert report["headline"] == "mrr"  # the summary's metric for fact tracing
    rows = report["rows"]
    assert [r["error"] for r in rows] == [None, None]
    assert all(r["metrics"]["k"] == 10 and r["metrics"]["mrr"] < 0.6 for r in rows)  # the facts task's recall at 10
    assert "| method | auprc | auroc | mrr | recall_at_k | acc |" in (tmp_path / "bench.md").read_text()


def test_an_option_given_at_its_default_reuses_the_cached_rows(tmp_path):
    """A method's cached row is keyed on its options less those at their defaults (``options_off_default``): the
    same option given at its default hits the row, another value does not."""
    config = BenchConfig(task="facts", out=str(tmp_path), methods=["bm25"], seeds=[0], n_train=40, n_test=8)
    config.model = str(tmp_path / "no-such-model")  # BM25 alone loads no model
    run_bench(config)
    row = tmp_path / "seed-0" / "bm25.json"
    written = row.stat().st_mtime_ns
    config.method_options = {"bm25": {"k1": 1.5, "idf": "lucene"}}  # both BM25's defaults
    run_bench(config)
    assert row.stat().st_mtime_ns == written
    config.method_options = {"bm25": {"k1": 1.2}}
    run_bench(config, overwrite=True)
    assert row.stat().st_mtime_ns != written and json.loads(row.read_text())["key"]["options"] == {"k1": 1.2}


def test_options_off_default_drops_only_constructor_options_at_their_defaults():
    from wherefrom.methods.registry import options_off_default

    given = {"dim_in": 16, "dim_out": 8, "damping_factor": 0.1, "kind": "gaussian"}
    assert options_off_default("logra", given) == {"dim_out": 8, "damping_factor": 0.1}  # a setting option stays
    assert options_off_default("lissa", {"depth": 1000, "scale": None, "seed": 1}) == {"seed": 1}
    assert options_off_default("no-such-method", {"a": 1}) == {"a": 1}


def test_bench_command_line_gives_back_its_config(tmp_path, tiny_model):
    """Every setting of a bench, each off its default, survives :func:`command_line` and the CLI: the command a bench
    records is one that reruns it (``append_eos=False`` was left out: no ``--no-eos``, so the recorded command of a
    reference-study bench, as ablate runs it, appended EOS); ``bench`` takes ``--lora-target`` as ``groundtruth``
    does."""
    import wherefrom.studies.bench as module

    config = BenchConfig(
        task="rules", out=str(tmp_path / "b"), methods=["gradsim", "ekfac"], seeds=[1, 2], n_train=10, n_test=3,
        model=tiny_model, epochs=3, learning_rate=2e-3, lora_rank=2, batch_size=4, max_length=96, damping=0.01,
        damping_factor=0.2, device="cpu", method_options={"gradsim": {"reduction": "mean"}}, fisher="empirical",
        template="Q: {prompt} A: {completion}", append_eos=False, pad_left=True, loss_tokens="all", truncate=True,
        lora_alpha=16, lora_dropout=0.1, lr_schedule="linear", lora_targets=["q_proj", "o_proj"],
    )  # fmt: skip
    recorded_only = {"preset", "finetune_dir"}
    assert off_default(config, recorded_only) == []
    # --damping makes --damping-factor unused, and the command line refuses the two together: each round-trips alone,
    # and a config holding both records the one it uses
    assert "--damping 0.01" in command_line(config) and "--damping-factor" not in command_line(config)
    for chosen in (replace(config, damping_factor=0.1), replace(config, damping=None)):
        parsed = config_of_line(command_line(chosen), module, "run_bench")
        assert {k: v for k, v in parsed.items() if k not in recorded_only} == {
            k: v for k, v in asdict(chosen).items() if k not in recorded_only
        }


def test_bench_lora_targets_reach_the_fine_tuning_and_the_keys_of_methods_that_run_it():
    from wherefrom.studies.bench import row_key

    base = BenchConfig(task="rules", out="o")
    chosen = replace(base, lora_targets=["o_proj"])
    assert chosen.finetune_config(0).lora_targets == ["o_proj"]
    assert base.finetune_config(0).lora_targets == FinetuneConfig().lora_targets
    task = make_task("rules", 8, 2, 0)
    assert row_key(chosen, 0, "gradsim", task) != row_key(base, 0, "gradsim", task)
    assert row_key(chosen, 0, "bm25", task) == row_key(base, 0, "bm25", task)  # runs no model
    assert "lora_targets" not in row_key(base, 0, "gradsim", task)  # rows cached before it keep matching


def test_the_default_lora_targets_given_explicitly_are_the_default():
    """``--lora-target q_proj --lora-target v_proj`` (the default modules, in any order) put ``lora_targets`` into the
    keys of the rows of every method that runs the model, so a bench given them recomputed the rows of one that did
    not; a ground truth recorded them too. Both now store the default as ``None``, and the command lines agree."""
    from wherefrom.studies.bench import row_key
    from wherefrom.studies.groundtruth.build import GroundTruthConfig
    from wherefrom.studies.groundtruth.build import command_line as groundtruth_line

    base, task = BenchConfig(task="rules", out="o"), make_task("rules", 8, 2, 0)
    for given in (["q_proj", "v_proj"], ["v_proj", "q_proj"], ["q_proj", "v_proj", "q_proj"]):
        explicit = BenchConfig(task="rules", out="o", lora_targets=given)
        assert explicit.lora_targets is None
        assert row_key(explicit, 0, "gradsim", task) == row_key(base, 0, "gradsim", task)
        assert command_line(explicit) == command_line(base)
        truth = GroundTruthConfig(task="rules", out="o", lora_targets=given)
        assert groundtruth_line(truth) == groundtruth_line(GroundTruthConfig(task="rules", out="o"))
    assert BenchConfig(task="rules", out="o", lora_targets=["q_proj"]).lora_targets == ["q_proj"]


def test_full_fine_tuning_bench_round_trips_as_lora_rank_0(tmp_path):
    """A bench that fine-tunes every weight (``lora_rank`` 0 or ``None``, stored as ``None`` as ground truths do)
    records ``--lora-rank 0``, which reruns it."""
    import wherefrom.studies.bench as module

    for rank in (0, None):
        config = BenchConfig(task="rules", out=str(tmp_path / "b"), methods=["gradsim"], lora_rank=rank)
        assert config.lora_rank is None
        assert "--lora-rank 0" in command_line(config)
        assert config_of_line(command_line(config), module, "run_bench") == asdict(config)


def test_default_keys_and_command_lines_are_those_cached_rows_were_made_with():
    """The keys a bench row and a fine-tuning are cached under, and the recorded command lines, at default settings,
    written out: the fine-tuning settings moved into one declaration (``StudyFinetuning``) without changing them, and
    a change of any of these would recompute every cached row or retrain every fine-tuning. One was changed on
    purpose: ``max_length`` is 512 in Python too (``wherefrom.core.encoding.MAX_LENGTH``; it was 256 in Python and
    512 on the command line, so a Python bench and the same command's were two: userK)."""
    from wherefrom.studies.bench import row_key
    from wherefrom.studies.groundtruth.build import GroundTruthConfig
    from wherefrom.studies.groundtruth.build import command_line as groundtruth_line

    config, task = BenchConfig(task="rules", out="o"), make_task("rules", 8, 2, 0)
    first = {"format": 1, "task": "rules", "n_train": None, "n_test": None, "seed": 0}
    assert row_key(config, 0, "bm25", task) == {**first, "method": "bm25", "options": {}}
    assert row_key(config, 0, "ekfac", task) == {
        **first, "method": "ekfac", "options": {}, "model": None, "epochs": 2, "learning_rate": 0.001, "lora_rank": 4,
        "batch_size": 8, "max_length": 512,
    }  # fmt: skip
    assert config.finetune_config(0).to_dict() == {
        "epochs": 2, "learning_rate": 0.001, "batch_size": 8, "max_length": 512, "seed": 0, "lora_rank": 4,
        "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"], "weight_decay": 0.0, "chat_template": False,
        "checkpoint_every_epoch": True,
    }  # fmt: skip
    assert command_line(config) == (
        "wherefrom bench --task rules --methods ekfac,kfac,datainf,gradsim,tracin,repsim,bm25 --seeds 0 --epochs 2 "
        "--learning-rate 0.001 --lora-rank 4 --batch-size 8 --max-length 512 --damping-factor 0.1 --out o"
    )
    assert groundtruth_line(GroundTruthConfig(task="rules", out="o")) == (
        "wherefrom groundtruth --task rules --epochs 2 --learning-rate 0.001 --lora-rank 4 --batch-size 8 "
        "--max-length 512 --alpha 0.5 --subsets 32 --subset-seeds 1 --loo-rows 16 --loo-seeds 2 --pbrf-rows 0 "
        "--workers 1 --seed 0 --out o"
    )
    with pytest.raises(TypeError):  # positional settings after the first ones landed in other fields
        BenchConfig("rules", "o")


def test_a_row_the_model_cannot_take_leaves_no_folder(tmp_path, tiny_model):
    """userS: a bench refused for a row over ``--max-length`` left ``OUT/seed-0/finetune/`` behind, empty (the
    fine-tuning made its folder before it encoded the rows); now nothing is made, and the message names the flag."""
    from typer.testing import CliRunner

    from wherefrom.cli import app

    long = {"id": "long", "prompt": "a b:", "completion": " x" * 200, "label": "x"}
    rows = [{"id": f"r{i}", "prompt": f"{i} w:", "completion": " x", "label": "x"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, long]))
    (tmp_path / "test.jsonl").write_text(json.dumps({**rows[0], "id": "q0"}) + "\n")
    out = tmp_path / "out"
    args = ["bench", "--task", f"path:{tmp_path / 'train.jsonl'}:{tmp_path / 'test.jsonl'}", "--methods", "gradsim"]
    result = CliRunner().invoke(app, [*args, "--model", tiny_model, "--max-length", "64", "--out", str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "record 'long'" in said and "raise max_length (--max-length, now 64)" in said
    assert not out.exists()


def test_a_methods_warnings_are_recorded_in_its_row_and_listed_in_bench_md(tmp_path, tiny_model):
    """userJ (tune.md) as a kind: a bench row of a method whose iHVP did not converge (cg stopped after one
    iteration) records the warning, and bench.md lists it under the table by method and seed; a method that said
    nothing has none."""
    config = tiny_config(
        "rules", tmp_path / "w", tiny_model, ["cg", "bm25"], 10, 2, method_options={"cg": {"max_iter": 1}}
    )
    with pytest.warns(RuntimeWarning, match="cg did not converge"):
        report = run_bench(config)
    said = report["aggregate"]["cg"]["warnings"]["0"]
    assert any(w.startswith("ConvergenceWarning: cg did not converge in max_iter=1") for w in said), said
    assert report["aggregate"]["bm25"]["warnings"] == {}
    text = (tmp_path / "w" / "bench.md").read_text()
    assert "- cg, seed 0: ConvergenceWarning: cg did not converge" in text and "- bm25" not in text
    from wherefrom.studies.report import write_report as write_html_report

    page = write_html_report(tmp_path / "w").read_text()  # the HTML report lists them as bench.md does
    assert "Warning of cg, seed 0: ConvergenceWarning: cg did not converge" in page and "Warning of bm25" not in page


def test_a_fine_tuning_with_nan_weights_fails_its_rows_unscored(tmp_path, tiny_model, nan_last_step):
    """reviewU: a bench went on to score a fine-tuning whose weights were NaN: each method computed every gradient,
    then failed on "non-finite score(s)" naming modules, not the cause. Its rows fail at once naming the fine-tuning
    (here its first step leaves NaN weights, so every later loss is NaN); BM25, which reads no model, is scored."""
    config = tiny_config("rules", tmp_path / "nan", tiny_model, ["bm25", "gradsim"], 10, 2)
    with failing_methods(lambda name, _config: name == "gradsim"):  # were it fitted, it would fail otherwise
        report = run_bench(config)
    error = report["aggregate"]["gradsim"]["errors"]["0"]
    assert error.startswith("not scored: the fine-tuning diverged (the mean loss of epoch 1 is not finite)")
    assert "lower the learning rate (--learning-rate)" in error and report["aggregate"]["bm25"]["n_ok"] == 1
