"""A fitted method in a folder: ``method.safetensors`` (its state tensors), then ``method.json`` (its
name and JSON state, written last: the "finished" marker), both atomic and checksummed
(:mod:`wherefrom.core.store`).

What each family keeps (:meth:`wherefrom.methods.registry.Method.fitted_state`): an influence method its
curvature (state tensors and metadata); ``trak``/``logra`` their projected curvature (the ``exact`` strategy fitted on
the projected gradient blocks: ``F~``, its damped inverse ``(k, k)`` and lambda per module) with the
projection's config (the seeded matrices are rebuilt from it);
``tracin`` its checkpoint folders (absolute paths) and their learning rates; ``repsim`` the normalised
train representations ``(n, hidden)``; ``bm25`` the corpus statistics (the ``(V, n)`` weight matrix,
``idf``, vocabulary and train ids). The caller records the fit's settings and holds the writer lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wherefrom.core.data import Record
from wherefrom.core.store import load_tensors_checked, read_json_checked, save_tensors_checked, write_json_checked

__all__ = ["META_FILE", "TENSORS_FILE", "load_fitted", "save_fitted"]

TENSORS_FILE = "method.safetensors"
META_FILE = "method.json"


def save_fitted(method: Any, folder: Path) -> None:
    """Write ``method``'s fitted state into ``folder`` (tensors first, then ``method.json``).

    Raises ``RuntimeError`` for an unfitted method, ``ValueError`` for state that cannot be saved (named)."""
    tensors, state = method.fitted_state()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_checked({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, folder / TENSORS_FILE)
    write_json_checked({"method": method.name, "state": state}, folder / META_FILE)


def load_fitted(method: Any, folder: Path, train: Sequence[Record]) -> Any:
    """``method`` (made with the options it was saved with) holding the state saved in ``folder``; returns it.

    Raises ``FileNotFoundError`` when ``folder`` holds no finished state, ``ValueError`` when it is of
    another method, and :class:`wherefrom.core.store.DamagedFile` naming a damaged file."""
    folder = Path(folder)
    if not (folder / META_FILE).exists():
        raise FileNotFoundError(f"no fitted method in {folder} (expected {META_FILE} and {TENSORS_FILE})")
    saved = read_json_checked(folder / META_FILE)
    if saved["method"] != method.name:
        raise ValueError(f"{folder} holds a fitted {saved['method']!r}, not {method.name!r}")
    tensors, _ = load_tensors_checked(folder / TENSORS_FILE)
    method.restore_state(tensors, saved["state"], train)
    return method
