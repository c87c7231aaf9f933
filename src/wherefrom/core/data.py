"""Training and query records, and loading them from JSONL, CSV and Parquet files.

A :class:`Record` is one ``(prompt, completion)`` pair with a unique ``id`` and an optional class
``label`` (used by class-attribution metrics). The loss is taken on the completion only; the prompt
is context (see :mod:`wherefrom.core.task` and :mod:`wherefrom.core.encoding`).

File formats (chosen by suffix, case-insensitive):

* ``.jsonl`` / ``.json``: one JSON object per line; blank lines are skipped. Positions in error
  messages are 1-based line numbers.
* ``.csv``: a header row naming the columns (``csv.DictReader``, UTF-8). Positions are 1-based line
  numbers counting the header as line 1, so the first data row is line 2. Empty ``id`` / ``label``
  cells count as absent.
* ``.parquet``: read with ``pyarrow.parquet``. Positions are 0-based row indices ("row N").

Field rules, the same for every source (extra fields are ignored):

* ``prompt``: required, a string; may be empty (some LM data has no prompt).
* ``completion``: required, a string that is not empty after stripping whitespace. It is stored
  unstripped: leading/trailing whitespace is part of what the model is scored on.
* ``id``: optional string or integer, stored as ``str``; defaults to ``"{file stem}:{position}"``
  for files and ``str(index)`` for in-memory rows. Ids must be unique within one set.
* ``label``: optional string or number, stored as ``str`` (or ``None`` when absent/null).

Every problem raises :class:`DataError` whose message names the source, the position and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DataError",
    "Record",
    "data_fingerprint",
    "load_records",
    "records_from_rows",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad input data; the message names the source (file path), the position and the field."""


@dataclass(frozen=True)
class Record:
    """One training or query example.

    ``id`` is unique within its set; ``label`` is an optional class name for attribution metrics.
    """

    id: str
    prompt: str
    completion: str
    label: str | None = None


# --------------------------------------------------------------------------------------------------
# Validation


def _where(source: str, position: str) -> str:
    return f"{source}, {position}"


def _scalar_to_str(value: Any, field: str, where: str) -> str:
    """Convert an ``id`` / ``label`` value to ``str``; only strings and (non-bool) numbers pass."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {field!r} must be a string or a number, got {type(value).__name__}")


def _validate_row(row: Any, where: str, default_id: str) -> Record:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields 'prompt' and 'completion', got {type(row).__name__}")
    for field in ("prompt", "completion"):
        if field not in row or row[field] is None:
            raise DataError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
    prompt: str = row["prompt"]
    completion: str = row["completion"]
    if not completion.strip():
        raise DataError(f"{where}: field 'completion': empty completion")

    raw_id = row.get("id")
    record_id = default_id if raw_id is None else _scalar_to_str(raw_id, "id", where)
    if not record_id:
        raise DataError(f"{where}: field 'id' is an empty string")

    raw_label = row.get("label")
    label = None if raw_label is None else _scalar_to_str(raw_label, "label", where)
    return Record(id=record_id, prompt=prompt, completion=completion, label=label)


def _build(rows: Iterable[tuple[str, Any, str]], source: str) -> list[Record]:
    """Validate ``(position, row, default_id)`` triples and check that ids are unique."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for position, row, default_id in rows:
        where = _where(source, position)
        record = _validate_row(row, where, default_id)
        if record.id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {record.id!r} (first used at {seen[record.id]})")
        seen[record.id] = position
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# Readers: each yields (position, row, default_id)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any, str]]:
    lineno = 0
    try:
        with path.open("r", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{_where(str(path), f'line {lineno}')}: invalid JSON ({err.msg} at column {err.colno})"
                    ) from None
                yield f"line {lineno}", row, f"{path.stem}:{lineno}"
    except UnicodeDecodeError as err:
        raise DataError(f"{_where(str(path), f'line {lineno + 1}')}: not valid UTF-8 ({err.reason})") from None


def _read_csv(path: Path) -> Iterator[tuple[str, Any, str]]:
    try:
        with path.open("r", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            try:
                for row in reader:
                    # line_num is the physical line the row ends on (header = line 1).
                    lineno = reader.line_num
                    cleaned = {k: v for k, v in row.items() if k is not None}
                    for optional in ("id", "label"):
                        if cleaned.get(optional) == "":
                            cleaned[optional] = None
                    yield f"line {lineno}", cleaned, f"{path.stem}:{lineno}"
            except csv.Error as err:
                raise DataError(f"{_where(str(path), f'line {reader.line_num}')}: malformed CSV ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"row {index}", row, f"{path.stem}:{index}"


# --------------------------------------------------------------------------------------------------
# Public API


def load_records(path: str | Path) -> list[Record]:
    """Load and validate records from a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file.

    Records keep file order. Raises :class:`DataError` for a missing file, an unknown suffix, a
    file with no records, or any invalid row (the message names the path, the line or row, and the
    field).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"supported suffixes are {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")

    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        rows = _read_parquet(path)
    records = _build(rows, str(path))
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def records_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "<memory>") -> list[Record]:
    """Validate in-memory rows (mappings with ``prompt``, ``completion``, optional ``id``/``label``).

    The same rules as :func:`load_records`; default ids are ``str(index)`` and error messages name
    ``source`` and the 0-based index. An empty iterable gives an empty list.
    """
    return _build(((f"index {i}", row, str(i)) for i, row in enumerate(rows)), source)


def data_fingerprint(records: Sequence[Record]) -> str:
    """SHA-256 hex digest of a canonical JSON encoding of ``records`` (order matters)."""
    payload = json.dumps(
        [asdict(record) for record in records],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def records_key(records: Sequence[Record]) -> tuple:
    """A hashable identity of a row list (ids and texts, in order), for caches keyed on the training set."""
    return tuple((r.id, r.prompt, r.completion) for r in records)
