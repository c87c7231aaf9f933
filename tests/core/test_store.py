"""Atomic JSON writing: strict JSON (no NaN), keyed cache reads that see the written form; the checksums of
written files (XXH3-128, and sha256 entries of folders written before it still verified)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash

import wherefrom
from wherefrom.core.store import (
    CHECKSUMS,
    DamagedFile,
    OutputExists,
    SettingsMismatch,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    check_file,
    check_replacement,
    check_size,
    checksum_of,
    forget_file,
    is_intact,
    load_tensors_checked,
    read_checked,
    read_json_checked,
    read_keyed_json,
    record_settings,
    recorded_checksums,
    save_tensors_checked,
    strict_json,
    update_json,
    write_json_checked,
)
from wherefrom.models.optimizer_state import OPTIMIZER_STATE_FILE, AdamState, save_adam_state


def test_non_finite_floats_become_null_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json({"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": {"d": 0.5}}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert loaded == {"a": None, "b": [1.0, None, [2, None]], "c": {"d": 0.5}}
    assert strict_json(3) == 3 and strict_json("nan") == "nan"


def test_keyed_read_matches_a_key_with_nan(tmp_path):
    path = tmp_path / "job.json"
    key = {"damping": math.nan, "rows": (1, 2)}
    atomic_write_json({"key": key, "values": [1.0]}, path)
    assert read_keyed_json(path, key)["values"] == [1.0]
    assert read_keyed_json(path, {"damping": 0.1, "rows": (1, 2)}) is None


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def recorded_as(path, entry):
    """Replace ``path``'s entry in its folder's manifest by ``entry`` (as an older wherefrom recorded it)."""
    manifest = path.parent / CHECKSUMS
    files = json.loads(manifest.read_text())
    files["files"][path.name] = entry
    manifest.write_text(json.dumps(files))


def test_a_written_file_records_its_xxh3_128_and_size(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors_checked({"x": torch.arange(4096.0)}, path)
    data = path.read_bytes()  # the digest by the xxhash package directly, over all the file's bytes
    assert recorded_checksums(tmp_path)[path.name] == {
        "xxh3_128": xxhash.xxh3_128(data).hexdigest(),
        "bytes": len(data),
    }
    assert checksum_of(recorded_checksums(tmp_path)[path.name]) == ("xxh3_128", xxhash.xxh3_128(data).hexdigest())
    flip_last_byte(path)  # the same size: only the digest tells
    with pytest.raises(DamagedFile, match=r"a\.safetensors is damaged: its xxh3_128 differs"):
        check_file(path)
    check_size(path)  # the cheap check reads no bytes


@pytest.mark.parametrize("replace", ["deleted", "folder", "truncated"])
def test_the_cheap_size_check_names_a_missing_replaced_or_truncated_file(tmp_path, replace):
    path = tmp_path / "a.safetensors"
    save_tensors_checked({"x": torch.arange(64.0)}, path)
    recorded = recorded_checksums(tmp_path)
    if replace == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.unlink()
        if replace == "folder":
            path.mkdir()  # a directory of that name is no file: named as a folder, not as missing
    message = {"deleted": "is missing", "folder": "is a folder where this file belongs", "truncated": "is truncated"}
    message = message[replace]
    for given in (recorded, None):
        with pytest.raises(DamagedFile, match=rf"a\.safetensors {message}"):
            check_size(path, given)


def test_a_folder_written_with_sha256_checksums_is_still_verified(tmp_path):
    """Folders written before XXH3 recorded sha256: each entry is verified with the hash it names."""
    tensors, json_file = tmp_path / "a.safetensors", tmp_path / "b.json"
    save_tensors_checked({"x": torch.arange(100.0)}, tensors)
    write_json_checked({"k": [1, 2]}, json_file)
    for path in (tensors, json_file):
        data = path.read_bytes()
        recorded_as(path, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    assert is_intact(tensors) and is_intact(json_file)
    assert torch.equal(load_tensors_checked(tensors)[0]["x"], torch.arange(100.0))
    assert read_json_checked(json_file) == {"k": [1, 2]}
    flip_last_byte(tensors)
    with pytest.raises(DamagedFile, match=r"a\.safetensors is damaged: its sha256 differs"):
        load_tensors_checked(tensors)
    flip_last_byte(json_file)
    with pytest.raises(DamagedFile, match=r"b\.json is damaged: its sha256 differs"):
        read_json_checked(json_file)


def test_an_entry_naming_no_known_hash_is_no_checksum(tmp_path):
    path = tmp_path / "a.json"
    write_json_checked({"k": 1}, path)
    recorded_as(path, {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size})
    with pytest.raises(DamagedFile, match=r"a\.json has no checksum"):
        read_json_checked(path)
    with pytest.raises(KeyError, match="names none of"):
        checksum_of({"md5": "0", "bytes": 1})


def test_an_optimizer_states_fingerprint_names_the_hash_it_was_recorded_with(tmp_path):
    """An index's settings record the state's fingerprint: a state saved with a sha256 entry keeps the
    fingerprint it had (so those indexes are not refused as made with another state)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_adam_state(optimizer, torch.nn.Sequential(model), tmp_path)
    data = (tmp_path / OPTIMIZER_STATE_FILE).read_bytes()
    fresh = AdamState.fingerprint(tmp_path)
    assert fresh == {"checkpoint": str(tmp_path.resolve()), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert AdamState.load(tmp_path).checksum == fresh["xxh3_128"]
    recorded_as(tmp_path / OPTIMIZER_STATE_FILE, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    old = {"checkpoint": str(tmp_path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    assert AdamState.fingerprint(tmp_path) == old
    assert AdamState.load(tmp_path).checksum == old["sha256"]


SRC = Path(wherefrom.__file__).resolve().parents[1]
UPDATER = """
import sys
from wherefrom.core.store import update_json
path, name = sys.argv[1], sys.argv[2]
for i in range(60):
    update_json(path, lambda saved, i=i: saved.setdefault("replay", {}).update({f"{name}{i}": i}))
"""


def test_processes_updating_one_json_file_at_once_keep_every_change(tmp_path):
    """Commands record themselves in one folder's config.json by read-modify-write: two at once lost each other's
    records (each wrote back its own copy). Under update_json's file lock every one of 2 x 60 updates is kept."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kept": True}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    writers = [
        subprocess.Popen([sys.executable, "-c", UPDATER, str(path), name], env=env, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    errors = [p.communicate()[1] for p in writers]
    assert [p.returncode for p in writers] == [0, 0], errors
    saved = json.loads(path.read_text())
    assert saved["kept"] is True
    assert saved["replay"] == {f"{name}{i}": i for name in "ab" for i in range(60)}


def test_update_json_names_a_file_that_is_not_a_json_object_and_leaves_it(tmp_path):
    for text in ("{not json", "[1, 2]", "\xff\xfe"):
        path = tmp_path / "config.json"
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=f"{path} (is not valid JSON|does not hold a JSON object)"):
            update_json(path, lambda saved: saved.update({"x": 1}))
        assert path.read_bytes() == text.encode("latin-1")
    update_json(tmp_path / "new.json", lambda saved: saved.update({"x": 1}))
    assert json.loads((tmp_path / "new.json").read_text()) == {"x": 1}
    update_json(tmp_path / "new.json", lambda saved: False)  # no change: not rewritten
    assert json.loads((tmp_path / "new.json").read_text()) == {"x": 1}


def test_a_checked_file_is_on_the_disk_before_its_checksum_is_recorded(tmp_path, monkeypatch):
    """A shard's bytes were never flushed while its checksum (and later the index's marker) was: after an OS crash
    the marker could outlive the shard's bytes. Now the temporary file is flushed, renamed, and its folder flushed,
    all before the checksum is written."""
    from wherefrom.core.store import save_tensors_checked

    events = []
    fsync, replace = os.fsync, os.replace

    def flushed(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def renamed(source, target):
        events.append(("replace", str(target)))
        return replace(source, target)

    monkeypatch.setattr(os, "fsync", flushed)
    monkeypatch.setattr(os, "replace", renamed)
    shard = tmp_path / "shard.safetensors"
    save_tensors_checked({"x": torch.ones(3)}, shard)
    checksums = str(tmp_path / "checksums.json")
    (first_fsync,) = (i for i, (kind, name) in enumerate(events) if kind == "fsync" and ".shard.safetensors" in name)
    shard_renamed = events.index(("replace", str(shard)))
    folder_flushed = events.index(("fsync", str(tmp_path)), shard_renamed)
    manifest_renamed = events.index(("replace", checksums))
    assert first_fsync < shard_renamed < folder_flushed < manifest_renamed


def test_a_forgotten_file_killed_midway_is_missing_not_unchecked(tmp_path, monkeypatch):
    """``forget_file`` removes the file before its checksum entry: a kill in between leaves a missing file (not yet
    written, what a resumed job rewrites), where the other order left a file without a checksum, which readers
    refuse as damaged (a finished index's marker did so until ``index`` was rerun)."""
    from wherefrom.core import store
    from wherefrom.core.store import forget_file, write_json_checked

    marker = tmp_path / "index.json"
    write_json_checked({"rows": 3}, marker)

    class Killed(BaseException):
        pass

    def killed(*_args):
        raise Killed

    monkeypatch.setattr(store, "_set_checksum", killed)
    with pytest.raises(Killed):
        forget_file(marker)
    assert not marker.exists()


def test_every_atomic_write_names_its_file_when_it_cannot_be_written(tmp_path, monkeypatch):
    """A JSON or text write that failed raised the OS's error naming the temporary file in its private folder, or
    nothing (a disk filling on ``settings.json`` before any index shard: a bare ``[Errno 28]``); now every atomic
    write names the file it was writing. A folder where a file belongs is refused naming it, not deleted."""
    limited = f"""
import resource, signal
from wherefrom.core.store import atomic_write_json, write_json_checked
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000, 1_000))
for write in (atomic_write_json, write_json_checked):
    try:
        write({{"rows": list(range(1_000))}}, {str(tmp_path / "settings.json")!r})
    except OSError as error:
        print("OSError:", error)
"""
    done = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    named = f"OSError: could not write {tmp_path / 'settings.json'}: File too large"
    assert done.stdout.splitlines() == [named, named], done.stdout
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written, nothing left beside it

    folder = tmp_path / "checksums.json"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=rf"^could not write {folder}: Is a directory$") as raised:
        atomic_write_text("{}", folder)
    assert raised.value.errno == errno.EISDIR  # the kind and errno survive the renaming, for callers catching them

    def vanished(*args):  # the folder deleted mid-write: studies commands catch FileNotFoundError
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", args[0])

    monkeypatch.setattr(os, "replace", vanished)
    with pytest.raises(FileNotFoundError, match=rf"^could not write {tmp_path / 'a.json'}: No such file") as raised:
        atomic_write_text("{}", tmp_path / "a.json")
    assert raised.value.errno == errno.ENOENT
    monkeypatch.undo()
    (tmp_path / "kept").mkdir()
    with pytest.raises(
        IsADirectoryError, match=rf"a folder is where this file belongs; move it away.*{tmp_path / 'kept'}"
    ):
        forget_file(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


def test_a_full_disk_is_an_oserror_naming_the_file_and_a_killed_writes_leftovers_are_removed(tmp_path):
    """Two faults of real safetensors writes, in child processes: (1) under a file size limit (EFBIG, as a full disk
    gives ENOSPC) safetensors raised its own ``SafetensorError``, which the index writer (it keeps finished shards
    on an ``OSError``) and the CLI's one-line errors missed: a traceback, exit 1; (2) safetensors writes through a
    ``.tmpXXXXXX`` file of its own, which a kill -9 left in the folder for good (the next writer removed only
    ``.partial-`` names). Now it writes inside a private ``.<name>.partial-XXXX/`` folder that the next writer
    removes."""
    from wherefrom.core.store import writer_lock

    limited = f"""
import resource, signal, torch
from wherefrom.core.store import save_tensors_checked
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_tensors_checked({{"x": torch.ones(10_000)}}, {str(tmp_path / "big.safetensors")!r})
except OSError as error:
    print("OSError:", error)
"""
    done = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OSError: could not write {tmp_path / 'big.safetensors'}: "), done.stdout
    assert "File too large" in done.stdout and not (tmp_path / "big.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left beside it

    killed = f"""
import os, signal, torch
import safetensors.torch
from wherefrom.core import store
real = safetensors.torch.save_file
def save_file(tensors, path, metadata=None):
    real(tensors, os.path.join(os.path.dirname(path), ".tmpAbC123"))  # safetensors' own temporary file
    os.kill(os.getpid(), signal.SIGKILL)
store.save_file = save_file
store.save_tensors_checked({{"x": torch.ones(3)}}, {str(tmp_path / "shard.safetensors")!r})
"""
    done = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    left = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")]
    assert any(name.startswith(".shard.safetensors.partial-") and name.endswith("/.tmpAbC123") for name in left), left
    with writer_lock(tmp_path):  # the next writer
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".wherefrom.lock"]


def test_a_folder_replaced_in_a_failed_rename_keeps_its_earlier_copy(tmp_path, monkeypatch):
    """atomic_write_dir moved the earlier folder aside, and when the rename of the new one failed (ENOSPC on a
    directory rename) it deleted the new one and left the earlier one under .old-, which the next writer lock
    clears away: both copies lost. Now the earlier folder is moved back."""
    target = tmp_path / "state"
    atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("earlier"))
    replace = os.replace

    def full_disk(source, destination):
        if Path(destination) == target and ".partial" in str(source):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["state"]


@pytest.mark.parametrize("name", ["settings.json", "checksums.json"])
def test_a_folder_where_a_settings_file_belongs_is_named_not_emptied(tmp_path, name):
    """A job folder without an intact settings.json is emptied and started again; a folder in the place of
    settings.json (or checksums.json) was emptied with it, the user's files inside included."""
    job = tmp_path / "index"
    (job / name).mkdir(parents=True)
    (job / name / "keep.txt").write_text("my notes")
    (job / "shard-00000.safetensors").write_bytes(b"rows")
    with pytest.raises(IsADirectoryError, match=f"a folder is where this file belongs.*{name}"):
        record_settings(job, {"dim": 4})
    assert (job / name / "keep.txt").read_text() == "my notes" and (job / "shard-00000.safetensors").exists()


def test_a_settings_hint_can_depend_on_what_differs(tmp_path):
    """A callable hint is given the dotted keys that differ (a key one side lacks by its own name), so a caller can
    tell settings a rerun chooses from inputs that changed; a plain hint is said as it is."""
    recorded = {"dtype": "float32", "layout": {"weights": ["a", "b"], "dim": 4}, "state": {"x": 1}}
    record_settings(tmp_path, recorded)
    seen = []
    now = {"dtype": "float16", "layout": {"weights": ["a", "c"], "dim": 4}, "extra": 1}
    with pytest.raises(SettingsMismatch, match=r"dtype: recorded 'float32', now 'float16'.*\. told$"):
        record_settings(tmp_path, now, lambda names: seen.append(names) or "told")
    assert seen == [["dtype", "extra", "layout.weights", "state"]]
    with pytest.raises(SettingsMismatch, match=r"\. plain$"):
        record_settings(tmp_path, now, "plain")
    record_settings(tmp_path, recorded, lambda names: pytest.fail(f"no difference, yet called with {names}"))


def test_a_file_missing_or_a_folder_is_damaged_not_a_traceback(tmp_path):
    """Every checked read names a folder found where its file belongs (it was "missing": the user, seeing it
    there, had no way to tell what was wrong), and a file that is not there stays "missing"."""
    path = tmp_path / "shard-00000.safetensors"
    path.mkdir()
    for read in (check_size, check_file, read_checked):
        with pytest.raises(DamagedFile, match=f"{re.escape(str(path))} is a folder where this file belongs"):
            read(path)
    path.rmdir()
    for read in (check_size, check_file, read_checked):
        with pytest.raises(DamagedFile, match=f"{re.escape(str(path))} is missing"):
            read(path)


def test_a_settings_difference_names_what_differs_without_dumping_long_values():
    """A refusal names the setting that differs; a long value (a whole attribution section gone, two module lists) is
    cut, and two long lists of one length are compared item by item, where the message dumped both in full."""
    from wherefrom.core.store import SHOWN_CHARACTERS, settings_differences

    attribution = {f"setting_{i}": i for i in range(20)}
    blocks = [[f"model.layers.{i}.mlp.down_proj", 64, 16] for i in range(24)]
    changed = [list(b) for b in blocks]
    changed[3][1] = 32
    saved = {"attribution": attribution, "precondition": "fitted", "blocks": blocks, "modules": blocks, "dim": 4}
    now = {"precondition": "none", "blocks": changed, "modules": blocks[:12], "dim": 8}
    differences = settings_differences(saved, now)
    assert differences[0].startswith("attribution: recorded {'setting_0': 0,") and differences[0].endswith(
        "... (20 keys), now absent"
    )
    assert differences[1] == (
        "blocks[3]: recorded ['model.layers.3.mlp.down_proj', 64, 16], now ['model.layers.3.mlp.down_proj', 32, 16]"
    )
    assert differences[2] == "dim: recorded 4, now 8"  # short values in full, as before
    assert differences[3].startswith("modules: recorded [['model.layers.0.mlp.down_proj'") and "(24 items), now" in (
        differences[3]
    ) and differences[3].endswith("(12 items)")  # fmt: skip
    assert differences[4] == "precondition: recorded 'fitted', now 'none'"
    assert all(len(text) < 3 * SHOWN_CHARACTERS for text in differences)
    assert settings_differences({"include": ["mlp"]}, {"include": ["attn"]}) == [
        "include: recorded ['mlp'], now ['attn']"
    ]
    (shifted,) = settings_differences({"blocks": blocks}, {"blocks": blocks[1:] + blocks[:1]})  # every item differs
    assert shifted.startswith("blocks[0]: recorded ['model.layers.0.") and shifted.count("blocks[") == 3
    assert shifted.endswith("(and 21 more items of blocks differ)") and len(shifted) < 4 * SHOWN_CHARACTERS


@pytest.mark.parametrize("record", [None, "[1, 2]", '{"other": 1}', "{"])
def test_replacing_results_whose_record_is_not_the_jobs_names_the_record(tmp_path, record):
    """userA: a ``scores.json`` in ``attribute --out`` whose ``config.json`` is missing, another program's or broken
    was refused as "made from other inputs (attribution: recorded None, now {...}; method: recorded None, ...)", one
    clause per input. Now the record is named as holding none of them; a record of the same inputs loses nothing."""
    result, config = tmp_path / "scores.json", tmp_path / "config.json"
    result.write_text("{}")
    if record is not None:
        config.write_text(record)
    now = {"method": "gradsim", "train": "t.jsonl"}
    with pytest.raises(
        OutputExists,
        match=r"config.json is missing, unreadable or records none of this job's inputs: method, train\); pass",
    ) as e:
        check_replacement([result], config, now)
    assert "recorded None" not in str(e.value)
    config.write_text(json.dumps({"method": "bm25", "train": "t.jsonl"}))
    with pytest.raises(OutputExists, match=r"made from other inputs \(method: recorded 'bm25', now 'gradsim'"):
        check_replacement([result], config, now)
    config.write_text(json.dumps(now))
    assert check_replacement([result], config, now) is True
