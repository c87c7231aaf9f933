"""Diff the numbers of two parity runs (bench, diagnose, evaluate), ignoring times, paths and versions."""

import json
import math
import sys
from pathlib import Path

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


before, after = Path(sys.argv[1]), Path(sys.argv[2])
diffs = []
for rel in ("bench/bench.json", "diag/diagnose.json", "gt/evaluate.json", "gt/groundtruth.json"):
    a, b = before / rel, after / rel
    if not a.exists() or not b.exists():
        diffs.append(f"{rel}: missing ({a.exists()}, {b.exists()})")
        continue
    walk(json.loads(a.read_text()), json.loads(b.read_text()), rel, diffs)
for p in sorted((before / "bench").glob("seed-0/*.json")):
    q = after / "bench" / p.relative_to(before / "bench")
    if q.exists():
        walk(json.loads(p.read_text()), json.loads(q.read_text()), str(p.relative_to(before)), diffs)
print("\n".join(diffs) if diffs else "IDENTICAL numbers")
