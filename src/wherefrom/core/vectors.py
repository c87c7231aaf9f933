"""A sharded store of float rows (one vector per training row), written resumably and read shard by shard.

Layout of a store folder (every file atomic and checksummed, :mod:`wherefrom.core.store`)::

    settings.json              the manifest, written FIRST: the caller's settings (model, tokenizer,
                               module selection, projection, ... fingerprints) plus ``dim``, ``dtype``,
                               ``shard_size``, ``rows`` and ``ids_sha256``
    ids.json                   the row ids in row order (written second)
    shard-NNNNN.safetensors    rows ``[k * shard_size, (k + 1) * shard_size)``: tensor ``rows``
                               ``(n_k, dim)`` in the stored dtype; metadata ``ids`` (the shard's ids)
    checksums.json             checksum (xxh3_128) and size of each file above, recorded after it is written
    index.json                 the completion marker, written LAST: ``{shards, rows, dtype, shard_size}``

A shard's bytes depend only on its rows, dtype and ids, so a store built in one process, resumed after
a kill, or built by several processes (``rank``/``world``: process ``rank`` writes the shards ``k`` with
``k % world == rank``, then one process calls :meth:`VectorStoreWriter.finalize`) is the same, byte for
byte. Scores against a store are inner products ``query_vec @ row`` (what the rows mean, and the sign
convention, belong to the producer that wrote them).

Resume: a finished, intact shard is kept; a missing, unfinished, truncated or changed one is (re)built,
never read (:attr:`VectorStoreWriter.notices` names the damaged ones); a rerun whose settings differ from
the manifest is refused (:class:`wherefrom.core.store.SettingsMismatch` names each setting with both
values). A failed write (e.g. a full disk: ``OSError``) leaves no file under a shard's name and keeps
the finished shards, so the same command resumes once space is freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes

from wherefrom.core.store import (
    DamagedFile,
    SettingsMismatch,
    StoreError,
    check_bytes,
    check_file,
    check_size,
    forget_file,
    intact_json,
    is_intact,
    json_form,
    read_checked,
    read_json_checked,
    record_settings,
    recorded_checksums,
    refuse_folder_in_place,
    restated,
    save_tensors_checked,
    settings_differences,
    with_defaults_recorded,
    write_json_checked,
)

__all__ = [
    "DTYPE",
    "DTYPES",
    "IDS_FILE",
    "MARKER",
    "SHARD_SIZE",
    "STOPPED",
    "IncompleteStore",
    "UnstorableRow",
    "VectorStore",
    "VectorStoreWriter",
    "shard_name",
    "stop_reason",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Storage dtypes of the rows, by name."""
DTYPE = "float32"
"""The default storage dtype (``wherefrom index --dtype``)."""
SHARD_SIZE = 256
"""The default rows per shard (``wherefrom index --shard-size``): a build resumes shard by shard, and a search reads
cache-sized blocks of shards whatever their size."""
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
"""Each storage dtype's name in a safetensors header (a shard's ``rows`` tensor; :meth:`VectorStore.blocks`)."""
MARKER = "index.json"
"""The completion marker, written last."""
IDS_FILE = "ids.json"
STOPPED = "stopped.json"
"""Why the last build of an unfinished store stopped on a row it cannot store (:class:`UnstorableRow`): written by
:meth:`VectorStoreWriter.build` as it stops, removed when a build starts again (:meth:`VectorStoreWriter.start`)
and when the store is finished; :func:`stop_reason` reads it."""
REBUILD = "rebuild the store"
"""The advice that ends each :class:`wherefrom.core.store.DamagedFile` the store raises itself (a shard missing,
truncated or not holding its rows; the marker, settings and ids disagreeing); a checksum or size that differs is
raised by :mod:`wherefrom.core.store`'s checks without it. A run opening and verifying its index ends either kind
with the command that rebuilds it."""
_HEADER_PIECE = 1 << 16
"""Bytes of a shard's start kept by :meth:`VectorStore.verify` from the pass that hashes it: the safetensors header
(its rows' ids as JSON: about 3.5 KiB for the default 256 rows of 12-character ids); a longer one is read again."""
LAYOUT = ("dim", "dtype", "shard_size", "rows", "ids_sha256")
"""Manifest keys the store sets itself (beside the caller's settings)."""


class IncompleteStore(StoreError):
    """A store folder has no completion marker (a damaged one is a :class:`wherefrom.core.store.DamagedFile`), or
    cannot be finalized: a shard is missing or damaged."""


class UnstorableRow(ValueError):
    """A row with a NaN or infinite entry, or one the store's dtype cannot hold (float16 beyond 65504): the same
    settings compute the same row again, so rerunning the same build stops on it again."""


def stop_reason(folder: Path) -> str | None:
    """The error that stopped the last build of the unfinished store in ``folder`` on a row it cannot store (what
    :data:`STOPPED` records; ``None`` when none did, or the record is damaged)."""
    recorded = intact_json(Path(folder) / STOPPED)
    return str(recorded["error"]) if isinstance(recorded, dict) and "error" in recorded else None


def shard_name(shard: int) -> str:
    """``shard-NNNNN.safetensors``."""
    return f"shard-{shard:05d}.safetensors"


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(ids).encode("utf-8")).hexdigest()


def checked_head(path: Path, recorded: Mapping[str, Any] | None = None) -> bytes:
    """The safetensors header of shard ``path`` (its first bytes, at least the header), from the pass that hashes
    the whole file against its recorded checksum (:class:`wherefrom.core.store.DamagedFile` naming it otherwise);
    hashed in pieces, so memory holds one piece, not a shard; a header longer than the piece kept is read again."""
    return whole_header(path, check_file(path, recorded, head=_HEADER_PIECE))


def whole_header(path: Path, first: bytes) -> bytes:
    """``first`` (shard ``path``'s first bytes), read again to the end of its safetensors header when that is
    longer (long ids)."""
    (size,) = struct.unpack("<Q", first[:8]) if len(first) >= 8 else (0,)
    if len(first) < 8 + size <= path.stat().st_size:
        with open(path, "rb") as fh:
            first = fh.read(8 + size)
    return first


def rows_offset(path: Path, header: bytes, ids: list[str], start: int, dtype: str, dim: int) -> tuple[int, int]:
    """``(where the rows begin, the header's length)`` of shard ``path``, from its safetensors header (``header``:
    the file's first bytes, at least its header); :class:`wherefrom.core.store.DamagedFile` unless it holds the rows
    ``ids`` (the store's rows from ``start`` on) in order as ``(len(ids), dim)`` of ``dtype`` (a name of
    :data:`DTYPES`): a shard whose bytes match its checksum can still hold another shard's rows (shards swapped with
    their checksum entries)."""
    try:
        (size,) = struct.unpack("<Q", header[:8])
        layout = json.loads(header[8 : 8 + size])
        rows, held = layout["rows"], json.loads(layout["__metadata__"]["ids"])
        begin, end = rows["data_offsets"]
        fits = begin >= 0 and (rows["dtype"], rows["shape"], end - begin) == (
            SAFETENSORS_DTYPES[dtype],
            [len(ids), dim],
            len(ids) * dim * DTYPES[dtype].itemsize,
        )
    except (struct.error, ValueError, KeyError, TypeError):
        fits, held, begin, size = False, None, 0, 0
    if not fits or held != ids:
        raise DamagedFile(f"{path} does not hold the store's rows from {start} on; {REBUILD}")
    return 8 + size + begin, 8 + size


def _read_fully(fh: BinaryIO, target: memoryview) -> int:
    """Fill ``target`` from ``fh``'s position; returns the bytes read (fewer at the end of the file). One read returns
    at most 2 GiB - 4 KiB on Linux, so a larger shard takes several."""
    got = 0
    while got < len(target):
        piece = fh.readinto(target[got:])
        if not piece:
            break
        got += piece
    return got


class VectorStoreWriter:
    """Builds (or resumes) a store of ``len(ids)`` rows of length ``dim`` in ``folder``.

    ``settings`` (JSON-able) are what decide the rows' values (fingerprints, projection, ...); they and the
    layout go into the manifest. ``defaults``: what a setting a recorded manifest lacks is taken to be (see
    :func:`wherefrom.core.store.record_settings`); ``unchecked``: settings recorded but never compared. The caller holds the folder's writer lock
    (:func:`wherefrom.core.store.writer_lock`) around :meth:`start` ... :meth:`finalize`; processes of one
    distributed build may write different shards of one folder at once (checksum updates are locked).

    Raises ``ValueError`` for no or repeated ids, ``dim < 1``, ``shard_size < 1``, an unknown ``dtype``
    (allowed: float32, float16, bfloat16) or a setting named like a layout key.
    """

    def __init__(
        self,
        folder: Path,
        ids: list[str],
        dim: int,
        settings: Mapping[str, Any],
        dtype: str = DTYPE,
        shard_size: int = SHARD_SIZE,
        defaults: Mapping[str, Any] | None = None,
        unchecked: Collection[str] = (),
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"a store needs at least one row and unique ids ({len(ids)} ids, {len(set(ids))} unique)")
        clash = sorted(set(settings) & set(LAYOUT))
        if clash:
            raise ValueError(f"settings may not use the store's own keys {clash}")
        self.folder = Path(folder)
        self.ids = list(ids)
        self.dim, self.dtype, self.shard_size = int(dim), dtype, int(shard_size)
        self.manifest = {
            **dict(settings),
            "dim": self.dim,
            "dtype": dtype,
            "shard_size": self.shard_size,
            "rows": len(self.ids),
            "ids_sha256": ids_sha256(self.ids),
        }
        self.defaults, self.unchecked = dict(defaults or {}), tuple(unchecked)
        self.notices: list[str] = []
        """What was found and repaired (damaged shards rebuilt, parts of unknown settings discarded)."""
        self.owner = self.folder
        """The store a user deletes to build again with other settings: this one, or for a part of another store
        (a tracin index's checkpoint stores) that store; named by the advice of a row the dtype cannot hold, and
        where its :data:`STOPPED` record goes."""
        self.guard: Callable[[], None] = lambda: None
        """Called before each shard write (before the marker is cleared); raises when this writer must not write
        any more, e.g. :func:`wherefrom.core.store.holder_guard` once the folder's writer lock changed hands."""

    @property
    def shard_count(self) -> int:
        return (len(self.ids) + self.shard_size - 1) // self.shard_size

    def shard_path(self, shard: int) -> Path:
        return self.folder / shard_name(shard)

    def span(self, shard: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``shard``."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, len(self.ids))

    def complete(self) -> bool:
        """The marker and every shard are intact (hashes every file; whatever settings the store was made with)."""
        recorded = recorded_checksums(self.folder)
        return is_intact(self.folder / MARKER, recorded) and all(
            is_intact(self.shard_path(k), recorded) for k in range(self.shard_count)
        )

    def misplaced(self) -> list[int]:
        """The shards whose header does not hold their rows of this store (ids, dtype, shape: :func:`rows_offset`),
        reading headers only: a finished store whose settings agree with the writer's can still hold a shard whose
        bytes match its checksum but are another shard's (swapped with their checksum entries)."""
        found = []
        for shard in range(self.shard_count):
            path = self.shard_path(shard)
            try:
                with open(path, "rb") as fh:
                    self._check_rows(shard, whole_header(path, fh.read(_HEADER_PIECE)))
            except (OSError, DamagedFile):
                found.append(shard)
        return found

    def shard_problem(self, shard: int, recorded: Mapping[str, Any] | None = None) -> str | None:
        """Why shard ``shard`` is not finished and this store's (missing, unfinished, damaged, or a header that does
        not hold its rows: :func:`rows_offset`), or ``None``: what a reader would refuse, the writer rebuilds."""
        try:
            self._check_rows(shard, checked_head(self.shard_path(shard), recorded))
        except DamagedFile as error:
            return str(error)
        return None

    def _check_rows(self, shard: int, header: bytes) -> None:
        """:func:`rows_offset` of shard ``shard`` (``header``: its first bytes) against its rows of this store."""
        start, stop = self.span(shard)
        rows_offset(self.shard_path(shard), header, self.ids[start:stop], start, self.dtype, self.dim)

    def start(
        self, hint: str | Callable[[list[str]], str] = "", ignore: Collection[str] = (), forget_stop: bool = True
    ) -> list[str]:
        """Record the manifest (first write) or compare it; then the ids. Returns notes of what was discarded
        (empty when nothing was; see :func:`wherefrom.core.store.record_settings`).

        ``ignore``: top-level settings not compared (e.g. the device when a finished store is reused).
        ``forget_stop``: remove :data:`STOPPED` (a build starts again); ``False`` for the other processes of a
        distributed build, which start after the first and must not remove what a process that stopped since wrote.
        Raises :class:`wherefrom.core.store.SettingsMismatch` naming each differing setting (``hint`` says
        what to do; a callable is given the dotted keys that differ). A folder whose manifest is missing or damaged
        is emptied (noted in :attr:`notices`). A folder in the place of one of the store's files (a shard, the ids,
        the marker) raises ``IsADirectoryError`` naming it before anything changes (it is not the store's file: it
        is neither deleted nor replaced, and a finished store keeps its marker).
        """
        refuse_folder_in_place(
            self.folder / MARKER, self.folder / IDS_FILE, *map(self.shard_path, range(self.shard_count))
        )
        notes = record_settings(self.folder, self.manifest, hint, (*ignore, *self.unchecked), self.defaults)
        self.notices += notes
        if forget_stop:  # this build tries again
            self._forget_stop()
        path = self.folder / IDS_FILE
        if intact_json(path) != self.ids:
            if path.exists():  # userD: an edited ids.json was put right without a word (a damaged shard is noted)
                self.notices.append(f"rewriting: {path} is damaged or holds other ids than the training rows'")
            write_json_checked(self.ids, path)
        return notes

    def pending(self, rank: int = 0, world: int = 1, only: Collection[int] | None = None) -> list[int]:
        """The shards ``k`` with ``k % world == rank`` (and in ``only``, when given: e.g. the shards a store
        assembled from this one still needs) that are not intact (to build); a damaged one is noted.

        Raises ``ValueError`` unless ``0 <= rank < world``."""
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) = [0, {world}), got {rank}")
        todo, recorded = [], recorded_checksums(self.folder)
        for shard in range(rank, self.shard_count, world):
            if only is not None and shard not in only:
                continue
            problem = self.shard_problem(shard, recorded)
            if problem is None:
                continue
            if self.shard_path(shard).exists():
                self.notices.append(f"rebuilding: {problem}")
            todo.append(shard)
        return todo

    def write(self, shard: int, ids: list[str], rows: torch.Tensor) -> None:
        """Write shard ``shard``: ``ids`` must be its ids in order, ``rows`` ``(n_k, dim)`` (cast to the dtype).

        Clears the completion marker first. Raises ``ValueError`` for other ids or another shape, and naming the
        row for a row with a NaN or infinite entry, or one that the store's dtype cannot hold (float16 beyond
        its largest value, 65504, which preconditioned rows can reach) rather than storing ``inf``; an ``OSError``
        of the write (a full disk) is re-raised naming the shard, with nothing left under its name.
        """
        start, stop = self.span(shard)
        if ids != self.ids[start:stop]:
            raise ValueError(f"shard {shard} of {self.folder} must hold rows {start}..{stop - 1} in order")
        if tuple(rows.shape) != (stop - start, self.dim):
            raise ValueError(f"shard {shard} rows must have shape {(stop - start, self.dim)}, got {tuple(rows.shape)}")
        tensor = rows.detach().to(device="cpu", dtype=DTYPES[self.dtype]).contiguous()
        self._check_finite(shard, ids, rows, tensor)
        self.guard()
        forget_file(self.folder / MARKER)
        path = self.shard_path(shard)
        forget_file(path)
        try:
            save_tensors_checked({"rows": tensor}, path, meta={"ids": json.dumps(ids)})
        except OSError as error:
            forget_file(path)
            raise restated(
                error, f"{error}; the finished shards are kept: free space and rerun the same command to resume"
            ) from error

    def _check_finite(self, shard: int, ids: list[str], rows: torch.Tensor, stored: torch.Tensor) -> None:
        """``ValueError`` naming the first row of ``rows`` that is not finite, or not finite once ``stored`` in the
        store's dtype."""
        bad = (~torch.isfinite(stored)).any(dim=1).nonzero()
        if not len(bad):
            return
        row = int(bad[0])
        given = rows[row].detach().cpu()
        where = f"row {ids[row]!r} (shard {shard} of {self.folder})"
        if not torch.isfinite(given).all():
            raise UnstorableRow(f"{where} has a NaN or infinite entry; nothing of the shard was written")
        advice = ""
        if self.dtype == "float16":
            advice = f": delete {self.owner} and rebuild it with dtype bfloat16 (float32's range) or float32"
        raise UnstorableRow(
            f"{where} has an entry of magnitude {float(given.abs().max()):.4g}, beyond the largest {self.dtype} "
            f"({torch.finfo(DTYPES[self.dtype]).max:.6g}); this store cannot hold it{advice}"
        )

    def build(
        self,
        produce: Callable[[int, list[str]], Iterable[tuple[list[str], torch.Tensor]]],
        rank: int = 0,
        world: int = 1,
        only: Collection[int] | None = None,
    ) -> int:
        """Build this process's pending shards (:meth:`pending`, ``only`` as there); returns how many it wrote.

        ``produce(shard, ids)`` yields ``(batch_ids, rows (b, dim))`` for the shard's ids, in order. A row the store
        cannot hold raises :class:`UnstorableRow` after recording it in :data:`STOPPED` of :attr:`owner`."""
        written = 0
        for shard in self.pending(rank, world, only):
            start, stop = self.span(shard)
            ids, parts = [], []
            try:
                for batch_ids, rows in produce(shard, self.ids[start:stop]):
                    cast = rows.detach().to(device="cpu", dtype=DTYPES[self.dtype])  # held in the store's dtype
                    self._check_finite(shard, list(batch_ids), rows, cast)
                    ids += list(batch_ids)
                    parts.append(cast)
                self.write(shard, ids, torch.cat(parts) if parts else torch.zeros(0, self.dim))
            except UnstorableRow as error:
                try:
                    write_json_checked({"shard": shard, "error": str(error)}, self.owner / STOPPED)
                except OSError as unrecorded:  # a full disk: the row's error is what the user needs
                    error.add_note(f"(why the build stopped was not recorded: {unrecorded})")
                raise
            written += 1
        return written

    def _forget_stop(self) -> None:
        """Remove :data:`STOPPED` (a build starts again, or the store is finished); ``checksums.json`` is read only
        when there is one. A part of another store (:attr:`owner`) records its stops there, and the owner's own
        writer removes them."""
        if (self.folder / STOPPED).exists():
            forget_file(self.folder / STOPPED)

    def finalize(self) -> None:
        """Write the completion marker once every shard is intact (hashing each).

        Raises :class:`IncompleteStore` naming the first shard that is not (e.g. another rank's, unfinished)."""
        recorded = recorded_checksums(self.folder)
        for shard in range(self.shard_count):
            problem = self.shard_problem(shard, recorded)
            if problem is not None:
                raise IncompleteStore(f"{self.folder} cannot be finalized: {problem}")
        self._forget_stop()
        write_json_checked(
            {"shards": self.shard_count, "rows": len(self.ids), "dtype": self.dtype, "shard_size": self.shard_size},
            self.folder / MARKER,
        )


class VectorStore:
    """A finished store, opened for reading (see the module docstring for the layout).

    Attributes: ``folder``, ``dim``, ``count`` (rows), ``ids`` (row order), ``dtype`` (name),
    ``shard_size``, ``shard_count`` and ``settings`` (the manifest as recorded, layout keys included).
    """

    def __init__(self, folder: Path, settings: dict[str, Any], ids: list[str]):
        self.folder = Path(folder)
        self.settings = settings
        self.ids = ids
        self.dim: int = settings["dim"]
        self.count: int = settings["rows"]
        self.dtype: str = settings["dtype"]
        self.shard_size: int = settings["shard_size"]
        self.shard_count = (self.count + self.shard_size - 1) // self.shard_size
        self._headers: dict[int, tuple[int, int, int]] = {}
        # per shard hashed in this process: (its header's length, XXH3-64 of the header, where its rows begin)

    @property
    def verified(self) -> set[int]:
        """The shards hashed in this process (by :meth:`verify`, or as :meth:`shards` or :meth:`blocks` read them):
        :meth:`shards` maps them, :meth:`blocks` reads them without hashing (their header compared with the one
        checked, not parsed again), so a command that reads the store in several passes (a FAISS build) hashes
        each shard once."""
        return set(self._headers)

    @classmethod
    def open(cls, folder: Path) -> VectorStore:
        """Open a finished store: its marker, manifest and ids verified, each shard present with its recorded size.

        Raises :class:`IncompleteStore` without a completion marker and
        :class:`wherefrom.core.store.DamagedFile` naming a damaged marker, manifest or ids file, or a missing
        or truncated shard (a shard's bytes are hashed when read: :meth:`shards`, :meth:`verify`)."""
        folder = Path(folder)
        if not (folder / MARKER).exists():
            raise IncompleteStore(f"{folder} is not a finished store (no {MARKER}); build or resume it first")
        recorded = recorded_checksums(folder)  # read once for every file checked below
        marker = read_json_checked(folder / MARKER, recorded)
        settings = read_json_checked(folder / "settings.json", recorded)
        ids = read_json_checked(folder / IDS_FILE, recorded)
        layout = {key: settings.get(key) for key in ("rows", "dtype", "shard_size")}
        if layout != {key: marker[key] for key in layout} or ids_sha256(ids) != settings.get("ids_sha256"):
            raise DamagedFile(f"{folder}: {MARKER}, settings.json and {IDS_FILE} disagree; {REBUILD}")
        store = cls(folder, settings, ids)
        for shard in range(store.shard_count):
            check_size(folder / shard_name(shard), recorded)
        return store

    def content_key(self) -> str:
        """A sha256 over the recorded checksums of the manifest, the ids and every shard: it changes whenever
        any row, id or setting does (keys derived data such as a FAISS index, without reading the rows)."""
        names = ["settings.json", IDS_FILE, *(shard_name(k) for k in range(self.shard_count))]
        files = recorded_checksums(self.folder)
        recorded = {name: files.get(name) for name in names}
        return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()

    def verify(self, only: Collection[int] | None = None) -> None:
        """Hash every shard (``only``: just these, e.g. the ones this process reads) and check its header (ids, dtype,
        shape); raises :class:`wherefrom.core.store.DamagedFile` naming the first damaged one. :meth:`shards` then
        reads those it hashed memory-mapped by default (hashing again in the same process adds only time: a scan of
        10^6 rows read each shard three times, verified here, then once per end of a search), and :meth:`blocks`
        reads them without parsing their header again (it compares the header's XXH3-64 with the one verified)."""
        recorded = recorded_checksums(self.folder)
        for shard in range(self.shard_count) if only is None else sorted(only):
            path = self.folder / shard_name(shard)
            self._check_header(shard, path, checked_head(path, recorded))

    def require(
        self,
        settings: Mapping[str, Any],
        what: str = "",
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        remedy: str | Callable[[], str] = "rebuild it with the current ones",
    ) -> None:
        """Raise :class:`wherefrom.core.store.SettingsMismatch` naming each of ``settings`` whose recorded value
        differs (e.g. the model fingerprint, the module selection, the projection); ``what`` says what the store
        is being used for; ``defaults``: what a setting the manifest lacks is taken to be
        (:func:`wherefrom.core.store.with_defaults_recorded`); ``remedy``: what to do (e.g. the command that
        rebuilds it; a callable is called only when a setting differs)."""
        now = json_form(dict(settings))
        recorded = with_defaults_recorded({k: self.settings.get(k) for k in now}, defaults or {})
        differences = settings_differences(recorded, now)
        if differences:
            raise SettingsMismatch(
                f"the store {self.folder} was made with other settings ({'; '.join(differences)})"
                + (f"; it cannot serve {what}" if what else "")
                + f"; {remedy() if callable(remedy) else remedy}"
            )

    def blocks(self, size: int, ahead: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first_row, rows (n, dim))`` of all rows in row order, in the stored dtype: consecutive shards read
        straight into one reused buffer until it holds ``size`` rows or more (whole shards; the last block fewer).
        A yielded block is valid until the next one is asked for (copy it to keep it). The next block is read ahead
        on a reader thread while the caller works on this one, into a second buffer (memory: two blocks): the
        reads and hashes release the GIL, so they overlap the caller's arithmetic (10^6 x 1024 rows, warm page
        cache, two threads, ``benchmarks/results/store_scan.md``: the exact search of a verified store took 0.46 s
        read ahead against 0.74 s read in turn at float16, whose conversion now overlaps the reads, and 0.59
        against 0.65 s at float32, bound by memory). A reader still reading when the caller stops early is
        waited for. ``ahead=False``: each block read in turn into one buffer (memory: one block; no thread).

        A shard :meth:`verify` hashed in this process is read without hashing: its header, compared by its XXH3-64
        with the header :meth:`verify` checked (a shard whose header changed since, other ids, dtype or shape, is
        refused; one rewritten with the same ids and layout is found only by hashing it again), then its rows with
        one ``readinto`` into the buffer. Any other shard is read once: its header checked (ids and layout, as
        :meth:`verify` does), its rows straight into the buffer, every byte hashed on the way and compared with its
        recorded checksum before the block holding it is yielded, so a damaged one is never yielded (and it counts as
        :attr:`verified` after). Raises
        :class:`wherefrom.core.store.DamagedFile` naming a damaged, truncated or missing shard.

        Why not :meth:`shards` joined by the reader: mapping each shard and copying it into a block faults every
        page in (``benchmarks/results/store_scan_float32.md``, 10^6 x 1024 float32 rows in 256-row shards, warm page
        cache, two threads: the search of both ends took 0.59 s read ahead into the buffers, 0.65 s read in turn,
        1.26 s mapped and joined into a reused buffer; 2.0-2.5 s joined into a new tensor per block before). Parsing each header again as it is
        read made the search about 1.2x as long (0.92 against 0.76 s, both versions in one process, a one-off
        script)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        groups: list[list[int]] = []  # the shards of each block
        held = size
        rows = 0  # the most any block holds: a buffer's rows (by the rows there are, not the recorded shard size)
        for shard in range(self.shard_count):
            if held >= size:
                groups.append([])
                held = 0
            groups[-1].append(shard)
            held += min(self.shard_size, self.count - shard * self.shard_size)
            rows = max(rows, held)
        buffers = [torch.empty(rows, self.dim, dtype=DTYPES[self.dtype]) for _ in groups[: 2 if ahead else 1]]
        recorded = None if len(self._headers) == self.shard_count else recorded_checksums(self.folder)

        def fill(buffer: torch.Tensor, shards: list[int]) -> int:
            filled = 0
            for shard in shards:
                filled += self._read_into(shard, buffer[filled:], recorded)
            return filled

        first = 0
        if not ahead:
            for group in groups:
                held = fill(buffers[0], group)
                yield first, buffers[0][:held]
                first += held
            return
        with ThreadPoolExecutor(1, thread_name_prefix="wherefrom-read-ahead") as reader:
            pending = reader.submit(fill, buffers[0], groups[0])
            for number in range(len(groups)):
                held = pending.result()  # a damaged shard's error is raised here, before its block is yielded
                if number + 1 < len(groups):  # into the buffer of the block before: the caller has let it go
                    pending = reader.submit(fill, buffers[(number + 1) % 2], groups[number + 1])
                yield first, buffers[number % 2][:held]
                first += held

    def _read_into(self, shard: int, out: torch.Tensor, recorded: Mapping[str, Any] | None) -> int:
        """Read ``shard``'s rows into ``out[:n]`` (hashed on the way unless :meth:`verify` hashed it); returns ``n``."""
        path = self.folder / shard_name(shard)
        start = shard * self.shard_size
        n = min(self.shard_size, self.count - start)
        target = memoryview(out[:n].view(torch.uint8).numpy()).cast("B")
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:  # deleted (since it was verified)
            raise DamagedFile(f"{path} is missing; {REBUILD}") from None
        with fh:
            if shard not in self._headers:
                self._read_hashing(shard, path, fh, target, recorded)
                return n
            length, digest, offset = self._headers[shard]
            if xxhash.xxh3_64_intdigest(fh.read(length)) != digest:  # e.g. another shard's bytes, or rebuilt since
                raise DamagedFile(
                    f"{path} does not hold the store's rows from {start} on (its header changed since it was "
                    f"verified); {REBUILD}"
                )
            fh.seek(offset)
            if _read_fully(fh, target) < len(target):
                raise DamagedFile(f"{path} is truncated: it ends inside its rows; {REBUILD}")
        return n

    def _read_hashing(
        self, shard: int, path: Path, fh: BinaryIO, target: memoryview, recorded: Mapping[str, Any] | None
    ) -> None:
        """Read ``shard`` (``path``, open as ``fh``) once: its header checked, its rows straight into ``target``, every byte
        hashed on the way against the recorded checksum, then counted as :attr:`verified`. Raises
        :class:`wherefrom.core.store.DamagedFile` naming it (its checksum named first when its header is damaged too);
        ``target`` then holds bytes that must not be used. Verifying first and then reading read each shard twice
        (``benchmarks/results/store_scan.md``, 10^6 x 1024 float16 rows in the page cache: opened and searched in
        one pass 0.97 s, verified first 1.07 s)."""
        head = fh.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        head += fh.read(min(length, os.fstat(fh.fileno()).st_size))  # a damaged length reads to the end at most
        try:
            offset = self._check_header(shard, path, head)
        except DamagedFile:
            self._hashed(shard, recorded)  # a damaged file is named by its checksum first
            raise
        before = head + fh.read(offset - len(head))  # each byte read once (rows_offset: offset >= the header's end)
        got = _read_fully(fh, target)
        try:  # a short file reads short and is named by its size
            check_bytes(path, [before, target[:got], fh.read()], recorded)
        except DamagedFile:
            del self._headers[shard]
            raise

    def _hashed(self, shard: int, recorded: Mapping[str, Any] | None) -> tuple[bytes, int]:
        """``(bytes, where the rows begin)`` of ``shard`` read whole, hashed and its header checked (ids, dtype,
        shape), then counted as :attr:`verified`; :class:`wherefrom.core.store.DamagedFile` naming it otherwise."""
        path = self.folder / shard_name(shard)
        data = read_checked(path, recorded)
        return data, self._check_header(shard, path, data)

    def _check_header(self, shard: int, path: Path, head: bytes) -> int:
        """Where the rows of ``shard`` (at ``path``, hashed; ``head``: its first bytes, its header at least) begin,
        its header checked (:func:`rows_offset`) and recorded as :attr:`verified`."""
        start = shard * self.shard_size
        ids = self.ids[start : start + self.shard_size]
        offset, header = rows_offset(path, head, ids, start, self.dtype, self.dim)
        self._headers[shard] = (header, xxhash.xxh3_64_intdigest(head[:header]), offset)
        return offset

    def shards(
        self, verify: bool | None = None, only: Collection[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first_row, rows (n_k, dim))`` per shard in row order, in the stored dtype, each verified as it
        is read (memory: one shard; twice its size while it is hashed: its bytes, then its rows). Raises
        :class:`wherefrom.core.store.DamagedFile` naming a damaged shard.

        ``verify=False`` memory-maps each shard without hashing or copying it, for repeated queries against a
        store already checked once with :meth:`verify` (measured, 100,000 x 1024 float16 rows, warm page
        cache, one thread: 0.8 s verified, 0.09 s mapped); a truncated shard is still refused by :meth:`open`.
        The default (``None``) verifies each shard that :meth:`verify` did not hash in this process (:attr:`verified`).
        ``only``: read just these shards (e.g. one rank's, :func:`wherefrom.core.distributed.shards_for_rank`)."""
        chosen = range(self.shard_count) if only is None else sorted(only)
        hashed = [shard not in self._headers if verify is None else verify for shard in chosen]
        recorded = recorded_checksums(self.folder) if any(hashed) else None
        for shard, check in zip(chosen, hashed, strict=True):
            path = self.folder / shard_name(shard)
            start = shard * self.shard_size
            n = min(self.shard_size, self.count - start)
            if check:  # hashed: the bytes as written, the header checked
                data, _ = self._hashed(shard, recorded)
                rows = load_safetensors_bytes(data)["rows"]
            else:
                rows, ids = self._mapped(path)
                if (rows.dtype, tuple(rows.shape), ids) != (
                    DTYPES[self.dtype],
                    (n, self.dim),
                    self.ids[start : start + n],
                ):
                    raise DamagedFile(f"{path} does not hold the store's rows from {start} on; {REBUILD}")
            yield start, rows

    @staticmethod
    def _mapped(path: Path) -> tuple[torch.Tensor, list[str]]:
        """``(rows, ids)`` of shard ``path`` memory-mapped (not hashed); :class:`wherefrom.core.store.DamagedFile`
        naming a shard that is missing or whose header cannot be read (damaged since :meth:`verify`)."""
        try:
            with safe_open(str(path), "pt") as mapped:
                rows, meta = mapped.get_tensor("rows"), mapped.metadata()
            return rows, json.loads(meta["ids"])
        except FileNotFoundError:
            raise DamagedFile(f"{path} is missing; {REBUILD}") from None
        except (SafetensorError, KeyError, TypeError, ValueError) as error:
            raise DamagedFile(f"{path} cannot be read ({error}); {REBUILD}") from None
