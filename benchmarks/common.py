"""What the benchmark scripts share: SmolLM2 loading, the shared data sets, timing, and the results
files (``benchmarks/results/<name>.md`` and ``.json``, written atomically, with the command that made
them, the machine's load (``uptime``), package versions and hardware), and the ``argparse`` types that check
a script's numbers and names as it parses them (``error: argument --sizes: ...``, exit 2, before any work).

Used by ``index_throughput.py``, ``index_quality.py``, ``index_peers.py``, ``index_scale.py``,
``bench_kronfluence.py``, ``query_latency.py``, ``store_scan.py``, ``real_recall.py`` and ``hnsw_graph.py``; see
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATASETS = HERE.parent.parent / "shared" / "datasets"
"""The shared data sets (``<task>.train.jsonl`` / ``<task>.test.jsonl``), beside the checkout."""
MLP = r"\.mlp\."
MLP_AND_ATTENTION = r"\.(mlp|self_attn)\."
"""Module-name regexes: every MLP projection (90 Linear layers of SmolLM2), and with attention (210)."""


# --- argument types: argparse ``type=`` functions; a bad value ends in ``error: argument --flag: ...`` (exit 2) ---
def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (``--threads 2``, ``--queries 20``, ``--dim 1024``)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed; a count where 0 means "all" or "none", as ``index_scale.py --per-task 0``)."""
    return _integer(text, 0)


def positive_ints(text: str) -> list[int]:
    """Comma-separated integers >= 1 (``--sizes 1000,10000``)."""
    try:
        return [_integer(item, 1) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a standard deviation)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def json_file(text: str) -> Path:
    """A file that holds JSON (``--spectrum results/row_spectrum.json``)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}" + (" (a folder)" if path.is_dir() else ""))
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error})") from None
    return path


def folder_with(marker: str, made_by: str) -> Callable[[str], Path]:
    """The type of a folder that holds the file ``marker``; ``made_by`` names what writes one, for the message
    (``folder_with("bench.json", "wherefrom bench --out")``)."""

    def folder(text: str) -> Path:
        if not (Path(text) / marker).is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is not a folder with {marker} (written by {made_by})")
        return Path(text)

    return folder


def results_folder(text: str) -> Path:
    """A folder for results files: one that exists, or a path where none is (made when written); not a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder for the results files")
    return path


def file_stem(text: str) -> str:
    """A results file stem: a plain file name, no folder in it (``--name ""`` wrote ``benchmarks/results.md``)."""
    if not text or text in (".", "..") or Path(text).name != text or "\\" in text:
        raise argparse.ArgumentTypeError(f"expected a file name without a folder, got {text!r}")
    return text


def results_arguments(parser: argparse.ArgumentParser, name: str | None) -> None:
    """``--results DIR`` (default ``benchmarks/results``) and ``--name STEM`` (default ``name``; ``None``: required):
    where :func:`write_results` writes ``STEM.md`` and ``STEM.json`` (a trial need not replace a committed file)."""
    parser.add_argument("--results", type=results_folder, default=RESULTS, help="folder of the results files")
    parser.add_argument(
        "--name", type=file_stem, default=name, required=name is None, help="results file stem under --results"
    )


def names_of(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """The type of a comma-separated list of names, each one of ``choices`` (``--rows fitted,none``)."""

    def names(text: str) -> list[str]:
        chosen = text.split(",")
        wrong = [name for name in chosen if name not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong[0]!r} is not one of {', '.join(choices)}")
        return chosen

    return names


def quiet_threads(threads: int = 1) -> None:
    """One torch thread (the shared 2-core machine; the brief's rule), set before any work."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def begin(model: str | None = None, device: str = "cpu") -> tuple[str, object, object]:
    """Start a SmolLM2 benchmark: one torch thread, the load recorded before any work, then
    SmolLM2-135M-Instruct (or the HF model folder ``model``) on ``device`` in eval mode. Returns
    ``(uptime line, model, tokenizer)``."""
    quiet_threads()
    load_before = uptime()
    return (load_before, *smollm2(model, device))


def smollm2(model: str | None = None, device: str = "cpu"):
    """SmolLM2-135M-Instruct (or the HF model folder ``model``) on ``device``, eval mode: ``(model, tokenizer)``."""
    from transformers.utils import logging as hf_logging

    from wherefrom.models.loading import load_model

    hf_logging.disable_progress_bar()
    loaded = load_model(model, device=device)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def rows(task: str, split: str = "train", n: int | None = None, datasets: Path = DATASETS) -> list:
    """The first ``n`` records (all when ``None``) of ``<datasets>/<task>.<split>.jsonl``."""
    from wherefrom.core.data import load_records

    records = load_records(datasets / f"{task}.{split}.jsonl")
    return records if n is None else records[:n]


def emotion_sample(n_train: int, n_queries: int) -> tuple[list, list]:
    """``n_train`` emotion training rows and ``n_queries`` test rows, evenly spaced through each file (the files
    are grouped by label, so every class is present)."""
    train, test = rows("emotion"), rows("emotion", "test")
    return train[:: max(1, len(train) // n_train)][:n_train], test[:: max(1, len(test) // n_queries)][:n_queries]


def wait_for(device) -> None:
    """Wait for the kernels queued on ``device`` (a CUDA one; nothing to wait for on CPU), so that a clock read
    next counts their work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(into: list[float], device: str = "cpu") -> Iterator[None]:
    """Append the wall seconds of the ``with`` body to ``into``; on a CUDA ``device`` the queued kernels are
    waited for before and after (:func:`wait_for`), so that the time is the body's work."""
    wait_for(device)
    start = time.perf_counter()
    yield
    wait_for(device)
    into.append(time.perf_counter() - start)


def uptime() -> str:
    """The machine's ``uptime`` line (its load average), recorded with every result."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


REPOSITORY = Path(__file__).resolve().parent.parent
"""The checkout this script belongs to: recorded commands run from its root."""


def _from_root(value: str) -> str:
    """A path given to a script, named as a command run from the repository's root takes it: relative to the root
    when inside it, else absolute."""
    where = Path(value).resolve()
    return str(where.relative_to(REPOSITORY)) if where.is_relative_to(REPOSITORY) else str(where)


def _is_path_option(flag: str, args: argparse.Namespace) -> bool:
    """Whether ``--flag`` (argparse's default destination, ``--spectrum-file`` -> ``spectrum_file``) holds a path in
    ``args``: a :class:`~pathlib.Path` (a script declares its path options ``type=Path``), or a list of them."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    values = value if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(isinstance(v, Path) for v in values)


def command_line(script: str, argv: list[str] | None, args: argparse.Namespace) -> str:
    """The command that reproduces this run from the repository's root, as recorded in the results: the script's
    arguments (``argv``, default ``sys.argv``) with the value of each path option (:func:`_is_path_option`; as
    ``--flag value`` or ``--flag=value``) named from the root (:func:`_from_root`), whatever folder it ran from, and
    every other argument as given. userG: ``--output bench/kron.md`` given in another folder was recorded as
    typed, so no folder reran the recorded command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    shown = []
    for i, argument in enumerate(arguments):
        flag, equals, value = argument.partition("=")
        if argument.startswith("--") and equals and _is_path_option(flag, args):
            argument = f"{flag}={_from_root(value)}"
        elif i and arguments[i - 1].startswith("--") and "=" not in arguments[i - 1] and not argument.startswith("-"):
            argument = _from_root(argument) if _is_path_option(arguments[i - 1], args) else argument
        shown.append(argument)
    return f"python benchmarks/{script} " + shlex.join(shown)


def provenance_lines(command: str, versions: dict[str, str], load: str = "") -> list[str]:
    """The Markdown tail of a results file: the command, the load (when given), versions and hardware."""
    from wherefrom.core.store import hardware

    return [
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        *([load, ""] if load else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        "Hardware: " + ", ".join(f"{k} {v}" for k, v in hardware().items()),
        "",
    ]


def write_results(stem: Path, markdown: list[str], data: dict[str, Any], command: str, load_before: str) -> Path:
    """Write ``<stem>.md`` (``markdown`` lines, then the command, load, versions and hardware) and ``<stem>.json``
    (``data`` with the same provenance), ``stem`` = ``--results`` / ``--name`` (:func:`results_arguments`); returns
    the Markdown path."""
    from wherefrom.core.store import atomic_write_json, atomic_write_text, hardware, package_versions

    load_after = uptime()
    load = f"Load (`uptime`) before: `{load_before}`; after: `{load_after}`"
    provenance = {
        "command": command,
        "uptime_before": load_before,
        "uptime_after": load_after,
        "versions": package_versions(),
        "hardware": hardware(),
    }
    path = stem.with_name(f"{stem.name}.md")
    atomic_write_text("\n".join([*markdown, "", *provenance_lines(command, provenance["versions"], load)]), path)
    atomic_write_json({**data, **provenance}, stem.with_name(f"{stem.name}.json"))
    return path
