"""The command-line recorder: quoting, repeated flags, and paths that name no machine."""

from __future__ import annotations

import tempfile
from pathlib import Path

from wherefrom.core.commandline import command_line, portable, repository_root


def test_words_lists_floats_and_flags():
    line = command_line(
        "bench",
        [
            ("--task", "rules"),
            ("--n-train", None),
            ("--lr", 0.001),
            ("--full", True),
            ("--no", False),
            ("--option", ["a=1", 'b="x y"']),
            ("--seed", 0),
            (None, "pos"),
        ],
        exact=True,
    )
    assert line == "wherefrom bench --task rules --lr 0.001 --full --option a=1 --option 'b=\"x y\"' --seed 0 pos"


def test_paths_become_relative_to_the_repository_or_placeholders():
    root = repository_root()
    assert root is not None and (root / ".git").exists()
    tmp = Path(tempfile.gettempdir()).resolve() / "run-1"
    home = Path.home() / "data.jsonl"
    assert portable(f"--run {tmp} --train {home} --model {root / 'models' / 'm'}") == (
        "--run <tmp>/run-1 --train <home>/data.jsonl --model models/m"
    )
    assert str(tmp) in command_line("fit", [("--run", tmp)], exact=True)
    assert command_line("fit", [("--run", tmp)]) == "wherefrom fit --run <tmp>/run-1"
