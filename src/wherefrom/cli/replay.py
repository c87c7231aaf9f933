"""``wherefrom replay DIR``: rerun the commands recorded in an output folder's ``config.json``."""

from __future__ import annotations

import json

from wherefrom.cli.app import COMMANDS, command, console, fail


@command(distributed=True)  # reruns a recorded command, which decides for itself
def replay(folder, threads) -> None:
    """Rerun, with exactly the recorded settings, every command recorded in FOLDER/config.json (in the
    order they first ran there: e.g. a bench, then its analyses). Finished outputs are reused as
    each command reuses them; delete them first to recompute."""
    records = json.loads((folder / "config.json").read_text())["replay"]
    for key, record in records.items():
        if record["command"] not in COMMANDS:
            fail(f"{folder / 'config.json'}: record {key!r} names an unknown command {record['command']!r}")
        console.print(f"replay: {record['line']}", markup=False, highlight=False)
        COMMANDS[record["command"]](**record["arguments"])
