"""Tests for wherefrom.core.data: loading JSONL / CSV / Parquet, validation messages, fingerprints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import SHARED
from wherefrom.core.data import (
    DataError,
    Record,
    check_records,
    data_fingerprint,
    load_records,
    records_from_rows,
)

ROWS = [
    {"id": "a", "prompt": "p one", "completion": "c one", "label": "x"},
    {"id": "b", "prompt": "p two", "completion": "c two", "label": "y"},
    {"prompt": "", "completion": " c three", "label": 3},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def expected(stem: str, third_position: int) -> list[Record]:
    return [
        Record("a", "p one", "c one", "x"),
        Record("b", "p two", "c two", "y"),
        Record(f"{stem}:{third_position}", "", " c three", "3"),
    ]


# -- formats ---------------------------------------------------------------------------------------


def test_load_jsonl_skips_blank_lines_and_defaults_id(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "   ", json.dumps({**ROWS[2], "x": 1})]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    assert load_records(path) == expected("train", 5)


def test_load_json_suffix_and_str_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "set.json", [json.dumps(r) for r in ROWS])
    assert load_records(str(path)) == expected("set", 3)


def test_load_csv(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "rows.csv",
        ["id", "prompt", "completion", "label", "extra"],
        [["a", "p one", "c one", "x", "e"], ["b", "p two", "c two", "y", ""], ["", "", " c three", "3", ""]],
    )
    # header is line 1, so the third data row is line 4
    assert load_records(path) == expected("rows", 4)


def test_a_csv_float_id_is_the_id_of_the_same_json_number(tmp_path: Path) -> None:
    """pandas writes a float id column as 1.0, 2.0: the CSV gave ids '1.0', '2.0' where the same column as JSON or
    Parquet gives '1', '2', and the cells 1 and 1.0 were two ids (JSON refuses them as one id given twice)."""
    rows = [["1.0", "p", " c", "2.0"], ["-3.00", "p", " c", "x"], ["1.5", "p", " c", "007"], ["1e3", "p", " c", ""]]
    path = write_csv(tmp_path / "f.csv", ["id", "prompt", "completion", "label"], rows)
    loaded = load_records(path)
    assert [(r.id, r.label) for r in loaded] == [("1", "2"), ("-3", "x"), ("1.5", "007"), ("1e3", None)]
    twice = write_csv(tmp_path / "twice.csv", ["id", "prompt", "completion"], [["1", "p", " c"], ["1.0", "p", " c"]])
    with pytest.raises(DataError, match=r"twice\.csv, line 3: field 'id': duplicate id '1' \(first used at line 2\)"):
        load_records(twice)


def test_load_csv_empty_label_is_none(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", ["prompt", "completion", "label"], [["p", "c", ""]])
    assert load_records(path) == [Record("r:2", "p", "c", None)]


def test_load_parquet(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["id"] = None
    rows[2]["label"] = "3"
    path = write_parquet(tmp_path / "t.parquet", rows)
    assert load_records(path) == expected("t", 2)


def test_records_from_rows() -> None:
    records = records_from_rows(ROWS)
    assert [r.id for r in records] == ["a", "b", "2"]
    assert records[2].label == "3"
    assert records_from_rows([]) == []


def test_integer_id_converted_to_str() -> None:
    assert records_from_rows([{"id": 7, "prompt": "p", "completion": "c"}])[0].id == "7"


# -- errors ----------------------------------------------------------------------------------------


def assert_error(excinfo: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), '{"prompt": "p", '])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "bad.jsonl", "line 2", "invalid JSON")
    path = write_jsonl(tmp_path / "open.jsonl", [json.dumps(ROWS[0]), '{"prompt": "p, "completion": "c"}'])
    with pytest.raises(DataError) as excinfo:  # userS: json's "starting at" read "starting at at column 29"
        load_records(path)
    assert_error(excinfo, "open.jsonl, line 2: invalid JSON (Expecting ',' delimiter at column 17)")
    path = write_jsonl(tmp_path / "unterminated.jsonl", [json.dumps(ROWS[0]), '{"prompt": "p'])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "invalid JSON (Unterminated string starting at column 12)")
    assert " at at " not in str(excinfo.value)


def test_non_object_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arr.jsonl", ["[1, 2]"])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "arr.jsonl", "line 1", "list")


@pytest.mark.parametrize("field", ["prompt", "completion"])
def test_missing_field_jsonl(tmp_path: Path, field: str) -> None:
    row = {"id": "z", "prompt": "p", "completion": "c"}
    del row[field]
    path = write_jsonl(tmp_path / "miss.jsonl", [json.dumps(ROWS[0]), "", json.dumps(row)])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "miss.jsonl", "line 3", f"missing field '{field}'")


@pytest.mark.parametrize("field", ["prompt", "completion"])
def test_null_field_is_named_null_not_missing(tmp_path: Path, field: str) -> None:
    row = {"id": "z", "prompt": "p", "completion": "c", field: None}
    path = write_jsonl(tmp_path / "null.jsonl", [json.dumps(row)])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "null.jsonl", "line 1", f"field '{field}' is null")


def test_missing_column_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "nocol.csv", ["id", "prompt"], [["a", "p"]])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "nocol.csv", "line 2", "'completion'")


def test_non_string_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "num.jsonl", [json.dumps({"prompt": 5, "completion": "c"})])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "num.jsonl", "line 1", "'prompt'", "must be a string", "int")


def test_empty_completion_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS[0]), json.dumps({"prompt": "p", "completion": "  \n"})]
    path = write_jsonl(tmp_path / "empty.jsonl", lines)
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "empty.jsonl", "line 2", "'completion'", "empty completion")


def test_empty_completion_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", ["prompt", "completion"], [["p", "c"], ["p", ""]])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "e.csv", "line 3", "'completion'", "empty completion")


def test_empty_completion_parquet(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}]
    path = write_parquet(tmp_path / "e.parquet", rows)
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "e.parquet", "row 1", "'completion'", "empty completion")


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), json.dumps({**ROWS[1], "id": "a"})]
    path = write_jsonl(tmp_path / "dup.jsonl", lines)
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "dup.jsonl", "line 3", "line 1", "'id'", "duplicate id 'a'")


@pytest.mark.parametrize(
    ("field", "value", "control"),
    [("id", "q\nnext", "\n"), ("id", "a\tb", "\t"), ("label", "x\r", "\r"), ("id", "\x00z", "\x00")],
)
def test_a_control_character_in_an_id_or_label_is_refused_by_name(tmp_path, field, value, control) -> None:
    """An id with a line break was accepted and printed raw: `query` wrote one result over two lines, and a
    consumer taking the first word read the ids "q" and "next". Control characters are refused in ids and labels,
    in every format (here JSONL, and rows in memory); other characters (a zero-width joiner, accents) pass."""
    path = write_jsonl(tmp_path / "ids.jsonl", [json.dumps(ROWS[0]), json.dumps({**ROWS[1], field: value})])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "ids.jsonl", "line 2", f"field {field!r} holds the control character {control!r}")
    with pytest.raises(DataError, match=f"index 0: field '{field}' holds the control character"):
        records_from_rows([{**ROWS[1], field: value}], source="queries")
    assert records_from_rows([{**ROWS[1], "id": "emoji \u200d ok", "label": "café"}])[0].label == "café"


@pytest.mark.parametrize("label", ["", "  "])
def test_an_empty_or_blank_label_is_refused_by_name(tmp_path: Path, label: str) -> None:
    """A JSON ``"label": ""`` was the class ``""`` (ranked as one by class attribution) while an empty CSV cell is no
    label; an empty or blank label is refused in every form (JSONL, CSV, rows in memory)."""
    path = write_jsonl(tmp_path / "labels.jsonl", [json.dumps(ROWS[0]), json.dumps({**ROWS[1], "label": label})])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "labels.jsonl", "line 2", "field 'label' is", "leave the field out")
    if label:
        csv_path = write_csv(tmp_path / "labels.csv", ["prompt", "completion", "label"], [["p", "c", label]])
        with pytest.raises(DataError, match=r"labels\.csv, line 2: field 'label' is blank"):
            load_records(csv_path)
    with pytest.raises(DataError, match="index 0: field 'label' is"):
        records_from_rows([{**ROWS[1], "label": label}], source="queries")


def test_duplicate_id_in_memory() -> None:
    with pytest.raises(DataError) as excinfo:
        records_from_rows([ROWS[0], ROWS[0]], source="queries")
    assert_error(excinfo, "queries", "index 1", "index 0", "'id'")


def test_bad_label_type_in_memory() -> None:
    with pytest.raises(DataError) as excinfo:
        records_from_rows([{"prompt": "p", "completion": "c", "label": [1]}], source="mem")
    assert_error(excinfo, "mem", "index 0", "'label'")


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "data.txt", ".jsonl", ".csv", ".parquet")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_records(tmp_path / "nope.jsonl")
    assert_error(excinfo, "nope.jsonl", "not found")


def test_empty_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [""])
    with pytest.raises(DataError, match="no records"):
        load_records(path)


# -- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_order_sensitive() -> None:
    records = records_from_rows(ROWS)
    fp = data_fingerprint(records)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert data_fingerprint(records_from_rows(ROWS)) == fp
    assert data_fingerprint(list(reversed(records))) != fp
    changed = [records[0], records[1], Record(records[2].id, "", " c three", None)]
    assert data_fingerprint(changed) != fp


# -- shared data sets ------------------------------------------------------------------------------


def test_shared_emotion_train_loads() -> None:
    path = SHARED / "emotion.train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    records = load_records(path)
    assert len(records) == 750
    assert len({r.label for r in records}) == 5
    assert len({r.id for r in records}) == 750


@pytest.mark.parametrize("name", ["grammars.train.jsonl", "math.test.jsonl", "emotion.test.jsonl"])
def test_other_shared_sets_load(name: str) -> None:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    records = load_records(path)
    assert records and all(r.completion.strip() for r in records)


def chat_rows() -> list[dict]:
    return [
        {"id": "m1", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " Hello."}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " 4"}], "label": "math"},
    ]


def test_chat_messages_rows_become_prompt_and_completion(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(row) for row in chat_rows()])
    records = load_records(path)
    assert records[0] == Record(id="m1", prompt="Hi?", completion=" Hello.")
    assert records[1] == Record(id="chat:2", prompt="2+2?", completion=" 4", label="math")


@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ],
        [{"role": "user", "content": "Hi"}],
    ],
)
def test_other_conversations_are_refused_naming_the_roles(tmp_path: Path, messages) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": messages})])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: field 'messages': expected a user message then an "):
        load_records(path)


@pytest.mark.parametrize(
    ("user", "assistant", "said"),
    [
        ({"role": "user"}, {"role": "assistant", "content": " x"}, "field 'messages[0]' has no 'content'"),
        ({"role": "user", "content": None}, {"role": "assistant", "content": " x"}, "'messages[0].content' is null"),
        ({"role": "user", "content": "q"}, {"role": "assistant", "content": 3}, "field 'messages[1].content' must be"),
        ({"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}, "'messages[1].content': empty"),
    ],
)
def test_a_chat_rows_bad_text_is_named_where_it_is(tmp_path: Path, user, assistant, said) -> None:
    """userO: a user message without ``content`` was "field 'prompt' is null", a field the row does not have."""
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": [user, assistant]})])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: ") as caught:
        load_records(path)
    assert said in str(caught.value)


@pytest.mark.parametrize("extra", [{"prompt": "zz", "completion": " yy"}, {"completion": " yy"}, {"prompt": ""}])
def test_a_row_with_messages_and_a_plain_field_is_refused(tmp_path: Path, extra) -> None:
    """Both forms in one row: the messages were dropped silently for the prompt/completion (and with only one
    of them, the row was refused as missing the other); the form to keep is the user's choice."""
    row = {"id": "m0", "messages": chat_rows()[0]["messages"], **extra}
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(chat_rows()[1]), json.dumps(row)])
    given = " and ".join(repr(k) for k in extra)
    with pytest.raises(DataError, match=rf"chat\.jsonl, line 2: fields 'messages' and {given} both given"):
        load_records(path)


def test_a_table_mixing_chat_and_plain_rows_reads_both(tmp_path: Path) -> None:
    """A Parquet table of both forms has every column in every row, null where a row has the other form."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = chat_rows()[0]
    table = pa.Table.from_pylist(
        [
            {"id": "m1", "messages": chat["messages"], "prompt": None, "completion": None},
            {"id": "p1", "messages": None, "prompt": "ab", "completion": " cd"},
        ]
    )
    pq.write_table(table, tmp_path / "mixed.parquet")
    assert load_records(tmp_path / "mixed.parquet") == [
        Record(id="m1", prompt="Hi?", completion=" Hello."),
        Record(id="p1", prompt="ab", completion=" cd"),
    ]


def save_to_disk_by_hand(folder: Path, rows: list[dict], files: int = 2) -> Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow stream shards named in ``state.json``."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    names = []
    for i in range(files):
        part = pa.Table.from_pylist(rows[i::files] if files > 1 else rows)
        name = f"data-{i:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_a_datasets_save_to_disk_folder_loads_without_datasets(tmp_path: Path) -> None:
    folder = save_to_disk_by_hand(tmp_path / "train", [*ROWS[:2], {"prompt": "p", "completion": " c", "label": None}])
    records = load_records(folder)
    assert [r.id for r in records] == ["a", "train:1", "b"]  # shard 0 holds rows 0 and 2, shard 1 row 1
    assert records[2] == Record(id="b", prompt="p two", completion="c two", label="y")
    rows = [{"label": None, **row} for row in chat_rows()]  # from_pylist takes its columns from the first row
    chat = load_records(save_to_disk_by_hand(tmp_path / "chat", rows, files=1))
    assert chat[1].prompt == "2+2?" and chat[1].label == "math"


def test_folders_that_save_to_disk_did_not_write_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"DatasetDict folder with splits \['train', 'test'\]; pass one split"):
        load_records(tmp_path / "dict")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"no state\.json"):
        load_records(tmp_path / "plain")


def test_real_datasets_load_from_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (optional)")
    dataset = datasets.Dataset.from_list(ROWS[:2]).shuffle(seed=0)  # an indices mapping: saved flattened
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert [r.id for r in load_records(tmp_path / "saved")] == list(dataset["id"])


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("keys.jsonl", '{"prompt": "p", "completion": " c", "prompt": "q"}\n', "line 1"),
        ("deep.jsonl", '{"messages": [{"role": "user", "content": "p", "content": "q"}, {}]}\n', "line 1"),
        (
            "array.json",
            '[\n{"prompt": "p", "completion": " c"},\n{"prompt": "p", "completion": " c", "id": 1, "id": 2}]',
            "line 3",
        ),
        ("header.csv", "prompt,completion,prompt\np, c,q\n", "line 1 (the header)"),
    ],
)
def test_a_field_given_twice_in_one_row_is_refused_by_name(tmp_path: Path, name: str, text: str, where: str) -> None:
    """A repeated JSON key (at any depth) or CSV header name was read silently: JSON kept the last key and the CSV
    reader the last column, so one of the user's two prompts was dropped without a word."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    field = "'content'" if name == "deep.jsonl" else "'id'" if name == "array.json" else "'prompt'"
    assert_error(excinfo, name, where, f"field {field} is given twice")


def test_a_column_given_twice_in_parquet_or_arrow_is_refused_by_name(tmp_path: Path) -> None:
    """pyarrow failed a Parquet file with a repeated column on "Multiple matches for FieldRef", and read a
    save_to_disk Arrow file's repeated column as its last copy."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table([pa.array(["p"]), pa.array([" c"]), pa.array(["q"])], names=["prompt", "completion", "prompt"])
    pq.write_table(table, tmp_path / "twice.parquet")
    with pytest.raises(DataError) as excinfo:
        load_records(tmp_path / "twice.parquet")
    assert_error(excinfo, "twice.parquet (its schema)", "field 'prompt' is given twice")
    folder = tmp_path / "saved"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(DataError) as excinfo:
        load_records(folder)
    assert_error(excinfo, "data-00000-of-00001.arrow (its schema)", "field 'prompt' is given twice")


def test_blank_csv_header_names_and_repeated_keys_in_other_rows_pass(tmp_path: Path) -> None:
    path = tmp_path / "trailing.csv"
    path.write_text("prompt,completion,,\np, c,,\n", encoding="utf-8")
    assert [r.completion for r in load_records(path)] == [" c"]


def test_a_record_names_its_file_and_line_and_keeps_them_through_check_records(tmp_path: Path) -> None:
    """Errors raised after loading (an over-long row at encoding) named the record id only; a record read from a
    file now names its file and line, also after the API's check_records, and the fingerprint ignores where."""
    from wherefrom.core.data import check_records

    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1])])
    records = load_records(path)
    assert [r.named() for r in records] == [f"{path}, line 1: record 'a'", f"{path}, line 3: record 'b'"]
    assert [r.named() for r in check_records(records)] == [r.named() for r in records]
    assert check_records([Record("q", "p", " c")], source="queries")[0].named() == "queries, index 0: record 'q'"
    assert Record("x", "p", " c").named() == "record 'x'"
    in_memory = [Record(r.id, r.prompt, r.completion, r.label) for r in records]
    assert in_memory == records and data_fingerprint(in_memory) == data_fingerprint(records)


def test_a_csv_row_with_more_cells_than_the_header_is_refused_by_line(tmp_path: Path) -> None:
    """An unquoted comma in a prompt gave the row one cell more than the header: the completion took part of the
    prompt, the label took the completion, and the last cell was dropped, all without a word. Empty extra cells
    (trailing delimiters, as spreadsheets write them) still pass."""
    path = tmp_path / "shifted.csv"
    path.write_text("id,prompt,completion,label\nr0,hello world:, ef,x\nr1,hello, world:, ij,y\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, "shifted.csv, line 3", "5 cells, the header names 4", "extra: 'y'", "must be quoted")
    path.write_text("id,prompt,completion,label\nr0,hello world:, ef,x,,\n", encoding="utf-8")
    assert [r.label for r in load_records(path)] == ["x"]


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        # a quote never closed: it swallowed the next rows (3 rows loaded as 1)
        ('id,prompt,completion\na,"p1 quoted, never closed, c1\nb,p2, c2\nc,"p3", c3"\n', "lines 2-4"),
        ('id,prompt,completion\na,"hi" she said, c1\n', "line 2"),  # the quotes were dropped from the prompt
        ('id,prompt,completion\na,p1, c1\nb,"p2 never closed, c2\n', "line 3"),  # open at the end of the file
    ],
)
def test_csv_quotes_that_do_not_pair_up_are_refused_by_line(tmp_path: Path, text: str, lines: str) -> None:
    """userH: the CSV reader was not strict, so a quoted cell left open merged the rows after it into one and a quote
    closing a cell early vanished from its text, without a word. A quote inside an unquoted cell is kept."""
    path = tmp_path / "quotes.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, f"quotes.csv, {lines}: malformed CSV", "this row's quotes do not pair up")
    path.write_text('id,prompt,completion\na,he said "hi", c1\n', encoding="utf-8")
    assert load_records(path)[0].prompt == 'he said "hi"'


def test_messages_that_are_not_a_list_are_named_as_such(tmp_path: Path) -> None:
    """A string was iterated letter by letter ("got roles ['str', 'str']"; found by a new-user trial)."""
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": "hi"})])
    with pytest.raises(DataError, match=r"line 1: field 'messages': expected a list of \{role, content\} .* got str"):
        load_records(path)


@pytest.mark.parametrize("field", ["prompt", "completion", "id", "label"])
def test_a_lone_surrogate_is_refused_naming_the_line_and_field(tmp_path: Path, field: str) -> None:
    """JSON's "\\ud800" without its pair reads as a Python string that is no text: it was accepted and failed after
    the model loaded with "surrogates not allowed", naming nothing (found by a new-user trial)."""
    row = {"id": "a", "prompt": "ab", "completion": " cd", "label": "x"}
    line = json.dumps(row).replace(f'"{row[field]}"', f'"{row[field]}\\ud800"', 1)
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({**row, "id": "z"}), line])
    with pytest.raises(DataError, match=rf"bad\.jsonl, line 2: field '{field}' holds a lone surrogate '\\ud800'"):
        load_records(path)
    with pytest.raises(DataError, match=rf"index 0: field '{field}' holds a lone surrogate"):
        check_records([{**row, field: row[field] + "\ud800"}])


def test_an_infinite_number_id_is_named_as_not_finite(tmp_path: Path) -> None:
    """``"id": 1e400`` parses to inf, and the error said "must be a string or a number, got float"."""
    path = write_jsonl(tmp_path / "inf.jsonl", ['{"id": 1e400, "prompt": "a", "completion": " b"}'])
    with pytest.raises(DataError, match=r"line 1: field 'id' must be a string or a finite number, got inf"):
        load_records(path)


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("case.csv", "ID,Prompt,Completion\na,p, c\n", "line 2: missing field 'prompt' (there is 'Prompt': field"),
        ("space.jsonl", '{" prompt": "p", "completion": " c"}\n', "missing field 'prompt' (there is ' prompt'"),
        (
            "wrapped.json",
            '{"data": [{"prompt": "p", "completion": " c"}]}',
            "line 1: missing field 'prompt' (this object holds a list of objects under 'data'",
        ),
        ("blank.jsonl", '{"id": "  ", "prompt": "p", "completion": " c"}\n', "line 1: field 'id' is blank ('  ')"),
        ("empty.jsonl", '{"id": "", "prompt": "p", "completion": " c"}\n', "line 1: field 'id' is an empty string"),
    ],
)
def test_a_missing_field_says_what_is_there_instead_and_a_blank_id_is_refused(tmp_path, name, text, said):
    """userH: a header ``Prompt`` and rows wrapped in ``{"data": [...]}`` both said "missing field 'prompt'" alone,
    and an id of spaces (printed as nothing in every table) was taken where an empty one was refused."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert_error(excinfo, said)


def test_a_long_csv_cell_loads_and_only_quote_errors_are_explained_as_quotes(tmp_path: Path) -> None:
    """reviewS: a quoted cell of over 128 KiB (a long document) failed with csv's field limit, and that error was
    explained as quotes that do not pair up."""
    path = tmp_path / "long.csv"
    long = "word " * 60_000
    path.write_text(f'id,prompt,completion\na,"{long}", c\n', encoding="utf-8")
    assert load_records(path)[0].prompt == long
    import csv

    assert csv.field_size_limit() == 131072  # restored after the read
