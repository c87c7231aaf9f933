"""Command line: ``wherefrom <command>``; :data:`app` is the Typer application."""

from wherefrom.cli.app import app

__all__ = ["app"]
