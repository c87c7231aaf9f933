"""The paired change between two ``wherefrom bench`` runs of the same task, rows and seeds that differ in
one setting given on the command line (e.g. ``--epochs``: the fine-tuning length), per method and metric.

``wherefrom ablate`` switches the settings one preset decides; a setting that holds in every ablation run
(like the 15 optimiser steps of ``benchmarks/ablation.sh``) is changed here instead, by comparing a bench
with it against one without, seed by seed (the same seed draws the same rows and queries): the mean of
each run and the mean change with its 95% Student-t interval over the seeds
(:func:`wherefrom.studies.ablation.paired_change`; the metrics of :data:`wherefrom.studies.ablation.ABLATION_METRICS`).

    python benchmarks/paired_bench.py --pair "LABEL=BASE_FOLDER:OTHER_FOLDER" [--pair ...] --name NAME

Refuses two benches of other tasks, row counts, models or seeds, naming the setting (the means and the
change are then over the same seeds); compares the methods both ran. Writes
``benchmarks/results/<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import command_line, results_arguments, uptime, write_results
from wherefrom.studies.ablation import ABLATION_METRICS, paired_change
from wherefrom.studies.toolkit import interval_cell

SAME = ("task", "n_train", "n_test", "model", "seeds")
"""Bench settings two compared runs must share (their seeds then draw the same rows)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="append", required=True, help="LABEL=BASE_FOLDER:OTHER_FOLDER (bench folders)")
    results_arguments(p, None)
    return p.parse_args(argv)


def load(folder: Path) -> dict:
    path = folder / "bench.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no bench.json (run `wherefrom bench --out {folder}` to the end first)")
    return json.loads(path.read_text(encoding="utf-8"))


def compared(label: str, base_folder: Path, other_folder: Path) -> dict:
    """The two runs' means and the paired change of every shared method and metric, with the settings that
    differ between them (``SystemExit`` when one of :data:`SAME` differs)."""
    base, other = load(base_folder), load(other_folder)
    for key in SAME:
        if base["config"].get(key) != other["config"].get(key):
            raise SystemExit(
                f"{label}: {base_folder} and {other_folder} differ in {key} "
                f"({base['config'].get(key)!r} vs {other['config'].get(key)!r}): not a comparison seed by seed of the "
                "same rows"
            )
    seeds = base["config"]["seeds"]
    methods = [m for m in base["config"]["methods"] if m in other["config"]["methods"]]
    differ = {
        k: [base["config"].get(k), other["config"].get(k)]
        for k in sorted(set(base["config"]) | set(other["config"]))
        if k not in ("out", "finetune_dir", "seeds", "methods") and base["config"].get(k) != other["config"].get(k)
    }
    rows = []
    for method in methods:
        for metric in ABLATION_METRICS[base["kind"] or "class"]:
            rows.append(
                {
                    "method": method,
                    "metric": metric,
                    "base": base["aggregate"][method]["metrics"].get(metric),
                    "other": other["aggregate"][method]["metrics"].get(metric),
                    "change": paired_change(base, other, method, metric, seeds),
                }
            )
    return {"label": label, "base": str(base_folder), "other": str(other_folder), "seeds": seeds,
            "differ": differ, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    before = uptime()
    pairs = []
    for pair in args.pair:
        label, _, folders = pair.partition("=")
        base, _, other = folders.partition(":")
        if not (label and base and other):
            raise SystemExit(f"--pair {pair!r}: expected LABEL=BASE_FOLDER:OTHER_FOLDER")
        pairs.append(compared(label, Path(base), Path(other)))
    markdown = ["# Paired change between bench runs", ""]
    for entry in pairs:
        markdown += [
            f"## {entry['label']}",
            "",
            f"Base `{entry['base']}`, other `{entry['other']}`, seeds {entry['seeds']}; settings that differ "
            f"(base, other): " + ", ".join(f"`{k}` {v[0]!r} -> {v[1]!r}" for k, v in entry["differ"].items()) + ".",
            "",
            "| method | metric | base | other | change, paired [95% t] |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for row in entry["rows"]:
            markdown.append(
                f"| {row['method']} | {row['metric']} | {interval_cell(row['base'])} | {interval_cell(row['other'])} "
                f"| {interval_cell(row['change'], '+.3f')} |"
            )
        markdown.append("")
    path = write_results(
        args.results / args.name, markdown, {"pairs": pairs}, command_line("paired_bench.py", argv, args), before
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
