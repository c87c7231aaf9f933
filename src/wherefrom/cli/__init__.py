"""Command line: ``wherefrom <command>``; :data:`app` is the Typer application.

Importing this package registers every command family on :data:`app`.
"""

from wherefrom.cli import attribute, methods, replay, report, run, studies, wordorder
from wherefrom.cli.app import app

__all__ = ["app", "attribute", "methods", "replay", "report", "run", "studies", "wordorder"]
