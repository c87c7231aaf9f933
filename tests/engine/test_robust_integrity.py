"""Stored state is verified before it is used (issue 10, kind 11): a damaged, truncated, missing or
unrecorded factors file or index shard is named; `scores`/`query` refuse it (exit 2, no scores
written), `fit`/`index` rebuild it (never "reused"), and the rebuilt state gives the original scores.
Leftover `.partial-*` files of killed writers are removed by the next writer."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from wherefrom.core.store import (
    DamagedFile,
    atomic_save_tensors,
    load_tensors_checked,
    read_json_checked,
    save_tensors_checked,
    write_json_checked,
)

from .robust_workspace import fit_args, invoke, make_workspace, partials


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("integrity"), n_train=20)
    for args in (
        fit_args(root, "run"),
        ["index", "--run", root / "run", "--shard-size", "4"],
        ["scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "clean"],
    ):
        code, out = invoke(*args)
        assert code == 0, out
    return root


def flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def forget_checksum(path):
    """The state a kill between the rename and the checksum record leaves: a file nobody vouched for."""
    manifest = path.parent / "checksums.json"
    files = json.loads(manifest.read_text())
    del files["files"][path.name]
    manifest.write_text(json.dumps(files))


DAMAGE = {
    "flipped": (flip_middle, "is damaged"),
    "truncated": (truncate, "is truncated or changed"),
    "unrecorded": (forget_checksum, "has no checksum"),
}


def scores_of(root, name):
    return load_file(str(root / "run" / "scores" / f"{name}.safetensors"))["total"]


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("file", ["curvature.safetensors", "curvature.json"])
def test_damaged_factors_are_refused_then_refitted(root, kind, file):
    path = root / "run" / "factors" / file
    original = (root / "run" / "factors" / "curvature.safetensors").read_bytes()
    hurt, named = DAMAGE[kind]
    hurt(path)
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "damaged")
    assert code == 2 and str(path) in out and named in out, out
    assert not (root / "run" / "scores" / "damaged.safetensors").exists()
    code, out = invoke("query", "--run", root / "run", "ab cd:", " ef")
    assert code == 2 and str(path) in out, out
    code, out = invoke(*fit_args(root, "run"))
    assert code == 0 and "ekfac fitted" in out and "reused" not in out and "refitting" in out and file in out, out
    assert (root / "run" / "factors" / "curvature.safetensors").read_bytes() == original  # same seed: same bytes
    code, out = invoke(*fit_args(root, "run"))
    assert code == 0 and "reused" in out, out


@pytest.mark.parametrize("kind", [*DAMAGE, "deleted"])
def test_damaged_index_shard_is_refused_then_rebuilt(root, kind):
    path = root / "run" / "index" / "shard-00002.safetensors"
    if kind == "deleted":
        path.unlink()
        named = "is missing"
    else:
        hurt, named = DAMAGE[kind]
        hurt(path)
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "damaged")
    assert code == 2 and str(path) in out and named in out, out
    assert not (root / "run" / "scores" / "damaged.safetensors").exists()
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0 and "1 shard written now" in out, out
    assert kind == "deleted" or "rebuilding" in out
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "rebuilt")
    assert code == 0, out
    assert torch.equal(scores_of(root, "rebuilt"), scores_of(root, "clean"))


@pytest.mark.parametrize("file", ["shard-00002.safetensors", "ids.json", "index.json"])
def test_a_folder_in_place_of_an_index_file_is_named_and_changes_nothing(root, file):
    """A folder where a finished index's file belongs was reported as "missing", and `index` removed the
    completion marker before it met the folder (a finished store became unfinished, with a raw `[Errno 21]`).
    Readers name the folder, `index` refuses it before any change, and once it is moved away the store is whole
    again (the shard rebuilt from the run, the marker rewritten)."""
    index = root / "run" / "index"
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()}
    path = index / file
    path.rename(root / "kept")
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    try:
        code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "folder")
        said = " ".join(out.split())
        assert code == 2 and f"{path} is a folder where this file belongs" in said, out
        code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
        said = " ".join(out.split())
        assert code == 2 and f"{path}: a folder is where this file belongs" in said and "Errno" not in said, out
        assert (path / "notes.txt").read_text() == "mine"
        assert {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()} == {
            k: v for k, v in before.items() if k != file
        }  # nothing changed: the marker kept
    finally:
        (path / "notes.txt").unlink()
        path.rmdir()
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0, out
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "moved")
    assert code == 0 and torch.equal(scores_of(root, "moved"), scores_of(root, "clean")), out
    (root / "kept").unlink()


@pytest.mark.parametrize("file", ["scores/clean.top.csv", "scores/clean.json", "factors/curvature.safetensors"])
def test_a_folder_in_place_of_a_result_file_is_refused_before_the_work(root, file):
    """A folder where a score set's file belongs: `scores` ran the whole query pass, removed the finished set's
    marker (the set became unfinished) and then refused the folder; in place of a factors file, `fit` refitted
    the whole curvature before failing. Both are refused first, nothing changed."""
    path = root / "run" / file
    kept = {p: p.read_bytes() for p in (root / "run").rglob("*") if p.is_file() and p != path}
    path.rename(root / "aside")
    path.mkdir()
    try:
        args = ["scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "clean"]
        code, out = invoke(*(fit_args(root, "run") if file.startswith("factors") else args))
        said = " ".join(out.split())
        assert code == 2 and f"{path}: a folder is where this file belongs" in said and "refitting" not in said, out
        assert {p: p.read_bytes() for p in kept} == kept  # nothing changed: the set's marker kept
    finally:
        path.rmdir()
        (root / "aside").rename(path)


def test_damaged_index_marker_is_refused_then_rewritten(root):
    path = root / "run" / "index" / "index.json"
    path.write_text(path.read_text().replace('"rows": 20', '"rows": 21'))
    code, out = invoke("scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "damaged")
    assert code == 2 and str(path) in out, out
    code, out = invoke("index", "--run", root / "run", "--shard-size", "4")
    assert code == 0 and "0 shards written now" in out, out
    assert json.loads(path.read_text())["rows"] == 20


def test_factors_without_recorded_checksums_are_refitted(root):
    """Factors made by a version without checksums (or whose manifest is lost) are never reused blindly."""
    factors = root / "run" / "factors"
    (factors / "checksums.json").unlink()
    code, out = invoke(*fit_args(root, "run"))
    assert code == 0 and "ekfac fitted" in out and "settings unknown" in out, out


def test_partial_leftovers_are_ignored_by_readers_and_removed_by_the_next_writer(root):
    run = root / "run"
    junk = [
        run / "index" / ".shard-00001.safetensors.partial-k1ll3d",
        run / "factors" / ".curvature.safetensors.partial-x9",
        run / "scores" / ".clean.safetensors.partial-ab",
    ]
    for path in junk:
        path.write_bytes(b"half a file")
    (run / ".index.partial-dir").mkdir()
    (run / ".index.partial-dir" / "shard-00000.safetensors").write_bytes(b"x")
    code, out = invoke("query", "--run", run, "ab cd:", " ef")  # a reader: neither uses nor removes them
    assert code == 0, out
    assert len(partials(run)) == 4
    code, out = invoke("index", "--run", run, "--shard-size", "4")
    assert code == 0, out
    assert partials(run) == []


def test_checked_files_name_the_damage(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors_checked({"x": torch.arange(1000.0)}, path, meta={"ids": "[1]"})
    tensors, meta = load_tensors_checked(path)
    assert torch.equal(tensors["x"], torch.arange(1000.0)) and meta == {"ids": "[1]"}
    flip_middle(path)
    with pytest.raises(DamagedFile, match=r"a\.safetensors is damaged"):
        load_tensors_checked(path)
    atomic_save_tensors({"x": torch.zeros(3)}, tmp_path / "b.safetensors")  # written, checksum never recorded
    with pytest.raises(DamagedFile, match=r"b\.safetensors has no checksum"):
        load_tensors_checked(tmp_path / "b.safetensors")
    write_json_checked({"k": 1}, tmp_path / "c.json")
    assert read_json_checked(tmp_path / "c.json") == {"k": 1}
    (tmp_path / "c.json").write_text('{"k": 2}\n')
    with pytest.raises(DamagedFile, match=r"c\.json"):
        read_json_checked(tmp_path / "c.json")


@pytest.mark.parametrize("file", ["config.json", "manifest.json"])
@pytest.mark.parametrize(
    "damage, named",
    [
        (b'{"train": ', "is not valid JSON"),
        (b"[1, 2]", "does not hold a JSON object"),
        (b'{"attribution": 3}', "does not (record a run's config|hold a run's manifest)"),
    ],
    ids=["cut", "list", "fields"],
)
def test_a_damaged_config_or_manifest_of_a_finished_run_is_named_and_kept(root, file, damage, named):
    """A finished run's config.json or manifest.json that cannot be read: `fit` (which checks the folder against
    its settings), `scores` and `query` (which open the run) exit 2 naming the file, and leave it as it was
    (before: an unnamed JSONDecodeError, or a KeyError/AttributeError traceback)."""
    path = root / "run" / file
    clean = path.read_bytes()
    path.write_bytes(damage)
    try:
        for args in (
            fit_args(root, "run"),
            ["scores", "--run", root / "run", "--queries", root / "queries.jsonl", "--name", "again"],
            ["query", "--run", root / "run", "ab cd:", " ef"],
        ):
            code, out = invoke(*args)
            assert code == 2 and str(path) in out and re.search(named, out), (args[0], out)
            assert path.read_bytes() == damage
    finally:
        path.write_bytes(clean)


@pytest.mark.parametrize(
    ("flags", "other", "folder", "named"),
    [
        (
            ["--strategy", "kfac"],
            ["--strategy", "ekfac"],
            "factors",
            "attribution.strategy: recorded 'ekfac', now 'kfac'",
        ),
        ([], ["--damping-factor", "0.5"], "factors", "attribution.damping_factor: recorded 0.5, now 0.1"),
        ([], ["--train", "FEWER"], "factors", "data: recorded"),
        (["--method", "logra"], ["--method", "logra", "--option", "dim_in=8"], "method", "options.dim_in: recorded 8"),
    ],
)
def test_factors_of_other_settings_put_in_a_run_are_refused_by_its_readers(root, tmp_path, flags, other, folder, named):
    """userY: `scores`/`query` used whatever RUN/factors held: a K-FAC run's scores were, byte for byte, those of
    the EK-FAC factors copied there, and factors of another damping or of other training rows gave other scores,
    with no error, where `fit` refused them. Readers now compare the factors' (or a fitted method's) recorded
    settings with the run's, naming each that differs; the run's own factors are read as before."""
    import shutil

    rows = (root / "train.jsonl").read_text().splitlines()
    (tmp_path / "fewer.jsonl").write_text("\n".join(rows[:12]) + "\n")
    other = [str(tmp_path / "fewer.jsonl") if a == "FEWER" else a for a in other]
    run, donor = f"mine-{tmp_path.name}", f"donor-{tmp_path.name}"
    code, out = invoke(*fit_args(root, run, *flags))
    assert code == 0, out
    donor_args = fit_args(root, donor)
    if "--train" in other:  # the donor fitted on other rows
        donor_args[donor_args.index("--train") + 1] = other[1]
        other = []
    code, out = invoke(*donor_args, *other)
    assert code == 0, out
    code, out = invoke("scores", "--run", root / run, "--queries", root / "queries.jsonl", "--name", "own")
    assert code == 0, out
    shutil.rmtree(root / run / folder)
    shutil.copytree(root / donor / folder, root / run / folder)
    for args in (
        ["scores", "--run", root / run, "--queries", root / "queries.jsonl", "--name", "swapped"],
        ["query", "--run", root / run, "ab cd:", " ef"],
    ):
        code, out = invoke(*args)
        said = " ".join(out.split())
        assert code == 2 and f"{root / run / folder} was fitted with other settings than run" in said, out
        assert named in said, said
    assert not (root / run / "scores" / "swapped.safetensors").exists()


def test_an_unfinished_index_passed_over_by_scores_is_said(root, tmp_path):
    """userY: with RUN/index unfinished (no index.json), `scores` and `query` recomputed the training gradients and
    said nothing of the index; they now say it was passed over, with the command that finishes it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "index" / "index.json").unlink()
    for args in (["scores", "--queries", root / "queries.jsonl", "--name", "passed"], ["query", "ab cd:", " ef"]):
        code, out = invoke(*args, "--run", run)
        said = " ".join(out.split())
        assert code == 0 and f"note: {run / 'index'} is unfinished, so the training side was recomputed" in said
        assert f"wherefrom index --run {run} --shard-size 4" in said, said
