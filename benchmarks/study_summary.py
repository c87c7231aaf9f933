"""One table over every task of a study folder: each method's headline metric (the ``headline`` its
``bench.json`` records, e.g. MRR for ``facts``; older reports: Acc for class tasks, AUPRC for
identification tasks), mean over seeds, read from each ``<task>/bench.json``.

    python benchmarks/study_summary.py [benchmarks/results/study-smollm2]   # writes summary.md there

The folder must hold at least one ``<task>/bench.json`` (userN: any argument, ``--help`` included, was taken as the
folder, made, and given a malformed empty table, exit 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wherefrom.core.store import atomic_write_text

TASK_ORDER = [
    "rules",
    "math",
    "emotion",
    "grammars",
    "backdoor",
    "backdoor-multi",
    "unwanted",
    "backdoor-paraphrase",
    "facts",
    "unwanted-paraphrase",
    "mixedS",
    "mixedL",
    "backdoor-sudo",
    "multibackdoor",
]
METHOD_ORDER = ["ekfac", "kfac", "lissa", "datainf", "gradsim", "tracin", "repsim", "bm25"]
_METRIC_NAMES = {"acc": "Acc", "auprc": "AUPRC", "mrr": "MRR"}


def summary(folder: Path) -> str:
    """The Markdown table of the tasks found in ``folder`` (known tasks first, in TASK_ORDER)."""
    reports = {path.parent.name: json.loads(path.read_text(encoding="utf-8")) for path in folder.glob("*/bench.json")}
    tasks = [t for t in TASK_ORDER if t in reports] + sorted(set(reports) - set(TASK_ORDER))
    methods = [m for m in METHOD_ORDER if any(m in r["aggregate"] for r in reports.values())]
    lines = ["| task (metric) | " + " | ".join(methods) + " | seeds |", "| --- |" + " ---: |" * (len(methods) + 1)]
    for task in tasks:
        report = reports[task]
        metric = report.get("headline") or ("acc" if report["kind"] == "class" else "auprc")
        cells = []
        for method in methods:
            entry = report["aggregate"].get(method)
            cells.append(f"{entry['metrics'][metric]['mean']:.2f}" if entry and entry["n_ok"] else "–")
        seeds = max(entry["n_seeds"] for entry in report["aggregate"].values())
        lines.append(f"| {task} ({_METRIC_NAMES.get(metric, metric)}) | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines) + "\n"


def study_folder(text: str) -> Path:
    """A folder holding at least one ``<task>/bench.json`` (a ``study.sh`` results folder)."""
    if not any(Path(text).glob("*/bench.json")):
        raise argparse.ArgumentTypeError(f"{text!r} holds no <task>/bench.json (written by benchmarks/study.sh)")
    return Path(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folder",
        nargs="?",
        type=study_folder,
        default=str(Path(__file__).resolve().parent / "results" / "study-smollm2"),
        help="the study's results folder (default: benchmarks/results/study-smollm2)",
    )
    folder = parser.parse_args().folder
    text = summary(folder)
    atomic_write_text(text, folder / "summary.md")
    print(text)


if __name__ == "__main__":
    main()
