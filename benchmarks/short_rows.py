"""Do short (most padded) training rows win the top-1? The reference study's observation (issue 14): in its
Llama-2 caches one short benign row is top-1 for 234 of 260 harmful queries, and the other top-1 winners are
among the shortest 3% of rows; under its settings (rows left-padded to 128 tokens, loss on every position)
the shortest rows carry the most padding in their gradients.

For each given bench folder (``bench.json``, from ``wherefrom bench``), per method and pooled over its seeds:
the queries, how many distinct rows win the top-1, the most frequent winner (its id, its wins, its length
rank among the training rows, 0 = shortest), and the top-1 wins of the shortest 3% and 10% of training rows
by characters of prompt + completion (:func:`wherefrom.studies.ablation.short_row_wins`; chance is that share
of the queries, or one row's where that is more).

    python benchmarks/short_rows.py .cache/shortrows/mixedL-ref [more bench folders] [--name short_rows]

Writes ``benchmarks/results/<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from common import command_line, folder_with, results_arguments, uptime, write_results
from wherefrom.studies.ablation import row_lengths, short_row_wins
from wherefrom.studies.analyses import open_bench

SHARES = (0.03, 0.10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("benches", nargs="+", type=folder_with("bench.json", "wherefrom bench --out"), help="bench folders")
    results_arguments(p, "short_rows")
    return p.parse_args(argv)


def bench_rows(folder: Path) -> list[dict]:
    """One table row per method of the bench in ``folder`` (see the module docstring)."""
    bench = open_bench(folder)  # a path: task's files named from where the bench ran
    report, config = bench.report, bench.config
    lengths = row_lengths(config, bench.directory)
    out = []
    for method in config.methods:
        rows = [r for r in report["rows"] if r["method"] == method and not r["error"] and r.get("top1")]
        if not rows:
            continue
        winners = Counter(w for r in rows for w in r["top1"])
        top, wins = winners.most_common(1)[0]
        seed = next(r["seed"] for r in rows if top in r["top1"])
        order = sorted(lengths[seed], key=lengths[seed].get)
        entry = {
            "bench": str(folder),
            "preset": config.preset,
            "method": method,
            "seeds": sorted({r["seed"] for r in rows}),
            "train_rows": len(order),
            "queries": sum(len(r["top1"]) for r in rows),
            "distinct_top1": len(winners),
            "most_frequent": {"id": top, "wins": wins, "length_rank": order.index(top), "chars": lengths[seed][top]},
        }
        for share in SHARES:
            entry[f"short_{share:g}"] = short_row_wins(report, method, lengths, share)["short_top1"]
            # chance: the rows counted as short (at least one) over all rows, times the queries
            entry[f"chance_{share:g}"] = max(1, math.ceil(share * len(order))) / len(order) * entry["queries"]
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = uptime()
    table = [row for folder in args.benches for row in bench_rows(folder)]
    shares = " | ".join(f"top-1 in shortest {s:.0%} (chance)" for s in SHARES)
    markdown = [
        "# Do the shortest (most padded) training rows win the top-1?",
        "",
        "Per bench and method, pooled over seeds. Length: characters of prompt + completion; rank 0 = shortest.",
        "",
        f"| bench | preset | method | queries | distinct top-1 rows | most frequent top-1 (wins, length rank of "
        f"N) | {shares} |",
        "| --- | --- | --- | ---: | ---: | --- |" + " ---: |" * len(SHARES),
    ]
    for e in table:
        top = e["most_frequent"]
        cells = " | ".join(f"{e[f'short_{s:g}']} ({e[f'chance_{s:g}']:.1f})" for s in SHARES)
        markdown.append(
            f"| `{e['bench']}` | {e['preset'] or '-'} | {e['method']} | {e['queries']} | {e['distinct_top1']} | "
            f"{top['id']} ({top['wins']}, {top['length_rank']} of {e['train_rows']}) | {cells} |"
        )
    path = write_results(
        args.results / args.name, markdown, {"rows": table}, command_line("short_rows.py", argv, args), load
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
