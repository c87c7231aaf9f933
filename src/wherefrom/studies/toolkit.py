"""What every study shares: a resumable per-item cache, time and memory measurement, provenance, report tables.

The studies (``bench``, ``diagnose``, ``groundtruth`` build / evaluate / tune and the three analyses)
call these and write none of them again:

* **cache**: a unit of work (one method on one seed, one retraining job, one checkpoint...) is one
  JSON file holding its result and the ``key`` of every setting the result depends on.
  :func:`cached` reads a finished unit back; a missing file, one written with another key, one
  that recorded an ``error`` or one whose companion files (``needs``) are missing is ``None``, so
  the unit is computed (again). :func:`store` writes it atomically (temporary name + rename,
  :mod:`wherefrom.core.store`), so an interrupted run leaves either the finished file or nothing and
  a rerun resumes. :func:`resumable` is the two together.
* **measurement**: :func:`measured` gives the wall time (seconds) and the peak memory (MiB above
  the level at the start) of a block; :func:`free_memory` releases a model between units.
* **provenance**: :func:`provenance` (command line, package versions, hardware, data fingerprints);
  the command line itself comes from :func:`wherefrom.core.commandline.command_line`.
* **report tables**: :func:`interval_cell` (``"mean [low, high]"`` of a
  :func:`wherefrom.studies.metrics.mean_stat` or :func:`wherefrom.studies.groundtruth.lds.summarize`
  entry), :func:`number`, :func:`failure_cell`, :func:`markdown_table` and :func:`write_report`
  (``<stem>.json`` + ``<stem>.md``, atomically).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from wherefrom.core.data import Record, data_fingerprint
from wherefrom.core.options import int64_problem
from wherefrom.core.store import (
    atomic_write_json,
    atomic_write_text,
    hardware,
    json_form,
    package_versions,
    read_json_object,
    read_keyed_json,
    refuse_overwrite,
    replaceable,
    settings_differences,
)

__all__ = [
    "cached",
    "failure_cell",
    "failure_notes",
    "foreign_report",
    "free_memory",
    "interval_cell",
    "markdown_table",
    "measured",
    "number",
    "provenance",
    "refuse_foreign_report",
    "refuse_replacing",
    "resumable",
    "store",
    "write_report",
]


# --- cache -----------------------------------------------------------------------------------------
def seeds_problem(seeds: Sequence[int]) -> str | None:
    """What is wrong with a study's ``seeds``, else ``None``: none; one negative (refused as the single ``seed`` of a
    fine-tuning or ground truth is: numpy's generators, which draw LDS subsets and query splits, take none) or beyond
    the 64-bit integers (torch's seeding overflowed after the study started); one repeated (its one run counted
    twice: ``word-order --seeds 0,0`` reported n 2 and an interval of zero width)."""
    if not seeds:
        return "expected at least one integer"
    negative = sorted({seed for seed in seeds if seed < 0})
    if negative:
        return f"seed(s) {negative} negative: seeds are integers >= 0, as --seed"
    huge = next(filter(None, map(int64_problem, seeds)), None)
    if huge is not None:
        return huge
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    return f"seed(s) {repeated} repeated: each seed is one run" if repeated else None


def check_seeds(seeds: Sequence[int]) -> None:
    """``ValueError`` naming the seeds and :func:`seeds_problem`'s finding, if any."""
    problem = seeds_problem(list(seeds))
    if problem is not None:
        raise ValueError(f"seeds {list(seeds)}: {problem}")


def key_digest(key: Any, length: int) -> str:
    """A folder name for a settings ``key``: the first ``length`` hex digits of the SHA-256 of its key-sorted JSON
    (other objects as ``str``); equal keys, in any order, name one folder."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:length]


def cached(path: Path, key: Any, needs: Iterable[Path] = ()) -> dict[str, Any] | None:
    """The finished unit of work at ``path`` if it was computed with ``key``, else ``None``.

    ``None`` (compute it) when the file is missing or unreadable, holds another ``key`` (compared in
    JSON form, :func:`wherefrom.core.store.read_keyed_json`), recorded an ``error`` (a failure is retried)
    or when one of the companion files ``needs`` (e.g. the unit's saved scores) is missing.
    """
    row = read_keyed_json(Path(path), key)
    if row is None or row.get("error") or not all(Path(p).is_file() for p in needs):
        return None
    return row


def refuse_replacing(units: Iterable[tuple[Path, Any]]) -> None:
    """Raise :class:`wherefrom.core.store.OutputExists` when a finished unit of work (a :func:`store`d row without an
    ``error``) at one of ``units``' paths holds another key than the one paired with it: computing that unit now
    would replace it. The message names how many would be replaced, the first one's file, each entry of its key that
    differs (with both values) and how to permit it (:data:`wherefrom.core.store.OVERWRITE_ALLOW`). Call it before any long
    work."""
    replaced = []
    for path, key in units:
        try:
            saved = read_json_object(Path(path))
        except (OSError, ValueError):
            continue  # a missing or unreadable unit is computed, as cached() does
        now = json_form(key)
        if "key" in saved and not saved.get("error") and saved["key"] != now:
            replaced.append((Path(path), saved["key"], now))
    if replaced:
        path, was, now = replaced[0]
        others = f" and {len(replaced) - 1} more" if len(replaced) > 1 else ""
        refuse_overwrite([path], why=f"{others}, made from other inputs ({'; '.join(settings_differences(was, now))})")


def store(path: Path, key: Any, row: dict[str, Any]) -> dict[str, Any]:
    """Write ``row`` with ``row["key"] = key`` atomically to ``path`` (strict JSON); returns ``row``."""
    row["key"] = key
    atomic_write_json(row, Path(path))
    return row


def resumable(
    path: Path, key: Any, compute: Callable[[], dict[str, Any]], needs: Iterable[Path] = ()
) -> tuple[dict[str, Any], bool]:
    """``(row, reused)``: the :func:`cached` unit at ``path``, or ``compute()`` stored there (:func:`store`).

    ``compute`` returns the unit's row; a failure it wants retried is a row with an ``error``.
    ``needs`` are files ``compute`` writes beside ``path`` that a reuse requires.
    """
    needs = list(needs)
    row = cached(path, key, needs)
    if row is not None:
        return row, True
    return store(path, key, compute()), False


# --- measurement -----------------------------------------------------------------------------------
def _resident_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextmanager
def measured(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Wall time and peak memory of the block, written into the yielded dict when it ends.

    ``seconds``: ``time.perf_counter`` difference (CUDA synchronised at both ends). ``peak_mib``: the
    peak memory above the level at the start, MiB: CUDA ``max_memory_allocated`` (its peak statistic
    is reset on entry); on Linux CPU the process's resident-set high-water mark (``VmHWM``, reset on
    entry through ``/proc/self/clear_refs``); ``None`` where neither is available.
    """
    result: dict[str, float | None] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        release_freed_heap()
        try:
            with open("/proc/self/clear_refs", "w") as clear:  # "5": reset the peak RSS (Linux >= 4.0)
                clear.write("5")
            base = _resident_bytes("VmRSS")
        except OSError:
            base = None
    started = time.perf_counter()
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = _resident_bytes("VmHWM") if base is not None else None
        result["seconds"] = time.perf_counter() - started
        result["peak_mib"] = None if peak is None or base is None else max(peak - base, 0) / 2**20


def release_freed_heap() -> None:
    """Return the C heap's free memory to the system (glibc ``malloc_trim(0)``; nothing elsewhere).

    Freed blocks that glibc keeps resident would be reused by the next allocations without raising the
    resident set, so a peak measured as ``VmHWM`` growth (:func:`measured`) would miss them."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def free_memory() -> None:
    """Collect garbage and empty the CUDA cache (between models and units of work)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- provenance ------------------------------------------------------------------------------------
def provenance(command: str, **records: Sequence[Record]) -> dict[str, Any]:
    """What a report records about how it was made: ``command`` (the command line, as given),
    ``versions`` (:func:`wherefrom.core.store.package_versions`), ``hardware``
    (:func:`wherefrom.core.store.hardware`) and, for every keyword ``name=rows``, ``<name>_fingerprint``
    (:func:`wherefrom.core.data.data_fingerprint` of the rows)."""
    record: dict[str, Any] = {"command": command, "versions": package_versions(), "hardware": hardware()}
    for name, rows in records.items():
        record[f"{name}_fingerprint"] = data_fingerprint(rows)
    return record


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
"""A number in a warning's text: warnings that differ only in their numbers (a cg residual of each query batch) are
recorded once, counted (:func:`recorded_warnings`)."""


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Record the warnings said inside the block, show each once afterwards (as Python's default filter shows a
    warning of one text from one place: recorded, each repeat would be shown, a cg warning of every query batch 12
    times), and fill the yielded list with wherefrom's own among them as ``Category: message``, once each (not a
    library's deprecation; those that differ only in their numbers once, the first with how many more there were:
    ``... (and 11 more like it)``): what a study's row records, so that its report says a number came from, say, an iHVP
    that did not converge (userJ: ``tune.md`` showed LiSSA points with no word of the warnings on the terminal)."""
    own: list[str] = []
    said: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            said = caught
            yield own
    finally:  # also when the block raises: what it said before is shown
        for text, category, filename, lineno in dict.fromkeys(
            (str(w.message), w.category, w.filename, w.lineno) for w in said
        ):
            warnings.warn_explicit(text, category, filename, lineno)
        alike: dict[str, list] = {}  # the text with its numbers left out -> [its first text, how many]
        for w in said:
            if w.category.__module__.startswith("wherefrom."):
                text = f"{w.category.__name__}: {w.message}"
                alike.setdefault(NUMBER.sub("#", text), [text, 0])[1] += 1
        own.extend(text if count == 1 else f"{text} (and {count - 1} more like it)" for text, count in alike.values())


def failure_notes(failed: Iterable[tuple[str, str | None]]) -> str:
    """The Markdown notes under a study's table giving each failed row's error in full, ``- label: error`` on one
    line (the table's cell, :func:`failure_cell`, is cut at 200 characters: userP read ``bench.md``'s cut error, its
    fix hint lost, as the whole); rows without an error are left out; ``""`` when none failed."""
    lines = [f"- {label}: {' '.join(error.split())}" for label, error in failed if error]
    return "\nFailed (each error in full):\n\n" + "\n".join(lines) + "\n" if lines else ""


def warning_notes(warned: Iterable[tuple[str, Sequence[str] | None]]) -> str:
    """The Markdown notes under a study's table naming each row's recorded warnings (:func:`recorded_warnings`),
    one line each, ``- label: Category: message``, then the rows whose warnings were not recorded (``None``: a row
    cached by an earlier version, reviewV: read as "none"); ``""`` when no row has any and every row recorded."""
    warned = list(warned)
    lines = [f"- {label}: {text}" for label, texts in warned for text in texts or ()]
    unrecorded = [label for label, texts in warned if texts is None]
    text = ""
    if lines:
        text += (
            "\nWarnings while computing these numbers (a number beside one may not be what its method promises):\n\n"
        )
        text += "\n".join(lines) + "\n"
    if unrecorded:
        text += (
            f"\nWarnings not recorded for {', '.join(unrecorded)}: rows cached by an earlier version, which kept none "
            "(`--overwrite` recomputes them).\n"
        )
    return text


def number(value: float | None, fmt: str = ".3f") -> str:
    """``value`` formatted with ``fmt``; ``–`` for ``None`` or a non-finite value; a value that rounds to zero shows
    as zero, without a sign of its own (``0.000``, ``+0.000`` with ``fmt="+.3f"``; tables showed ``-0.000``)."""
    if value is None or not math.isfinite(value):
        return "–"
    text = format(value, fmt)
    return format(0.0, fmt) if text == format(-0.0, fmt) else text


def interval_cell(stat: Mapping[str, Any] | None, fmt: str = ".3f") -> str:
    """``"mean [low, high]"`` of a ``{mean, low, high, ...}`` entry (:func:`wherefrom.studies.metrics.mean_stat`,
    :func:`wherefrom.studies.groundtruth.lds.summarize`); only the mean when ``low`` is ``None``; ``–``
    for no entry or no mean."""
    if not stat or stat.get("mean") is None:
        return "–"
    text = number(stat["mean"], fmt)
    if stat.get("low") is not None:
        text += f" [{number(stat['low'], fmt)}, {number(stat['high'], fmt)}]"
    return text


def failure_text(error: str | None, limit: int = 200) -> str:
    """``"failed: <error>"`` on one line (newlines as spaces, the error cut to ``limit`` characters, ending ``…``
    where cut: userP read a cut error as whole): a table cell of a method or row that failed (``failure_cell`` in
    Markdown, the HTML report's tables)."""
    text = (error or "no result").replace("\n", " ")
    return f"failed: {text if len(text) <= limit else text[:limit] + '…'}"


def failure_cell(error: str | None, limit: int = 200) -> str:
    """:func:`failure_text` made safe for one Markdown table cell (``|`` escaped)."""
    return failure_text((error or "no result").replace("|", "\\|"), limit)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown table: ``header``, a rule (``align``: ``"---"`` / ``"---:"`` per column; default the
    first column left, the others right) and one line per row of cells (a short row is padded with
    empty cells). No trailing newline."""
    align = list(align) if align is not None else ["---"] + ["---:"] * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} entries for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        if len(row) > len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {list(row)[:3]}...")
        cells = list(row) + [""] * (len(header) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def foreign_report(stem: Path, marks: Mapping[str, str] | None = None) -> str | None:
    """Why :func:`write_report` may not write ``<stem>.json`` and ``<stem>.md``, or ``None``: one is a folder, or a
    file wherefrom did not write there. ``marks`` (``{".json": regex, ".md": regex}``, :func:`wherefrom.core.store.
    replaceable`): how a command's own report starts (``evaluate``'s, so that it replaces no report of another
    command); else any report: a ``.json`` that is a JSON object recording its ``command`` (every report does), a
    ``.md`` with its ``.json`` beside it (``influence --out FOLDER`` replaced a user's ``influence.md``). An empty
    file holds nothing to lose."""
    stem = Path(stem)
    paths = {suffix: stem.with_name(stem.name + suffix) for suffix in (".json", ".md")}
    for suffix, path in paths.items():
        if path.is_dir():
            return f"{path} is a folder, not a file"
        if not path.is_file() or path.stat().st_size == 0:
            continue
        if marks is not None:
            ours = replaceable(path, marks[suffix])
        elif suffix == ".json":
            try:
                ours = "command" in read_json_object(path)
            except ValueError:
                ours = False
        else:
            ours = paths[".json"].is_file()
        if not ours:
            return f"{path} is a file wherefrom did not write (not a report of this command): choose another place, or move it"
    return None


def refuse_foreign_report(stem: Path, marks: Mapping[str, str] | None = None) -> None:
    """``ValueError`` with :func:`foreign_report`'s reason, where it gives one."""
    problem = foreign_report(stem, marks)
    if problem is not None:
        raise ValueError(problem)


def write_report(
    stem: Path, payload: Mapping[str, Any], markdown: str, marks: Mapping[str, str] | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``payload``, strict key-sorted JSON) and ``<stem>.md`` (``markdown``),
    each atomically; returns both paths. ``ValueError`` from :func:`refuse_foreign_report` (with ``marks``) first: a
    file of either name that wherefrom did not write is kept."""
    refuse_foreign_report(stem, marks)
    stem = Path(stem)
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    atomic_write_json(dict(payload), json_path)
    atomic_write_text(markdown, md_path)
    return json_path, md_path
