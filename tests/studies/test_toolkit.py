"""The studies' toolkit: the resumable per-item cache, measurement, provenance and report tables."""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from wherefrom.core import store as core_store
from wherefrom.core.data import Record, data_fingerprint
from wherefrom.studies.metrics import spearman, spearman_rows
from wherefrom.studies.toolkit import (
    cached,
    check_seeds,
    failure_cell,
    interval_cell,
    key_digest,
    markdown_table,
    measured,
    number,
    provenance,
    recorded_warnings,
    refuse_replacing,
    resumable,
    store,
    warning_notes,
    write_report,
)


class Counter:
    """A unit of work that counts its calls and returns ``row`` (a copy)."""

    def __init__(self, row):
        self.row, self.calls = row, 0

    def __call__(self):
        self.calls += 1
        return dict(self.row)


def test_resume_reads_a_finished_unit_back(tmp_path):
    path, key = tmp_path / "seed-0" / "ekfac.json", {"seed": 0, "method": "ekfac", "options": {"rank": (1, 2)}}
    work = Counter({"value": 1.5, "error": None})
    row, reused = resumable(path, key, work)
    assert not reused and work.calls == 1 and row["value"] == 1.5
    again, reused = resumable(path, key, work)
    assert reused and work.calls == 1  # not computed again
    assert again["value"] == 1.5 and again["key"] == {"seed": 0, "method": "ekfac", "options": {"rank": [1, 2]}}
    assert cached(path, key) == again


def test_failed_unit_is_retried(tmp_path):
    path, key = tmp_path / "u.json", {"k": 1}
    failing = Counter({"value": None, "error": "RuntimeError: boom"})
    row, _ = resumable(path, key, failing)
    assert row["error"] and json.loads(path.read_text())["error"]  # the failure is on disk, for the report
    assert cached(path, key) is None
    working = Counter({"value": 2.0, "error": None})
    row, reused = resumable(path, key, working)
    assert not reused and working.calls == 1 and row["value"] == 2.0
    assert cached(path, key)["value"] == 2.0


def test_unit_written_with_other_settings_is_recomputed(tmp_path):
    path = tmp_path / "u.json"
    resumable(path, {"damping": 0.1}, Counter({"value": 1}))
    work = Counter({"value": 2})
    row, reused = resumable(path, {"damping": 0.2}, work)
    assert not reused and work.calls == 1 and row["value"] == 2
    assert cached(path, {"damping": 0.1}) is None and cached(path, {"damping": 0.2})["value"] == 2


def test_unit_missing_a_companion_file_is_recomputed(tmp_path):
    path, scores, key = tmp_path / "m.row.json", tmp_path / "m.safetensors", {"m": 1}
    store(path, key, {"error": None})
    assert cached(path, key) is not None and cached(path, key, needs=[scores]) is None
    scores.write_bytes(b"x")
    assert cached(path, key, needs=[scores]) is not None


def test_partial_file_is_never_read_as_complete(tmp_path, monkeypatch):
    path, key = tmp_path / "u.json", {"k": 1}
    # a file cut short (as a non-atomic writer would leave it) is not a finished unit
    text = json.dumps({"key": key, "value": 1.0})
    path.write_text(text[: len(text) // 2])
    assert cached(path, key) is None
    path.unlink()

    # an interruption while storing leaves neither the file nor its temporary behind
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(core_store.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store(path, key, {"value": 1.0})
    monkeypatch.undo()
    assert not path.exists() and os.listdir(tmp_path) == []
    work = Counter({"value": 3.0})
    row, reused = resumable(path, key, work)
    assert not reused and work.calls == 1 and row["value"] == 3.0


def test_measured_time_and_memory():
    with measured(torch.device("cpu")) as usage:
        time.sleep(0.05)
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block[::512] = 2.0
    print(usage)
    assert usage["seconds"] >= 0.05
    if usage["peak_mib"] is not None:  # Linux: the resident-set high-water mark
        assert usage["peak_mib"] >= 48, usage
    del block


def test_measured_records_even_when_the_block_raises():
    seen = []

    def failing():
        with measured(torch.device("cpu")) as usage:
            seen.append(usage)
            raise ValueError("x")

    with pytest.raises(ValueError):
        failing()
    assert seen[0]["seconds"] >= 0 and "peak_mib" in seen[0]


def test_provenance_records_command_versions_hardware_and_fingerprints():
    rows = [Record("a", "p", " c"), Record("b", "q", " d")]
    record = provenance("wherefrom bench --task rules", train=rows)
    assert record["command"] == "wherefrom bench --task rules"
    assert record["versions"]["torch"] not in ("", "absent") and record["versions"]["numpy"] == np.__version__
    assert record["hardware"]["cpu_count"] == os.cpu_count()
    assert record["train_fingerprint"] == data_fingerprint(rows)
    assert provenance("x", train=rows[:1])["train_fingerprint"] != record["train_fingerprint"]


def test_report_cells():
    assert interval_cell({"mean": 0.4, "low": 0.1234, "high": 0.9}) == "0.400 [0.123, 0.900]"
    assert interval_cell({"mean": 0.4, "low": None, "high": None}) == "0.400"
    assert interval_cell(None) == "–" and interval_cell({"mean": None}) == "–"
    assert interval_cell({"mean": 1234.5, "low": 1000.0, "high": 1500.0}, ".3g") == "1.23e+03 [1e+03, 1.5e+03]"
    # a tiny negative rounds to zero without its sign (ablate.md showed "-0.000 [-1.000, +1.000]")
    assert interval_cell({"mean": -1e-9, "low": -0.0, "high": 0.767}) == "0.000 [0.000, 0.767]"
    assert interval_cell({"mean": -4e-5, "low": -1.0, "high": 1.0}, "+.3f") == "+0.000 [-1.000, +1.000]"
    assert number(-4e-4, ".1%") == "0.0%" and number(-1e-4, ".3g") == "-0.0001" and number(-0.0006) == "-0.001"
    assert number(None) == "–" and number(float("nan")) == "–" and number(2.0, ".1f") == "2.0"
    cut = "failed: " + ("ValueError: a \\| b c" + "x" * 300)[:200] + "…"  # userP read a cut error as whole
    assert failure_cell("ValueError: a | b\nc" + "x" * 300) == cut and failure_cell("x" * 200) == "failed: " + "x" * 200
    assert failure_cell(None) == "failed: no result"


def test_markdown_table_pads_short_rows_and_rejects_long_ones():
    table = markdown_table(["method", "acc", "time, s"], [["a", "0.5", "1.0"], ["b", "failed: x"]])
    assert table.splitlines() == [
        "| method | acc | time, s |",
        "| --- | ---: | ---: |",
        "| a | 0.5 | 1.0 |",
        "| b | failed: x |  |",
    ]
    with pytest.raises(ValueError, match="4 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [["1", "2", "3", "4"]])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], align=["---"])


def test_write_report_writes_strict_json_and_markdown(tmp_path):
    json_path, md_path = write_report(tmp_path / "out" / "bench", {"x": float("nan"), "y": 1}, "# title\n")
    assert json_path == tmp_path / "out" / "bench.json" and md_path == tmp_path / "out" / "bench.md"
    assert json.loads(json_path.read_text()) == {"x": None, "y": 1}
    assert md_path.read_text() == "# title\n"


def test_one_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 30)).astype(float)  # ties
    b = a + rng.normal(size=a.shape)
    want = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman_rows(a, b), want, rtol=1e-12)
    assert spearman(a[0].tolist(), b[0].tolist()) == pytest.approx(want[0], rel=1e-12)
    assert spearman([1, 2, float("nan"), 3], [1, 2, 5, 3]) == pytest.approx(1.0)
    assert math.isnan(spearman_rows([[1.0, 1.0, 1.0]], [[1.0, 2.0, 3.0]])[0])


def test_measured_peak_counts_memory_glibc_kept_from_earlier_frees():
    """Freed heap that glibc keeps resident is returned before measuring: without it, a block reusing that
    memory raised the resident set by 32 of its 48 MiB here (and by nothing in a loaded full test run)."""
    import subprocess
    import sys

    script = (
        "import ctypes, torch\n"
        "from wherefrom.studies.toolkit import measured\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.free(libc.malloc(30 << 20))  # glibc's dynamic mmap threshold rises to ~30 MB\n"
        "parts = [torch.ones(4 << 20) for _ in range(3)]; del parts  # 48 MB freed into the heap, kept resident\n"
        "with measured(torch.device('cpu')) as usage:\n"
        "    again = [torch.ones(4 << 20) for _ in range(3)]\n"
        "print(usage['peak_mib'])\n"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's heap and /proc/self/status: Linux only")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) >= 47


@pytest.mark.parametrize(
    ("seeds", "said"),
    [
        ([], "expected at least one integer"),
        ([0, 0], "seed(s) [0] repeated"),
        ([1, 2, 1], "seed(s) [1] repeated"),
        ([-1], "seed(s) [-1] negative"),
        ([0, -3], "seed(s) [-3] negative"),
        ([0, 10**20], "100000000000000000000 is outside the 64-bit integers"),
    ],
)
def test_seed_lists_are_non_empty_non_negative_64_bit_without_repeats(seeds, said):
    """A study's seeds as ``--seed``: a negative one was taken by ``BenchConfig`` and ``WordOrderConfig`` (a bench
    wrote ``seed--1/``) though a fine-tuning's or ground truth's single seed refuses it, and one beyond 64 bits
    overflowed in torch's seeding after the study started."""
    with pytest.raises(ValueError) as error:
        check_seeds(seeds)
    assert str(error.value) == f"seeds {seeds}: {said}" or said in str(error.value)
    check_seeds([0, 1, 7])


def test_key_digest_names_equal_keys_alike_in_any_order():
    """One naming of cache folders by settings (tune's points, bench's shared fine-tunings, ihvp's references: three
    hashes written three ways before); the names bench and tune gave stay what they were."""
    import hashlib

    point = {"damping_factor": 0.01, "depth": 100}
    assert key_digest(point, 12) == key_digest({"depth": 100, "damping_factor": 0.01}, 12)
    assert key_digest(point, 12) == hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:12]
    assert len(key_digest(point, 16)) == 16 and key_digest(point, 16).startswith(key_digest(point, 12))
    assert key_digest(point, 12) != key_digest({**point, "depth": 101}, 12)


def test_refuse_replacing_names_only_finished_units_of_another_key(tmp_path):
    """Only a finished unit (no ``error``) holding another key is refused: the same key, a failed unit, a missing
    or unreadable file and a unit of a new id are computed as :func:`resumable` would; the message counts the rest."""
    for name, key, row in (
        ("a", {"lr": 1, "rows": [1, 2]}, {}),
        ("b", {"lr": 1}, {}),
        ("c", {"lr": 1}, {"error": "x"}),
    ):
        store(tmp_path / f"{name}.json", key, dict(row))
    (tmp_path / "d.json").write_text("{not json")
    now = {"lr": 2, "rows": [1, 2]}
    refuse_replacing([(tmp_path / "a.json", {"lr": 1, "rows": [1, 2]}), (tmp_path / "c.json", now)])
    refuse_replacing([(tmp_path / "d.json", now), (tmp_path / "e.json", now)])
    with pytest.raises(core_store.OutputExists) as error:
        refuse_replacing([(tmp_path / name, now) for name in ("a.json", "b.json", "c.json", "d.json")])
    assert str(error.value) == (
        f"earlier results would be overwritten: {tmp_path / 'a.json'} and 1 more, made from other inputs "
        "(lr: recorded 1, now 2); pass overwrite=True (--overwrite on the command line) to replace them"
    )


def test_recorded_warnings_keep_wherefroms_own_once_and_show_each_once_even_when_the_block_raises():
    """What a study's row records (:func:`recorded_warnings`): wherefrom's warnings once each (a cg warning of every
    query batch), not a library's; each warning is shown again once, also when the block raised."""
    from wherefrom.curvature.iterative import ConvergenceWarning

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with recorded_warnings() as said:
            for _ in range(3):
                warnings.warn("cg did not converge", ConvergenceWarning, stacklevel=1)
            for residual in ("1.5e-02", "3e-3"):  # reviewV: one line per query batch, whose residuals differ
                warnings.warn(f"cg: relative residual {residual} > tol=1e-06", ConvergenceWarning, stacklevel=1)
            warnings.warn("a library's", DeprecationWarning, stacklevel=1)
    assert said == [
        "ConvergenceWarning: cg did not converge (and 2 more like it)",
        "ConvergenceWarning: cg: relative residual 1.5e-02 > tol=1e-06 (and 1 more like it)",
    ]
    residuals = [f"cg: relative residual {r} > tol=1e-06" for r in ("1.5e-02", "3e-3")]
    assert [str(w.message) for w in shown] == ["cg did not converge", *residuals, "a library's"]
    with warnings.catch_warnings(record=True) as shown, pytest.raises(ValueError, match="stop"):
        warnings.simplefilter("always")
        with recorded_warnings() as said:
            warnings.warn("before the failure", ConvergenceWarning, stacklevel=1)
            raise ValueError("stop")
    assert said == ["ConvergenceWarning: before the failure"] and len(shown) == 1
    assert warning_notes([("a", said), ("b", [])]).splitlines()[-1] == ("- a: ConvergenceWarning: before the failure")
    assert warning_notes([("b", [])]) == ""
    unrecorded = warning_notes([("b", []), ("c", None)])  # reviewV: a row cached before read as "no warnings"
    assert unrecorded.strip() == (
        "Warnings not recorded for c: rows cached by an earlier version, which kept none (`--overwrite` recomputes them)."
    )
