"""The one command-line recorder: ``wherefrom <command> ...`` from arguments, portable across machines.

:func:`command_line` renders arguments as a shell-quoted command that reruns them; :func:`portable`
rewrites machine-specific absolute paths in any text: a path inside the repository the command runs
in becomes relative to that repository's root, a path under the temporary folder starts with
``<tmp>``, one under the home folder with ``<home>``. Results files record the portable form; the
exact arguments stay in the output folder's ``config.json`` (see ``wherefrom replay``).
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["command_line", "field_flags", "portable", "repository_root"]


def repository_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working folder) holding ``.git``, else ``None``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return folder
    return None


def portable(text: str) -> str:
    """``text`` with absolute paths of this machine replaced: the repository root by nothing (paths in it
    become relative to it), the temporary folder by ``<tmp>``, the home folder by ``<home>``."""
    root = repository_root()
    prefixes = [(str(root) + os.sep, "")] if root is not None else []
    prefixes += [(str(Path(tempfile.gettempdir()).resolve()) + os.sep, "<tmp>/")]
    prefixes += [(tempfile.gettempdir().rstrip(os.sep) + os.sep, "<tmp>/"), (str(Path.home()) + os.sep, "<home>/")]
    for prefix, replacement in prefixes:
        text = text.replace(prefix, replacement)
    return text


def _tokens(flag: str | None, value: Any) -> list[str]:
    """One argument as command-line words: ``None``/``False``/empty lists vanish, ``True`` is the bare
    flag, a list repeats the flag, a float keeps every digit (``repr``)."""
    if value is None or value is False or (isinstance(value, list | tuple) and not value):
        return []
    if isinstance(value, list | tuple):
        return [word for item in value for word in _tokens(flag, item)]
    if value is True:
        return [flag] if flag else []
    text = repr(value) if isinstance(value, float) else str(value)
    return [flag, text] if flag else [text]


def command_line(command: str, arguments: Iterable[tuple[str | None, Any]], exact: bool = False) -> str:
    """``wherefrom COMMAND ...`` for ``(flag, value)`` pairs in order (flag ``None``: a positional argument).

    Paths go through :func:`portable` unless ``exact``; every word is shell-quoted.
    """
    words = ["wherefrom", *command.split()]
    for flag, value in arguments:
        words += _tokens(flag, value)
    line = " ".join(shlex.quote(word) for word in words)
    return line if exact else portable(line)


def field_flags(config: Any, names: Iterable[str]) -> list[tuple[str, Any]]:
    """``(--field-name, value)`` pairs of the named fields of a configuration object, for :func:`command_line`
    (where a field and its flag share a name)."""
    return [("--" + name.replace("_", "-"), getattr(config, name)) for name in names]
