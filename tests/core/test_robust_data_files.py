"""Data files as spreadsheets, editors and other platforms write them load to the same records as a
plain UTF-8 file, or raise a DataError naming the file and the line."""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

import pytest

from wherefrom.core.data import DataError, Record, load_records

ROWS = [
    {"id": "a", "prompt": "Grüße, café?", "completion": " naïve €5", "label": "x"},
    {"id": "b", "prompt": "two\nlines", "completion": " done", "label": "y"},
    {"id": "c", "prompt": "", "completion": " third, with; delimiters", "label": "z"},
]
EXPECTED = [Record(r["id"], r["prompt"], r["completion"], r["label"]) for r in ROWS]


def csv_text(delimiter: str = ",", line_end: str = "\r\n") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=line_end)
    writer.writerow(["id", "prompt", "completion", "label"])
    for r in ROWS:
        writer.writerow([r["id"], r["prompt"], r["completion"], r["label"]])
    return buffer.getvalue()


def jsonl_text(line_end: str = "\n") -> str:
    return line_end.join(json.dumps(r, ensure_ascii=False) for r in ROWS) + line_end


@pytest.mark.parametrize("variant", ["plain", "bom", "crlf", "cr", "utf16le", "utf16be", "utf32", "trailing_blank"])
def test_jsonl_variants_load_like_plain(tmp_path: Path, variant: str) -> None:
    text = jsonl_text("\r\n" if variant == "crlf" else "\r" if variant == "cr" else "\n")
    if variant == "trailing_blank":
        text += "\n\n   \n"
    data = {
        "bom": codecs.BOM_UTF8 + text.encode("utf-8"),
        "utf16le": codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
        "utf16be": codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
        "utf32": text.encode("utf-32"),  # Python writes the BOM
    }.get(variant, text.encode("utf-8"))
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    records = load_records(path)
    assert records == EXPECTED


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
@pytest.mark.parametrize("line_end", ["\r\n", "\n"])
def test_csv_variants_load_like_plain(tmp_path: Path, delimiter: str, encoding: str, line_end: str) -> None:
    # quoted multi-line cells (row b) and cells holding the other delimiters (row c) included
    path = tmp_path / "train.csv"
    path.write_bytes(csv_text(delimiter, line_end).encode(encoding))
    assert load_records(path) == EXPECTED


@pytest.mark.parametrize("line_end, quoting", [("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL)])
def test_line_ends_inside_a_csv_cell_are_kept_as_in_jsonl_and_parquet(tmp_path: Path, line_end: str, quoting) -> None:
    """userO: the text was read with its line ends made LF before the CSV reader ran, so a cell ``l1\\r\\nl2`` (or
    ``cr\\ronly``) loaded as ``l1\\nl2`` from CSV and as written from JSONL and Parquet: other tokens, other scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": "a", "prompt": "l1\r\nl2", "completion": " x"},
        {"id": "b", "prompt": "cr\ronly", "completion": " y"},
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=line_end, quoting=quoting)  # minimal quoting of LF rows misses a CR
    writer.writerows([["id", "prompt", "completion"], *([r["id"], r["prompt"], r["completion"]] for r in rows)])
    (tmp_path / "t.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    expected = [Record(r["id"], r["prompt"], r["completion"]) for r in rows]
    for name in ("t.csv", "t.jsonl", "t.parquet"):
        assert load_records(tmp_path / name) == expected, name


def test_csv_excel_empty_rows_and_padded_header(tmp_path: Path) -> None:
    text = "id ; prompt ;completion;label\r\n1;p;c;\r\n;;;\r\n\r\n2;q;d;7\r\n;;;\r\n"
    path = tmp_path / "eu.csv"
    path.write_text(text, encoding="utf-8")
    assert load_records(path) == [Record("1", "p", "c", None), Record("2", "q", "d", "7")]


def test_multiline_csv_row_named_by_its_first_line(tmp_path: Path) -> None:
    text = 'id,prompt,completion\nok,p,c\nbad,"line one\nline two\nline three",\n'
    path = tmp_path / "multi.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"multi\.csv, line 3: field 'completion'"):
        load_records(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("bad_line", [1, 2, 8])
def test_latin1_byte_named_on_its_line(tmp_path: Path, suffix: str, bad_line: int) -> None:
    # a file that is UTF-8 except for one cp1252 'é' (0xE9) on line ``bad_line``
    lines = (["id,prompt,completion"] if suffix == ".csv" else []) + [
        (
            f"r{i},p{i},c{i}"
            if suffix == ".csv"
            else json.dumps({"id": f"r{i}", "prompt": f"p{i}", "completion": f"c{i}"})
        )
        for i in range(10)
    ]
    encoded = [line.encode("utf-8") for line in lines]
    encoded[bad_line - 1] = encoded[bad_line - 1].replace(b"p", "caf\u00e9 ".encode("cp1252"), 1)
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(b"\r\n".join(encoded) + b"\r\n")
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    message = str(excinfo.value)
    assert f"latin{suffix}, line {bad_line}:" in message
    assert "0xe9" in message and "UTF-8" in message and "Latin-1" in message


def test_utf16_without_bom_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nobom.jsonl"
    path.write_bytes(jsonl_text().encode("utf-16-le"))
    with pytest.raises(DataError, match="UTF-16 without a byte-order mark"):
        load_records(path)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
@pytest.mark.parametrize("name", ["ascii.jsonl", "ascii.csv"])
def test_ascii_text_in_utf16_or_32_without_bom_is_named(tmp_path: Path, encoding: str, name: str) -> None:
    """ASCII text in UTF-16/32 without a BOM is valid UTF-8 (a NUL beside each character): it was "invalid JSON at
    column 2" (or a CSV without the header's fields), naming no encoding."""
    text = '{"prompt": "p", "completion": "c"}\n' if name.endswith("jsonl") else "prompt,completion\np,c\n"
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=r"ascii\.\w+, line 1: a NUL character at column [12]: it looks like UTF-16"):
        load_records(path)


def test_json_array_file_and_trailing_commas(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    assert load_records(path) == EXPECTED
    path.write_text(
        '[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "q", "completion": "d"},\n]\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"rows\.json, line 4: invalid JSON \(a trailing comma before '\]'"):
        load_records(path)
    # default ids of an array file carry the line its object starts on
    path.write_text(
        '[\n  {"prompt": "p", "completion": "c"},\n\n  {"prompt": "q", "completion": "d"}\n]\n', encoding="utf-8"
    )
    assert [r.id for r in load_records(path)] == ["rows:2", "rows:4"]


def test_trailing_comma_in_jsonl_named(tmp_path: Path) -> None:
    path = tmp_path / "comma.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "q", "completion": "d",}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"comma\.jsonl, line 2: invalid JSON .*trailing comma"):
        load_records(path)
    path.write_text('{"prompt": "p", "completion": "c"},\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: invalid JSON .*no comma after it"):
        load_records(path)


def test_numeric_ids_and_labels_agree_across_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "n.jsonl").write_text(
        '{"id": 1, "prompt": "p", "completion": "c", "label": 2}\n'
        '{"id": 2.0, "prompt": "q", "completion": "d", "label": 2.5}\n',
        encoding="utf-8",
    )
    (tmp_path / "n.csv").write_text("id,prompt,completion,label\n1,p,c,2\n2,q,d,2.5\n", encoding="utf-8")
    # pandas turns an integer column with a gap into floats: 1.0, NaN
    pq.write_table(
        pa.table(
            {"id": [1.0, 2.0], "prompt": ["p", "q"], "completion": ["c", "d"], "label": [2.0, 2.5], "extra": [None, 3]}
        ),
        tmp_path / "n.parquet",
    )
    expected = [Record("1", "p", "c", "2"), Record("2", "q", "d", "2.5")]
    for name in ("n.jsonl", "n.csv", "n.parquet"):
        assert load_records(tmp_path / name) == expected, name


def test_parquet_nan_label_is_absent_and_nan_id_defaults(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "id": [float("nan"), 5.0],
                "prompt": ["p", "q"],
                "completion": ["c", "d"],
                "label": [float("nan"), 1.0],
                "__index_level_0__": [0, 1],
            }
        ),
        tmp_path / "g.parquet",
    )
    assert load_records(tmp_path / "g.parquet") == [Record("g:0", "p", "c", None), Record("5", "q", "d", "1")]


def test_ids_one_and_one_point_zero_collide(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text(
        '{"id": 1, "prompt": "p", "completion": "c"}\n{"id": "1", "prompt": "q", "completion": "d"}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"dup\.jsonl, line 2: field 'id': duplicate id '1' \(first used at line 1\)"):
        load_records(path)


def test_a_clash_with_a_generated_id_says_the_id_was_generated(tmp_path: Path) -> None:
    """userY: a row without an id gets ``stem:line``; where an earlier row had taken that id, the message blamed
    the later row's 'id' field, which it does not have. Either order now says which id was generated."""
    rows = [{"prompt": "a:", "completion": " b"}, {"prompt": "c:", "completion": " d"}]
    later = tmp_path / "later.jsonl"
    later.write_text("\n".join(json.dumps(r) for r in [{**rows[0], "id": "later:2"}, rows[1]]) + "\n")
    with pytest.raises(DataError, match=r"later.jsonl, line 2: the row has no id, and the one generated for it, "):
        load_records(later)
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("\n".join(json.dumps(r) for r in [rows[0], {**rows[1], "id": "earlier:1"}]) + "\n")
    said = r"line 2: field 'id': duplicate id 'earlier:1' \(first used at line 1, generated for a row without one\)"
    with pytest.raises(DataError, match=said):
        load_records(earlier)
