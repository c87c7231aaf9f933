"""Concurrent writers (issue 10, kind 12), with real processes: a second writer of a run folder
(fit, index, scores) gets a named error at once (the folder and the holder's pid), readers are
unaffected, a killed holder frees the folder, and two CLI writers started together leave a
consistent folder (one config, factors of that config; every training row indexed once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import wherefrom.cli.run as cli_run
import wherefrom.core.search as search_module
from wherefrom.core.search import search_store
from wherefrom.core.store import FolderLocked, holder_guard, is_intact, writer_lock
from wherefrom.core.vectors import MARKER, VectorStore, VectorStoreWriter, shard_name
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig, RunMismatch

from .robust_workspace import SRC, fit_args, invoke, make_workspace, spawn

ROWS = 40


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("locking"), n_train=ROWS)
    code, out = invoke(*fit_args(root, "run", "--strategy", "identity"))
    assert code == 0, out
    return root


def hold_lock(folder) -> subprocess.Popen:
    """Another process that holds ``folder``'s writer lock until killed (prints ``held`` once it does)."""
    script = textwrap.dedent(f"""
        import sys, time
        from wherefrom.core.store import writer_lock
        with writer_lock({str(folder)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_writer_is_refused_by_name_and_readers_are_unaffected(root):
    run = root / "run"
    holder = hold_lock(run)
    try:
        expected = f"{run} is being written by pid {holder.pid}"
        for args in (
            ["index", "--run", run, "--shard-size", "8"],
            fit_args(root, "run", "--strategy", "identity"),
            ["scores", "--run", run, "--queries", root / "queries.jsonl"],
        ):
            code, out = invoke(*args)
            assert code == 2 and expected in out, (args[0], out)
        assert not (run / "index" / "index.json").exists() and not (run / "scores").exists()
        with pytest.raises(FolderLocked, match="is being written by pid"), writer_lock(run):
            pass
        code, out = invoke("query", "--run", run, "ab cd:", " ef", "--json")  # a reader
        assert code == 0 and '"proponents"' in out, out
    finally:
        holder.kill()
        holder.wait()
    code, out = invoke("index", "--run", run, "--shard-size", "8")  # the killed holder freed the folder
    assert code == 0 and "5 shards written now" in out, out


def test_two_index_and_two_fit_processes_at_once(root):
    """Two `index` runs on one folder (formerly rows went missing) and two `fit` runs with different
    strategies on one new folder (formerly both exited 0, config.json saying kfac beside ekfac
    factors), all four processes started together."""
    code, out = invoke(*fit_args(root, "pair", "--strategy", "identity", "--batch-size", "1"))
    assert code == 0, out
    pair, contested = root / "pair", root / "contested"
    indexers = [spawn("index", "--run", pair, "--shard-size", "2") for _ in range(2)]
    fitters = [spawn(*fit_args(root, "contested", "--strategy", s, "--batch-size", "1")) for s in ("kfac", "ekfac")]
    index_out = [p.communicate()[0] for p in indexers]
    fit_out = [p.communicate()[0] for p in fitters]

    codes = [p.returncode for p in indexers]
    assert 0 in codes, index_out
    for code, out in zip(codes, index_out):
        assert code == 0 or (code == 2 and f"{pair} is being written by pid" in out), out
    info = json.loads((pair / "index" / "index.json").read_text())
    assert info["rows"] == ROWS and all(
        is_intact(pair / "index" / f"shard-{k:05d}.safetensors") for k in range(info["shards"])
    )
    code, out = invoke("scores", "--run", pair, "--queries", root / "queries.jsonl")
    assert code == 0, out
    ids = json.loads((pair / "scores" / "scores.json").read_text())["train_ids"]
    assert ids == [f"r{i}" for i in range(ROWS)]  # every row once, in order

    codes = [p.returncode for p in fitters]
    assert sorted(codes) == [0, 2], fit_out
    loser = fit_out[codes.index(2)]
    assert f"{contested} is being written by pid" in loser or "other settings (attribution.strategy" in loser, loser
    config = json.loads((contested / "config.json").read_text())
    factors = json.loads((contested / "factors" / "curvature.json").read_text())
    assert config["attribution"]["strategy"] == factors["strategy"] == ("kfac", "ekfac")[codes.index(0)]


def strategy_config(root, strategy: str) -> RunConfig:
    attribution = AttributionConfig(strategy=strategy, include=[r"layers\.1\.mlp\.down_proj"], batch_size=8)
    return RunConfig(train=str(root / "train.jsonl"), attribution=attribution, model=str(root / "model"), device="cpu")


def recorded_strategies(folder) -> tuple[str, str]:
    config = json.loads((folder / "config.json").read_text())
    factors = json.loads((folder / "factors" / "curvature.json").read_text())
    return config["attribution"]["strategy"], factors["strategy"]


def test_holder_guard_fails_once_the_writer_lock_changed_hands(tmp_path):
    folder = tmp_path / "run"
    with writer_lock(folder):
        guard = holder_guard(folder)
        guard()  # still held as it was
    with pytest.raises(FolderLocked, match=r"changed hands while this process wrote it .*\(its hold ended\)"):
        guard()
    holder = hold_lock(folder)  # a rerun of another process took the lock
    try:
        with pytest.raises(FolderLocked, match=rf"changed hands .*now held by .*\b{holder.pid}\b.*the newer writer"):
            guard()
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(folder), pytest.raises(FolderLocked, match="changed hands"):  # this process, a new hold
        guard()


def test_an_index_rank_whose_writer_lock_changed_hands_stops_before_its_next_shard(root, tmp_path, monkeypatch):
    """An orphaned torchrun rank (its launcher and rank 0, the lock's holder, killed) went on writing index shards,
    and each write removed the completion marker, also of a store a rerun had meanwhile finished. Every rank now
    checks before each shard that the run's writer lock is held as when it started, and stops otherwise: here the
    lock changes hands (a rerun's description) during the build, and the next shard is not written; a writer of a
    finished store whose guard fails leaves its marker and shards as they were."""
    run = tmp_path / "run"
    code, out = invoke(*fit_args(root, str(run), "--strategy", "identity"))
    assert code == 0, out
    real, written = VectorStoreWriter.write, []

    def write(self, shard, ids, rows):
        if written:  # after the first shard: a rerun takes the lock (rank 0 died, the OS released it)
            rerun = {"pid": 424242, "command": "wherefrom index", "since": "now", "hold": "a rerun's"}
            (run / ".wherefrom.lock.json").write_text(json.dumps(rerun))
        real(self, shard, ids, rows)
        written.append(shard)

    monkeypatch.setattr(VectorStoreWriter, "write", write)
    with pytest.raises(FolderLocked, match=r"changed hands .*424242"):
        Run.open(run, device="cpu").build_index(shard_size=8)
    assert written == [0] and not (run / "index" / shard_name(1)).exists()

    monkeypatch.setattr(VectorStoreWriter, "write", real)
    with writer_lock(run):  # an orphan's start: its rank 0 held the lock, then died
        orphan_guard = holder_guard(run)
    Run.open(run, device="cpu").build_index(shard_size=8)  # a rerun finishes the store
    index = run / "index"
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()}
    store = VectorStore.open(index)
    orphan = VectorStoreWriter(index, store.ids, store.dim, {}, store.dtype, store.shard_size)
    orphan.guard = orphan_guard
    with pytest.raises(FolderLocked, match="its hold ended"):
        orphan.write(1, store.ids[8:16], torch.zeros(8, store.dim))
    assert (index / MARKER).exists() and {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()} == before


def test_the_run_that_fits_a_new_folder_records_its_own_config(root, tmp_path):
    """Two runs created on one new folder, as two fit processes do before either takes the lock to fit: the
    second recorded its config over the first's, and the first then fitted beside it (config.json said ekfac,
    the factors were kfac). The fit records its config again under its lock; the other is refused by name."""
    folder = tmp_path / "contested"
    first = Run.create(folder, strategy_config(root, "kfac"))
    second = Run.create(folder, strategy_config(root, "ekfac"))
    assert json.loads((folder / "config.json").read_text())["attribution"]["strategy"] == "ekfac"
    assert first.fit() is True
    assert recorded_strategies(folder) == ("kfac", "kfac")
    with pytest.raises(RunMismatch, match=r"other settings \(attribution\.strategy"):
        second.fit()
    assert recorded_strategies(folder) == ("kfac", "kfac")


def test_fit_records_its_command_under_the_lock_beside_its_own_config(root, tmp_path, monkeypatch):
    """The CLI `fit` wrote its replay record into config.json without the lock: another writer acquiring the lock
    deleted the record's temporary file (the command failed: No such file or directory), or the record landed in
    the other fit's config. Here another fit of the same new folder records its config and command between this
    fit's Run.create and its fit: config.json ends with this fit's config and its command alone."""
    folder = tmp_path / "contested"
    real_create = Run.create

    def create_then_rival(run_folder, config, progress):
        opened = real_create(run_folder, config, progress=progress)
        real_create(run_folder, strategy_config(root, "ekfac"))
        saved = json.loads((run_folder / "config.json").read_text())
        saved["replay"] = {"fit": {"command": "fit", "arguments": {"strategy": "ekfac"}, "line": "wherefrom fit ekfac"}}
        (run_folder / "config.json").write_text(json.dumps(saved))
        return opened

    monkeypatch.setattr(cli_run.Run, "create", create_then_rival)
    code, out = invoke(*fit_args(root, str(folder), "--strategy", "kfac", "--batch-size", "8"))
    assert code == 0, out
    assert recorded_strategies(folder) == ("kfac", "kfac")
    replay = json.loads((folder / "config.json").read_text())["replay"]
    assert list(replay) == ["fit"] and replay["fit"]["arguments"]["strategy"] == "kfac", replay


def test_fit_records_its_command_while_it_holds_the_runs_writer_lock(root, tmp_path, monkeypatch):
    """The replay record is written while `fit` holds the run's writer lock: another process cannot take the lock
    then (taking it deletes the leftovers of killed writers, which took this record's temporary file)."""
    folder, probes = tmp_path / "held", []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    real = cli_run.remember

    def remember_probed(run, *args):
        script = f"from wherefrom.core.store import writer_lock\nwith writer_lock({str(run)!r}):\n    pass"
        probes.append(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True))
        real(run, *args)

    monkeypatch.setattr(cli_run, "remember", remember_probed)
    code, out = invoke(*fit_args(root, str(folder), "--strategy", "identity", "--batch-size", "8"))
    assert code == 0, out
    assert len(probes) == 1 and probes[0].returncode != 0 and f"{folder} is being written by pid" in probes[0].stderr
    assert "replay" in json.loads((folder / "config.json").read_text())


def test_a_config_recorded_again_unchanged_keeps_what_was_written_beside_it(root, tmp_path):
    folder = tmp_path / "run"
    run = Run.create(folder, strategy_config(root, "kfac"))
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "replay": {"fit": {"line": "wherefrom fit"}}}))
    run.fit()
    assert json.loads((folder / "config.json").read_text())["replay"] == {"fit": {"line": "wherefrom fit"}}


def test_a_faiss_search_is_a_reader_and_a_failed_save_only_costs_the_next_build(root, monkeypatch, caplog):
    """The FAISS index is a cache a search saves beside the store: it took the store folder's writer lock, so two
    searches at once failed (one saving, the other refused); now a search runs while a writer holds the run, and
    a save that fails (its temporary file removed by a writer's cleanup) is logged, not fatal."""
    pytest.importorskip("faiss")
    run = root / "run"
    code, out = invoke("index", "--run", run, "--shard-size", "8")
    assert code == 0, out
    store = VectorStore.open(run / "index")
    queries = torch.randn(2, store.dim, generator=torch.Generator().manual_seed(0))
    search = {"faiss_options": {"nlist": 2}, "index_folder": run / "index"}
    holder, second = hold_lock(run), hold_lock(run / "index")  # a writer of the run, and one of the store folder
    try:
        report = search_store(store, queries, 3, "faiss", **search)
    finally:
        for process in (holder, second):
            process.kill()
            process.wait()
    assert "saved as faiss-ivf.safetensors" in report.summary(3) and is_intact(run / "index" / "faiss-ivf.safetensors")
    (run / "index" / "faiss-ivf.safetensors").unlink()

    def removed(*_args, **_kwargs):
        raise FileNotFoundError("the temporary file was removed")

    monkeypatch.setattr(search_module, "save_tensors_checked", removed)
    report = search_store(store, queries, 3, "faiss", **search)
    assert "index built in" in report.summary(3) and "saved" not in report.summary(3)
    assert "the FAISS index was not saved (the temporary file was removed)" in caplog.text


def test_influence_writes_inside_the_run_under_its_writer_lock(root, tmp_path):
    """`influence` writes RUN/analyses/NAME: it wrote without the run's lock, so a writer starting meanwhile (which
    deletes the leftovers of killed writers) could delete its temporary files. It now holds the lock for an --out
    inside RUN (refused while another process writes RUN); an --out elsewhere needs no lock."""
    run = root / "run"
    code, out = invoke("scores", "--run", run, "--queries", root / "queries.jsonl", "--name", "tails")
    assert code == 0, out
    holder = hold_lock(run)
    try:
        code, out = invoke("influence", "--run", run, "--name", "tails")
        assert code == 2 and f"{run} is being written by pid {holder.pid}" in out, out
        assert not (run / "analyses" / "tails").exists()
        code, out = invoke("influence", "--run", run, "--name", "tails", "--out", tmp_path / "tails")
        assert code == 0 and (tmp_path / "tails" / "influence.json").is_file(), out
    finally:
        holder.kill()
        holder.wait()
    code, out = invoke("influence", "--run", run, "--name", "tails")
    assert code == 0 and (run / "analyses" / "tails" / "influence.json").is_file(), out


def test_a_reader_finding_no_fit_names_the_process_writing_the_run(root, tmp_path):
    """userY: a `query` during a running `fit` was told "no fitted curvature ...; run wherefrom fit first" (or,
    earlier in the fit, "not a wherefrom run directory ...; run wherefrom fit first"). While a live process holds
    the run's writer lock, both name it and say to wait; a description left by a killed holder is not named."""
    from wherefrom.core.store import writing_now

    fresh = tmp_path / "being-made"
    holder = hold_lock(fresh)
    try:
        assert str(holder.pid) in (writing_now(fresh) or "")
        code, out = invoke("query", "--run", fresh, "ab cd:", " ef")
        said = " ".join(out.split())
        assert (
            code == 2
            and f"is not a wherefrom run directory (no config.json or manifest.json); it is being made now by pid {holder.pid}"
            in said
        ), out
    finally:
        holder.kill()
        holder.wait()
    assert writing_now(fresh) is None  # killed: its description is left, naming a process that is gone
    assert (fresh / ".wherefrom.lock.json").exists()
    code, out = invoke("query", "--run", fresh, "ab cd:", " ef")
    assert code == 2 and "run `wherefrom fit` first" in " ".join(out.split()), out
    code, out = invoke(*fit_args(root, f"kfac-{tmp_path.name}", "--strategy", "kfac"))
    assert code == 0, out
    unfitted = root / f"kfac-{tmp_path.name}"
    shutil.rmtree(unfitted / "factors")  # as a fit writing them finds it
    holder = hold_lock(unfitted)
    try:
        code, out = invoke("query", "--run", unfitted, "ab cd:", " ef")
        said = " ".join(out.split())
        assert code == 2 and f"the run is being written now by pid {holder.pid}" in said and "wait" in said, out
    finally:
        holder.kill()
        holder.wait()
    # `scores` reads under its own hold of the lock: it is not told to wait for itself (reviewX)
    code, out = invoke("scores", "--run", unfitted, "--queries", root / "queries.jsonl")
    said = " ".join(out.split())
    assert code == 2 and "no fitted curvature" in said and "run `wherefrom fit` first" in said, out
