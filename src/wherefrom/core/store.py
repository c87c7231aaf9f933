"""Atomic writes and run-directory bookkeeping: the shared mechanism of every resumable job.

Every file wherefrom writes goes to a temporary name in the same folder (``.<name>.partial-XXXX``)
and is renamed into place, so an interrupted job never leaves a half-written file under its real
name: a rerun sees either the finished file or nothing, and resumes from there.

**Contract of a resumable job** (``fit`` and ``index`` follow it; bench, ground truth, tune and the
analysis caches can call the same functions):

1. Hold the folder's writer lock for the whole job: ``with writer_lock(folder): ...``. A second
   writer gets :class:`FolderLocked` at once (naming the folder and the holder's pid), never a
   wait; readers take no lock. Acquiring it removes the ``.partial-`` leftovers of killed writers
   under the folder (:func:`cleanup_partials`).
2. Record the settings that decide the job's bytes *before* the first result file:
   ``record_settings(job_folder, settings)`` writes ``settings.json`` the first time and compares
   on every later run: different values raise :class:`SettingsMismatch` naming each setting with
   both values; a folder whose settings are missing or damaged (older version, bit rot) is emptied
   and started afresh, so a resumed job never mixes parts made under different settings.
3. Write each result with :func:`save_tensors_checked` / :func:`write_json_checked`: the file is
   written atomically, then its checksum (:data:`CHECKSUM`) and size go into the folder's ``checksums.json``. A file
   is finished only once its checksum is recorded (:func:`is_intact`); a resuming writer redoes
   every file that is not intact (missing, unrecorded, truncated or changed).
4. Read with :func:`load_tensors_checked` / :func:`read_json_checked`: the bytes are hashed as they
   are read and a mismatch raises :class:`DamagedFile` naming the file, so damaged data is never used.
5. Write a small "complete" marker last (e.g. ``index.json``) with :func:`write_json_checked`.
6. Per-stage results of a long computation can go through :class:`StageFolder` (same rules).

``checksums.json`` is read-modified-written under its own file lock (``.checksums.json.lock``), so
several processes may write *different* files of one folder (e.g. the ranks of a distributed index
build); the writer lock of step 1 still keeps two jobs from writing the same files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import xxhash
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

PARTIAL = ".partial-"
"""Infix of the temporary names: ``.<name>.partial-XXXX`` (a crash may leave one behind)."""

OLD = ".old-"
"""Infix of a folder moved aside while its replacement is renamed in: ``.<name>.old-XXXX`` (:func:`atomic_write_dir`;
a crash may leave one behind)."""


def _fsync(path: str | Path) -> None:
    """Flush ``path`` (a file, or a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restated(error: OSError, message: str) -> OSError:
    """``error`` with the text ``message``, of the same built-in kind (``FileNotFoundError``, ``PermissionError``,
    ...) and ``errno``, so that callers catching a kind still catch it (raise it ``from error``)."""
    kind = type(error) if type(error).__module__ == "builtins" else OSError
    told = kind(message)
    told.errno = error.errno
    return told


def _atomic_replace(path: Path, write) -> None:
    """``write(tmp)`` a file in a private folder beside ``path`` (``.<name>.partial-XXXX/``), flush it to the disk,
    rename it to ``path`` and flush the folder: when this returns, ``path``'s bytes and name survive an OS crash or
    power cut, so a checksum recorded after it (:func:`record_checksum`) never names bytes the disk does not hold
    (kill -9 alone cannot lose them). Whatever ``write`` leaves beside ``tmp`` when killed (safetensors writes
    through a temporary file of its own) is inside that folder, which :func:`cleanup_partials` removes.

    Raises ``OSError`` naming ``path`` when it cannot be written (a full disk, a file size limit, no permission,
    a folder in its place): the error of the failed step names a temporary file, or nothing. The raised error keeps
    the failed step's kind and ``errno`` (a ``PermissionError`` stays one)."""
    private = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private = tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
        tmp = os.path.join(private, path.name)
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as error:
        raise restated(error, f"could not write {path}: {error.strerror or error}") from error
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def replaceable(path: Path, mark: str, within: int = 4096) -> bool:
    """Whether a job may replace the file ``path``: it is missing, empty, not readable (left to the write, which
    names it), or ``mark`` (a regular expression, ``re.search``) matches its first ``within`` bytes (as UTF-8): a
    file of the kind the job writes, which it can make again. Else it is someone else's file, which the job would
    destroy (``report --out notes.txt`` replaced it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(within)
    except OSError:
        return True
    return not head or re.search(mark, head.decode("utf-8", errors="replace")) is not None


def file_in_the_way(folder: Path, value: Path) -> str | None:
    """What stops ``folder`` (made where missing) from holding ``value``: ``"is a file, not a folder"`` when ``value``
    itself is that file, ``"<path> is a file, not a folder"`` for a file above it; ``None`` when nothing does. The
    nearest path that exists decides; under a folder that cannot be searched ``os.path`` says False, not
    ``PermissionError``, and that is left to the writer."""
    for path in (folder, *folder.parents):
        if os.path.exists(path):
            if os.path.isdir(path):
                return None
            return "is a file, not a folder" if path == value else f"{path} is a file, not a folder"
    return None


def atomic_write_text(text: str, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_replace(Path(path), write)


def atomic_write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(tmp)`` under a temporary name, then rename it to ``target``.

    An existing ``target`` is moved aside first (``.<name>.old-XXXX``) and deleted after the rename; where the
    rename fails (``OSError``, raised), it is moved back, so ``target`` is the earlier folder, never none.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        fill(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD}", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # the next writer_lock would clear the .old- folder away: both copies lost
                os.replace(old / target.name, target)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf: "undefined", e.g. a correlation over one seed)
    replaced by ``None``, so the JSON written is strict (``json.dumps`` would write ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_form(value: Any) -> Any:
    """``value`` as it reads back from JSON (:func:`strict_json`; tuples become lists, other objects ``str``): the
    form in which recorded settings and cache keys are compared."""
    return json.loads(json.dumps(strict_json(value), default=str))


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented, key-sorted strict JSON (:func:`strict_json`; other objects as ``str``)."""
    atomic_write_text(json.dumps(strict_json(obj), indent=2, sort_keys=True, default=str) + "\n", path)


def update_json(
    path: Path,
    change: Callable[[dict[str, Any]], bool | None],
    read: Callable[[Path], dict[str, Any]] | None = None,
) -> None:
    """Read the JSON object at ``path``, let ``change`` update it in place, and write it back
    (:func:`atomic_write_json`; not when ``change`` returns ``False``), all under a file lock beside it
    (``.<name>.lock``): processes that update one file at once (two commands recording themselves in one
    folder's ``config.json``, the ranks of a distributed build recording checksums) never lose each other's
    changes, as they did when each read the file, changed its copy and wrote it back.

    A missing file reads as ``{}``. ``read``: how the file is read (default: :func:`read_json_object`, which
    raises ``ValueError`` naming ``path`` when it is not a JSON object). The folder must exist."""
    path = Path(path)
    with FileLock(path.parent / f".{path.name}.lock"):
        if read is not None:
            saved = read(path)
        else:
            saved = read_json_object(path) if path.exists() else {}
        if change(saved) is not False:
            atomic_write_json(saved, path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``. Raises ``FileNotFoundError`` when it is missing and ``ValueError`` naming
    ``path`` when it is not valid UTF-8 JSON or not an object."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); repair or delete it") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} does not hold a JSON object; repair or delete it")
    return saved


def read_keyed_json(path: Path, key: Any) -> dict[str, Any] | None:
    """The JSON object at ``path`` if its ``"key"`` entry equals ``key``, else ``None``.

    The cache check of resumable jobs: a missing or unreadable file, or one written with other
    settings, is ``None``. ``key`` is compared in its JSON form (tuples become lists, other objects
    ``str``), the form :func:`atomic_write_json` stored.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != json_form(key):
        return None
    return saved


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors at ``path`` atomically (values must be contiguous CPU tensors).

    Raises ``OSError`` naming ``path`` when the bytes cannot be written (a full disk, a file size limit):
    safetensors reports those as its own ``SafetensorError``, which callers that keep finished work on an
    ``OSError`` (and the CLI's one-line errors) did not catch."""

    def write(tmp: str) -> None:
        try:
            save_file(dict(tensors), tmp, metadata=dict(meta) if meta else None)
        except SafetensorError as error:
            raise OSError(str(error)) from error

    _atomic_replace(Path(path), write)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers a run produces."""
    versions = {"python": sys.version.split()[0]}
    for name in ("wherefrom", "torch", "transformers", "peft", "safetensors", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


# --- integrity, settings and locking (the resumable-job contract of the module docstring) ---------
CHECKSUMS = "checksums.json"
"""Per-folder checksum manifest: ``{"files": {name: {CHECKSUM: hex, "bytes": size}}}``."""
CHECKSUM = "xxh3_128"
"""The hash recorded for every file written: XXH3 with 128 bits (the ``xxhash`` package), a non-cryptographic
checksum that detects damage (a flipped, cut or rewritten file: two different contents agree with probability
2^-128), not tampering. Read through files it runs at about 11 GB/s on this CPU against 1.45 GB/s for sha256,
so hashing the shards of a store is no longer most of a query's time (``benchmarks/results/store_scan.md``)."""
HASHES: dict[str, Callable[..., Any]] = {CHECKSUM: xxhash.xxh3_128, "sha256": hashlib.sha256}
"""The hashes a recorded entry may name: :data:`CHECKSUM`, and ``sha256``, which wherefrom recorded before
(an entry is verified with the hash it names, so folders written then are read as they are)."""
SETTINGS = "settings.json"
"""A job folder's settings, recorded before its first result (:func:`record_settings`)."""
LOCK = ".wherefrom.lock"
"""The writer lock file of a folder; ``.wherefrom.lock.json`` beside it names the holder."""


class StoreError(RuntimeError):
    """A stored folder cannot be used as it is (locked, damaged, or made with other settings)."""


class FolderLocked(StoreError):
    """Another process holds the folder's writer lock."""


class DamagedFile(StoreError):
    """A stored file is missing, truncated, changed since it was written, or has no recorded checksum."""


class SettingsMismatch(StoreError):
    """A job folder was started with other settings than the current run's."""


class OutputExists(StoreError):
    """A job would replace the finished results of an earlier job; the message names them and how to allow it."""


OVERWRITE_ALLOW = "overwrite=True (--overwrite on the command line)"
"""How a refusal to replace earlier results says to permit it, by default: the Python argument and the command's flag
(a study's Python caller was told "pass --overwrite")."""


def refuse_overwrite(paths: Collection[Path], allow: str = OVERWRITE_ALLOW, why: str = "") -> None:
    """Raise :class:`OutputExists` naming the existing ones among ``paths`` (earlier results a job is about to
    replace), ``why`` (e.g. which inputs differ) and ``allow`` (the caller's way to permit it, e.g.
    ``--overwrite``). Call it before any long work, so nothing is computed only to be refused."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        raise OutputExists(
            f"earlier results would be overwritten: {', '.join(existing)}{why}; pass {allow} to replace them"
        )


def check_replacement(
    results: Collection[Path],
    record: Path,
    now: Mapping[str, Any],
    allow: str = OVERWRITE_ALLOW,
    recorded_as: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> bool:
    """Whether a job about to write ``results`` replaces earlier ones: ``False`` when none of them exists;
    ``True`` when they exist and were made from the same inputs (the JSON file ``record`` holds every
    key of ``now`` with the same value: recomputing them loses nothing); else :class:`OutputExists`
    naming the existing results, each input that differs with both values, and ``allow`` (the caller's
    way to permit it, e.g. ``--overwrite``). ``recorded_as``: the record in the form ``now`` takes (e.g. an older
    version's options given the defaults it left out; compared in JSON form too). A ``record`` that is missing,
    unreadable or names none of ``now``'s keys is named so (userA: another program's ``scores.json`` read
    "attribution: recorded None, now {...}" for every input). Call it before any long work."""
    if not any(Path(p).exists() for p in results):
        return False
    try:
        saved = read_json_object(Path(record))
    except (OSError, ValueError):  # missing, unreadable or not an object: it records nothing
        saved = {}
    recorded, empty = (json_form({key: form.get(key) for key in now}) for form in map(recorded_as or dict, (saved, {})))
    if recorded == empty and recorded != json_form(dict(now)):  # the record tells nothing an empty one does not
        refuse_overwrite(
            results, allow, f" ({record} is missing, unreadable or records none of this job's inputs: {', '.join(now)})"
        )
    refuse_other_inputs(results, recorded, now, allow)
    return True


def refuse_other_inputs(
    results: Collection[Path],
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    allow: str = OVERWRITE_ALLOW,
    prefix: str = "",
) -> None:
    """:func:`refuse_overwrite` of ``results`` when the inputs they were made from (``saved``) differ from ``now``
    (compared in JSON form), naming each differing input (``prefix.key``) with both values."""
    differences = settings_differences(saved, json_form(dict(now)), prefix)
    if differences:
        refuse_overwrite(results, allow, f", made from other inputs ({'; '.join(differences)})")


def checksum_of(entry: Mapping[str, Any]) -> tuple[str, str]:
    """``(hash name, hex digest)`` of a recorded entry (``{name: hex, "bytes": size}``, name one of :data:`HASHES`).

    Raises ``KeyError`` for an entry that names none of them."""
    for name in HASHES:
        if name in entry:
            return name, entry[name]
    raise KeyError(f"a checksum entry names none of {sorted(HASHES)}: {dict(entry)}")


def _digest(pieces: Iterable[bytes | memoryview], name: str = CHECKSUM) -> str:
    digest = HASHES[name]()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def file_digest(path: Path, name: str = CHECKSUM, head: int = 0) -> tuple[str, int, bytes]:
    """``(hex digest, size, the first head bytes)`` of ``path``, read in 4 MiB pieces (memory: one piece)."""
    digest, size, first = HASHES[name](), 0, b""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            if size < head:
                first += block[: head - size]
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size, first


def _checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """The folder's recorded checksums; an unreadable manifest counts as none recorded."""
    try:
        saved = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
        return dict(saved["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _set_checksum(path: Path, entry: dict[str, Any] | None) -> None:
    # A file lock around the read-modify-write: processes that write different files of one folder
    # (the ranks of a distributed index build) never lose each other's entries.
    if not path.parent.is_dir():  # forgetting a file of a folder not yet made: nothing recorded
        return

    def change(saved: dict[str, Any]) -> bool:
        files = saved["files"]
        if entry is None:
            return files.pop(path.name, None) is not None
        files[path.name] = entry
        return True

    update_json(path.parent / CHECKSUMS, change, lambda manifest: {"files": _checksums(manifest.parent)})


def record_checksum(path: Path) -> None:
    """Hash the finished file ``path`` and record its checksum (:data:`CHECKSUM`) and size in its folder's
    ``checksums.json``."""
    path = Path(path)
    digest, size, _first = file_digest(path)
    _set_checksum(path, {CHECKSUM: digest, "bytes": size})


def recorded_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {hash name, "bytes"}}`` recorded in ``folder``'s ``checksums.json`` (read once; the hash
    name is :data:`CHECKSUM`, or ``sha256`` in folders written before it: :func:`checksum_of`)."""
    return _checksums(Path(folder))


def refuse_folder_in_place(*paths: Path) -> None:
    """Raise ``IsADirectoryError`` naming the first of ``paths`` where a folder is where that file belongs: it is
    not the file, so it is neither deleted nor replaced (it may hold a user's notes)."""
    for path in paths:
        if Path(path).is_dir():
            raise IsADirectoryError(
                errno.EISDIR, "a folder is where this file belongs; move it away and rerun", str(path)
            )


def forget_file(path: Path) -> None:
    """Delete ``path`` (if present) and its checksum entry: the file counts as not yet written. Raises
    ``IsADirectoryError`` naming ``path`` when a folder is in its place (not deleted: it is not this file)."""
    path = Path(path)
    refuse_folder_in_place(path)
    path.unlink(missing_ok=True)  # first: a kill before the entry goes leaves a missing file, not an unchecked one
    _set_checksum(path, None)


Recorded = Mapping[str, Mapping[str, Any]] | None
"""The checks below take their folder's :func:`recorded_checksums` when a caller checks many files of one folder
(the shards of a store: reading the manifest once per file was quadratic in the files); ``None``: read it."""


def _entry(path: Path, recorded: Recorded) -> Mapping[str, Any] | None:
    """``path``'s recorded ``{hash name, "bytes"}`` (from ``recorded``, else its folder's manifest), or ``None``."""
    return (_checksums(path.parent) if recorded is None else recorded).get(path.name)


def _compare(path: Path, size: int, recorded: Recorded = None, digest: Callable[[str], str] | None = None) -> None:
    """Raise :class:`DamagedFile` unless ``path`` has a recorded entry of ``size`` bytes and, where ``digest`` is
    given (``digest(hash name)``: the hex digest of ``path``'s bytes by the hash the entry names), that digest."""
    entry = _entry(path, recorded)
    try:
        name, expected = checksum_of(entry or {})
        written = entry["bytes"]
    except (KeyError, TypeError):
        raise DamagedFile(
            f"{path} has no checksum in {path.parent / CHECKSUMS} (unfinished write, or made by an older wherefrom)"
        ) from None
    if size != written:
        raise DamagedFile(f"{path} is truncated or changed: {size} bytes, {written} were written")
    if digest is not None and digest(name) != expected:
        raise DamagedFile(f"{path} is damaged: its {name} differs from the one recorded when it was written")


def check_bytes(path: Path, data: bytes | Sequence[bytes | memoryview], recorded: Recorded = None) -> None:
    """Raise :class:`DamagedFile` naming ``path`` unless ``data`` (its bytes, read by the caller: whole, or in pieces
    that join to them, e.g. a header and the rows read straight into a buffer) match its recorded checksum and
    size."""
    pieces = [data] if isinstance(data, bytes) else data
    _compare(Path(path), sum(len(piece) for piece in pieces), recorded, lambda name: _digest(pieces, name))


def absent(path: Path) -> DamagedFile:
    """The :class:`DamagedFile` of a file that is not there: ``PATH is missing``, or, where a folder is in its
    place, ``PATH is a folder where this file belongs`` (a reader cannot use it, and no writer deletes it:
    :func:`refuse_folder_in_place`)."""
    if Path(path).is_dir():
        return DamagedFile(f"{path} is a folder where this file belongs; move it away")
    return DamagedFile(f"{path} is missing")


def read_checked(path: Path, recorded: Recorded = None) -> bytes:
    """The bytes of ``path``, read once and checked against the recorded checksum (:class:`DamagedFile` naming a
    missing or damaged file; ``recorded``: the folder's :func:`recorded_checksums`, read by the caller once for
    many files)."""
    try:  # no is_file() first: a file removed between the two (a rebuild beside an unlocked reader) raised
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise absent(path) from None
    check_bytes(path, data, recorded)
    return data


def check_size(path: Path, recorded: Recorded = None) -> None:
    """Raise :class:`DamagedFile` naming ``path`` when it is missing, has no recorded checksum, or its size
    differs from the recorded one (a truncated file); the cheap check, without reading the bytes."""
    path = Path(path)
    try:
        status = os.stat(path)  # one system call (a store of 10^6 rows checks about 4,000 shards when opened)
    except FileNotFoundError:
        status = None
    if status is None or not stat.S_ISREG(status.st_mode):
        raise absent(path)
    _compare(path, status.st_size, recorded)


def check_file(path: Path, recorded: Recorded = None, head: int = 0) -> bytes:
    """Raise :class:`DamagedFile` naming ``path`` unless it matches its recorded checksum (the size first, so a
    truncated file is named without being read). Returns the file's first ``head`` bytes, from the same pass
    that hashed them (fewer when the file is shorter; ``b""`` by default)."""
    path = Path(path)
    if not path.is_file():
        raise absent(path)
    first = b""

    def digest(name: str) -> str:
        nonlocal first
        hexdigest, _size, first = file_digest(path, name, head)
        return hexdigest

    _compare(path, path.stat().st_size, recorded, digest)
    return first


def damage(path: Path, recorded: Recorded = None) -> str | None:
    """Why ``path`` is not a finished, intact file (the :class:`DamagedFile` message), or ``None`` if it is."""
    try:
        check_file(path, recorded)
    except DamagedFile as error:
        return str(error)
    return None


def is_intact(path: Path, recorded: Recorded = None) -> bool:
    """``path`` exists and matches its recorded checksum (it was finished and is unchanged)."""
    return damage(path, recorded) is None


def save_tensors_checked(
    tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str] | None = None
) -> None:
    """:func:`atomic_save_tensors`, then record the file's checksum (the file is finished only then)."""
    atomic_save_tensors(tensors, path, meta)
    record_checksum(path)


def load_tensors_checked(path: Path, recorded: Recorded = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file written by :func:`save_tensors_checked`.

    The bytes are read once and hashed before they are decoded; raises :class:`DamagedFile` naming
    ``path`` when they differ from the recorded checksum (or none is recorded; ``recorded``: the folder's
    :func:`recorded_checksums`, read by the caller once for many files).
    """
    data = read_checked(Path(path), recorded)
    (header_size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    return load_safetensors_bytes(data), dict(meta)


def write_json_checked(obj: Any, path: Path) -> None:
    """:func:`atomic_write_json`, then record the file's checksum."""
    atomic_write_json(obj, path)
    record_checksum(path)


def read_json_checked(path: Path, recorded: Recorded = None) -> Any:
    """The JSON at ``path`` after checking its checksum (:class:`DamagedFile` names the file otherwise;
    ``recorded`` as for :func:`read_checked`)."""
    return json.loads(read_checked(Path(path), recorded).decode("utf-8"))


def intact_json(path: Path) -> Any | None:
    """The JSON at ``path`` when it is intact (:func:`read_json_checked`, one read), else ``None`` (missing or
    damaged)."""
    try:
        return read_json_checked(path)
    except DamagedFile:
        return None


def unchecked_json(path: Path) -> Any | None:
    """The JSON at ``path`` when no checksum is recorded for it (its folder's ``checksums.json`` was lost, or its
    write was cut before the entry): not known to be damaged, nor to be intact. For a hint only (which options
    rebuild a store as it was), never for results. ``None`` when a checksum is recorded (:func:`intact_json` reads
    it), or the file is missing or not JSON."""
    path = Path(path)
    if _entry(path, None) is not None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def settings_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """``"key: recorded X, now Y"`` for every (dotted) key whose value differs between two settings dicts."""
    return [text for _name, text in differing_settings(saved, now, prefix)]


SHOWN_CHARACTERS = 100
"""A value shown in a settings difference is cut to this many characters (a module list runs to thousands)."""
SHOWN_ITEMS = 3
"""Differing items of two long lists shown in a settings difference; the rest are counted."""


def shown_setting(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARACTERS` with ``...`` and the count of its items or keys when longer."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    count = (
        f" ({len(value)} {'keys' if isinstance(value, dict) else 'items'})" if isinstance(value, dict | list) else ""
    )
    return f"{text[:SHOWN_CHARACTERS]}...{count}"


def differing_settings(saved: Any, now: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, "key: recorded X, now Y")`` for every key whose value differs between two settings dicts
    (a key one of them lacks included), in key order. Values are shown by :func:`shown_setting`; two long lists of
    one length (a module list) are compared item by item (``blocks[3]: ...``, the first :data:`SHOWN_ITEMS` of
    them), keyed by the list's own key."""
    name = prefix or "value"
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            inner = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append((inner, f"{inner}: not recorded, now {shown_setting(now[key])}"))
            elif key not in now:
                out.append((inner, f"{inner}: recorded {shown_setting(saved[key])}, now absent"))
            else:
                out += differing_settings(saved[key], now[key], inner)
        return out
    if saved == now:
        return []
    if (
        isinstance(saved, list)
        and isinstance(now, list)
        and len(saved) == len(now)
        and len(repr(saved)) > SHOWN_CHARACTERS
    ):
        items = [
            text for i, (a, b) in enumerate(zip(saved, now)) for _item, text in differing_settings(a, b, f"{name}[{i}]")
        ]
        more = f" (and {len(items) - SHOWN_ITEMS} more items of {name} differ)" if len(items) > SHOWN_ITEMS else ""
        return [(name, f"{'; '.join(items[:SHOWN_ITEMS])}{more}")]  # keyed by the list's name
    return [(name, f"{name}: recorded {shown_setting(saved)}, now {shown_setting(now)}")]


def with_defaults_recorded(saved: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (settings read back from JSON) with what it does not record taken from ``defaults``: per top-level
    section that ``saved`` holds as a dict, every key missing from it at the default, recursively into
    sub-dicts both hold (e.g. a strategy's options); sections ``saved`` lacks stay out. A default that is not a dict
    is what a missing top-level key means (a raw gradient index records no ``precondition`` unless it is ``adam``)."""

    def filled(recorded: dict[str, Any], known: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(recorded)
        for key, value in known.items():
            if key not in out:
                out[key] = value
            elif isinstance(out[key], dict) and isinstance(value, dict):
                out[key] = filled(out[key], value)
        return out

    out = dict(saved)
    for section, values in json_form(dict(defaults)).items():
        if isinstance(values, dict):
            if isinstance(out.get(section), dict):
                out[section] = filled(out[section], values)
        elif section not in out:
            out[section] = values
    return out


def recorded_differences(
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    ignore: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """:func:`differing_settings` of a job's recorded ``saved`` settings and the settings ``now`` (in their JSON
    form), the missing keys of each taken from ``defaults`` (:func:`with_defaults_recorded`), top-level keys in
    ``ignore`` left out."""
    saved = with_defaults_recorded(saved, defaults or {})
    now = with_defaults_recorded(json_form(dict(now)), defaults or {})
    return differing_settings(
        {k: v for k, v in saved.items() if k not in ignore}, {k: v for k, v in now.items() if k not in ignore}
    )


def record_settings(
    folder: Path,
    settings: Mapping[str, Any],
    hint: str | Callable[[list[str]], str] = "",
    ignore: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Record ``settings`` in ``folder/settings.json`` before the job's first result, or compare them.

    ``folder`` belongs to the job alone. Values are compared in their JSON form; top-level keys in
    ``ignore`` are not compared (e.g. the device, when a finished result is only being reused and
    no part of it is computed again). ``defaults``: per top-level section (a dict of settings), the values
    that keys missing from the recorded section take, recursively (:func:`with_defaults_recorded`: settings
    added since the folder was started, whose defaults do what the older version did, and options recorded
    as given, an option left out being at its default); a default that is not a dict is what a missing top-level
    key means, on either side (the recorded settings and ``settings``). Returns notes of what was discarded (empty when nothing was).
    Raises :class:`SettingsMismatch` naming every differing setting with the recorded and the
    current value (``hint`` says what to do; a callable is given the dotted keys that differ, e.g. to tell
    settings a rerun can choose from inputs that changed). A folder with results but no intact ``settings.json``
    (made by an older version, or damaged) is emptied and started afresh: its results' settings
    are unknown; but where a folder is in the place of ``settings.json`` or ``checksums.json``, nothing is
    emptied and ``IsADirectoryError`` names it (:func:`refuse_folder_in_place`).
    """
    folder = Path(folder)
    now = json_form(dict(settings))
    path = folder / SETTINGS
    notes = []
    try:
        saved = read_json_checked(path)
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: not a JSON object")
    except (DamagedFile, ValueError) as error:
        # a folder there is not the job's file: not emptied with the rest
        refuse_folder_in_place(folder / SETTINGS, folder / CHECKSUMS)
        leftovers = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if leftovers:
            notes.append(f"{folder}: settings unknown ({error}); discarded {len(leftovers)} entries and started again")
            shutil.rmtree(folder)
        write_json_checked(now, path)
        return notes
    differences = recorded_differences(saved, now, ignore, defaults)
    if differences:
        said = hint([name for name, _text in differences]) if callable(hint) else hint
        raise SettingsMismatch(
            f"{folder} was started with other settings ({'; '.join(text for _name, text in differences)}). "
            + (said or f"Rerun with the recorded settings, or delete {folder} to start again with the new ones.")
        )
    return notes


def cleanup_partials(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders of killed writers under ``folder`` (names
    ``.*.partial-*`` and ``.*.old-*``); returns them. Call it only while holding the writer lock, or with
    ``name`` (only the leftovers of that file's writes, directly in ``folder``) while holding
    :func:`cache_save_lock` of that file."""
    if name is not None:
        found = list(Path(folder).glob(f".{name}{PARTIAL}*"))
    else:
        found = [p for p in Path(folder).rglob(".*") if PARTIAL in p.name or OLD in p.name]
    for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


@contextmanager
def cache_save_lock(path: Path) -> Iterator[bool]:
    """The lock of the saves of one cache file that readers write beside a store without its folder's writer lock
    (a FAISS index): yields ``True`` once held, after removing the leftovers of killed saves of that file
    (:func:`cleanup_partials` with its name: a kill -9 mid-save left the whole index's size behind for good), or
    ``False`` at once when another process is saving it (the caller skips its own save)."""
    path = Path(path)
    lock = FileLock(path.parent / f".{path.name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        cleanup_partials(path.parent, path.name)
        yield True
    finally:
        lock.release()


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s writer lock (``folder/.wherefrom.lock``) for the block; reentrant in one process.

    Raises :class:`FolderLocked` at once, naming the folder and the holder's pid and command, when
    another process holds it (it never waits). On acquiring, writes the holder's description and
    removes the leftovers of killed writers (:func:`cleanup_partials`). The lock is an OS file lock,
    so a killed holder releases it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0, is_singleton=True)
    holder = folder / f"{LOCK}.json"
    outermost = not lock.is_locked
    try:
        lock.acquire()
    except Timeout:
        by = "another process"
        # The holder writes its description just after acquiring: give it a moment before naming no one.
        for _ in range(20):
            who = _holder(folder)
            if who is not None:
                by = who
                break
            time.sleep(0.1)
        raise FolderLocked(
            f"{folder} is being written by {by}; wait until it finishes, or use another folder"
        ) from None
    try:
        if outermost:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
            # "hold": this hold's own token, so that a new hold differs from the last one (holder_guard)
            described = {"pid": os.getpid(), "command": " ".join(sys.argv), "since": stamp, "hold": uuid.uuid4().hex}
            atomic_write_json(described, holder)
            cleanup_partials(folder)
        yield
    finally:
        if outermost:  # the description exists only while the lock is held (no stale holder named)
            holder.unlink(missing_ok=True)
        lock.release()


def _holder(folder: Path, token: bool = False) -> str | None:
    """Who holds ``folder``'s writer lock, as :func:`writer_lock` described it: ``pid N (command, since time)``, with
    the hold's own token when ``token``; ``None`` while no readable description is there."""
    try:
        who = json.loads((folder / f"{LOCK}.json").read_text(encoding="utf-8"))
        described = f"pid {who['pid']} ({who['command']}, since {who['since']})"
        return f"{described} [{who['hold']}]" if token else described
    except (OSError, ValueError, KeyError, TypeError):
        return None


def writing_now(folder: Path) -> str | None:
    """The holder of ``folder``'s writer lock as its description names it (``pid N (command, since time)``) while
    that process is alive, else ``None``; read without taking the lock (a reader's try would make a writer starting
    that instant fail as locked), so it is for what a message says, never for a decision. A description left by a
    killed holder names a process that is gone (or, rarely, one that took its pid since)."""
    who = _holder(Path(folder))
    if who is None:
        return None
    try:
        pid = int(who.split()[1])
        if pid == os.getpid():  # this process's own hold (`scores` reads under it): no one else writes
            return None
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return None
    except PermissionError:  # alive, another user's
        pass
    return who


def holder_guard(folder: Path) -> Callable[[], None]:
    """A check that ``folder``'s writer lock is still held as it is now (the description :func:`writer_lock` wrote
    on acquiring: pid, command, time). Call it under a hold of the lock (under ``torch.distributed``, on every rank
    while rank 0 holds it); the returned function raises :class:`FolderLocked`, naming the new holder, once
    another process took the lock, or the hold ended: the ranks of a ``torchrun`` whose rank 0 died (and with it
    the lock) stop before their next write instead of writing into the folder of a newer writer (an orphaned rank
    removed the completion marker of an index a rerun had finished)."""
    folder = Path(folder)
    held = _holder(folder, token=True)

    def check() -> None:
        now = _holder(folder, token=True)
        if now != held:
            by = f"now held by {_holder(folder)}" if now is not None else "its hold ended"
            raise FolderLocked(
                f"{folder}'s writer lock changed hands while this process wrote it for an earlier writer ({by}); "
                "it stops without writing more: the newer writer finishes the work"
            )

    return check


class StageFolder:
    """Persisted stages of a long computation (kronfluence-style): ``<folder>/<stage>.safetensors``.

    Each stage is a dict of tensors plus a JSON-able ``info`` dict, written with
    :func:`save_tensors_checked`; :meth:`load` returns ``None`` for a stage that is missing or not
    intact (it is then recomputed), so a killed job resumes after its last finished stage. The
    caller holds the writer lock and records the settings of an enclosing folder first.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage.replace(' ', '-')}.safetensors"

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        try:
            tensors, meta = load_tensors_checked(self.path(stage))
        except DamagedFile:
            return None
        return tensors, json.loads(meta.get("info", "{}"))

    def save(self, stage: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        contiguous, written = {}, set()
        for k, v in tensors.items():  # memory under several names (shared covariance sums) is written under each
            v = v.detach().contiguous().cpu()
            memory = v.untyped_storage().data_ptr()
            contiguous[k] = v.clone() if memory and memory in written else v
            written.add(memory)
        save_tensors_checked(contiguous, self.path(stage), meta={"info": json.dumps(strict_json(dict(info)))})

    def clear(self) -> None:
        """Delete every stage (after the final result is recorded)."""
        shutil.rmtree(self.folder, ignore_errors=True)
