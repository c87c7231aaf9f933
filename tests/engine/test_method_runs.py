"""Every method of the registry in a run directory: fit once, reopen (a fresh Run object, from another
working directory), scores equal to the in-memory method's; a moved training file is refused by name."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from tests.engine.robust_workspace import make_workspace
from tests.models.tokenizers import appends_eos, version_1
from wherefrom.core.data import load_records
from wherefrom.core.store import record_checksum, recorded_checksums
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig, RunMismatch
from wherefrom.methods.registry import METHODS, make_method, method_settings
from wherefrom.models.loading import Version1TokenizerRecord, load_model
from wherefrom.models.tiny import save_tiny

ATTRIBUTION = AttributionConfig(include=[r"layers\.1\.mlp\.down_proj"], batch_size=4, max_length=64)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("methods"), n_train=6)
    for k in (1, 2):  # two full-model "checkpoints" for tracin
        save_tiny(root / f"checkpoint-{k}", arch="llama", seed=k)
    return root


def options_of(name: str, root) -> dict:
    """Small, valid options of each method (tracin: two checkpoint folders with given learning rates)."""
    return {
        "tracin": {"checkpoints": [str(root / "checkpoint-1"), str(root / "checkpoint-2")], "learning_rates": [0.5, 2]},
        "trak": {"dim": 8},
        "logra": {"dim_in": 4, "dim_out": 4},
        "arnoldi": {"rank": 2, "iterations": 20},
    }.get(name, {})


def in_memory_scores(name: str, root, options: dict):
    loaded = load_model(root / "model", device="cpu")
    train, queries = load_records(root / "train.jsonl"), load_records(root / "queries.jsonl")
    method = make_method(name, loaded.model, loaded.tokenizer, ATTRIBUTION, **options)
    method.fit(train)
    return method.scores(queries, train)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_run_reopens_with_equal_scores(workspace, tmp_path, monkeypatch, name):
    options = options_of(name, workspace)
    monkeypatch.chdir(workspace)  # paths given relative to the working directory, as typed
    config = RunConfig.for_method(name, "train.jsonl", ATTRIBUTION, options, model="model", device="cpu")
    run = Run.create(tmp_path / "run", config)
    assert run.config.train == str((workspace / "train.jsonl").resolve())  # recorded resolved
    assert run.fit() is True

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a fresh Run object, opened from another working directory
    reopened = Run.open(tmp_path / "run", device="cpu")
    queries = load_records(workspace / "queries.jsonl")
    saved = reopened.scores(queries)
    expected = in_memory_scores(name, workspace, options)
    assert saved.train_ids == expected.train_ids and saved.query_ids == expected.query_ids
    assert torch.equal(saved.per_module, expected.per_module), name
    assert (tmp_path / "run" / ("method" if reopened.method is not None else "factors")).is_dir()
    # a second fit reuses the saved state
    assert Run.create(tmp_path / "run", run.config).fit() is False


@pytest.mark.parametrize("name", ["bm25", "ekfac"])
def test_moved_training_file_is_refused_by_name(workspace, tmp_path, name):
    root = tmp_path / "copy"
    shutil.copytree(workspace, root, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = RunConfig.for_method(name, str(root / "train.jsonl"), ATTRIBUTION, {}, model=str(root / "model"))
    Run.create(tmp_path / "run", replace(config, device="cpu")).fit()
    moved = root / "moved.jsonl"
    (root / "train.jsonl").rename(moved)
    with pytest.raises(RunMismatch, match=r"training file .*train\.jsonl .* is gone"):
        Run.open(tmp_path / "run", device="cpu")
    # found again when its new place is given and its rows have the recorded fingerprint
    assert Run.open(tmp_path / "run", device="cpu", train=moved).config.train == str(moved.resolve())
    (root / "model").rename(root / "model-moved")
    with pytest.raises(RunMismatch, match=r"model folder .*model recorded in .* is gone"):
        Run.open(tmp_path / "run", device="cpu", train=moved)
    (root / "model-moved").rename(root / "model")
    other = root / "other.jsonl"
    other.write_text(moved.read_text().replace('"ij:"', '"ab:"'))
    with pytest.raises(RunMismatch, match=r"^training data \(.*other\.jsonl\) changed since this run was made; refit"):
        Run.open(tmp_path / "run", device="cpu", train=other)


def test_method_run_refuses_index_and_bad_option(workspace, tmp_path):
    config = RunConfig.for_method("trak", str(workspace / "train.jsonl"), ATTRIBUTION, {"dim": 8}, device="cpu")
    run = Run.create(tmp_path / "run", replace(config, model=str(workspace / "model")))
    with pytest.raises(ValueError, match="method 'trak' has no per-row gradient index"):
        run.build_index()
    with pytest.raises(RuntimeError, match="no fitted trak"):
        run.scores(load_records(workspace / "queries.jsonl"))
    with pytest.raises(ValueError, match="dims"):
        method_settings("trak", ATTRIBUTION, {"dims": 8})


def test_a_tokenizer_that_encodes_otherwise_is_refused_and_version_1_records_still_open(workspace, tmp_path):
    """A run and its index record the tokenizer's fingerprint: one that encodes the same text to other ids (the
    same vocabulary and special tokens) is refused by name. A run made before version 2 of the fingerprint
    (records holding the version-1 digest, rewritten here) opens, reuses its fit and reads its index as before."""
    root = tmp_path / "copy"
    shutil.copytree(workspace, root, ignore=shutil.ignore_patterns("checkpoint-*"))
    options = options_of("logra", root)
    config = RunConfig.for_method("logra", str(root / "train.jsonl"), ATTRIBUTION, options, model=str(root / "model"))
    folder = tmp_path / "run"
    run = Run.create(folder, replace(config, device="cpu"))
    run.fit()
    run.build_index(shard_size=4)
    queries = load_records(root / "queries.jsonl")
    before = run.store_scores(queries, run.open_index())
    tokenizer = run.loaded.tokenizer

    appends_eos(load_model(root / "model").tokenizer).save_pretrained(root / "model")
    with pytest.raises(
        RunMismatch, match=r"^tokenizer \(its vocabulary, .*how it encodes text.*\) changed since this run"
    ):
        Run.open(folder, device="cpu")
    tokenizer.save_pretrained(root / "model")

    current, old = run.loaded.tokenizer_fingerprint, version_1(tokenizer)
    records = [path for path in folder.rglob("*.json") if current in path.read_text()]
    assert {path.relative_to(folder).as_posix() for path in records} >= {"manifest.json", "index/settings.json"}
    for path in records:
        path.write_text(path.read_text().replace(current, old))
        if path.name in recorded_checksums(path.parent):
            record_checksum(path)  # as the version that wrote it recorded it
    with pytest.warns(Version1TokenizerRecord, match=r"manifest\.json records its tokenizer with version 1"):
        reopened = Run.open(folder, device="cpu")
    assert reopened.loaded.tokenizer_fingerprint == old
    after = reopened.store_scores(queries, reopened.open_index())
    assert torch.equal(after.per_module, before.per_module)
    with pytest.warns(Version1TokenizerRecord):
        assert Run.create(folder, replace(config, device="cpu")).fit() is False  # the fit is reused
    assert old in (folder / "manifest.json").read_text()


@pytest.mark.parametrize("name", ["logra", "trak", "tracin", "repsim", "ekfac"])
def test_a_method_run_reports_its_passes_to_its_progress(workspace, tmp_path, name):
    """userD: a logra run's fit and index (3.5 min each on 900 rows) showed no progress bar: :class:`Run` gave its
    progress to the influence attributor alone, not to a method it made. Every method that runs the model reports
    each pass over rows, with the batches it yields."""
    seen: list[tuple[str, int]] = []

    def progress(batches, description):
        for batch in batches:
            seen.append((description, 1))
            yield batch

    config = RunConfig.for_method(
        name, str(workspace / "train.jsonl"), ATTRIBUTION, options_of(name, workspace), model=str(workspace / "model")
    )
    run = Run.create(tmp_path / "run", replace(config, device="cpu"), progress=progress)
    run.fit()
    run.scores(load_records(workspace / "queries.jsonl"))
    assert seen and all(description for description, _ in seen)
    assert len(seen) >= 2 * len(load_records(workspace / "train.jsonl")) // ATTRIBUTION.batch_size  # fit + scores


def test_a_recorded_run_of_settings_its_options_skip_still_opens_but_a_new_one_is_refused(
    workspace, tmp_path, monkeypatch
):
    """A ``logra`` run with ``curvature=False`` reads no Fisher. ``Run.create`` refuses one that gives
    ``fisher="empirical"`` (:func:`wherefrom.methods.registry.refuse_skipped_options`), but a run an older version
    recorded with it (made here with that check off) still opens, scores as ``curvature=False`` scores and builds
    its index: the check is made where a run is made, not where a recorded one is opened."""
    import wherefrom.engine.run as run_module
    from wherefrom.core.options import OptionError

    options = {"dim_in": 4, "dim_out": 4, "curvature": False}
    skipped = replace(ATTRIBUTION, fisher="empirical")
    config = RunConfig.for_method(
        "logra", str(workspace / "train.jsonl"), skipped, options, model=str(workspace / "model")
    )
    config = replace(config, device="cpu")
    with pytest.raises(OptionError, match="method 'logra': fisher='empirical' with curvature=False"):
        Run.create(tmp_path / "refused", config)
    assert not (tmp_path / "refused").exists()
    with monkeypatch.context() as older:
        older.setattr(run_module, "refuse_skipped_options", lambda *args: None)
        Run.create(tmp_path / "old", config).fit()
    reopened = Run.open(tmp_path / "old", device="cpu")
    expected = in_memory_scores("logra", workspace, options)
    assert torch.equal(reopened.scores(load_records(workspace / "queries.jsonl")).per_module, expected.per_module)
    assert reopened.build_index() >= 1


def test_a_tracin_checkpoint_written_again_after_the_fit_is_refused_by_name(workspace, tmp_path):
    """userH: a tracin run stored its checkpoints' paths and learning rates, not their weights: a checkpoint
    fine-tuned again in place was scored with the old learning rates (neither the old run's scores nor a new
    fit's), and a rerun of the fit said "already fitted". Opening the run now refuses, naming the folder."""
    from wherefrom.models.loading import ModelLoadError

    root = tmp_path / "copy"
    shutil.copytree(workspace, root)
    options = options_of("tracin", root)
    config = RunConfig.for_method("tracin", str(root / "train.jsonl"), ATTRIBUTION, options, model=str(root / "model"))
    Run.create(tmp_path / "run", replace(config, device="cpu")).fit()
    import wherefrom.methods.tracin as tracin_module

    with pytest.MonkeyPatch.context() as unhashed:  # reviewS: each opening hashed every checkpoint's bytes
        unhashed.setattr(tracin_module, "weights_fingerprint", lambda folder: pytest.fail(f"{folder} hashed"))
        assert Run.open(tmp_path / "run", device="cpu").method_fitted  # unchanged files: opens, read by stat only
    save_tiny(root / "checkpoint-2", arch="llama", seed=7)  # the same folder, other weights
    with pytest.raises(ModelLoadError, match=r"checkpoint-2'\] hold other weights than when the run was fitted"):
        Run.open(tmp_path / "run", device="cpu")
