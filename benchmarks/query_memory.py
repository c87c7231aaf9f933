"""Query memory of pairwise scoring: full-rank queries vs low-rank query batching (Grosse et al., 2023,
section 3.2.2), against the number of queries.

Each (query_rank, n_queries) cell runs in a fresh ``spawn`` subprocess: load SmolLM2-135M-Instruct,
track the MLP projections of the last ``--layers`` blocks (identity curvature, so the measurement is the
query side alone), precondition and compress the query gradients, score them against ``--train`` rows,
and report the peak resident memory (``ru_maxrss``) above the level after loading the model. With a
query rank the dense preconditioned queries of one batch exist at once (they are compressed a batch at a
time), so the peak should not grow with the number of queries beyond the small rank-r factors; at
full rank it grows with ``n_queries x tracked parameters``.

    python benchmarks/query_memory.py                     # ~3 min on 2 CPU cores
    python benchmarks/query_memory.py --queries 4,8,16 --ranks none,32 --layers 6

Writes ``benchmarks/results/query-memory.{md,json}`` with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue as queues
import resource
import sys
import time
from pathlib import Path

from common import command_line, positive_int, positive_ints

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "emotion.test.jsonl"


def cell(rank: int | None, n_queries: int, args: argparse.Namespace, out: mp.Queue) -> None:
    import torch

    from wherefrom.core.data import load_records
    from wherefrom.engine.api import AttributionConfig, Attributor
    from wherefrom.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model()
    rows = load_records(DATA)
    first = 30 - args.layers
    include = [rf"layers\.({'|'.join(str(i) for i in range(first, 30))})\.mlp\."]
    config = AttributionConfig(strategy="identity", include=include, batch_size=args.batch_size, query_rank=rank)
    attributor = Attributor(loaded.model, loaded.tokenizer, config)
    queries, train = rows[:n_queries], rows[n_queries : n_queries + args.train]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ids, pre = attributor.preconditioned_queries(queries)
    scores = attributor.scores_from_gradients(ids, pre, attributor.gradients(train))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    out.put(
        {
            "query_rank": rank,
            "queries": n_queries,
            "train": len(train),
            "tracked_parameters": attributor.num_parameters,
            "peak_mib": peak / 1024,
            "seconds": seconds,
            "shape": list(scores.total.shape),
        }
    )


def query_ranks(text: str) -> list[int | None]:
    """Comma-separated query ranks, each ``none`` (full rank) or an integer >= 1."""
    try:
        return [None if item == "none" else positive_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated 'none' or integers >= 1, got {text!r}") from None


def cell_result(process: mp.Process, results: mp.Queue, what: str) -> dict:
    """The result ``process`` (one cell) puts on ``results``; exits naming ``what`` when the process ends without
    one (it failed: its traceback is above). userN: the benchmark waited for ever on a cell that had failed."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queues.Empty:
            if not process.is_alive():
                try:
                    return results.get(timeout=1.0)  # put just before it ended
                except queues.Empty:
                    process.join()
                    sys.exit(f"query_memory: the cell {what} failed (exit code {process.exitcode}; its error is above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=positive_ints, default=[4, 8, 16], help="numbers of queries, comma-separated")
    parser.add_argument(
        "--ranks", type=query_ranks, default=[None, 32], help="query ranks ('none' = full rank), comma-separated"
    )
    parser.add_argument("--layers", type=positive_int, default=6, help="track the MLP of the last N of 30 blocks")
    parser.add_argument("--train", type=positive_int, default=8, help="training rows scored")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", default="benchmarks/results/query-memory")
    args = parser.parse_args()
    if args.layers > 30:
        parser.error(f"--layers: SmolLM2-135M has 30 blocks, got {args.layers}")
    if not DATA.exists():
        sys.exit(f"query_memory: needs the shared emotion data at {DATA}")
    context = mp.get_context("spawn")
    results = []
    for rank in args.ranks:
        for n in args.queries:
            queue = context.Queue()
            process = context.Process(target=cell, args=(rank, n, args, queue))
            process.start()
            result = cell_result(process, queue, f"query rank {rank or 'full'}, {n} queries")
            process.join()
            results.append(result)
            print(json.dumps(result), flush=True)
    command = command_line("query_memory.py", None, args)
    lines = [
        "# Query memory: full-rank vs low-rank query batching",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
        f"torch {__import__('torch').__version__}; SmolLM2-135M-Instruct, MLP of the last {args.layers} blocks "
        f"({results[0]['tracked_parameters']:,} parameters), identity curvature, {args.train} training rows, "
        f"batch size {args.batch_size}.",
        "",
        "| query rank | queries | peak above the loaded model (MiB) | wall (s) |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        rank = "full" if r["query_rank"] is None else r["query_rank"]
        lines.append(f"| {rank} | {r['queries']} | {r['peak_mib']:.0f} | {r['seconds']:.1f} |")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    from wherefrom.core.store import atomic_write_text

    atomic_write_text("\n".join(lines) + "\n", out.with_suffix(".md"))
    atomic_write_text(json.dumps({"command": command.strip(), "results": results}, indent=2), out.with_suffix(".json"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
