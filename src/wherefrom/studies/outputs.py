"""Which command made an output folder, read from the files it holds.

A folder's own record says it first: the commands ``wherefrom replay`` reruns, in ``config.json``'s ``replay``
(:func:`wherefrom.cli.app.remember`). A folder without one (made by an older version, by the Python API, or by
``finetune``, which records none) is recognised by the files each command writes there, in the order of
:data:`FOLDER_MARKERS`, which is also the order ``wherefrom report`` recognises result folders in
(:mod:`wherefrom.studies.report.folders`). ``finetune``'s folder is recognised by any of its files, an
unfinished or killed fine-tuning's (``checkpoints/``, ``resume/``) included (:data:`FINETUNE_MARKERS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wherefrom.core.store import read_json_object
from wherefrom.models.finetune import CHECKPOINTS_DIR, CONFIG_FILE, RESUME_DIR, TRAIN_LOG_FILE

__all__ = [
    "FINETUNE_MARKERS",
    "FOLDER_MARKERS",
    "enclosing_output",
    "folder_makers",
    "marked_commands",
    "recorded_commands",
]

FOLDER_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bench", ("bench.json",)),
    ("ablate", ("ablate.json",)),
    ("evaluate", ("evaluate.json",)),
    ("diagnose", ("diagnose.json",)),
    ("word-order", ("wordorder.json",)),
    ("groundtruth", ("groundtruth.json",)),
    ("fit", ("config.json", "manifest.json")),
    ("attribute", ("config.json", "scores.safetensors")),
)
"""``(command, files)``: a folder holding every one of ``files`` was made by ``command``."""

FINETUNE_MARKERS = (CONFIG_FILE, TRAIN_LOG_FILE, CHECKPOINTS_DIR, RESUME_DIR)
"""What ``finetune`` writes in its folder from the first finished epoch on (its weights folders, ``adapter/`` and
``model/``, are left out: a ground truth holds its fine-tuning in ``model/``)."""


def recorded_commands(saved: dict[str, Any]) -> list[str]:
    """The commands a ``config.json`` (its content ``saved``) records under ``replay``, sorted; ``[]`` for none."""
    records = saved.get("replay")
    if not isinstance(records, dict):
        return []
    return sorted({r["command"] for r in records.values() if isinstance(r, dict) and isinstance(r.get("command"), str)})


def folder_makers(folder: Path, saved: dict[str, Any] | None = None) -> list[str]:
    """The commands that made ``folder``: those its ``config.json`` (or ``saved``, that file's content) records,
    else those whose files it holds (:data:`FOLDER_MARKERS`, then ``finetune``'s :data:`FINETUNE_MARKERS`);
    ``[]`` for a folder of none. ``ValueError`` naming a ``config.json`` that is not a JSON object."""
    folder = Path(folder)
    if saved is None:
        saved = read_json_object(folder / "config.json") if (folder / "config.json").is_file() else {}
    return recorded_commands(saved) or marked_commands(folder)


def marked_commands(folder: Path) -> list[str]:
    """The commands whose files ``folder`` holds, in the order of :data:`FOLDER_MARKERS`, then ``finetune``
    (:data:`FINETUNE_MARKERS`); ``[]`` for none."""
    folder = Path(folder)
    found = [command for command, files in FOLDER_MARKERS if all((folder / f).is_file() for f in files)]
    if any((folder / name).exists() for name in FINETUNE_MARKERS):
        found.append("finetune")
    return found


FOLDER_HOLDERS = frozenset({"fit", "bench", "ablate", "groundtruth", "word-order", "finetune", "tune"})
"""The commands whose output folder holds folders they made, at most two levels down (``GROUNDTRUTH/model``,
``BENCH/seed-<s>/finetune``, ``ABLATE/finetunes/KEY``, ``RUN/index``, ``TUNE/points``): the folders
:func:`enclosing_output` looks for. The others write files (``evaluate`` its ``STEM.json``, ``attribute`` its
scores)."""


def enclosing_output(folder: Path) -> tuple[Path, list[str]] | None:
    """``(the nearest of the two folders above folder that a command of FOLDER_HOLDERS made, those makers)``
    (:func:`folder_makers`), or ``None``. A ``config.json`` there that is not a JSON object is not read (only
    the files there count): another program's, not the running command's to name. No higher: a folder such as
    ``/tmp`` that once took a command's output does not own every folder below it."""
    for parent in Path(folder).resolve().parents[:2]:
        try:
            makers = folder_makers(parent)
        except ValueError:
            makers = marked_commands(parent)
        holders = [name for name in makers if name in FOLDER_HOLDERS]
        if holders:
            return parent, holders
    return None


def recorded_directory(folder: Path, command: str) -> Path | None:
    """The directory ``command``'s record in ``folder/config.json`` ran in (its ``cwd``, kept relative to
    ``folder``, so a project moved whole keeps it), which its relative paths are relative to; ``None`` without such a
    record (a folder made with the Python API or by an older version) or a readable ``config.json``."""
    path = Path(folder) / "config.json"
    try:
        saved = read_json_object(path) if path.is_file() else {}
    except ValueError:
        return None
    records = saved.get("replay")
    record = records.get(command) if isinstance(records, dict) else None
    cwd = record.get("cwd") if isinstance(record, dict) else None
    return (Path(folder) / cwd).resolve() if isinstance(cwd, str) else None
