"""``torchrun --nproc_per_node=2 ... fit | scores`` on gloo (CPU) against the same commands in one process.

Tolerances (README, "Many processes"): factors rtol 1e-5 (float64 sums of float32 products, summed in
another order); scores of the same factors rtol 1e-5; scores of the two-process factors within 1e-4 of
the largest score (measured: 6e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from tests.cli.conftest import invoke
from wherefrom.core.data import load_records
from wherefrom.core.distributed import NotDistributable
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::wherefrom.curvature.base.DegenerateCurvatureWarning")


def torchrun(*args, cwd: Path, fails: bool = False) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 -m wherefrom.cli -- ARGS`` (the
    ``--`` keeps torchrun from reading ``--run`` as its own ``--run-path``), one torch thread per process; it must
    succeed (with ``fails``: fail)."""
    source = str(Path(__file__).resolve().parents[2] / "src")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "wherefrom.cli", "--", *map(str, args), "--threads", "1"]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == fails, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one(workspace):
    """A run fitted and scored in this one process."""
    run = workspace / "run-one"
    for args in (
        ("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--device", "cpu"),
        ("scores", "--queries", workspace / "queries.jsonl"),
    ):
        result = invoke(*args, "--run", run, "--threads", "1")
        assert result.exit_code == 0, result.output
    return run


def factors(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``{module.A|S|eigenvalues|damping: tensor}`` (``A = Q diag(a) Q^T``: free of the eigenvectors' signs)
    and the fit's info."""
    state = load_file(run / "factors" / "curvature.safetensors")
    out = {}
    for key in state:
        if key.endswith(".a_eigvecs") or key.endswith(".s_eigvecs"):
            name, side = key.rsplit(".", 1)[0], key.rsplit(".", 1)[1][0]
            vectors, values = state[key].double(), state[f"{name}.{side}_eigvals"].double()
            out[f"{name}.{side.upper()}"] = vectors @ torch.diag(values) @ vectors.T
        elif key.endswith(".eigenvalues") or key.endswith(".damping"):
            out[key] = state[key].double()
    return out, json.loads((run / "factors" / "curvature.json").read_text())["info"]


def test_torchrun_fit_gives_the_one_process_factors(workspace, one):
    done = torchrun(
        "fit", "--train", "train.jsonl", "--model", "model", "--device", "cpu", "--run", "run-two", cwd=workspace
    )
    assert done.stderr.count("ekfac fitted: 8 modules, 20 rows") == 1  # rank 0 alone reports (and writes)
    two, info_two = factors(workspace / "run-two")
    alone, info_one = factors(one)
    assert info_two["examples"] == info_one["examples"] == 20 and info_two["tokens"] == info_one["tokens"]
    assert set(two) == set(alone)
    for key, value in alone.items():
        tolerance = 1e-4 if key.endswith(".eigenvalues") else 1e-5  # EK-FAC's are measured in the eigenbasis
        assert_close(two[key], value, rtol=tolerance, atol=tolerance * float(value.abs().max()))
    assert not (workspace / "run-two" / "factors" / "stages").exists()
    # the two-process factors score as the one-process ones
    result = invoke("scores", "--run", workspace / "run-two", "--queries", workspace / "queries.jsonl", "--threads", 1)
    assert result.exit_code == 0, result.output
    scores_two = load_file(workspace / "run-two" / "scores" / "scores.safetensors")["total"]
    scores_one = load_file(one / "scores" / "scores.safetensors")["total"]
    assert_close(scores_two, scores_one, rtol=0, atol=1e-4 * float(scores_one.abs().max()))


def test_torchrun_fit_of_modules_fed_one_input(workspace, tmp_path):
    """q/k/v read one input, whose covariance sum one process holds once for the three: under torchrun every
    process reduces each module's sum once (the shared one reduced once per module would count it three
    times), giving the one-process factors."""
    save_tiny(tmp_path / "model", arch="llama")
    fit = ("fit", "--train", workspace / "train.jsonl", "--model", tmp_path / "model", "--device", "cpu")
    fit += ("--include", r"self_attn\.[qkv]_proj")
    result = invoke(*fit, "--run", tmp_path / "run-one", "--threads", 1)
    assert result.exit_code == 0, result.output
    torchrun(*fit, "--run", tmp_path / "run-two", cwd=tmp_path)
    (two, _), (alone, _) = factors(tmp_path / "run-two"), factors(tmp_path / "run-one")
    assert set(two) == set(alone) and any(".q_proj.A" in key for key in alone)
    for key, value in alone.items():
        tolerance = 1e-4 if key.endswith(".eigenvalues") else 1e-5
        assert_close(two[key], value, rtol=tolerance, atol=tolerance * float(value.abs().max()))


def test_torchrun_scores_gather_every_training_row_in_order(workspace, one):
    done = torchrun("scores", "--run", one, "--queries", workspace / "queries.jsonl", "--name", "two", cwd=workspace)
    assert done.stderr.count("(3, 20) scores ->") == 1
    gathered = json.loads((one / "scores" / "two.json").read_text())
    alone = json.loads((one / "scores" / "scores.json").read_text())
    assert gathered["train_ids"] == alone["train_ids"] and gathered["query_ids"] == alone["query_ids"]
    two, single = (load_file(one / "scores" / f"{n}.safetensors") for n in ("two", "scores"))
    assert_close(two["per_module"], single["per_module"], rtol=1e-5, atol=1e-6 * float(single["total"].abs().max()))


def test_a_malformed_torchrun_environment_is_one_error_line_for_every_command(monkeypatch):
    """A leftover ``RANK`` without ``WORLD_SIZE`` gave a traceback from every one-process command (``methods``,
    ``query``), while ``fit``/``index``/``scores`` printed the error line."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    listed = invoke("methods")
    text = " ".join(listed.output.split())
    assert listed.exit_code == 2 and "RANK=1 and WORLD_SIZE=1: need 0 <= RANK < WORLD_SIZE" in text, listed.output
    assert "Traceback" not in listed.output


def test_what_does_not_distribute_is_refused_by_name(workspace, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; nothing below joins a process group
    monkeypatch.setenv("RANK", "0")
    result = invoke(
        "attribute", "--method", "ekfac", "--train", workspace / "train.jsonl", "--queries",
        workspace / "queries.jsonl", "--out", workspace / "run-refused", "--threads", 1,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "command attribute cannot run under torch.distributed (WORLD_SIZE=2)" in " ".join(result.output.split())
    # every command but fit, index, scores (and replay, which reruns one of them) is refused before it runs: query
    # ran whole in each process, printing its answer once per process
    asked = invoke("query", "a", "b", "--run", workspace / "run-refused")
    assert asked.exit_code == 2 and not (workspace / "run-refused").exists()
    assert (
        "command query cannot run under torch.distributed (WORLD_SIZE=2): run it in one process; fit, index, "
        "replay, scores run under torchrun" in " ".join(asked.output.split())
    ), asked.output
    run = workspace / "run-logra-recorded"  # a run of a method outside the influence family: its scores are
    run.mkdir()  # refused from its recorded config, before the process group and the model
    recorded = RunConfig.for_method("logra", str(workspace / "train.jsonl"), AttributionConfig(), {}, model="nowhere")
    (run / "config.json").write_text(json.dumps(recorded.to_dict()))
    (run / "manifest.json").write_text("{}")  # a run folder holds both (the manifest is read after the model loads)
    scored = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl")
    assert scored.exit_code == 2, scored.output
    assert "scoring method 'logra' cannot run under torch.distributed" in " ".join(scored.output.split())
    config = RunConfig.for_method(
        "trak", str(workspace / "train.jsonl"), AttributionConfig(), {}, model=str(workspace / "model")
    )
    with pytest.raises(NotDistributable, match=r"method 'trak' cannot run under torch\.distributed"):
        Run.create(workspace / "run-refused", config)
    assert not (workspace / "run-refused").exists()
    train = str(workspace / "train.jsonl")
    refused = [RunConfig(train, attribution=AttributionConfig(strategy=name)) for name in ("cg", "lissa", "arnoldi")]
    refused += [RunConfig.for_method(name, train, AttributionConfig(), {}) for name in ("cg", "lissa")]
    for config in refused:  # refused before the default model loads: no run folder is started
        with pytest.raises(NotDistributable, match=f"strategy {config.attribution.strategy!r} cannot run"):
            Run.create(workspace / "run-refused", config)
        assert not (workspace / "run-refused").exists()


@pytest.mark.parametrize("shard_size", [6, 20])
def test_torchrun_scores_from_an_index_read_each_shard_once(workspace, one, shard_size):
    """4 shards: ranks take 0,2 and 1,3; one shard (20 rows): rank 1 has none and adds no columns (it failed)."""
    indexed = workspace / f"run-indexed-{shard_size}"
    shutil.copytree(one, indexed)
    result = invoke("index", "--run", indexed, "--shard-size", shard_size, "--threads", 1)
    assert result.exit_code == 0, result.output
    scores = ("scores", "--run", indexed, "--queries", workspace / "queries.jsonl", "--name", "two")
    torchrun(*scores, "--overwrite", cwd=workspace)  # the copied run's recomputed scores, now from the index
    gathered = json.loads((indexed / "scores" / "two.json").read_text())
    assert gathered["train_ids"] == json.loads((one / "scores" / "scores.json").read_text())["train_ids"]
    two, single = (load_file(run / "scores" / f"{n}.safetensors") for run, n in ((indexed, "two"), (one, "scores")))
    assert_close(two["per_module"], single["per_module"], rtol=1e-5, atol=1e-6 * float(single["total"].abs().max()))


def test_torchrun_with_fewer_training_rows_than_processes(workspace, tmp_path):
    """One training row, two processes: rank 1 fits and scores no rows (scoring failed); the results are the one
    process's."""
    write_jsonl(load_records(workspace / "train.jsonl")[:1], tmp_path / "train.jsonl")
    fit = ("fit", "--train", tmp_path / "train.jsonl", "--model", workspace / "model", "--device", "cpu")
    runs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    for args in (fit, ("scores", "--queries", workspace / "queries.jsonl")):
        result = invoke(*args, "--run", runs["one"], "--threads", 1)
        assert result.exit_code == 0, result.output
        torchrun(*args, "--run", runs["two"], cwd=tmp_path)
    (two, _), (alone, _) = factors(runs["two"]), factors(runs["one"])
    for key, value in alone.items():
        assert_close(two[key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()))
    scores_two, scores_one = (load_file(run / "scores" / "scores.safetensors")["total"] for run in runs.values())
    assert scores_one.shape == (3, 1)
    assert_close(scores_two, scores_one, rtol=0, atol=1e-4 * float(scores_one.abs().max()))


def test_torchrun_index_writes_the_one_process_store(workspace, one):
    """Two ranks build shards 0,2 and 1,3; rank 0 finishes: the same files, byte for byte, as one process."""
    alone, two = workspace / "run-index-one", workspace / "run-index-two"
    shutil.copytree(one, alone)
    shutil.copytree(one, two)
    assert invoke("index", "--run", alone, "--shard-size", 6, "--threads", 1).exit_code == 0
    done = torchrun("index", "--run", two, "--shard-size", 6, cwd=workspace)
    assert done.stderr.count("index complete (4 shards written now; ") == 1  # counted over both ranks
    files = sorted(p.name for p in (alone / "index").iterdir())
    assert files == sorted(p.name for p in (two / "index").iterdir()) and "shard-00003.safetensors" in files
    for name in files:
        assert (alone / "index" / name).read_bytes() == (two / "index" / name).read_bytes(), name


@pytest.mark.parametrize("shard_size", [6, 20])
def test_torchrun_empirical_index_equals_one_process(workspace, shard_size):
    """`index --precondition empirical` of a logra run: each rank builds its shards (with 20 rows a shard,
    rank 1 has none), then rank 0 alone fits the projected Fisher on every shard in order: every file,
    the preconditioner included, has the one-process bytes, and so have the scores from the store."""
    runs = {
        "alone": workspace / f"run-empirical-one-{shard_size}",
        "two": workspace / f"run-empirical-two-{shard_size}",
    }
    for run in runs.values():
        fitted = invoke(
            "fit", "--method", "logra", "--option", "dim_in=4", "--option", "dim_out=4", "--option",
            "curvature=false", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run,
            "--device", "cpu", "--include", r"h\.1\.mlp\.c_proj", "--threads", 1,
        )  # fmt: skip
        assert fitted.exit_code == 0, fitted.output
    args = ("--shard-size", shard_size, "--precondition", "empirical")
    assert invoke("index", "--run", runs["alone"], *args, "--threads", 1).exit_code == 0
    torchrun("index", "--run", runs["two"], *args, cwd=workspace)
    alone, two = (run / "index" for run in runs.values())
    files = sorted(str(p.relative_to(alone)) for p in alone.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files == sorted(
        str(p.relative_to(two)) for p in two.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    assert "preconditioner/curvature.safetensors" in files and len([f for f in files if "shard-" in f]) == -(
        -20 // shard_size
    )
    for name in files:
        assert (alone / name).read_bytes() == (two / name).read_bytes(), name
    queries = workspace / "queries.jsonl"
    for run in runs.values():
        assert invoke("scores", "--run", run, "--queries", queries, "--name", "s", "--threads", 1).exit_code == 0
    one_scores, two_scores = (load_file(run / "scores" / "s.safetensors")["total"] for run in runs.values())
    assert torch.equal(two_scores, one_scores)


def test_a_process_hashes_only_the_index_shards_it_reads(workspace, one, tmp_path, monkeypatch):
    """Every rank hashed every shard before reading its share (a store of S bytes read S x ranks times); each now
    verifies only its share, and a damaged shard is refused by the process that reads it."""
    from wherefrom.core import distributed
    from wherefrom.core.store import DamagedFile

    run = tmp_path / "run"
    shutil.copytree(one, run)
    assert invoke("index", "--run", run, "--shard-size", 6, "--threads", 1).exit_code == 0
    shard = run / "index" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as rank 1 of 2 sees it; no group is joined
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    store = Run.open(run).open_index()
    assert store.verified == {1, 3}
    assert [start for start, _rows in store.shards(only=distributed.shards_for_rank(store.shard_count))] == [6, 18]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(DamagedFile, match="shard-00000"):
        Run.open(run).open_index()


def test_a_damaged_shard_stops_every_process(workspace, one, tmp_path):
    """Each process hashes only its own shards, so only rank 1 finds its damaged shard: the error reaches rank 0
    too (which would otherwise go on to the queries and wait in the gather until torchrun killed it)."""
    run = tmp_path / "run"
    shutil.copytree(one, run)
    assert invoke("index", "--run", run, "--shard-size", 6, "--threads", 1).exit_code == 0
    shard = run / "index" / "shard-00001.safetensors"  # rank 1's: shards 1 and 3
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    done = torchrun(
        "scores", "--run", run, "--queries", workspace / "queries.jsonl", "--name", "x", cwd=tmp_path, fails=True
    )
    text = " ".join(done.stderr.split())  # each process's one error line (rich wraps long lines)
    assert text.count("error: ") == 2 and text.count("shard-00001.safetensors") >= 2, done.stderr[-3000:]
    assert not (run / "scores" / "x.json").exists()


@pytest.mark.parametrize("damage", ["factors", "settings"])
def test_a_fit_that_cannot_distribute_is_refused_before_its_factors_are_set_aside(
    workspace, tmp_path, monkeypatch, damage
):
    """cg factors fitted in one process, then damaged (or their settings.json lost): under torchrun the refit is
    refused before anything is set aside (the factors of unknown settings were deleted first before)."""
    config = RunConfig(str(workspace / "train.jsonl"), str(workspace / "model"), device="cpu",
                       attribution=AttributionConfig(strategy="cg"))  # fmt: skip
    Run.create(tmp_path / "run", config).fit()
    factors = tmp_path / "run" / "factors"
    if damage == "factors":
        tensors = factors / "curvature.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:-8])
    else:
        (factors / "settings.json").unlink()
    before = {p.name: p.read_bytes() for p in factors.iterdir() if p.is_file()}
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; nothing below joins a process group
    monkeypatch.setenv("RANK", "0")
    run = Run.create(tmp_path / "run", config)
    with pytest.raises(NotDistributable, match=r"strategy 'cg' cannot run under torch\.distributed"):
        run.fit()
    assert {p.name: p.read_bytes() for p in factors.iterdir() if p.is_file()} == before


def test_setting_options_in_a_run_config_options_are_refused(workspace, tmp_path):
    """``RunConfig.options`` holds constructor options; a setting option there would be applied by the method and
    missing from the recorded settings (``RunConfig.for_method`` puts it in ``attribution``)."""
    config = RunConfig(str(workspace / "train.jsonl"), method="logra", options={"reduction": "mean"})
    with pytest.raises(ValueError, match=r"RunConfig.options holds setting options \['reduction'\]"):
        Run.create(tmp_path / "run", config)
    assert not (tmp_path / "run").exists()


def ranks_by_hand(commands: list[list], cwd: Path) -> list[subprocess.CompletedProcess]:
    """One process per rank of a 2-process gloo group, started by hand (as a multi-node launch or a script does) with
    its own arguments ``commands[rank]`` (``python -m wherefrom.cli ARGS``); their results in rank order. A rank
    that fails before the group forms leaves the others waiting (torch gives up after its timeout)."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = str(Path(__file__).resolve().parents[2] / "src")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(len(commands)),
        "LOCAL_WORLD_SIZE": str(len(commands)),
    }
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "wherefrom.cli", *map(str, args)],
            cwd=cwd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            **pipes,
        )
        for r, args in enumerate(commands)
    ]
    results = []
    for process in started:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def test_ranks_started_with_other_arguments_are_refused_by_flag_before_anything_is_written(workspace, one, tmp_path):
    """Rank 1 given another ``--shard-size``: rank 0 had recorded its own settings and written its shards, then died
    at the barrier with a gloo traceback (a closed connection) while rank 1 refused. Now every rank refuses at once,
    naming the flag and both values, and no index is started; ``--device``/``--threads`` may differ, and a path given
    relative on one rank and absolute on the other agrees."""
    run = tmp_path / "run"
    shutil.copytree(one, run)
    shutil.rmtree(run / "scores")
    results = ranks_by_hand([["index", "--run", run, "--shard-size", s, "--threads", 1] for s in (6, 4)], workspace)
    for done in results:
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines() == [
            "error: the 2 processes of this torch.distributed group were started with other arguments "
            "(--shard-size: rank 0 6, rank 1 4); start every process with the same command"
        ]
    assert not (run / "index").exists()
    own = [["--device", "cpu", "--threads", 1], ["--threads", 2]]  # each process's own device and threads
    paths = [run, os.path.relpath(run, workspace)]  # one folder, given absolute and relative to the working dir
    commands = [["index", "--run", path, "--shard-size", 6, *mine] for path, mine in zip(paths, own)]
    results = ranks_by_hand(commands, workspace)
    assert [done.returncode for done in results] == [0, 0], results[0].stderr[-3000:] + results[1].stderr[-3000:]


def test_a_lost_peer_is_one_error_line_and_keeps_the_record_for_replay(workspace, one, tmp_path, monkeypatch):
    """userG: an orphaned rank ended in gloo's traceback. A :class:`wherefrom.core.distributed.PeersLost` (raised by
    every collective, ``tests/core/test_distributed.py``) is printed as one ``error:`` line, exit 1: a crash, so the
    command's record stays for ``replay`` to resume (exit 2 would take it back as a refusal's); ``scores`` too, which
    turned it into its exit-2 error (reviewS)."""
    from wherefrom.core.distributed import PeersLost

    lost = "rank 1 of 2: torch.distributed's barrier failed (Connection closed by peer); rerun the whole command"

    def fit(self, *args, **kwargs):
        raise PeersLost(lost)

    monkeypatch.setattr(Run, "fit", fit)
    monkeypatch.setattr(Run, "scores", fit)
    run = tmp_path / "run"
    result = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert " ".join(result.output.split()).endswith(f"error: {lost}")  # after the model's loading bar
    assert "fit" in json.loads((run / "config.json").read_text())["replay"]
    scored = invoke("scores", "--run", one, "--queries", workspace / "queries.jsonl", "--name", "lost")
    assert scored.exit_code == 1 and " ".join(scored.output.split()).endswith(f"error: {lost}"), scored.output
