"""``wherefrom methods [--json]``: every registered method with its family, options and paper."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wherefrom.cli.app import command


@command
def methods(as_json, threads) -> None:
    """Every method `attribute`, `bench`, `diagnose`, `evaluate` and `tune` accept, with its typed options
    (type, default, allowed values, help) and the paper it follows."""
    from wherefrom.methods.registry import METHODS  # imported here: `wherefrom --help` stays quick

    if as_json:
        typer.echo(json.dumps({"methods": [spec.to_dict() for spec in METHODS.values()]}, indent=2))
        return
    table = Table(title="methods (options: --option key=value; settings fixed by the method in brackets)")
    for column in ("method", "family"):  # a name whole on one line (`gradsim-cosin` / `e`: grep found none)
        table.add_column(column, no_wrap=True)
    for column in ("what it computes", "options", "paper"):
        table.add_column(column, overflow="fold")
    for spec in METHODS.values():
        lines = []
        for option in spec.options:
            default = "required" if option.required else f"default {json.dumps(option.default, default=str)}"
            lines.append(f"{option.name} ({default}; {option.allowed()}): {option.help}")
        fixed = ", ".join(f"{key}={value}" for key, value in spec.settings.items())
        description = spec.description + (f" [{fixed}]" if fixed else "")
        table.add_row(spec.name, spec.family, escape(description), escape("\n".join(lines)), escape(spec.citation))
    Console().print(table)  # for reading: at the terminal's width (80 columns into a file); --json for machines
