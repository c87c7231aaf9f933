"""Command line: ``wherefrom <command>``; :data:`app` is the Typer application.

Commands live in :mod:`wherefrom.cli.app`; the modules imported below add theirs to the same ``app``.
"""

from wherefrom.cli import report, wordorder  # noqa: F401  (they register `report` and `word-order`)
from wherefrom.cli.app import app

__all__ = ["app"]
