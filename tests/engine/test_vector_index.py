"""`index` of a run whose train side is a vector per row (logra, trak, repsim): the store's scores equal
the method's own, a store from another model or projection is refused naming what differs, and the
index settings that do not apply are refused by name."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from dataclasses import replace

import pytest
import torch

from tests.engine.robust_workspace import invoke, make_workspace, partials, spawn, wait_until
from wherefrom.core.data import load_records
from wherefrom.core.memory import MemoryLimitError
from wherefrom.core.store import DamagedFile, SettingsMismatch, is_intact, write_json_checked
from wherefrom.core.vectors import VectorStore
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.engine.run import Run, RunConfig
from wherefrom.methods import projection
from wherefrom.methods.registry import make_method
from wherefrom.models.loading import load_model
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import write_jsonl

ATTRIBUTION = AttributionConfig(include=[r"layers\.1\.mlp\.(down|up)_proj"], batch_size=4, max_length=64)
LOGRA = {"dim_in": 4, "dim_out": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("vectors"), n_train=10)
    save_tiny(root / "other-model", arch="llama", seed=7)
    return root


def fitted(root, folder, method, options, model="model"):
    config = RunConfig.for_method(method, str(root / "train.jsonl"), ATTRIBUTION, options, model=str(root / model))
    run = Run.create(folder, replace(config, device="cpu"))
    run.fit()
    return run


def in_memory(root, method, options):
    loaded = load_model(root / "model", device="cpu")
    train, queries = load_records(root / "train.jsonl"), load_records(root / "queries.jsonl")
    made = make_method(method, loaded.model, loaded.tokenizer, ATTRIBUTION, **options)
    made.fit(train)
    return made.scores(queries, train)


@pytest.mark.parametrize(("method", "options"), [("logra", LOGRA), ("trak", {"dim": 8}), ("repsim", {})])
def test_store_scores_equal_the_methods_scores(workspace, tmp_path, method, options):
    """float32 rows: equal to 1e-5 relative to the largest score (the preconditioner is applied to the train
    rows instead of the queries: same value, other rounding)."""
    run = fitted(workspace, tmp_path / "run", method, options)
    assert run.build_index(shard_size=4) == 3
    store = VectorStore.open(tmp_path / "run" / "index")
    assert store.count == 10 and store.shard_count == 3 and store.settings["precondition"] == "fitted"
    blocks = store.settings["rows_layout"]["blocks"]
    assert store.dim == sum(b[-1] for b in blocks) and len(blocks) == (1 if method == "repsim" else 2)
    queries = load_records(workspace / "queries.jsonl")
    reopened = Run.open(tmp_path / "run", device="cpu")
    from_store = reopened.scores(queries)
    expected = in_memory(workspace, method, options)
    assert from_store.train_ids == expected.train_ids and from_store.module_names == expected.module_names
    scale = expected.per_module.abs().max()
    assert torch.allclose(from_store.per_module, expected.per_module, rtol=0, atol=1e-5 * float(scale)), method
    assert reopened.build_index(shard_size=4) == 0  # finished: reused


def test_unit_rows_and_no_preconditioning(workspace, tmp_path):
    run = fitted(workspace, tmp_path / "run", "logra", LOGRA)
    run.build_index(shard_size=4, precondition="none", unit_norm=True)
    store = VectorStore.open(tmp_path / "run" / "index")
    rows = torch.cat([r for _, r in store.shards()])
    assert torch.allclose(rows.norm(dim=1), torch.ones(10), atol=1e-5)
    raw = make_method("logra", run.loaded.model, run.loaded.tokenizer, ATTRIBUTION, curvature=False, **LOGRA)
    queries = load_records(workspace / "queries.jsonl")
    cosine = torch.nn.functional.normalize
    _, q = raw.query_vectors(queries)
    train = torch.cat([r for _, r in raw.train_vectors(run.train, precondition=False)])
    expected = cosine(q, dim=1) @ cosine(train, dim=1).T
    assert torch.allclose(Run.open(tmp_path / "run", device="cpu").scores(queries).total, expected, atol=1e-5)
    with pytest.raises(SettingsMismatch, match="precondition: recorded 'none', now 'fitted'"):
        (tmp_path / "run" / "index" / "index.json").unlink()
        run.build_index(shard_size=4)


def test_store_of_another_projection_or_model_is_refused_by_name(workspace, tmp_path):
    queries = load_records(workspace / "queries.jsonl")
    fitted(workspace, tmp_path / "a", "logra", LOGRA).build_index(shard_size=4)
    other = fitted(workspace, tmp_path / "b", "logra", {"dim_in": 2, "dim_out": 4})
    shutil.copytree(tmp_path / "a" / "index", tmp_path / "b" / "index")
    with pytest.raises(SettingsMismatch, match=r"dim_in: recorded 4, now 2.*cannot serve run"):
        other.scores(queries)
    for name, model in (("c", "model"), ("d", "other-model")):
        code, out = invoke(
            "fit", "--train", workspace / "train.jsonl", "--model", workspace / model, "--run", tmp_path / name,
            "--device", "cpu", "--strategy", "identity", "--include", r"layers\.1\.mlp\.down_proj",
        )  # fmt: skip
        assert code == 0, out
    code, out = invoke("index", "--run", tmp_path / "c", "--shard-size", "4")
    assert code == 0 and "3 shards written now" in out, out
    shutil.copytree(tmp_path / "c" / "index", tmp_path / "d" / "index")
    code, out = invoke("scores", "--run", tmp_path / "d", "--queries", workspace / "queries.jsonl")
    assert code == 2 and "model: recorded" in out and "rebuild it" in out, out


def test_a_store_of_other_training_rows_names_both_sets_of_rows(workspace, tmp_path):
    """userD: a store copied from a run of another training file was refused as ``data: recorded '98d4...', now
    '8d54...'`` alone; the refusal now names the store's rows and the run's training file (counts, first ids; for
    as many rows, the first row that differs)."""
    rows = load_records(workspace / "train.jsonl")
    fewer = tmp_path / "fewer.jsonl"
    write_jsonl(rows[3:], fewer)
    fitted(workspace, tmp_path / "a", "logra", LOGRA).build_index(shard_size=4)
    config = RunConfig.for_method("logra", str(fewer), ATTRIBUTION, LOGRA, model=str(workspace / "model"))

    def refusal(folder) -> str:
        """The refusal of `a`'s store copied into a run of ``fewer`` as it is now."""
        other = Run.create(folder, replace(config, device="cpu"))
        other.fit()
        shutil.copytree(tmp_path / "a" / "index", folder / "index")
        with pytest.raises(SettingsMismatch, match="data: recorded") as refused:
            other.scores(load_records(workspace / "queries.jsonl"))
        return str(refused.value)

    said = refusal(tmp_path / "b")
    assert f"the store indexes 10 rows (the first {rows[0].id!r}), not the 7 rows of this run's training file" in said
    assert f"{fewer} (the first {rows[3].id!r})" in said
    # the same rows in another order: both counts and first ids alike, so the first row that differs
    write_jsonl([*rows[:2], rows[5], *rows[3:5], rows[2], *rows[6:]], fewer)
    said = refusal(tmp_path / "c")
    assert f"row 2 of the store is {rows[2].id!r}, not {rows[5].id!r} as in this run's training file {fewer}" in said
    assert "(both 10 rows)" in said


def test_a_store_made_with_other_input_settings_is_refused_and_an_older_manifest_is_read(workspace, tmp_path):
    """The input settings the rows depend on (template, truncation, EOS, padding side, loss tokens) are recorded
    with the store: a store copied into a run that lays its rows out otherwise gave that run's scores from the
    other rows, silently. A manifest written before they were recorded reads them at their defaults."""
    queries = load_records(workspace / "queries.jsonl")
    fitted(workspace, tmp_path / "a", "logra", LOGRA).build_index(shard_size=4)
    expected = Run.open(tmp_path / "a", device="cpu").scores(queries).total
    config = RunConfig.for_method(
        "logra", str(workspace / "train.jsonl"), replace(ATTRIBUTION, append_eos=False), LOGRA
    )
    other = Run.create(tmp_path / "b", replace(config, model=str(workspace / "model"), device="cpu"))
    other.fit()
    shutil.copytree(tmp_path / "a" / "index", tmp_path / "b" / "index")
    with pytest.raises(SettingsMismatch, match=r"gradients\.append_eos: recorded True, now False"):
        other.scores(queries)

    manifest = tmp_path / "a" / "index" / "settings.json"
    older = json.loads(manifest.read_text())
    kept = ("batch_size", "max_length", "chat_template", "reduction", "include", "exclude", "autocast")
    older["gradients"] = {k: v for k, v in older["gradients"].items() if k in kept}
    assert len(older["gradients"]) == len(kept)
    write_json_checked(older, manifest)
    assert torch.equal(Run.open(tmp_path / "a", device="cpu").scores(queries).total, expected)


def test_index_settings_that_do_not_apply_are_refused(workspace, tmp_path):
    code, out = invoke(
        "fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", tmp_path / "run",
        "--device", "cpu", "--strategy", "identity", "--include", r"layers\.1\.mlp\.down_proj",
    )  # fmt: skip
    assert code == 0, out
    # userL: each refusal named both flags, also when only --unit-norm was given beside a valid --precondition adam
    for flags, named in (
        (["--unit-norm"], "--unit-norm applies"),
        (["--precondition", "adam", "--unit-norm"], "--unit-norm applies"),
        (["--precondition", "none"], "--precondition none applies"),
        (["--precondition", "none", "--unit-norm"], "--precondition none and --unit-norm apply"),
    ):
        code, out = invoke("index", "--run", tmp_path / "run", *flags)
        said = " ".join(out.split())
        assert code == 2 and f"error: {named} only to the index of a trak/logra/repsim/tracin run" in said, out
    code, out = invoke("index", "--run", tmp_path / "run", "--precondition", "lots")
    assert code == 2 and "--precondition" in out and "lots" in out, out
    unfitted = RunConfig.for_method("logra", str(workspace / "train.jsonl"), ATTRIBUTION, LOGRA, device="cpu")
    run = Run.create(tmp_path / "unfitted", replace(unfitted, model=str(workspace / "model")))
    with pytest.raises(ValueError, match=r"method 'logra' has no per-row gradient index \(before it is fitted"):
        run.build_index()
    bm25 = fitted(workspace, tmp_path / "bm25", "bm25", {})
    with pytest.raises(ValueError, match="not a vector per row"):
        bm25.build_index()


def test_cli_index_of_a_logra_run(workspace, tmp_path):
    fitted(workspace, tmp_path / "run", "logra", LOGRA)
    code, out = invoke("index", "--run", tmp_path / "run", "--shard-size", "3", "--dtype", "bfloat16")
    assert code == 0 and "4 shards written now" in out, out
    assert VectorStore.open(tmp_path / "run" / "index").dtype == "bfloat16"
    code, out = invoke("scores", "--run", tmp_path / "run", "--queries", workspace / "queries.jsonl")
    assert code == 0 and "(3, 10) scores" in out, out


@pytest.mark.parametrize("precondition", ["fitted", "empirical"])
def test_logra_index_killed_then_resumed_is_byte_identical(workspace, tmp_path, precondition):
    """A real `wherefrom index` process of a logra run SIGKILLed after a few shards, then the same command:
    the store equals an uninterrupted build byte for byte (every file but the lock; an empirical index's
    preconditioner too)."""
    options = LOGRA if precondition == "fitted" else {**LOGRA, "curvature": False}  # empirical: no fitted F~
    for name in ("clean", "killed"):
        fitted(workspace, tmp_path / name, "logra", options)
    args = ("--shard-size", "1", "--precondition", precondition)
    code, out = invoke("index", "--run", tmp_path / "clean", *args)
    assert code == 0 and "10 shards written now" in out, out
    index = tmp_path / "killed" / "index"
    process = spawn("index", "--run", tmp_path / "killed", *args)
    wait_until(lambda: is_intact(index / "shard-00002.safetensors"), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if (index / "index.json").exists():
        pytest.skip("the index finished before the kill")
    finished = sum(is_intact(p) for p in index.glob("shard-*"))
    code, out = invoke("index", "--run", tmp_path / "killed", *args)
    assert code == 0 and f"{10 - finished} shard{'s' * (10 - finished != 1)} written now" in out, out

    def stored(folder):
        files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("."))
        return {str(p.relative_to(folder)): p.read_bytes() for p in files}

    assert stored(index) == stored(tmp_path / "clean" / "index") and not partials(tmp_path / "killed")


@pytest.mark.parametrize(("method", "options"), [("logra", LOGRA), ("trak", {"dim": 8})])
def test_empirical_index_gives_the_methods_empirical_fisher_scores_without_a_fit(workspace, tmp_path, method, options):
    """``--precondition empirical`` on a run never fitted: one pass of raw rows, the projected Fisher fitted on
    the stored rows, the queries preconditioned: the method's scores fitted with ``fisher="empirical"`` (the
    same F~ from the same gradients) to 1e-5 of the largest score; float32 rows are the raw projected gradients."""
    unfitted = {**options, "curvature": False}
    config = RunConfig.for_method(method, str(workspace / "train.jsonl"), ATTRIBUTION, unfitted, device="cpu")
    run = Run.create(tmp_path / "run", replace(config, model=str(workspace / "model")))
    assert run.build_index(shard_size=4, precondition="empirical") == 3
    assert not (tmp_path / "run" / "method").exists()  # no fitting pass
    index = tmp_path / "run" / "index"
    assert VectorStore.open(index).settings["precondition"] == "empirical"
    raw = make_method(method, run.loaded.model, run.loaded.tokenizer, ATTRIBUTION, curvature=False, **options)
    rows = torch.cat([r for _, r in VectorStore.open(index).shards()])
    assert torch.equal(rows, torch.cat([r for _, r in raw.train_vectors(run.train, precondition=False)]))
    queries = load_records(workspace / "queries.jsonl")
    from_store = Run.open(tmp_path / "run", device="cpu").scores(queries)
    expected = in_memory(workspace, method, {**options, "fisher": "empirical"})
    scale = float(expected.per_module.abs().max())
    assert torch.allclose(from_store.per_module, expected.per_module, rtol=0, atol=1e-5 * scale), method
    true_fisher = in_memory(workspace, method, options)  # the default, sampled labels: another F~
    assert not torch.allclose(from_store.per_module, true_fisher.per_module, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "lost",
    [
        ("settings.json", "index.json"),  # known by its preconditioner folder
        ("checksums.json", "index.json"),
        ("checksums.json", "index.json", "preconditioner"),  # known by the manifest read unchecked
    ],
)
def test_an_empirical_index_that_lost_its_manifest_is_not_scored_as_the_fitted_method(workspace, tmp_path, lost):
    """A fitted trak run without curvature (its scores: raw projected products) indexed with --precondition
    empirical, then the manifest and the completion marker lost (or the checksums and the marker): `scores`
    recomputed the raw products silently, another estimator than the index's. The preconditioner folder (or
    the manifest read unchecked) tells an unfinished empirical index: refused with the command that finishes
    it, which (followed) gives the empirical-Fisher scores again."""
    options = {"dim": 8, "curvature": False}
    config = RunConfig.for_method("trak", str(workspace / "train.jsonl"), ATTRIBUTION, options, device="cpu")
    run = Run.create(tmp_path / "run", replace(config, model=str(workspace / "model")))
    run.fit()
    run.build_index(shard_size=4, precondition="empirical")
    queries = load_records(workspace / "queries.jsonl")
    empirical = Run.open(tmp_path / "run", device="cpu").scores(queries).per_module
    index = tmp_path / "run" / "index"
    for name in lost:
        shutil.rmtree(index / name) if (index / name).is_dir() else (index / name).unlink()
    with pytest.raises(RuntimeError, match=r"unfinished --precondition empirical index.*--precondition empirical"):
        Run.open(tmp_path / "run", device="cpu").scores(queries)
    Run.open(tmp_path / "run", device="cpu").build_index(precondition="empirical")  # the hint, followed
    again = Run.open(tmp_path / "run", device="cpu").scores(queries).per_module  # another shard size: sums reordered
    assert torch.allclose(again, empirical, rtol=0, atol=1e-6 * float(empirical.abs().max()))


def test_a_folder_in_place_of_the_preconditioner_keeps_the_finished_index(workspace, tmp_path):
    """A folder where a finished empirical index's preconditioner file belongs: `index` removed the completion
    marker, refitted the preconditioner from every shard and only then failed ("Is a directory"), leaving the
    store unfinished. It is refused before anything changes, the marker kept."""
    options = {"dim": 8, "curvature": False}
    config = RunConfig.for_method("trak", str(workspace / "train.jsonl"), ATTRIBUTION, options, device="cpu")
    run = Run.create(tmp_path / "run", replace(config, model=str(workspace / "model")))
    run.fit()
    run.build_index(shard_size=4, precondition="empirical")
    tensors = tmp_path / "run" / "index" / "preconditioner" / "curvature.safetensors"
    tensors.unlink()
    tensors.mkdir()
    marker = (tmp_path / "run" / "index" / "index.json").read_bytes()
    with pytest.raises(IsADirectoryError, match="a folder is where this file belongs"):
        Run.open(tmp_path / "run", device="cpu", factors=False).build_index(shard_size=4, precondition="empirical")
    assert (tmp_path / "run" / "index" / "index.json").read_bytes() == marker and tensors.is_dir()


def test_empirical_index_resumes_to_the_same_bytes_and_refits_a_damaged_preconditioner(workspace, tmp_path):
    options = {**LOGRA, "fisher": "empirical"}  # the run's own fit would give the same estimator
    config = RunConfig.for_method("logra", str(workspace / "train.jsonl"), ATTRIBUTION, options, device="cpu")
    run = Run.create(tmp_path / "run", replace(config, model=str(workspace / "model")))
    run.build_index(shard_size=4, precondition="empirical")
    index = tmp_path / "run" / "index"

    def stored():
        return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*")) if p.is_file()}

    clean = stored()
    assert "preconditioner/curvature.safetensors" in clean
    (index / "shard-00001.safetensors").unlink()
    shutil.rmtree(index / "preconditioner")  # killed before the preconditioner was saved
    (index / "index.json").unlink()
    queries = load_records(workspace / "queries.jsonl")
    unfinished = r"unfinished --precondition empirical index .*--shard-size 4 --dtype float32 --precondition empirical --device cpu"
    with pytest.raises(RuntimeError, match=unfinished):  # not the raw scores of the unfitted method
        Run.open(tmp_path / "run", device="cpu").scores(queries)
    assert run.build_index(shard_size=4, precondition="empirical") == 1 and stored() == clean
    (index / "index.json").unlink()  # killed after the preconditioner was saved, before the marker
    assert run.build_index(shard_size=4, precondition="empirical") == 0 and stored() == clean

    tensors = index / "preconditioner" / "curvature.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DamagedFile, match=r"preconditioner.*curvature\.safetensors.*--precondition empirical"):
        Run.open(tmp_path / "run", device="cpu").scores(queries)
    again = Run.open(tmp_path / "run", device="cpu", factors=False)
    assert again.build_index(shard_size=4, precondition="empirical") == 0  # no shard rebuilt
    assert any("refitting the index's preconditioner" in n for n in again.notices) and stored() == clean
    (index / "index.json").unlink()
    with pytest.raises(SettingsMismatch, match="precondition: recorded 'empirical', now 'none'"):
        again.build_index(shard_size=4, precondition="none")


def test_empirical_index_is_refused_where_it_does_not_apply(workspace, tmp_path):
    def created(method, options, name):
        config = RunConfig.for_method(method, str(workspace / "train.jsonl"), ATTRIBUTION, options, device="cpu")
        return Run.create(tmp_path / name, replace(config, model=str(workspace / "model")))

    with pytest.raises(ValueError, match=r"--unit-norm .* --precondition empirical"):
        created("logra", LOGRA, "unit").build_index(precondition="empirical", unit_norm=True)
    with pytest.raises(ValueError, match=r"exact strategy, not to method 'logra' with strategy 'ekfac'"):
        created("logra", {**LOGRA, "strategy": "ekfac"}, "ekfac").build_index(precondition="empirical")
    with pytest.raises(ValueError, match="not to method 'repsim'"):
        fitted(workspace, tmp_path / "repsim", "repsim", {}).build_index(precondition="empirical")
    with pytest.raises(ValueError, match=r"before it is fitted"):  # the fitted F~ needs the fit
        created("logra", LOGRA, "fitted").build_index(precondition="fitted")
    assert not (tmp_path / "unit" / "index" / "shard-00000.safetensors").exists()  # refused before any write


def test_empirical_index_checks_the_fishers_memory_first_and_refuses_to_replace_a_true_fisher(
    workspace, tmp_path, monkeypatch
):
    """A run without curvature holds no Fisher of its own, yet the index fits one: its memory is checked
    before the pass. A run whose scores use the true Fisher is refused (its scores would silently change)."""
    options = {"dim": 8, "curvature": False}
    config = RunConfig.for_method("trak", str(workspace / "train.jsonl"), ATTRIBUTION, options, device="cpu")
    run = Run.create(tmp_path / "small", replace(config, model=str(workspace / "model")))
    with monkeypatch.context() as patched:
        patched.setenv("WHEREFROM_MEMORY_LIMIT", "1000")
        with pytest.raises(MemoryLimitError, match=r"projected Fisher \(8 x 8\)"):
            run.build_index(shard_size=4, precondition="empirical")
    assert not list((tmp_path / "small").glob("index/shard-*"))  # refused before the pass
    true_fisher = fitted(workspace, tmp_path / "true", "logra", LOGRA)  # fisher="true", the default
    with pytest.raises(ValueError, match=r"its own projected Fisher \(fisher='true'\).*--option curvature=false"):
        true_fisher.build_index(shard_size=4, precondition="empirical")
    empirical = fitted(workspace, tmp_path / "empirical", "logra", {**LOGRA, "fisher": "empirical"})
    empirical.build_index(shard_size=4, precondition="empirical")
    assert not empirical.notices


def test_the_row_fishers_memory_is_checked_on_the_cpu_where_the_rows_are_summed(workspace, tmp_path, monkeypatch):
    """The stored rows are read and their Fisher summed on the CPU: its memory is checked there, even for a run
    whose passes run on a GPU (their memory is checked on the GPU)."""
    config = RunConfig.for_method("trak", str(workspace / "train.jsonl"), ATTRIBUTION, {"dim": 8}, device="cpu")
    method = Run.create(tmp_path / "run", replace(config, model=str(workspace / "model"))).vectors()
    checked = []
    monkeypatch.setattr(projection, "check_memory", lambda needs, what, device, hint: checked.append((what, device)))
    monkeypatch.setattr(Attributor, "device", property(lambda self: torch.device("cuda")))
    method.check_row_fisher_memory()
    method.check_memory(0, fit=True)
    assert checked == [("trak (Fisher of the stored rows)", "cpu"), ("trak (fit)", torch.device("cuda"))]


def test_cli_empirical_index_of_a_run_fitted_without_curvature(workspace, tmp_path):
    """The one-pass command line: `fit --option curvature=false` (no pass), `index --precondition empirical`,
    then `scores` and `query` read the store and its preconditioner."""
    code, out = invoke(
        "fit", "--method", "logra", "--option", "dim_in=4", "--option", "dim_out=4", "--option", "curvature=false",
        "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", tmp_path / "run",
        "--device", "cpu", "--include", r"layers\.1\.mlp\.(down|up)_proj", "--batch-size", "4", "--max-length", "64",
    )  # fmt: skip
    assert code == 0, out
    code, out = invoke("index", "--run", tmp_path / "run", "--shard-size", "4", "--precondition", "empirical")
    assert code == 0 and "3 shards written now" in out, out
    code, out = invoke("scores", "--run", tmp_path / "run", "--queries", workspace / "queries.jsonl")
    assert code == 0 and "(3, 10) scores" in out, out
    saved = Run.open(tmp_path / "run", device="cpu").scores(load_records(workspace / "queries.jsonl"))
    expected = in_memory(workspace, "logra", {**LOGRA, "fisher": "empirical"})
    scale = float(expected.total.abs().max())
    assert torch.allclose(saved.total, expected.total, rtol=0, atol=1e-5 * scale)
    provenance = json.loads((tmp_path / "run" / "scores" / "scores.json").read_text())["provenance"]
    assert provenance["index_options"] == {"precondition": "empirical", "unit_norm": False}  # another estimator
    search = ("scores", "--run", tmp_path / "run", "--queries", workspace / "queries.jsonl", "--search", "exact")
    code, out = invoke(*search)
    assert code == 0, out
    (tmp_path / "run" / "index" / "index.json").unlink()  # as if killed before its marker
    code, out = invoke(*search)
    out = " ".join(out.split())
    finish = "--shard-size 4 --dtype float32 --precondition empirical --device cpu` finishes"
    assert code == 2 and "no finished vector store" in out and finish in out, out


def test_a_cosine_run_is_indexed_only_where_the_rows_give_its_scores(workspace, tmp_path):
    """A trak/logra run scored with ``normalize="cosine"`` divides each score by the preconditioned query's and
    the gradient's norms, which no product of preconditioned rows gives: refused by name, except a run without
    curvature indexed with ``--precondition none --unit-norm``, whose store scores equal the method's."""
    cosine = replace(ATTRIBUTION, normalize="cosine")

    def created(options, name):
        config = RunConfig.for_method("logra", str(workspace / "train.jsonl"), cosine, options, device="cpu")
        run = Run.create(tmp_path / name, replace(config, model=str(workspace / "model")))
        run.fit()
        return run

    curved = created({**LOGRA, "fisher": "empirical"}, "curved")
    for precondition, unit in (("empirical", False), ("fitted", False), ("fitted", True), ("none", True)):
        with pytest.raises(ValueError, match=r"normalize='cosine'.*--option curvature=false"):
            curved.build_index(shard_size=4, precondition=precondition, unit_norm=unit)
    flat = created({**LOGRA, "curvature": False}, "flat")
    flat.build_index(shard_size=4, precondition="none", unit_norm=True)
    queries = load_records(workspace / "queries.jsonl")
    from_store = Run.open(tmp_path / "flat", device="cpu").scores(queries)
    loaded = load_model(workspace / "model", device="cpu")
    method = make_method("logra", loaded.model, loaded.tokenizer, cosine, **LOGRA, curvature=False)
    method.fit(flat.train)
    expected = method.scores(queries, flat.train)
    assert torch.allclose(from_store.total, expected.total, rtol=0, atol=1e-5)


def test_index_commands_in_hints_work_as_given(workspace, tmp_path, monkeypatch):
    """The index command a hint names is quoted for the shell, and with a damaged manifest an empirical index
    is still rebuilt as one (known by its preconditioner); the memory refusal of `index` is an error line."""
    options = {**LOGRA, "curvature": False}
    folder = tmp_path / "my run"
    code, out = invoke(
        "fit", "--method", "logra", "--option", "dim_in=4", "--option", "dim_out=4", "--option", "curvature=false",
        "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", folder, "--device", "cpu",
        "--include", r"layers\.1\.mlp\.(down|up)_proj", "--batch-size", "4", "--max-length", "64",
    )  # fmt: skip
    assert code == 0, out
    with monkeypatch.context() as patched:
        patched.setenv("WHEREFROM_MEMORY_LIMIT", "1000")
        code, out = invoke("index", "--run", folder, "--precondition", "empirical")
    assert code == 2 and "error:" in out and "projected Fisher" in out and "Traceback" not in out, out
    run = Run.open(folder, device="cpu", factors=False)
    run.build_index(shard_size=4, precondition="empirical")
    (folder / "index" / "settings.json").write_text("{")  # damaged: the intact marker still says the layout
    command = run.index_command()  # (it named neither: followed, it rebuilt a float32 store of 256-row shards)
    expected = f"wherefrom index --run '{folder}' --shard-size 4 --dtype float32 --precondition empirical"
    assert command == expected, command
    code, out = invoke(*shlex.split(command)[1:])
    assert code == 0, out
    rebuilt = VectorStore.open(folder / "index")
    assert rebuilt.settings["precondition"] == "empirical" and (rebuilt.shard_size, rebuilt.dtype) == (4, "float32")
    expected = in_memory(workspace, "logra", {**options, "curvature": True, "fisher": "empirical"})
    from_store = Run.open(folder, device="cpu").scores(load_records(workspace / "queries.jsonl"))
    scale = float(expected.total.abs().max())
    assert torch.allclose(from_store.total, expected.total, rtol=0, atol=1e-5 * scale)


def test_the_rebuild_hint_keeps_the_layout_when_the_checksums_are_lost(workspace, tmp_path):
    """With ``checksums.json`` lost no file of the index is verified, so the hint named the plain ``index`` command
    and, followed, it rebuilt a float32 store of 256-row shards instead of the float16 / 16-row one the user chose.
    The manifest read unchecked still gives the options (a hint only: the store is rebuilt whole); a manifest whose
    recorded checksum differs is not read, the intact marker is."""
    run = fitted(workspace, tmp_path / "run", "logra", LOGRA)
    run.build_index(shard_size=4, dtype="float16", precondition="none")
    index = tmp_path / "run" / "index"
    (index / "checksums.json").unlink()
    command = run.index_command()
    assert "--shard-size 4 --dtype float16 --precondition none" in command, command
    code, out = invoke(*shlex.split(command)[1:])
    assert code == 0, out
    rebuilt = VectorStore.open(index)
    assert (rebuilt.shard_size, rebuilt.dtype, rebuilt.settings["precondition"]) == (4, "float16", "none")
    manifest = json.loads((index / "settings.json").read_text())
    (index / "settings.json").write_text(json.dumps({**manifest, "shard_size": 99}))  # damaged: checksum differs
    assert "--shard-size 4 --dtype float16" in run.index_command()  # from the intact marker
    # an unchecked manifest edited by hand: a value the command does not take is left out (it gave `--dtype ''`, or
    # a KeyError inside the error path for an AdamW state without its folder)
    (index / "checksums.json").unlink()
    edited = {**manifest, "dtype": "", "precondition": 7, "optimizer_state": {"sha": "x"}, "device": None}
    (index / "settings.json").write_text(json.dumps(edited))
    assert run.index_command() == shlex.join(
        ["wherefrom", "index", "--run", str(tmp_path / "run"), "--shard-size", "4"]
    )


def test_a_store_of_rows_preconditioned_by_another_fit_is_refused(workspace, tmp_path):
    """Rows built with ``precondition="fitted"`` carry the run's fitted ``(F~ + lambda I)^-1``: a store made by a
    run fitted with the true Fisher served a run fitted with the empirical one, silently (its scores 7.6x off
    the run's own). The fit's attribution settings are recorded with such rows and required; rows that carry no
    fitted curvature (``precondition="none"``) still serve any fit of the same projection."""
    queries = load_records(workspace / "queries.jsonl")
    true = fitted(workspace, tmp_path / "a", "logra", {**LOGRA, "fisher": "true"})
    true.build_index(shard_size=4)
    empirical = fitted(workspace, tmp_path / "b", "logra", {**LOGRA, "fisher": "empirical"})
    own = empirical.scores(queries).total
    shutil.copytree(tmp_path / "a" / "index", tmp_path / "b" / "index")
    with pytest.raises(SettingsMismatch, match=r"attribution\.fisher: recorded 'true', now 'empirical'"):
        Run.open(tmp_path / "b", device="cpu").scores(queries)
    manifest = tmp_path / "a" / "index" / "settings.json"
    older = json.loads(manifest.read_text())  # written before the fit's settings were recorded: unknown fit
    del older["attribution"]
    write_json_checked(older, manifest)
    with pytest.raises(SettingsMismatch, match=r"attribution: recorded None"):
        Run.open(tmp_path / "a", device="cpu").scores(queries)

    shutil.rmtree(tmp_path / "b" / "index")
    empirical.build_index(shard_size=4)  # the run's own store gives its own scores
    assert torch.allclose(
        Run.open(tmp_path / "b", device="cpu").scores(queries).total, own, atol=1e-5 * float(own.abs().max())
    )
    shutil.rmtree(tmp_path / "a" / "index")
    true.build_index(shard_size=4, precondition="none", unit_norm=True)
    shutil.rmtree(tmp_path / "b" / "index")
    shutil.copytree(tmp_path / "a" / "index", tmp_path / "b" / "index")
    raw = Run.open(tmp_path / "b", device="cpu").scores(queries).total  # not refused: no fitted curvature in it
    assert torch.allclose(raw, Run.open(tmp_path / "a", device="cpu").scores(queries).total)


def test_an_index_warns_of_rows_split_at_their_token_boundary_once_not_for_each_shard(workspace, tmp_path, monkeypatch):
    """userD: on the shared data (completions without a leading space) `index` repeated the
    :class:`~wherefrom.core.encoding.TokenBoundaryWarning` for every shard, each counting that shard's rows. The check
    of every row before the pass says it once: the first block's message, with every block's rows added up (reviewR:
    it counted the first block only, plus "N more blocks"); the shards say nothing more."""
    import warnings

    from wherefrom.core import encoding
    from wherefrom.core.encoding import TokenBoundaryWarning
    from wherefrom.engine import run as run_module

    def boundary(records, prompt_ids, completion_ids, tokenizer):  # every row but one of each block
        differ = len(records) - 1
        warnings.warn(TokenBoundaryWarning(f"{differ} of {len(records)} rows differ", differ), stacklevel=2)
        return differ

    run = fitted(workspace, tmp_path / "a", "logra", LOGRA)
    monkeypatch.setattr(encoding, "warn_split_boundaries", boundary)
    monkeypatch.setattr(run_module, "ENCODE_CHECK_ROWS", 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.build_index(shard_size=2)
    said = [str(w.message) for w in caught if issubclass(w.category, TokenBoundaryWarning)]
    blocks = -(-len(run.train) // 4)
    total = len(run.train) - blocks
    assert said == [f"3 of 4 rows differ ({total} of {len(run.train)} rows in all, in {blocks} blocks of 4 rows)"], said
