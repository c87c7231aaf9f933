"""Training and query records, and loading them from JSONL, CSV and Parquet files.

A :class:`Record` is one ``(prompt, completion)`` pair with a unique ``id`` and an optional class
``label`` (used by class-attribution metrics). The loss is taken on the completion only; the prompt
is context (see :mod:`wherefrom.core.task` and :mod:`wherefrom.core.encoding`).

File formats (chosen by suffix, case-insensitive):

* ``.jsonl`` / ``.json``: one JSON object per line; blank lines are skipped. A ``.json`` file
  whose first non-blank character is ``[`` is read as one JSON array of objects (as
  ``pandas.to_json(orient="records")`` or ``jq`` write it); a trailing comma before ``]`` is
  named. Positions in error messages are 1-based line numbers (of the line an object starts on).
* ``.csv``: a header row naming the columns. The delimiter is the first of ``,`` ``;`` tab ``|``
  that splits the header into a row naming both ``prompt`` and ``completion`` (European Excel
  writes ``;``, Excel's "Unicode text" tab); header names are stripped of surrounding whitespace.
  Quoted cells may span lines. Positions are 1-based line numbers counting the header as line 1,
  so the first data row is line 2 (a multi-line row is named by the line it starts on). A row with more
  non-empty cells than the header (an unquoted delimiter in a cell) is refused naming its line. Rows whose
  cells are all empty (blank lines, Excel's ``;;;``) are skipped. Empty ``id`` / ``label`` cells
  count as absent; a whole number written as a float (``1.0``) is the integer's id or label, as in JSON.
* ``.parquet``: read with ``pyarrow.parquet``. Positions are 0-based row indices ("row N").
* a folder written by Hugging Face ``datasets``' ``Dataset.save_to_disk`` (what ``load_from_disk``
  reads: ``state.json`` naming Arrow stream files): read with ``pyarrow``, so ``datasets`` need not be
  installed. Positions are 0-based row indices over its files in order. A ``DatasetDict`` folder
  (``dataset_dict.json``) is refused, naming its splits: pass the split's folder (``DIR/train``).

Text files are decoded as UTF-8; a UTF-8 byte-order mark is dropped, and a UTF-16 or UTF-32 BOM
(Excel's "Unicode text", Windows Notepad) selects that encoding. CRLF and CR line endings read as
LF. Any other bytes that are not UTF-8 (Latin-1 / cp1252 from an older editor) raise
:class:`DataError` naming the line and column of the first bad byte, and so does a NUL character (UTF-16/32 without
a BOM: ASCII text in it is valid UTF-8).

Field rules, the same for every source (extra fields are ignored; a field given twice in one row, as a
repeated JSON key at any depth, a repeated CSV header name or a repeated Parquet/Arrow column, is refused:
a reader would keep one of the two silently):

* ``messages`` (chat format, in place of ``prompt`` and ``completion``, refused beside either; a null
  ``messages`` cell, as in a table mixing both forms, is absent): a list of two
  ``{"role", "content"}`` objects, ``user`` then ``assistant``; the user content is the prompt and
  the assistant content the completion. This is the conversation ``chat_template=True`` renders (see
  :mod:`wherefrom.core.encoding`), so pass ``--chat-template`` to score it as a chat model sees it.
  Other conversations (a system message, several turns) are refused, naming the roles found: one
  row is one (prompt, completion) pair.

* ``prompt``: required, a string; may be empty (some LM data has no prompt).
* ``completion``: required, a string that is not empty after stripping whitespace. It is stored
  unstripped: leading/trailing whitespace is part of what the model is scored on.
* ``id``: optional string or number, stored as ``str``; defaults to ``"{file stem}:{position}"``
  for files and ``str(index)`` for in-memory rows. Ids must be unique within one set. A whole
  float is stored as an integer (``1.0`` -> ``"1"``, so the id ``1`` of a JSON file, the cell
  ``1`` of a CSV file and a Parquet column that pandas turned into floats agree); NaN (pandas'
  missing value) counts as absent.
* ``label``: optional string or number, stored as ``str`` like ``id`` (or ``None`` when
  absent/null/NaN, or an empty CSV cell); an empty or blank string is refused (no class).

Rows given in memory (the Python API) pass the same validator through :func:`check_records`, which
also refuses an empty list.

Every problem raises :class:`DataError` whose message names the source, the position and the field.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_FIELDS",
    "SUPPORTED_SUFFIXES",
    "DataError",
    "Record",
    "check_ids",
    "check_records",
    "data_fingerprint",
    "load_records",
    "records_from_rows",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")
WHOLE_FLOAT_CELL = re.compile(r"[+-]?\d+\.0*")
"""A CSV ``id``/``label`` cell that is a whole number written as a float (``1.0``, as pandas writes a float column):
read as the integer, as a JSON or Parquet ``1.0`` is (:func:`_scalar_to_str`)."""


class DataError(ValueError):
    """Bad input data; the message names the source (file path), the position and the field."""


@dataclass(frozen=True)
class Record:
    """One training or query example.

    ``id`` is unique within its set; ``label`` is an optional class name for attribution metrics.
    ``where`` names the row's source and position (``"train.jsonl, line 7"``; ``None`` for a row built in
    code) for error messages; ``chat`` whether it was given in the chat form (``messages``), which
    :func:`wherefrom.core.encoding.encode_records` warns of when no chat template renders it. Neither is part of
    the row's identity (equality, :func:`data_fingerprint`).
    """

    id: str
    prompt: str
    completion: str
    label: str | None = None
    where: str | None = dataclasses.field(default=None, compare=False, repr=False)
    chat: bool = dataclasses.field(default=False, compare=False, repr=False)

    def named(self) -> str:
        """``"FILE, line N: record ID"`` (``"record ID"`` without a ``where``), to begin an error message."""
        return f"{self.where}: record {self.id!r}" if self.where else f"record {self.id!r}"

    def content(self) -> dict[str, str | None]:
        """The row's fields without ``where``: what identifies it."""
        return {"id": self.id, "prompt": self.prompt, "completion": self.completion, "label": self.label}


# --------------------------------------------------------------------------------------------------
# Validation


def _where(source: str, position: str) -> str:
    return f"{source}, {position}"


def _scalar_to_str(value: Any, field: str, where: str) -> str:
    """Convert an ``id`` / ``label`` value to ``str``; only strings and (non-bool) numbers pass."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if isinstance(value, float):  # inf (e.g. JSON 1e400): a number, but no id
        raise DataError(f"{where}: field {field!r} must be a string or a finite number, got {value}")
    raise DataError(f"{where}: field {field!r} must be a string or a number, got {type(value).__name__}")


def _check_text(value: str, field: str, where: str) -> None:
    """:class:`DataError` naming ``field`` when ``value`` holds a lone surrogate (a JSON ``\\ud800`` escape without
    its pair): Python reads it, but it is no text, and tokenizing or hashing it failed later naming nothing."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(
            f"{where}: field {field!r} holds a lone surrogate {value[error.start]!r} at character {error.start}: "
            "not text (a \\uD800-\\uDFFF escape without its pair)"
        ) from None


def _absent_if_nan(value: Any) -> Any:
    """NaN (how pandas marks a missing cell) reads as an absent value."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _from_messages(messages: Any, where: str) -> dict[str, Any]:
    """``prompt`` and ``completion`` of a chat-format row's ``[user, assistant]`` messages."""
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field 'messages': expected a list of {{role, content}} objects (a user message then an "
            f"assistant message), got {type(messages).__name__}"
        )
    roles = [m.get("role") if isinstance(m, Mapping) else type(m).__name__ for m in messages]
    if roles != ["user", "assistant"]:
        raise DataError(
            f"{where}: field 'messages': expected a user message then an assistant message, got roles {roles}; "
            "one row is one (prompt, completion) pair: write other conversations as prompt and completion"
        )
    lacking = next((i for i, m in enumerate(messages) if "content" not in m), None)
    if lacking is not None:  # reviewW: it was named a null content
        raise DataError(f"{where}: field 'messages[{lacking}]' has no 'content'")
    return {"prompt": messages[0].get("content"), "completion": messages[1].get("content")}


CHAT_FIELDS = {"prompt": "messages[0].content", "completion": "messages[1].content"}
"""Where a chat-format row keeps its prompt and completion, as errors name them."""


def _validate_row(row: Any, where: str, default_id: str) -> Record:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields 'prompt' and 'completion', got {type(row).__name__}")
    chat = _absent_if_nan(row.get("messages")) is not None
    if chat:
        given = [f for f in ("prompt", "completion") if _absent_if_nan(row.get(f)) is not None]
        if given:
            raise DataError(
                f"{where}: fields 'messages' and {' and '.join(map(repr, given))} both given: a row is one (prompt, "
                "completion) pair, in the chat form or the plain one; keep one of them"
            )
        row = {**row, **_from_messages(row["messages"], where)}
    # a chat row's texts are named where they are (userO: a user message without content was "field 'prompt' is null")
    named = CHAT_FIELDS if chat else {"prompt": "prompt", "completion": "completion"}
    for field in ("prompt", "completion"):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r}{_missing_hint(row, field)}")
        if row[field] is None:
            raise DataError(f"{where}: field {named[field]!r} is null; it must be a string")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {named[field]!r} must be a string, got {type(row[field]).__name__}")
        _check_text(row[field], named[field], where)
    prompt: str = row["prompt"]
    completion: str = row["completion"]
    if not completion.strip():
        raise DataError(f"{where}: field {named['completion']!r}: empty completion")

    raw_id = _absent_if_nan(row.get("id"))
    record_id = default_id if raw_id is None else _scalar_to_str(raw_id, "id", where)
    if not record_id.strip():  # userH: an id of spaces printed as nothing in every table
        raise DataError(f"{where}: field 'id' is {'an empty string' if not record_id else f'blank ({record_id!r})'}")

    raw_label = _absent_if_nan(row.get("label"))
    label = None if raw_label is None else _scalar_to_str(raw_label, "label", where)
    if label is not None and not label.strip():  # a class named "" ranked as one in class attribution
        raise DataError(
            f"{where}: field 'label' is {'an empty string' if not label else f'blank ({label!r})'}; a label names "
            "the row's class: leave the field out (or null, or an empty CSV cell) for a row without one"
        )
    for field, value in (("id", record_id), ("label", label)):
        _check_text(value or "", field, where)
        control = next((c for c in value or "" if unicodedata.category(c) == "Cc"), None)
        if control is not None:
            raise DataError(
                f"{where}: field {field!r} holds the control character {control!r} ({value!r}); ids and labels are "
                "printed one result per line and written to CSV tables: remove it"
            )
    return Record(id=record_id, prompt=prompt, completion=completion, label=label, where=where, chat=chat)


def _missing_hint(row: dict[str, Any], field: str) -> str:
    """Why ``row`` may lack ``field`` (userH: both were "missing field 'prompt'" alone): a name that differs in case
    or spaces only (``Prompt``), or rows wrapped in one object (``{"data": [...]}``)."""
    near = [name for name in row if isinstance(name, str) and name.strip().lower() == field]
    if near:
        return f" (there is {near[0]!r}: field names are lower case, without spaces)"
    wrapped = [name for name, value in row.items() if isinstance(value, list) and value and isinstance(value[0], dict)]
    if len(row) == 1 and wrapped:
        return (
            f" (this object holds a list of objects under {wrapped[0]!r}: give the rows as one JSON object per line, "
            "or as a top-level JSON array)"
        )
    return ""


def _build(rows: Iterable[tuple[str, Any, str]], source: str) -> list[Record]:
    """Validate ``(position, row, default_id)`` triples and check that ids are unique."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for position, row, default_id in rows:
        record = _validate_row(row, _where(source, position), default_id)
        generated = record.id == default_id and not (isinstance(row, dict) and row.get("id") == default_id)
        _check_new_id(seen, record.id, position, source, generated)
        records.append(record)
    return records


def _check_new_id(seen: dict[str, str], record_id: str, position: str, source: str, generated: bool = False) -> None:
    """Record ``record_id`` at ``position`` in ``seen``; :class:`DataError` when it is there already, saying so
    when the id is the one ``generated`` for a row without one (the message blamed the row's 'id' field)."""
    if record_id in seen and generated:
        raise DataError(
            f"{_where(source, position)}: the row has no id, and the one generated for it, {record_id!r}, is already "
            f"used at {seen[record_id]}: give this row an id, or that one another"
        )
    if record_id in seen:
        raise DataError(
            f"{_where(source, position)}: field 'id': duplicate id {record_id!r} (first used at {seen[record_id]})"
        )
    seen[record_id] = f"{position}, generated for a row without one" if generated else position


# --------------------------------------------------------------------------------------------------
# Readers: each yields (position, row, default_id)


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # before UTF-16 LE: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _read_text(path: Path, line_ends: bool = False) -> str:
    """The file's text with LF line ends (``line_ends``: kept as they are, for a CSV reader, which ends rows at any of
    them and keeps those inside a quoted cell: userO, a CSV cell ``l1\\r\\nl2`` read as ``l1\\nl2`` where JSONL and
    Parquet keep it): UTF-8, or the encoding its byte-order mark names."""
    data = path.read_bytes()
    encoding, start = "utf-8", 0
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, start = name, len(bom)
            break
    try:
        text = data[start:].decode(encoding)
    except UnicodeDecodeError as err:
        bad = start + err.start
        line_start = data.rfind(b"\n", 0, bad) + 1
        lineno = data.count(b"\n", 0, bad) + 1
        if encoding != "utf-8":
            hint = f"the byte-order mark says {encoding}"
        elif b"\x00" in data:
            hint = "it looks like UTF-16 without a byte-order mark; save it as UTF-8"
        else:
            hint = (
                "it looks like Latin-1 / cp1252 (an older editor, or Excel's plain 'CSV'); "
                "save it as UTF-8 ('CSV UTF-8' in Excel)"
            )
        raise DataError(
            f"{_where(str(path), f'line {lineno}')}: not valid {encoding.upper()} (byte "
            f"0x{data[bad]:02x} at column {bad - line_start + 1}: {err.reason}); {hint}"
        ) from None
    if encoding == "utf-8" and "\x00" in text:  # UTF-16/32 of ASCII text is valid UTF-8, a NUL beside each character
        nul = text.index("\x00")
        lineno, column = text.count("\n", 0, nul) + 1, nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise DataError(
            f"{_where(str(path), f'line {lineno}')}: a NUL character at column {column}: it looks like UTF-16 or "
            "UTF-32 without a byte-order mark (save it as UTF-8), or zero bytes (a file padded after a crash); text "
            "has no NUL characters"
        )
    return text if line_ends else text.replace("\r\n", "\n").replace("\r", "\n")


def _refuse_repeated(names: Iterable[str], where: str) -> None:
    """:class:`DataError` naming the first field named twice in one object, header or schema (a reader would
    keep one of the two silently: JSON the last key, ``dict(zip(header, cells))`` the last column)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{where}: field {name!r} is given twice; keep one (only one of them would be read)")
        if name:  # a CSV header's blank names (trailing delimiters) name no field
            seen.add(name)


def _unique_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON ``object_pairs_hook`` that refuses an object (at any depth) with a repeated key."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        _refuse_repeated((key for key, _ in pairs), where)
        return dict(pairs)

    return build


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any, str]]:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        yield from _json_array(path, text)
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys(_where(str(path), f"line {lineno}")))
        except json.JSONDecodeError as err:
            hint = ""
            if line.rstrip().endswith(","):
                hint = "; a JSONL line holds one object with no comma after it"
            elif re.search(r",\s*[}\]]", line):
                hint = "; a trailing comma before } or ] is not JSON"
            raise DataError(
                f"{_where(str(path), f'line {lineno}')}: invalid JSON ({err.msg.removesuffix(' at')} at column {err.colno}){hint}"
            ) from None
        yield f"line {lineno}", row, f"{path.stem}:{lineno}"


def _json_array(path: Path, text: str) -> Iterator[tuple[str, Any, str]]:
    """The items of a JSON array, each with the line its value starts on."""

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\n":
            at += 1
        return at

    def fail(at: int, message: str) -> DataError:
        return DataError(f"{_where(str(path), f'line {text.count(chr(10), 0, at) + 1}')}: {message}")

    at = skip(text.index("[") + 1)
    first = True
    while True:
        if at < len(text) and text[at] == "]":
            if not first:
                raise fail(at, "invalid JSON (a trailing comma before ']' is not JSON)")
            break
        lineno = text.count("\n", 0, at) + 1
        decoder = json.JSONDecoder(object_pairs_hook=_unique_keys(_where(str(path), f"line {lineno}")))
        try:
            row, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"invalid JSON ({err.msg})") from None
        yield f"line {lineno}", row, f"{path.stem}:{lineno}"
        first = False
        at = skip(end)
        if at < len(text) and text[at] == ",":
            at = skip(at + 1)
            if at < len(text) and text[at] == "]":
                raise fail(at, "invalid JSON (a trailing comma before ']' is not JSON)")
            continue
        if at < len(text) and text[at] == "]":
            break
        raise fail(at, "invalid JSON (expected ',' or ']' after an array item)")
    if skip(at + 1) < len(text):
        raise fail(skip(at + 1), "invalid JSON (text after the closing ']')")


_DELIMITERS = (",", ";", "\t", "|")

UNPAIRED_QUOTES = ("expected after '\"'", "unexpected end of data")
"""Words of Python's strict CSV errors when a row's quotes do not pair up."""


def _csv_delimiter(text: str) -> str:
    """The delimiter that splits the header into a row naming ``prompt`` and ``completion`` (else ``,``)."""
    for delimiter in _DELIMITERS:
        try:
            header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
        except csv.Error:
            continue
        if {"prompt", "completion"} <= {name.strip() for name in header}:
            return delimiter
    return ","


def _read_csv(path: Path) -> Iterator[tuple[str, Any, str]]:
    text = _read_text(path, line_ends=True)
    # strict: a quote that does not pair up is an error (else a cell left open swallowed the next rows, and a quote
    # closing a cell early was dropped from the text: userH)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_csv_delimiter(text), strict=True)
    header: list[str] | None = None
    last_line = 0
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # a long document in one cell
    try:
        for cells in reader:
            lineno, last_line = last_line + 1, reader.line_num  # a quoted cell may span lines
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [name.strip() for name in cells]
                _refuse_repeated(header, _where(str(path), f"line {lineno} (the header)"))
                continue
            extra = [cell for cell in cells[len(header) :] if cell.strip()]
            if extra:  # zip would drop them, and every field after an unquoted delimiter shifts by one
                raise DataError(
                    f"{_where(str(path), f'line {lineno}')}: {len(cells)} cells, the header names {len(header)} "
                    f"(extra: {extra[0]!r}); a cell holding the delimiter {reader.dialect.delimiter!r} must be quoted"
                )
            row = dict(zip(header, cells))
            for optional in ("id", "label"):
                if row.get(optional) == "":
                    row[optional] = None
                elif row.get(optional) is not None and WHOLE_FLOAT_CELL.fullmatch(row[optional]):
                    row[optional] = str(int(row[optional].split(".")[0]))  # a float column's 1.0: the id 1
            yield f"line {lineno}", row, f"{path.stem}:{lineno}"
    except csv.Error as err:
        start, end = last_line + 1, reader.line_num
        lines = f"line {start}" if end <= start else f"lines {start}-{end}"
        quotes = any(words in str(err) for words in UNPAIRED_QUOTES)  # reviewS: not every CSV error is a quote's
        hint = (
            ": a cell that starts with a quote ends at the next lone quote, which the delimiter or the line's end "
            'must follow (a quote inside such a cell is doubled, ""); this row\'s quotes do not pair up'
        )
        raise DataError(f"{_where(str(path), lines)}: malformed CSV ({err}){hint if quotes else ''}") from None
    finally:
        csv.field_size_limit(limit)


def _read_parquet(path: Path) -> Iterator[tuple[str, Any, str]]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _refuse_repeated(names, f"{path} (its schema)")  # pyarrow would fail on "Multiple matches for FieldRef"
        table = pq.read_table(path)
    except DataError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"row {index}", row, f"{path.stem}:{index}"


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, Any, str]]:
    """The rows of a ``datasets`` ``save_to_disk`` folder: the Arrow stream files its ``state.json`` names."""
    import pyarrow as pa

    try:
        files = [item["filename"] for item in json.loads((path / "state.json").read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path / 'state.json'}: not a datasets save_to_disk state ({err!r})") from None
    index = 0
    for name in files:
        try:
            with pa.memory_map(str(path / name)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{path / name}: cannot read Arrow stream file ({err})") from None
        _refuse_repeated(table.column_names, f"{path / name} (its schema)")
        for row in table.to_pylist():
            yield f"row {index}", row, f"{path.name}:{index}"
            index += 1


def _dataset_folder_rows(path: Path) -> Iterator[tuple[str, Any, str]]:
    """The rows of a folder, which must be a ``datasets`` ``save_to_disk`` folder of one split."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"{path}: a datasets DatasetDict folder with splits {splits}; pass one split's folder, e.g. {path / 'train'}"
        )
    if not (path / "state.json").is_file():
        raise DataError(
            f"{path}: a folder, but not one that datasets' save_to_disk wrote (no state.json); give a "
            f"{', '.join(SUPPORTED_SUFFIXES)} file or such a folder"
        )
    return _read_saved_dataset(path)


# --------------------------------------------------------------------------------------------------
# Public API


def load_records(path: str | Path) -> list[Record]:
    """Load and validate records from a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file, or a folder
    written by ``datasets``' ``save_to_disk``.

    Records keep file order. Raises :class:`DataError` for a missing file, an unknown suffix, a
    folder ``save_to_disk`` did not write (or a ``DatasetDict`` folder, naming its splits), a
    source with no records, or any invalid row (the message names the path, the line or row, and the
    field).
    """
    path = Path(path)
    rows = _dataset_folder_rows(path) if path.is_dir() else _file_rows(path)
    records = _build(rows, str(path))
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def _file_rows(path: Path) -> Iterator[tuple[str, Any, str]]:
    """The rows of a file, read by the reader its suffix names; :class:`DataError` for another suffix or no file."""
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
        return _read_jsonl(path)
    return _read_csv(path) if suffix == ".csv" else _read_parquet(path)


def records_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "<memory>") -> list[Record]:
    """Validate in-memory rows (mappings with ``prompt``, ``completion``, optional ``id``/``label``).

    The same rules as :func:`load_records`; default ids are ``str(index)`` and error messages name
    ``source`` and the 0-based index. An empty iterable gives an empty list.
    """
    return _build(((f"index {i}", row, str(i)) for i, row in enumerate(rows)), source)


def check_records(records: Iterable[Record | Mapping[str, Any]], source: str = "<memory>") -> list[Record]:
    """Validate rows handed to the Python API with the rules of :func:`load_records`.

    ``records``: :class:`Record` objects or mappings as :func:`records_from_rows` takes them.
    ``source`` names the rows in messages (e.g. ``"training rows"``); positions are 0-based list
    indices. Returns the validated records (ids and labels as ``str``). Raises :class:`DataError`
    for an empty list, an invalid row (wrong field type, empty completion) or a repeated id.
    """
    given = list(records)
    if not given:
        raise DataError(f"{source}: no rows (an empty list); at least one row is needed")
    checked = records_from_rows([r.content() if isinstance(r, Record) else r for r in given], source)
    return [  # a Record read from a file keeps naming its file and line, and its form (reviewU: chat was dropped)
        replace(record, where=row.where or record.where, chat=row.chat) if isinstance(row, Record) else record
        for record, row in zip(checked, given)
    ]


def check_ids(ids: Iterable[str], source: str = "<memory>") -> list[str]:
    """Check the ids of already-encoded rows: :class:`DataError` when there are none or one repeats."""
    ids = list(ids)
    if not ids:
        raise DataError(f"{source}: no rows (an empty list); at least one row is needed")
    seen: dict[str, str] = {}
    for index, record_id in enumerate(ids):
        _check_new_id(seen, record_id, f"index {index}", source)
    return ids


def data_fingerprint(records: Sequence[Record]) -> str:
    """SHA-256 hex digest of a canonical JSON encoding of ``records`` (order matters)."""
    payload = json.dumps(
        [record.content() for record in records],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def records_key(records: Sequence[Record]) -> tuple:
    """A hashable identity of a row list (ids and texts, in order), for caches keyed on the training set."""
    return tuple((r.id, r.prompt, r.completion) for r in records)
