"""The benchmark scripts refuse a bad number or name as they parse it: ``error: argument --flag: ...``, exit 2,
no traceback and nothing written (``benchmarks/common.py``'s ``argparse`` types); ``store_scan.py --results``
writes its files where it is told, recording the command that made them.

Reported: ``query_latency.py --sizes 0`` (and ``--dims 0``, ``--queries 0``, ``--threads 0``, ``--rows bogus``,
``--dtypes float8``) ended in a traceback, ``--kinds bogus`` was refused only after the rows were written;
``store_scan.py --sizes 0`` failed naming ``ids``, and the script could write only to ``benchmarks/results/``.

Every bad value is run as its script's ``__main__`` (``runpy``, the script's folder first on ``sys.path`` as
``python benchmarks/X.py`` has it) in one interpreter, so torch is imported once; the two reported scripts are
also run as plain commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
from pathlib import Path

benchmarks, out, cases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
sys.path.insert(0, benchmarks)
import common

common.RESULTS = out / "results"  # where write_results would write (real_recall, hnsw_graph, index_scale)
answers = []
for script, argv in cases:
    err, code = io.StringIO(), 0
    sys.argv = [f"{benchmarks}/{script}", *argv]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(f"{benchmarks}/{script}", run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    answers.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(answers))
"""

WHERE = {  # what each script is told about where to write, all under the test's folder
    "query_latency.py": lambda tmp: ["--results", f"{tmp}/results", "--data", f"{tmp}/data"],
    "store_scan.py": lambda tmp: ["--results", f"{tmp}/results", "--data", f"{tmp}/data"],
    "real_recall.py": lambda tmp: ["--store", f"{tmp}/store"],
    "hnsw_graph.py": lambda tmp: ["--stores", f"{tmp}/store"],
    "index_scale.py": lambda tmp: ["--out", f"{tmp}/store"],
    "short_rows.py": lambda tmp: ["--results", f"{tmp}/results"],
    "query_memory.py": lambda tmp: ["--out", f"{tmp}/results/query-memory"],
    "study_summary.py": lambda tmp: [],
    "parity_compare.py": lambda tmp: [],
}

BAD = [  # (script, the bad arguments, the flag the error must name, text the error must contain)
    ("query_latency.py", ["--sizes", "0"], "--sizes", "integers >= 1"),
    ("query_latency.py", ["--sizes", "1000,x"], "--sizes", "integers >= 1"),
    ("query_latency.py", ["--dims", "0"], "--dims", "integers >= 1"),
    ("query_latency.py", ["--queries", "0"], "--queries", ">= 1"),
    ("query_latency.py", ["--threads", "0"], "--threads", ">= 1"),
    ("query_latency.py", ["--peer-queries", "0"], "--peer-queries", ">= 1"),
    ("query_latency.py", ["--rank", "0"], "--rank", ">= 1"),
    ("query_latency.py", ["--nlist", "0"], "--nlist", ">= 1"),
    ("query_latency.py", ["--noise=-1"], "--noise", ">= 0"),
    ("query_latency.py", ["--rows", "bogus"], "--rows", "fitted, none, iid, latent"),
    ("query_latency.py", ["--dtypes", "float8"], "--dtypes", "float32, float16"),
    ("query_latency.py", ["--kinds", "bogus"], "--kinds", "ivf, ivf-sq8, ivf-pq, pq, hnsw"),
    ("query_latency.py", ["--kind-max", "hnsw=0"], "--kind-max", "'hnsw=0'"),
    ("query_latency.py", ["--kind-max", "bogus=10"], "--kind-max", "'bogus=10'"),
    ("query_latency.py", ["--pq-m", "0"], "--pq-m", "'default'"),
    ("store_scan.py", ["--sizes", "0"], "--sizes", "integers >= 1"),
    ("store_scan.py", ["--dim", "0"], "--dim", ">= 1"),
    ("store_scan.py", ["--queries", "0"], "--queries", ">= 1"),
    ("store_scan.py", ["--threads", "0"], "--threads", ">= 1"),
    ("real_recall.py", ["--kinds", "bogus"], "--kinds", "ivf, ivf-sq8, ivf-pq, pq, hnsw"),
    ("real_recall.py", ["--rows", "bogus"], "--rows", "real, gaussian"),
    ("real_recall.py", ["--threads", "0"], "--threads", ">= 1"),
    ("real_recall.py", ["--seed=-1"], "--seed", ">= 0"),
    ("real_recall.py", ["--pq-m", "0"], "--pq-m", "'default'"),
    ("hnsw_graph.py", ["--ef-construction", "40,0"], "--ef-construction", "integers >= 1"),
    ("hnsw_graph.py", ["--threads", "0"], "--threads", ">= 1"),
    ("index_scale.py", ["--per-task=-1"], "--per-task", ">= 0"),
    ("index_scale.py", ["--fit-rows=-1"], "--fit-rows", ">= 0"),
    ("index_scale.py", ["--queries", "0"], "--queries", ">= 1"),
    ("index_scale.py", ["--dim", "0"], "--dim", ">= 1"),
    ("index_scale.py", ["--batch-size", "0"], "--batch-size", ">= 1"),
    ("index_scale.py", ["--max-length", "0"], "--max-length", ">= 1"),
    ("index_scale.py", ["--shard-size", "0"], "--shard-size", ">= 1"),
    # paths: they ended in a traceback (FileNotFoundError, IncompleteStore, JSONDecodeError) after the imports
    ("real_recall.py", ["--store", "no-such-store"], "--store", "not a store written by index_scale.py --out"),
    ("real_recall.py", ["--store", str(BENCHMARKS)], "--store", "(no "),
    ("hnsw_graph.py", ["--stores", f"{BENCHMARKS},x"], "--stores", "not a store written by index_scale.py --out"),
    ("query_latency.py", ["--spectrum", "no-such.json"], "--spectrum", "no such file"),
    ("store_scan.py", ["--spectrum", str(ROOT / "README.md")], "--spectrum", "is not JSON"),
    ("store_scan.py", ["--spectrum", str(BENCHMARKS)], "--spectrum", "(a folder)"),
    ("short_rows.py", [str(BENCHMARKS)], "benches", "not a folder with bench.json"),
    # reviewY: --name "" wrote benchmarks/results.md, ../x outside the results folder; a file as --results failed
    # after all the work
    ("real_recall.py", ["--name", ""], "--name", "a file name without a folder"),
    ("hnsw_graph.py", ["--name", "../x"], "--name", "a file name without a folder"),
    ("store_scan.py", ["--results", str(ROOT / "README.md")], "--results", "is a file, not a folder"),
    # userN: --ranks abc ended in a traceback; --queries 0 started a child that failed, and the script waited for ever
    ("query_memory.py", ["--ranks", "abc"], "--ranks", "'none' or integers >= 1"),
    ("query_memory.py", ["--queries", "0"], "--queries", "integers >= 1"),
    # userN: any argument (--help, a misspelt folder) was taken as the study folder, made and given an empty table
    ("study_summary.py", [str(BENCHMARKS)], "folder", "holds no <task>/bench.json"),
    # userN: a misspelt run folder was "missing (True, False)", exit 0
    ("parity_compare.py", [str(BENCHMARKS), "no-such-run"], "after", "no such folder"),
]


def written(folder: Path) -> list[str]:
    """Every file under ``folder`` (none when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every ``BAD`` case run as its script's ``__main__``, in one interpreter: ``(folder, answers)``."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = [(script, [*argv, *WHERE[script](tmp)]) for script, argv, _, _ in BAD]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(BENCHMARKS), str(tmp), json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return tmp, json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{s}:{' '.join(a)}" for s, a, _, _ in BAD])
def test_a_bad_argument_is_refused_at_parse_time_naming_its_flag(refusals, case):
    tmp, answers = refusals
    _script, _argv, flag, says = BAD[case]
    answer = answers[case]
    assert answer["code"] == 2, answer["stderr"]
    assert "Traceback" not in answer["stderr"]
    assert f"error: argument {flag}: " in answer["stderr"]
    assert says in answer["stderr"]
    assert written(tmp) == []  # no rows, store or results file from any refused command


@pytest.mark.parametrize("script", ["query_latency.py", "store_scan.py"])
def test_the_reported_command_exits_2_before_any_work(tmp_path, script):
    """``--sizes 0`` as the user ran it: a plain command, not the in-process driver."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--sizes", "0", *WHERE[script](tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "error: argument --sizes: expected comma-separated integers >= 1, got '0'" in done.stderr
    assert "Traceback" not in done.stderr
    assert written(tmp_path) == []


def test_store_scan_writes_its_results_under_results(tmp_path):
    """``--results`` puts ``<name>.md`` / ``.json`` there, the committed ``benchmarks/results/store_scan.*``
    untouched; the command recorded is the one given, the script named from the repository's root."""
    committed = {p: p.read_bytes() for p in (BENCHMARKS / "results").glob("store_scan.*")}
    argv = ["--sizes", "1000", "--dim", "8", "--queries", "2", "--threads", "1"]
    where = ["--data", str(tmp_path / "data"), "--results", str(tmp_path / "results"), "--name", "tiny"]
    done = subprocess.run(
        [sys.executable, "benchmarks/store_scan.py", *argv, *where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert written(tmp_path / "results") == ["tiny.json", "tiny.md"]
    command = "python benchmarks/store_scan.py " + " ".join([*argv, *where])
    report = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert report["command"] == command
    assert [r["count"] for r in report["rows"]] == [1000]
    assert f"Command: `{command}`" in (tmp_path / "results" / "tiny.md").read_text()
    assert {p: p.read_bytes() for p in (BENCHMARKS / "results").glob("store_scan.*")} == committed


def test_the_recorded_command_reruns_from_the_repositorys_root_whatever_folder_ran_it(tmp_path):
    """userG: run from another folder, ``--data``/``--results`` were recorded as given (relative to that folder),
    with the script named from the repository's root, so no folder reran the recorded command. Paths are now named
    from the root (absolute outside it), and the recorded command, run from the root, writes the same files."""
    import shlex

    argv = ["--sizes", "1000", "--dim", "8", "--queries", "2", "--threads", "1", "--name", "tiny"]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "store_scan.py"), *argv, "--data", "data", "--results", "results"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    command = json.loads((tmp_path / "results" / "tiny.json").read_text())["command"]
    where = f"--data {tmp_path / 'data'} --results {tmp_path / 'results'}"
    assert command == "python benchmarks/store_scan.py " + " ".join(argv) + " " + where, command
    for name in ("tiny.json", "tiny.md"):
        (tmp_path / "results" / name).unlink()
    words = shlex.split(command)
    again = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (tmp_path / "results" / "tiny.json").is_file(), again.stderr


def test_only_the_values_of_path_options_are_named_from_the_root(tmp_path, monkeypatch):
    """reviewR: matching the text of each argument against the parsed paths missed ``./data/`` and ``--data=./data``
    (a path prints without them) and rewrote ``--name data`` beside ``--data data`` (a folder ``data`` exists). Only
    the value of a path option is rewritten, whichever form it was given in."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from common import command_line

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--name")
    parser.add_argument("--kinds")
    argv = ["--data", "./data/", "--results=results/", "--name", "data", "--kinds", "data"]
    line = command_line("x.py", argv, parser.parse_args(argv))
    data, results = tmp_path / "data", tmp_path / "results"
    assert line == f"python benchmarks/x.py --data {data} --results={results} --name data --kinds data", line
    inside = ["--data", str(BENCHMARKS / "results")]
    assert command_line("x.py", inside, parser.parse_args(inside)) == "python benchmarks/x.py --data benchmarks/results"


def test_index_peers_installs_bergson_under_peers_dir_not_the_checkout(tmp_path, monkeypatch):
    """userG: ``index_peers.py`` installed Bergson into ``<checkout>/.cache`` with no way to put it elsewhere (a
    read-only or shared checkout). ``--peers-dir DIR`` installs into ``DIR/bergson`` (a ``.part`` folder renamed when
    pip is done); pip itself is stood in for here, writing into the folder it is given."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import index_peers

    args = index_peers.parse_args(["--peers-dir", str(tmp_path / "peers")])
    assert args.peers_dir == tmp_path / "peers" and index_peers.parse_args([]).peers_dir == ROOT / ".cache" / "peers"
    calls = []

    def pip(command, **_kwargs):
        calls.append(command)
        Path(command[command.index("--target") + 1], "bergson").mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(index_peers.subprocess, "run", pip)
    target = args.peers_dir / "bergson"
    assert index_peers.install_bergson(target) is None and (target / "bergson").is_dir()
    assert index_peers.install_bergson(target) is None and len(calls) == 1  # installed once
    assert not (target.parent / "bergson.part").exists()


def test_parity_compare_exits_1_on_a_difference_or_a_missing_file_and_0_when_identical(tmp_path):
    """userN: ``parity_compare.py`` printed a real difference (and four "missing" lines for a misspelt folder) and
    exited 0, so the refactor gate it is could not fail a script or CI job."""
    files = {"bench/bench.json": {"aggregate": {"ekfac": {"acc": 0.5}}}, "diag/diagnose.json": {"rows": [1.0]}}
    files |= {"gt/evaluate.json": {"lds": 0.25}, "gt/groundtruth.json": {"n": 3}}
    for run in ("before", "after"):
        for name, data in files.items():
            (tmp_path / run / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / run / name).write_text(json.dumps(data))

    def compare() -> subprocess.CompletedProcess:
        command = [sys.executable, "benchmarks/parity_compare.py", str(tmp_path / "before"), str(tmp_path / "after")]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)

    same = compare()
    assert same.returncode == 0 and same.stdout.strip() == "IDENTICAL numbers", same.stdout + same.stderr
    (tmp_path / "after" / "gt" / "evaluate.json").write_text(json.dumps({"lds": 0.3}))
    (tmp_path / "after" / "diag" / "diagnose.json").unlink()
    differ = compare()
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert "gt/evaluate.json.lds: 0.25 vs 0.3" in differ.stdout
    assert f"diag/diagnose.json: missing from {tmp_path / 'after'}" in differ.stdout


@pytest.mark.parametrize("script", ["ablation.sh", "study.sh"])
def test_a_study_script_whose_task_failed_exits_1_naming_it(tmp_path, script):
    """userN: ``ablation.sh`` and ``study.sh`` said "<task>: failed, see <log>" and went on to the next task, as they
    should, but then exited 0, so a caller saw success. They exit 1 at the end, naming the failed tasks."""
    shim = tmp_path / "wherefrom"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m wherefrom.cli "$@"\n')
    shim.chmod(0o755)
    env = {"TASKS": "no-such-task", "RESULTS": str(tmp_path / "results"), "WHEREFROM": str(shim), "PY": sys.executable}
    done = subprocess.run(
        ["bash", f"benchmarks/{script}", str(tmp_path / "work")],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no-such-task: failed, see" in done.stderr and "failed tasks: no-such-task" in done.stderr
    assert written(tmp_path / "results") == []
