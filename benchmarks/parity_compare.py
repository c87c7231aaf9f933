"""Diff the numbers of two parity runs (bench, diagnose, evaluate), ignoring times, paths and versions.

    python benchmarks/parity_compare.py OUT_BEFORE OUT_AFTER

Prints each difference (or ``IDENTICAL numbers``) and exits 0 only when the numbers are identical: 1 when they
differ or a result file is missing from either run (userN: it exited 0 on differences and on a misspelt folder).
"""

import argparse
import json
import math
import sys
from pathlib import Path

RESULT_FILES = ("bench/bench.json", "diag/diagnose.json", "gt/evaluate.json", "gt/groundtruth.json")
"""The result files of a ``parity_tiny.sh`` run, relative to its output folder."""

IGNORE = {
    "seconds",
    "time_s",
    "peak_mib",
    "peak_mb",
    "peak_bytes",
    "versions",
    "hardware",
    "command",
    "timings",
    "total_s",
    "fit_seconds",
    "path",
    "out",
    "model",
    "train",
    "queries",
    "task",
    "config",
    "wall_s",
    "memory",
    "rss",
    "peak",
    "peak_memory_mib",
    "created",
}


def walk(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if any(s in k for s in ("second", "peak", "time", "mib")) or k in IGNORE:
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k in b else 'before'}")
                continue
            walk(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * max(1, abs(a))):
            out.append(f"{path}: {a!r} vs {b!r}")
    elif a != b and not (isinstance(a, str) and ("/" in a or "wherefrom" in a)):
        out.append(f"{path}: {a!r} vs {b!r}")


def run_folder(text: str) -> Path:
    """An existing folder (a ``parity_tiny.sh`` output)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return Path(text)


def differences(before: Path, after: Path) -> list[str]:
    """Every difference between the numbers of the two runs' result files (:data:`RESULT_FILES` and the bench's
    per-method rows of seed 0), one line each; a file missing from a run is one line naming the run."""
    diffs = []
    for rel in RESULT_FILES:
        a, b = before / rel, after / rel
        if not a.exists() or not b.exists():
            missing = " and ".join(str(run) for run, path in ((before, a), (after, b)) if not path.exists())
            diffs.append(f"{rel}: missing from {missing}")
            continue
        walk(json.loads(a.read_text()), json.loads(b.read_text()), rel, diffs)
    for p in sorted((before / "bench").glob("seed-0/*.json")):
        q = after / "bench" / p.relative_to(before / "bench")
        if q.exists():
            walk(json.loads(p.read_text()), json.loads(q.read_text()), str(p.relative_to(before)), diffs)
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=run_folder, help="the parity_tiny.sh output folder of the code before")
    parser.add_argument("after", type=run_folder, help="the parity_tiny.sh output folder of the code after")
    args = parser.parse_args()
    diffs = differences(args.before, args.after)
    print("\n".join(diffs) if diffs else "IDENTICAL numbers")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
