"""The CLI tests' workspace: a tiny saved GPT-2 and 20 training / 3 query rows of a generated rule task."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from wherefrom.cli import app
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import rule_identification, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "model", arch="gpt2")
    train, queries = rule_identification(n_train=20, n_test=3, seed=0)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(queries, root / "queries.jsonl")
    return root


def invoke(*args):
    """``wherefrom ARGS`` run in-process by typer's ``CliRunner`` (arguments as strings); the result."""
    return CliRunner().invoke(app, [str(a) for a in args])
