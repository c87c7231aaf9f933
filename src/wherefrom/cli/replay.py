"""``wherefrom replay DIR``: rerun the commands recorded in an output folder's ``config.json``."""

from __future__ import annotations

import inspect
import json

from wherefrom.cli.app import COMMANDS, command, console, fail


@command
def replay(folder, threads) -> None:
    """Rerun, with exactly the recorded settings, every command recorded in FOLDER/config.json (in the
    order they first ran there: e.g. a bench, then its analyses). Finished outputs are reused as
    each command reuses them; delete them first to recompute. A command that refuses to replace
    earlier results (scores, attribute, finetune) replaces them here: replaying recomputes them."""
    records = json.loads((folder / "config.json").read_text())["replay"]
    for key, record in records.items():
        if record["command"] not in COMMANDS:
            fail(f"{folder / 'config.json'}: record {key!r} names an unknown command {record['command']!r}")
        console.print(f"replay: {record['line']}", markup=False, highlight=False)
        rerun = COMMANDS[record["command"]]
        arguments = dict(record["arguments"])
        if "overwrite" in inspect.signature(rerun).parameters:
            arguments["overwrite"] = True
        rerun(**arguments)
