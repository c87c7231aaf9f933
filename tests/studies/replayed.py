"""The configuration a study command builds from a command line, for the tests that a study's recorded command
(``bench``/``groundtruth``'s ``command_line``) gives its configuration back."""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import asdict
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from wherefrom.cli import app


def config_of_line(line: str, module: ModuleType, runner: str) -> dict[str, Any]:
    """``asdict`` of the configuration that ``line`` (a recorded ``wherefrom ...`` command; its portable ``<tmp>``
    paths made real again) passes to ``module.runner``, which is stubbed to stop the command there."""
    built: list[Any] = []

    def capture(config, **_keywords):
        built.append(config)
        raise RuntimeError("captured")  # ends the command before any work

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, runner, capture)
        result = CliRunner().invoke(app, shlex.split(line.replace("<tmp>", tempfile.gettempdir()))[1:])
    assert built, result.output
    return asdict(built[0])


def off_default(config: Any, leave: set[str]) -> list[str]:
    """The fields of the dataclass ``config`` at their default (class attribute or default factory), but ``leave``."""
    defaults = asdict(type(config)(**{k: v for k, v in asdict(config).items() if k in ("task", "out")}))
    return [k for k, v in asdict(config).items() if k not in leave and k not in ("task", "out") and v == defaults[k]]
