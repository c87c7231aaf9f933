"""Memory budgets: the bytes a step will allocate, checked against what is available before it starts.

Every strategy and store predicts its allocations as ``{part: bytes}`` (parts name the module or
buffer, e.g. ``"model.layers.0.mlp.up_proj: covariance factors"``) and calls :func:`check_memory`
before its first pass; an infeasible size raises :class:`MemoryLimitError` naming the largest parts,
the total and the limit, instead of an allocator failure (or swapping) after minutes of work.

The limit (:func:`memory_limit`), in bytes:

* the setting :data:`LIMIT_ENV` (``WHEREFROM_MEMORY_LIMIT``) when set: an integer byte count or a
  number with a unit, ``"512MiB"``, ``"8GiB"``, ``"2GB"``;
* on a CUDA device, the free memory ``torch.cuda.mem_get_info(device)[0]``;
* on CPU, ``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable``
  from ``/proc/meminfo``; with neither (not Linux, no psutil) there is no check.

Predictions count the buffers that scale with the model and data (factors, dense matrices,
per-example gradients, Jacobians, Krylov bases, solve vectors, projection matrices), not the model
itself or the framework's own overhead; tests compare them with the bytes actually held.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["LIMIT_ENV", "MemoryLimitError", "available_bytes", "check_memory", "format_bytes", "memory_limit", "nbytes"]

LIMIT_ENV = "WHEREFROM_MEMORY_LIMIT"
"""Environment setting that overrides the detected memory limit (bytes, or e.g. ``"8GiB"``)."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class MemoryLimitError(MemoryError):
    """A step would allocate more than the memory limit; raised before it allocates anything."""


def nbytes(*shape: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


def format_bytes(count: int) -> str:
    """``"424,673,280,000 bytes (395.5 GiB)"``."""
    return f"{count:,} bytes ({count / 2**30:.3g} GiB)"


def _parse(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{LIMIT_ENV}={text!r}: expected a byte count such as 2000000000, 512MiB or 8GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_bytes(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """``(bytes, source)`` free for new tensors on ``device``; ``(None, reason)`` when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device} (torch.cuda.mem_get_info)"
    try:
        import psutil
    except ImportError:
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
        return None, "no psutil and no /proc/meminfo"
    return int(psutil.virtual_memory().available), "available memory (psutil)"


def memory_limit(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """``(bytes, source)``: the setting :data:`LIMIT_ENV` if set, else :func:`available_bytes`."""
    setting = os.environ.get(LIMIT_ENV)
    if setting:
        return _parse(setting), f"the setting {LIMIT_ENV}={setting}"
    return available_bytes(device)


def check_memory(
    needs: Mapping[str, int],
    what: str,
    device: torch.device | str = "cpu",
    hint: str = "",
    limit: tuple[int, str] | None = None,
) -> int:
    """Return the total of ``needs`` (``{part: bytes}``); raise :class:`MemoryLimitError` when it is
    over the limit (``limit`` as ``(bytes, source)``, default :func:`memory_limit` of ``device``).

    The message names ``what``, the largest parts with their bytes, the total, the limit and its
    source, and ``hint`` (what to change)."""
    total = int(sum(needs.values()))
    allowed, source = limit if limit is not None else memory_limit(device)
    if allowed is None or total <= allowed:
        return total
    largest = sorted(needs.items(), key=lambda item: -item[1])[:3]
    parts = "; ".join(f"{part}: {format_bytes(count)}" for part, count in largest)
    raise MemoryLimitError(
        f"{what} would allocate {format_bytes(total)} on {torch.device(device)}, over the limit of "
        f"{format_bytes(allowed)} ({source}). Largest parts: {parts}." + (f" {hint}" if hint else "")
    )
