"""``wherefrom replay DIR``: rerun the commands recorded in an output folder's ``config.json``."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from wherefrom.cli.app import COMMANDS, command, console, fail
from wherefrom.cli.settings import SETTINGS
from wherefrom.cli.studies import PRESET_SETTINGS


def path_arguments(arguments: dict[str, Any]) -> dict[str, str]:
    """The arguments of a record that name a file or folder (settings declared as paths), by setting name."""
    return {
        name: value
        for name, value in arguments.items()
        if isinstance(value, str) and name in SETTINGS and SETTINGS[name].is_path
    }


def relocated(record: dict[str, Any], where: Path, folder: Path) -> tuple[dict[str, Any], Path | None]:
    """``(arguments, recorded folder)`` of a :func:`wherefrom.cli.app.remember` record found in ``folder``, which
    ran in ``where``: when the folder it was recorded in (its ``folder``, seen from ``where``) is another one, i.e.
    ``folder`` is a copy or was moved without the directory it ran in, each path argument at or under that folder
    names the same place under ``folder`` (relative paths stay relative to ``where``), and the recorded folder is
    returned; else the arguments as recorded and ``None`` (also for a record older than its ``folder`` entry)."""
    arguments = dict(record["arguments"])
    if not isinstance(record.get("folder"), str):
        return arguments, None
    recorded = (where / record["folder"]).resolve()
    if recorded == folder:
        return arguments, None
    for name, value in path_arguments(arguments).items():
        path = (where / value).resolve()
        if path == recorded or recorded in path.parents:
            moved = folder / path.relative_to(recorded)
            arguments[name] = str(moved) if Path(value).is_absolute() else os.path.relpath(moved, where)
    return arguments, recorded


def preset_resolved(command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` of a recorded ``bench --preset`` or ``ablate``, less the preset's settings at their default
    where the record names every one of them (:data:`wherefrom.cli.studies.PRESET_SETTINGS`): such a record was
    written by the versions of 1 December 2026 (fe1aeab to f8238df), which recorded every setting and let the
    preset decide those at their default. Replayed as written, each default now overrides the preset, as a flag
    given does (the empirical Fisher became the true one, 128 tokens 512). A record written since names only
    the flags given; it is returned as it is."""
    presetting = command == "ablate" or (command == "bench" and arguments.get("preset") is not None)
    if not presetting or not all(name in arguments for name in PRESET_SETTINGS):
        return arguments
    return {n: v for n, v in arguments.items() if n not in PRESET_SETTINGS or v != SETTINGS[n].default}


@command(distributed=True)  # reruns a recorded command, which decides for itself
def replay(folder, threads, overwrite) -> None:
    """Rerun, with exactly the recorded settings, every command recorded in FOLDER/config.json (in the
    order they first ran there: e.g. a bench, then its analyses), each in the directory it ran in (relative
    to FOLDER, so its relative paths name the same files from anywhere and after the project is moved whole).
    A FOLDER copied or moved on its own beside the original (at the same depth) is written, not the folder it was
    recorded in.
    Finished outputs are reused as each command reuses them; delete them first to recompute. A recorded
    --overwrite is not replayed: results made from other inputs (a data file edited since) are refused, as
    without it, unless replay itself is given --overwrite (then every command that takes it replaces them)."""
    folder = Path(folder).resolve()
    config = folder / "config.json"
    records = json.loads(config.read_text())["replay"]
    # records without a position (older versions) run first, in the file's order
    for key, record in sorted(records.items(), key=lambda item: item[1].get("position", -1)):
        if record["command"] not in COMMANDS:
            fail(f"{config}: record {key!r} names an unknown command {record['command']!r}")
        where = (folder / record["cwd"]).resolve() if "cwd" in record else Path.cwd()
        paths = path_arguments(record["arguments"])
        if where.is_dir():
            arguments, recorded = relocated(record, where, folder)
            if recorded is not None and arguments == record["arguments"]:
                fail(
                    f"{config}: record {key!r} wrote to {recorded}, and {folder} (a copy, or moved) is named by none "
                    f"of its paths; run its line by hand with its output in {folder}: {record['line']}"
                )
        else:  # userJ: refused also where every path is absolute, so that where it ran does not matter
            relative = [SETTINGS[name].flag for name, value in paths.items() if not Path(value).is_absolute()]
            if relative:
                fail(
                    f"{config}: record {key!r} ran in {where}, which is gone, and its relative paths "
                    f"({', '.join(relative)}) are relative to it; run its line by hand from the directory it means: "
                    f"{record['line']}"
                )
            if not any(Path(value).resolve() == folder for value in paths.values()):  # they name the original
                fail(
                    f"{config}: record {key!r} ran in {where}, which is gone, and none of its paths names {folder} "
                    f"(a copy, or moved); run its line by hand with its output in {folder}: {record['line']}"
                )
            where, arguments, recorded = folder, dict(record["arguments"]), None
        moved = f" ({folder} was recorded as {recorded}: written here)" if recorded is not None else ""
        console.print(f"replay (in {where}){moved}: {record['line']}", markup=False, highlight=False)
        # userI: a recorded --overwrite replaced the scores of edited queries without a word, and the refusal's
        # "pass --overwrite" named a flag replay did not take
        if "overwrite" in inspect.signature(COMMANDS[record["command"]]).parameters:
            arguments["overwrite"] = overwrite
        with contextlib.chdir(where):
            COMMANDS[record["command"]](**preset_resolved(record["command"], arguments))
