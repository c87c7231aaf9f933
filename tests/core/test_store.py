"""Atomic JSON writing: strict JSON (no NaN), keyed cache reads that see the written form."""

from __future__ import annotations

import json
import math

from wherefrom.core.store import atomic_write_json, read_keyed_json, strict_json


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
