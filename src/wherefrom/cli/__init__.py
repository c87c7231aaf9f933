"""Command line: ``wherefrom <command>``; :data:`app` is the Typer application.

Importing this package registers every command family on :data:`app`.
"""

from wherefrom.cli import attribute, replay, run, studies
from wherefrom.cli.app import app

__all__ = ["app", "attribute", "replay", "run", "studies"]
