"""Resuming with changed settings (issue 10, kind 4): an interrupted `index` or `fit` refuses to
resume under other settings, naming each one with both values, and a resumed index equals an
uninterrupted one; partial state of unknown settings is discarded, never mixed in."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from wherefrom.core.store import SettingsMismatch, forget_file, record_checksum, record_settings, write_json_checked

from .robust_workspace import fit_args, invoke, make_workspace


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("resume"), n_train=10)
    code, out = invoke(*fit_args(root, "run", "--strategy", "identity"))
    assert code == 0, out
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0, out
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "clean")
    assert code == 0, out
    return root


def interrupt_after_first_shard(index):
    """The state a kill after shard 0 leaves: later shards and the completion marker are gone."""
    for name in ("index.json", "shard-00001.safetensors", "shard-00002.safetensors"):
        (index / name).unlink()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--shard-size", "2"], "shard_size: recorded 4, now 2"),
        (["--shard-size", "3"], "shard_size: recorded 4, now 3"),
        (["--shard-size", "4", "--dtype", "float16"], "dtype: recorded 'float32', now 'float16'"),
        (["--shard-size", "4", "--dtype", "bfloat16"], "dtype: recorded 'float32', now 'bfloat16'"),
        (
            ["--shard-size", "5", "--dtype", "float16"],
            "dtype: recorded 'float32', now 'float16'; shard_size: recorded 4, now 5",
        ),
    ],
)
def test_resume_with_other_index_settings_is_refused_then_equals_clean(root, flags, named):
    index = root / "run" / "index"
    kept = (index / "shard-00000.safetensors").read_bytes()
    interrupt_after_first_shard(index)
    code, out = invoke("index", "--run", root / "run", *flags)
    assert code == 2 and named in out and str(index) in out, out
    resume = f"`wherefrom index --run {root / 'run'} --shard-size 4 --dtype float32"
    joined = " ".join(out.split())
    assert resume in joined and "` finishes it; or delete" in joined, out  # the recorded settings' command
    assert (index / "shard-00000.safetensors").read_bytes() == kept and not (index / "index.json").exists()
    assert not (index / "shard-00001.safetensors").exists()  # nothing written under the other settings
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0 and "2 shards written now" in out, out
    assert json.loads((index / "index.json").read_text()) == {
        "dtype": "float32",
        "rows": 10,
        "shard_size": 4,
        "shards": 3,
    }
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "resumed")
    assert code == 0, out
    scores = root / "run" / "scores"
    ids = json.loads((scores / "resumed.json").read_text())["train_ids"]
    assert ids == [f"r{i}" for i in range(10)]  # every training row once, in order
    assert torch.equal(
        load_file(str(scores / "resumed.safetensors"))["total"], load_file(str(scores / "clean.safetensors"))["total"]
    )


def test_complete_index_is_not_mixed_with_new_settings(root):
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4", "--dtype", "float16")
    assert code == 2 and "dtype: recorded 'float32', now 'float16'" in out, out
    assert "It is finished: `wherefrom index --run" in " ".join(out.split()), out  # not "resume" a finished one
    code, out = invoke("index", "--run", root / "run", "--shard-size", "3")  # other shard files than it has
    assert code == 2 and "shard_size: recorded 4, now 3" in out and "It is finished: `" in " ".join(out.split()), out
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0 and "0 shards written now" in out, out


def test_index_of_unknown_settings_is_discarded_and_rebuilt(root):
    """Shards without a recorded settings.json (an older version's, or bit rot) are never mixed in."""
    index = root / "run" / "index"
    (index / "settings.json").unlink()
    interrupt_after_first_shard(index)
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0 and "3 shards written now" in out and "settings unknown" in out, out
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "rebuilt")
    assert code == 0, out
    scores = root / "run" / "scores"
    assert torch.equal(
        load_file(str(scores / "rebuilt.safetensors"))["total"], load_file(str(scores / "clean.safetensors"))["total"]
    )


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        (["--strategy", "kfac"], ["--strategy", "ekfac"], "attribution.strategy: recorded 'kfac', now 'ekfac'"),
        (
            ["--strategy", "kfac", "--include", "q_proj"],
            ["--strategy", "kfac", "--include", "v_proj"],
            "attribution.include: recorded ['q_proj'], now ['v_proj']",
        ),
        (
            ["--strategy", "kfac", "--seed", "0"],
            ["--strategy", "kfac", "--seed", "1"],
            "attribution.seed: recorded 0, now 1",
        ),
    ],
)
def test_fit_resumed_with_other_settings_is_refused(root, tmp_path, first, second, named):
    run = f"fit-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run, *first))
    assert code == 0, out
    saved = (root / run / "factors" / "curvature.safetensors").read_bytes()
    code, out = invoke(*fit_args(root, run, *second))
    assert code == 2 and named in out, out
    assert (root / run / "factors" / "curvature.safetensors").read_bytes() == saved


def test_fit_of_an_older_version_is_reused(root, tmp_path):
    """A ``factors/settings.json`` written before a setting existed: the setting counts as its default."""
    run = root / f"fit-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac"))
    assert code == 0, out
    recorded = json.loads((run / "factors" / "settings.json").read_text())
    del recorded["attribution"]["query_without_eos"]  # as if the setting had been added since
    write_json_checked(recorded, run / "factors" / "settings.json")
    saved = (run / "factors" / "curvature.safetensors").read_bytes()
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac"))
    assert code == 0 and "refitting" not in out, out
    assert (run / "factors" / "curvature.safetensors").read_bytes() == saved
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--query-without-eos"))
    assert code == 2 and "attribution.query_without_eos: recorded False, now True" in out, out


def test_a_fit_killed_before_its_first_stage_starts_again_without_a_note(root, tmp_path):
    """A fit killed after it recorded ``factors/settings.json`` but before any stage: the rerun said "settings
    unknown (settings.json is missing); discarded 2 entries", though the file was there (it was forgotten first, as
    nothing of a fit was finished). The factors were and are the uninterrupted fit's."""
    run = root / f"fit-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac"))
    assert code == 0, out
    saved = (run / "factors" / "curvature.safetensors").read_bytes()
    for path in (run / "factors").iterdir():  # what a kill right after the settings leaves
        if path.name not in ("settings.json", "checksums.json", ".checksums.json.lock"):
            forget_file(path)
    assert sorted(p.name for p in (run / "factors").iterdir()) == [
        ".checksums.json.lock",
        "checksums.json",
        "settings.json",
    ]
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac"))
    assert code == 0 and "settings unknown" not in out and "discarded" not in out, out
    assert (run / "factors" / "curvature.safetensors").read_bytes() == saved


def test_record_settings_fills_a_section_with_its_defaults(tmp_path):
    folder = tmp_path / "job"
    record_settings(folder, {"run": {"a": 1}})
    assert record_settings(folder, {"run": {"a": 1, "new": "x"}}, defaults={"run": {"a": 5, "new": "x"}}) == []
    with pytest.raises(SettingsMismatch, match=r"run\.new: recorded 'x', now 'y'"):
        record_settings(folder, {"run": {"a": 1, "new": "y"}}, defaults={"run": {"new": "x"}})
    with pytest.raises(SettingsMismatch, match=r"run\.new: not recorded, now 'x'"):
        record_settings(folder, {"run": {"a": 1, "new": "x"}})
    assert json.loads((folder / "settings.json").read_text()) == {"run": {"a": 1}}


def test_settings_that_are_not_an_object_are_unknown(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    write_json_checked([1, 2], folder / "settings.json")
    (folder / "result.bin").write_bytes(b"x")
    notes = record_settings(folder, {"a": 1})
    assert notes and "not a JSON object" in notes[0] and not (folder / "result.bin").exists()
    assert json.loads((folder / "settings.json").read_text()) == {"a": 1}


def test_record_settings_names_nested_differences_and_keeps_the_record(tmp_path):
    folder = tmp_path / "job"
    assert record_settings(folder, {"a": 1, "b": {"c": [1, 2], "d": None}}) == []
    assert record_settings(folder, {"a": 1, "b": {"c": (1, 2), "d": None}}) == []  # compared in JSON form
    with pytest.raises(SettingsMismatch) as error:
        record_settings(folder, {"a": 2, "b": {"c": [1, 3]}, "e": "x"})
    message = str(error.value)
    for part in (
        "a: recorded 1, now 2",
        "b.c: recorded [1, 2], now [1, 3]",
        "b.d: recorded None, now absent",
        "e: not recorded, now 'x'",
    ):
        assert part in message
    assert json.loads((folder / "settings.json").read_text()) == {"a": 1, "b": {"c": [1, 2], "d": None}}


def test_device_is_compared_when_resuming_but_not_when_reusing_a_finished_index(root):
    """Parts computed on another device are not mixed in; a finished index is reused anywhere."""
    index = root / "run" / "index"
    settings = json.loads((index / "settings.json").read_text())
    (index / "settings.json").write_text(json.dumps({**settings, "device": "cuda"}))
    record_checksum(index / "settings.json")  # as if the index had been built on a GPU
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0 and "0 shards written now" in out, out
    interrupt_after_first_shard(index)
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 2 and "device: recorded 'cuda', now 'cpu'" in out, out
    with pytest.raises(SettingsMismatch, match="device: recorded 'cuda', now 'cpu'"):
        record_settings(index, {**settings, "device": "cpu"})
    assert record_settings(index, {**settings, "device": "cpu"}, ignore=("device",)) == []


@pytest.mark.parametrize(
    ("flags", "default", "other", "named"),
    [
        (
            ["--method", "logra"],
            ["--option", "dim_in=16"],
            ["--option", "dim_in=8"],
            "options.dim_in: recorded 16, now 8",
        ),
        (["--method", "bm25"], ["--option", "k1=1.5"], ["--option", "k1=1.2"], "options.k1: recorded 1.5, now 1.2"),
        (
            ["--strategy", "lissa"],
            ["--strategy-option", "depth=1000"],
            ["--strategy-option", "depth=10"],
            "attribution.strategy_options.depth: recorded 1000, now 10",
        ),
        (
            ["--method", "arnoldi"],
            ["--option", "rank=64"],
            ["--option", "rank=8"],
            "attribution.strategy_options.rank: recorded 64, now 8",
        ),
    ],
)
@pytest.mark.parametrize("given_first", [False, True])
def test_an_option_given_at_its_default_is_the_setting_left_out(
    root, tmp_path, flags, default, other, named, given_first
):
    """A fit with an option left out is reused by the same command giving that option its default value, and the
    other way round; another value is still refused, naming it."""
    run = f"default-{tmp_path.name}"
    first, second = (flags + default, flags) if given_first else (flags, flags + default)
    code, out = invoke(*fit_args(root, run, *first))
    assert code == 0, out
    code, out = invoke(*fit_args(root, run, *second))
    assert code == 0 and "reused" in out, out
    code, out = invoke(*fit_args(root, run, *flags, *other))
    assert code == 2 and named in out, out


def test_an_index_of_options_recorded_as_given_is_reused_and_read(root, tmp_path):
    """A logra fit and index whose settings recorded only the options given (as this version did before it
    recorded every option at its value): the options left out count as their defaults, so fit, index and
    scores reuse them; an option given at another value is still refused."""
    run = root / f"sparse-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, "--method", "logra", "--option", "dim_out=8"))
    assert code == 0, out
    code, out = invoke("index", "--run", run, "--shard-size", "4")
    assert code == 0, out
    for path in (run / "method" / "settings.json", run / "index" / "settings.json"):
        recorded = json.loads(path.read_text())
        assert recorded["options"]["dim_in"] == 16 and recorded["options"]["kind"] == "gaussian"
        write_json_checked({**recorded, "options": {"dim_out": 8}}, path)
    shards = {p.name: p.read_bytes() for p in (run / "index").glob("shard-*")}
    code, out = invoke(*fit_args(root, run.name, "--method", "logra", "--option", "dim_out=8", "--option", "dim_in=16"))
    assert code == 0 and "reused" in out, out
    code, out = invoke("index", "--run", run, "--shard-size", "4")
    assert code == 0 and "0 shards written now" in out, out
    assert {p.name: p.read_bytes() for p in (run / "index").glob("shard-*")} == shards
    code, out = invoke("scores", "--run", run, "--queries", root / "queries.jsonl", "--name", "sparse")
    assert code == 0, out
    recorded = json.loads((run / "index" / "settings.json").read_text())
    write_json_checked({**recorded, "options": {"dim_out": 8, "dim_in": 4}}, run / "index" / "settings.json")
    code, out = invoke("scores", "--run", run, "--queries", root / "queries.jsonl", "--name", "other")
    assert code == 2 and "options.dim_in: recorded 4, now 16" in out, out


def test_record_settings_fills_nested_sections_with_their_defaults(tmp_path):
    folder = tmp_path / "job"
    record_settings(folder, {"run": {"a": 1, "options": {"x": 1}}, "other": 2})
    defaults = {"run": {"options": {"x": 0, "y": 3}}, "absent": {"z": 1}}
    assert record_settings(folder, {"run": {"a": 1, "options": {"x": 1, "y": 3}}, "other": 2}, defaults=defaults) == []
    with pytest.raises(SettingsMismatch, match=r"run\.options\.y: recorded 3, now 4"):
        record_settings(folder, {"run": {"a": 1, "options": {"x": 1, "y": 4}}, "other": 2}, defaults=defaults)
    with pytest.raises(SettingsMismatch, match=r"absent: not recorded"):  # a section is not filled in whole
        record_settings(
            folder, {"run": {"a": 1, "options": {"x": 1}}, "other": 2, "absent": {"z": 1}}, defaults=defaults
        )


def test_a_resumed_fit_and_index_run_with_the_thread_count_they_started_with(root, tmp_path, monkeypatch):
    """Torch's CPU thread count changes float sums in the last bits (SmolLM2 EK-FAC factors fitted with 1 and 2
    threads differ), and --threads defaults to the cores the load leaves: a job rerun after a kill could take
    another count and end other than an uninterrupted run. The count is recorded and a resumed job takes it;
    a finished result is reused with any count."""
    from wherefrom.core.vectors import VectorStoreWriter
    from wherefrom.engine.api import Attributor

    seen = {}
    fit, build = Attributor.fit, VectorStoreWriter.build

    def counted(name, function):
        def wrapper(*args, **kwargs):
            seen[name] = torch.get_num_threads()
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Attributor, "fit", counted("fit", fit))
    monkeypatch.setattr(VectorStoreWriter, "build", counted("index", build))
    run = root / f"threads-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "1"))
    assert code == 0 and seen["fit"] == 1, out
    assert json.loads((run / "factors" / "settings.json").read_text())["threads"] == 1
    saved = (run / "factors" / "curvature.safetensors").read_bytes()
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "2"))
    assert code == 0 and "reused" in out and "torch threads" not in out, out  # finished: reused with any count
    (run / "factors" / "curvature.json").unlink()  # as a fit killed before its final save leaves it
    before = torch.get_num_threads()
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "2"))
    assert code == 0 and seen["fit"] == 1, out
    assert "with 1 torch threads, the count it started with (not 2)" in " ".join(out.split()), out
    assert (run / "factors" / "curvature.safetensors").read_bytes() == saved
    assert torch.get_num_threads() == before
    code, out = invoke("index", "--run", run, "--shard-size", "4", "--threads", "1")
    assert code == 0 and seen["index"] == 1, out
    interrupt_after_first_shard(run / "index")
    code, out = invoke("index", "--run", run, "--shard-size", "4", "--threads", "2")
    assert code == 0 and seen["index"] == 1 and "2 shards written now" in out, out
    assert "the count it started with (not 2)" in " ".join(out.split()), out


def test_an_index_from_a_resumed_fits_kept_gradients_records_the_fits_thread_count(root, tmp_path):
    """``fit --with-index`` writes the rows the fit's pass kept, computed with the fit's recorded thread count: the
    index records that count, so that a resumed index recomputes its missing shards with it."""
    run = root / f"kept-{tmp_path.name}"
    args = ("--strategy", "kfac", "--with-index", "--shard-size", "4")
    code, out = invoke(*fit_args(root, run.name, *args, "--threads", "1"))
    assert code == 0, out
    (run / "factors" / "curvature.json").unlink()  # a fit killed before its final save, and no index yet
    shutil.rmtree(run / "index")
    code, out = invoke(*fit_args(root, run.name, *args, "--threads", "2"))
    assert code == 0 and "the count it started with (not 2)" in " ".join(out.split()), out
    assert json.loads((run / "index" / "settings.json").read_text())["threads"] == 1


def test_a_finished_fit_of_a_strategy_that_does_not_distribute_is_reused_under_torchrun(root, tmp_path, monkeypatch):
    from wherefrom.engine.run import Run, RunConfig

    run = root / f"cg-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, "--strategy", "cg"))
    assert code == 0, out
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; nothing below joins a process group
    monkeypatch.setenv("RANK", "0")
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert Run.create(run, config).finished()  # refused only where there is a fit to make


def test_a_fit_resumed_under_another_process_count_is_refused_and_finished_factors_are_reused(root, tmp_path):
    """A fit's stages are sums over the processes it started with: a fit killed under two processes and resumed in
    one matched neither clean fit (eigenvalues 1e-7 to 3e-6 off) without a word. The process count is recorded and a
    resume under another is refused naming it; finished factors are reused under any count, and an index is the
    same bytes under any count, so its settings leave it out."""
    run = root / f"processes-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "1"))
    assert code == 0, out
    settings = run / "factors" / "settings.json"
    assert json.loads(settings.read_text())["processes"] == 1
    code, out = invoke("index", "--run", run, "--shard-size", "4", "--threads", "1")
    assert code == 0 and "processes" not in json.loads((run / "index" / "settings.json").read_text()), out
    recorded = {**json.loads(settings.read_text()), "processes": 2}  # as a fit started under torchrun leaves it
    write_json_checked(recorded, settings)
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "1"))
    assert code == 0 and "reused" in out, out  # finished: reused
    (run / "factors" / "curvature.json").unlink()  # as a fit killed before its final save leaves it
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "1"))
    message = " ".join(out.split())
    assert code != 0 and "processes: recorded 2, now 1" in message, out
    # how to resume it where it started, not only "delete" (which throws the finished stages away)
    assert f"resume it with `torchrun --standalone --nproc-per-node 2 -m wherefrom.cli -- replay {run}`" in message, out
    write_json_checked({**recorded, "processes": 1, "device": "cuda"}, settings)  # as a fit started on a GPU
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "1"))
    message = " ".join(out.split())
    assert code != 0 and "resume it with its `fit` command with `--device cuda`" in message, out
    write_json_checked({k: v for k, v in recorded.items() if k != "processes"}, settings)  # an older version's
    code, out = invoke(*fit_args(root, run.name, "--strategy", "kfac", "--threads", "1"))
    message = " ".join(out.split())
    assert code != 0 and "resume it with" not in message and "to fit again with the current settings" in message


def test_index_rebuilds_shards_that_match_their_checksums_but_hold_other_rows(root, tmp_path):
    """Shards 0 and 1 of a finished index swapped with their checksum entries: `query` refused the store ("does
    not hold the store's rows from 0 on ... rerun `wherefrom index`") while `index` called it complete (the advice
    looped). `index` now rebuilds both, to the bytes of the clean build."""
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    index = run / "index"
    shutil.rmtree(index)  # earlier tests of this module leave root's index in other states
    code, out = invoke("index", "--run", run, "--shard-size", "4")
    assert code == 0 and "3 shards written now" in out, out
    clean = {p.name: p.read_bytes() for p in index.iterdir() if not p.name.startswith(".")}
    a, b = index / "shard-00000.safetensors", index / "shard-00001.safetensors"
    a.write_bytes(clean[b.name])
    b.write_bytes(clean[a.name])
    checksums = json.loads((index / "checksums.json").read_text())
    files = checksums["files"]
    files[a.name], files[b.name] = files[b.name], files[a.name]
    (index / "checksums.json").write_text(json.dumps(checksums))
    code, out = invoke("scores", "--run", run, "--queries", root / "queries.jsonl", "--name", "swapped")
    assert code == 2 and "does not hold the store's rows from 0 on" in out, out
    code, out = invoke("index", "--run", run, "--shard-size", "4")
    assert code == 0 and "2 shards written now" in out, out
    assert {p.name: p.read_bytes() for p in index.iterdir() if not p.name.startswith(".")} == clean


@pytest.mark.parametrize(
    ("first", "unfinish", "other", "named"),
    [
        (["--strategy", "kfac"], "factors", ["--strategy", "kfac", "--fisher", "empirical"], "attribution.fisher"),
        (["--method", "trak"], "method", ["--method", "trak", "--max-length", "96"], "max_length"),
    ],
)
def test_a_refused_resume_of_an_unfinished_fit_keeps_the_run_as_recorded(root, tmp_path, first, unfinish, other, named):
    """A fit killed midway (its ``factors/`` or ``method/`` holds settings and no result), rerun with another setting:
    refused rightly, but the run's ``config.json`` had taken the refused settings (the factors' were the old ones) and
    lost its replay record, so ``replay`` could not resume it ("records no command to replay"). Both stay as they
    were; the recorded command then finishes the fit with the uninterrupted fit's bytes."""
    run = root / f"fit-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run.name, *first))
    assert code == 0, out
    results = sorted(p for p in (run / unfinish).iterdir() if p.suffix == ".safetensors")
    saved = {p.name: p.read_bytes() for p in results}
    for path in results:  # what a kill midway leaves: the settings, no result (and a stage folder for factors)
        forget_file(path)
    for path in (run / unfinish).glob("*.json"):
        if path.name not in ("settings.json", "checksums.json"):
            forget_file(path)
    if unfinish == "factors":
        (run / "factors" / "stages").mkdir()
    recorded = {name: (run / name).read_bytes() for name in ("config.json", "manifest.json")}
    assert json.loads(recorded["config.json"])["replay"]["fit"]
    code, out = invoke(*fit_args(root, run.name, *other))
    assert code == 2 and named in out and "was started with other settings" in " ".join(out.split()), out
    assert {name: (run / name).read_bytes() for name in recorded} == recorded
    code, out = invoke("replay", run)
    assert code == 0, out
    assert {p.name: p.read_bytes() for p in (run / unfinish).iterdir() if p.suffix == ".safetensors"} == saved


def test_index_names_the_layout_it_built_also_after_its_settings_were_lost(root):
    """userD: an index whose ``settings.json`` was damaged, rebuilt by an ``index`` without its layout flags, was
    noted ("settings unknown ... discarded N entries and started again") but not which layout it now had (the
    defaults, not the float16 of the first build). The closing line names the store's rows, length, dtype, shard
    size and preconditioning."""
    run = "logra-layout"
    assert invoke(*fit_args(root, run, "--method", "logra", "--option", "dim_in=2", "--option", "dim_out=2"))[0] == 0
    code, out = invoke("index", "--run", root / run, "--dtype", "float16", "--shard-size", "4")
    said = " ".join(out.split())
    assert (
        code == 0 and "written now; 10 rows x " in said and " float16, 4 rows a shard, --precondition fitted)" in said
    )
    (root / run / "index" / "settings.json").write_text("{")
    code, out = invoke("index", "--run", root / run)
    said = " ".join(out.split())
    assert code == 0 and "settings unknown" in said and " float32, 256 rows a shard, --precondition fitted)" in said
