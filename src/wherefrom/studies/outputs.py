"""Which command made an output folder, read from the files it holds.

A folder's own record says it first: the commands ``wherefrom replay`` reruns, in ``config.json``'s ``replay``
(:func:`wherefrom.cli.app.remember`). A folder without one (made by an older version, by the Python API, or by
``finetune``, which records none) is recognised by the files each command writes there, in the order of
:data:`FOLDER_MARKERS`, which is also the order ``wherefrom report`` recognises result folders in
(:mod:`wherefrom.studies.report.folders`). ``finetune``'s folder is recognised by any of its files, an
unfinished or killed fine-tuning's (``checkpoints/``, ``resume/``) included (:data:`FINETUNE_MARKERS`).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from wherefrom.core.store import read_json_object
from wherefrom.models.finetune import CHECKPOINTS_DIR, CONFIG_FILE, RESUME_DIR, TRAIN_LOG_FILE

__all__ = [
    "FINETUNE_MARKERS",
    "FOLDER_CHILDREN",
    "FOLDER_MARKERS",
    "enclosing_output",
    "folder_makers",
    "marked_commands",
    "recorded_commands",
    "recorded_directory",
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


FOLDER_CHILDREN: dict[str, tuple[str, ...]] = {
    "fit": ("factors", "method", "index", "index-parts", "scores", "analyses"),
    "bench": ("seed-*",),
    "ablate": ("runs", "finetunes"),
    "groundtruth": ("model", "jobs", "scratch", "scores", "pbrf-rows"),
    "word-order": ("seed-*",),
    "finetune": ("adapter", "model", "checkpoints", "resume"),
    "tune": ("points",),
}
"""The folders (``fnmatch`` patterns) a command makes in its output folder: ``GROUNDTRUTH/model``,
``BENCH/seed-<s>/finetune``, ``ABLATE/finetunes/KEY``, ``RUN/index``: what :func:`enclosing_output` looks for. A
folder of another name there is the user's (``FINETUNE/run``, a run kept beside the fine-tuning it scores)."""


def enclosing_output(folder: Path) -> tuple[Path, list[str]] | None:
    """``(the nearest of the two folders above folder, the commands that made it)`` where ``folder`` lies in one of
    the folders those commands make there (:data:`FOLDER_CHILDREN`; the makers by :func:`folder_makers`), or
    ``None``. A ``config.json`` there that is not a JSON object is not read (only the files there count): another
    program's, not the running command's to name. A fine-tuning counts by its files (``finetune_config.json``,
    ``train_log.jsonl``), not by a ``checkpoints/`` or ``resume/`` alone: ``fit --run resume`` made the folder
    it ran in look like a killed fine-tuning, and was refused as its child."""
    folder = Path(folder).resolve()
    for parent in folder.parents[:2]:
        child = folder.relative_to(parent).parts[0]
        try:
            makers = folder_makers(parent)
        except ValueError:
            makers = marked_commands(parent)
        if not any((parent / name).is_file() for name in (CONFIG_FILE, TRAIN_LOG_FILE)):
            # known by its folders alone, which may be the very folder in question (a run named `resume`)
            makers = [name for name in makers if name != "finetune"]
        holders = [name for name in makers if any(fnmatch(child, p) for p in FOLDER_CHILDREN.get(name, ()))]
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
