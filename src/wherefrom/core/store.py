"""Atomic writes and run-directory bookkeeping.

Every file wherefrom writes goes to a temporary name in the same folder and is renamed into place,
so an interrupted job never leaves a half-written file behind: a rerun sees either the finished
file or nothing, and resumes from there.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

PARTIAL = ".partial-"
"""Infix of the temporary names: ``.<name>.partial-XXXX`` (a crash may leave one behind)."""


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_replace(Path(path), write)


def atomic_write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(tmp)`` under a temporary name, then rename it to ``target``.

    An existing ``target`` is moved aside first (``.<name>.old-XXXX``) and deleted after the rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        fill(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf: "undefined", e.g. a correlation over one seed)
    replaced by ``None``, so the JSON written is strict (``json.dumps`` would write ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented, key-sorted strict JSON (:func:`strict_json`; other objects as ``str``)."""
    atomic_write_text(json.dumps(strict_json(obj), indent=2, sort_keys=True, default=str) + "\n", path)


def read_keyed_json(path: Path, key: Any) -> dict[str, Any] | None:
    """The JSON object at ``path`` if its ``"key"`` entry equals ``key``, else ``None``.

    The cache check of resumable jobs: a missing or unreadable file, or one written with other
    settings, is ``None``. ``key`` is compared in its JSON form (tuples become lists, other objects
    ``str``), the form :func:`atomic_write_json` stored.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("key") != json.loads(json.dumps(strict_json(key), default=str)):
        return None
    return saved


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors at ``path`` atomically (values must be contiguous CPU tensors)."""
    _atomic_replace(Path(path), lambda tmp: save_file(dict(tensors), tmp, metadata=dict(meta) if meta else None))


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers a run produces."""
    versions = {"python": sys.version.split()[0]}
    for name in ("wherefrom", "torch", "transformers", "peft", "safetensors", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info
