"""``wherefrom replay DIR``: rerun the commands recorded in an output folder's ``config.json``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from wherefrom.cli.app import COMMANDS, command, console, fail


@command(distributed=True)  # reruns a recorded command, which decides for itself
def replay(folder, threads) -> None:
    """Rerun, with exactly the recorded settings, every command recorded in FOLDER/config.json (in the
    order they first ran there: e.g. a bench, then its analyses), each in the directory it ran in (relative
    to FOLDER, so its relative paths name the same files from anywhere and after the project is moved whole).
    Finished outputs are reused as each command reuses them; delete them first to recompute."""
    folder = Path(folder).resolve()
    config = folder / "config.json"
    records = json.loads(config.read_text())["replay"]
    # records without a position (older versions) run first, in the file's order
    for key, record in sorted(records.items(), key=lambda item: item[1].get("position", -1)):
        if record["command"] not in COMMANDS:
            fail(f"{config}: record {key!r} names an unknown command {record['command']!r}")
        where = (folder / record["cwd"]).resolve() if "cwd" in record else Path.cwd()
        if not where.is_dir():
            fail(
                f"{config}: record {key!r} ran in {where}, which is gone, and its relative paths are relative to it; "
                f"run its line by hand from the directory it means: {record['line']}"
            )
        console.print(f"replay (in {where}): {record['line']}", markup=False, highlight=False)
        with contextlib.chdir(where):
            COMMANDS[record["command"]](**record["arguments"])
