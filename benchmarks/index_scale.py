"""A scaled real-size run (issue 12, item 7): a LoGra index of the shared data sets' training rows on
SmolLM2-135M with every MLP projection tracked (90 Linear layers), then queries with top-10 proponents.

The issue asks for every training row (4,700 in the six sets below) on this 2-core CPU; this script
indexes the first ``--per-task`` rows of each set (all of them with ``--per-task 0``) and records:

* the projected Fisher fit on ``--fit-rows`` of those rows (spread over the sets; ``F~`` is 256 x 256 per
  module, so a few dozen rows already give a damped, invertible estimate; 0 = no preconditioning), or with
  ``--empirical`` what ``wherefrom index --precondition empirical`` does: raw rows in one pass, then the
  projected Fisher of every stored row (read back verified), applied to the queries;
* the build: wall time, rows/s, store size on disk (float16 rows, ``--shard-size`` per shard), and the
  full-size build time extrapolated from the measured rate (labelled as an extrapolation);
* queries (``--queries`` test rows per set): the query pass (forward + backward + projection, per query)
  and the scan of the store (verified, i.e. hashing every shard, and memory-mapped), and each query's
  top-10 proponents with their data set, so one can see whether the right set's rows come first.

Usage::

    python benchmarks/index_scale.py                      # 50 rows per set (300), ~15-20 min on this loaded CPU
    python benchmarks/index_scale.py --per-task 0         # every row (4,700): hours on this CPU

Writes ``benchmarks/results/index_scale.{md,json}``; the store goes to ``--out`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (
    MLP,
    begin,
    command_line,
    folder_bytes,
    nonnegative_int,
    positive_int,
    results_arguments,
    rows,
    timed,
    write_results,
)

TASKS = ["emotion", "grammars", "math", "mixedL", "backdoor", "multibackdoor"]


def queries_path(store: Path) -> Path:
    """Where a run with ``--out store`` writes its query vectors (:func:`wherefrom.core.store.save_tensors_checked`:
    atomic, checksum recorded): ``{"vectors": (n_query, row length) float32}``, the query ids (JSON) in the metadata
    under ``ids``."""
    return store.with_name(store.name + "-queries.safetensors")


def scale_store(text: str) -> Path:
    """The ``argparse`` type of a store this script wrote with ``--out`` (``real_recall.py --store``,
    ``hnsw_graph.py --stores``): a finished store with its query vectors beside it (:func:`queries_path`)."""
    from wherefrom.core.vectors import MARKER

    store = Path(text)
    for needed in (store / MARKER, queries_path(store)):
        if not needed.is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is not a store written by index_scale.py --out (no {needed})")
    return store


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-task", type=nonnegative_int, default=50, help="training rows per data set (0 = all)")
    p.add_argument("--fit-rows", type=nonnegative_int, default=32, help="rows of the projected Fisher fit (0 = none)")
    p.add_argument(
        "--empirical",
        action="store_true",
        help="no fit pass: store raw rows, fit F~ on every stored row, precondition the queries (the index's "
        "--precondition empirical; --fit-rows is then ignored)",
    )
    p.add_argument("--queries", type=positive_int, default=2, help="test rows per data set used as queries")
    p.add_argument("--dim", type=positive_int, default=16, help="LoGra dim_in = dim_out")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=704, help="tokens per row (mixedL's longest is ~640)")
    p.add_argument("--shard-size", type=positive_int, default=64)
    p.add_argument("--include", default=MLP)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="store folder (default: temporary, removed); the query vectors go beside it, to "
        "<out>-queries.safetensors (what real_recall.py reads)",
    )
    results_arguments(p, "index_scale")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, model, tokenizer = begin()
    import torch

    from wherefrom.core.store import save_tensors_checked
    from wherefrom.core.vectors import VectorStore, VectorStoreWriter
    from wherefrom.engine.api import AttributionConfig
    from wherefrom.methods.projection import ProjectedInfluence

    everything = {task: rows(task) for task in TASKS}
    per_task = {task: (recs if args.per_task == 0 else recs[: args.per_task]) for task, recs in everything.items()}
    train = [r for task in TASKS for r in per_task[task]]
    source = {r.id: task for task in TASKS for r in per_task[task]}
    queries = [r for task in TASKS for r in rows(task, "test", args.queries)]
    config = AttributionConfig(
        strategy="identity",
        fisher="empirical",
        include=[args.include],
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    fit_rows = 0 if args.empirical else args.fit_rows
    logra = ProjectedInfluence.logra(
        model, tokenizer, config, dim_in=args.dim, dim_out=args.dim, curvature=fit_rows > 0
    )
    dim = sum(logra.dims().values())
    times: dict[str, list[float]] = {
        "fit": [], "store_fit": [], "build": [], "query_pass": [], "scan_verified": [], "scan_mapped": []
    }  # fmt: skip
    if fit_rows:
        step = max(1, len(train) // fit_rows)
        with timed(times["fit"]):
            logra.fit(train[::step][:fit_rows])
    with tempfile.TemporaryDirectory(prefix="index_scale_") as tmp:
        folder = args.out or Path(tmp) / "index"
        settings = {"model": "SmolLM2-135M-Instruct", "include": args.include, "logra_dim": args.dim}
        if args.empirical:  # recorded only here, so stores started before the option still resume
            settings["precondition"] = "empirical"
        writer = VectorStoreWriter(folder, [r.id for r in train], dim, settings, "float16", args.shard_size)
        writer.start()
        precondition = fit_rows > 0
        built: list[int] = []  # rows embedded by this invocation (a resumed build skips finished shards)

        def produce(shard: int, _ids: list[str]):
            start, stop = writer.span(shard)
            built.append(stop - start)
            print(f"shard {shard + 1}/{writer.shard_count} at {time.strftime('%H:%M:%S')}", flush=True)
            return logra.train_vectors(train[start:stop], precondition=precondition)

        with timed(times["build"]):
            writer.build(produce)
            writer.finalize()
        store = VectorStore.open(folder)
        size = folder_bytes(folder)
        curvature = None
        if args.empirical:  # as Run.fit_preconditioner: every stored row, read back verified
            with timed(times["store_fit"]):
                curvature = logra.row_curvature(lambda: (shard for _start, shard in store.shards()))
        with timed(times["query_pass"]):
            query_ids, vectors = logra.query_vectors(queries, curvature=curvature)
        if args.out:
            save_tensors_checked(
                {"vectors": vectors.float().contiguous()}, queries_path(args.out), meta={"ids": json.dumps(query_ids)}
            )
        for verify, key in ((True, "scan_verified"), (False, "scan_mapped")):
            with timed(times[key]):
                total = torch.cat(
                    [vectors.float() @ shard.float().T for _start, shard in store.shards(verify=verify)], 1
                )
                top = torch.topk(total, 10, dim=1)
    proponents = {
        qid: [(store.ids[int(j)], source[store.ids[int(j)]], float(v)) for v, j in zip(top.values[q], top.indices[q])]
        for q, qid in enumerate(query_ids)
    }
    own = {qid: sum(task == qid.split("-test-")[0] for _id, task, _v in proponents[qid]) for qid in query_ids}
    rate = sum(built) / times["build"][0] if built else float("nan")
    full = sum(len(v) for v in everything.values())
    markdown = [
        f"# A {'' if len(train) == full else 'scaled '}real-size LoGra index (SmolLM2-135M, "
        + ("every MLP projection" if args.include == MLP else f"modules `{args.include}`")
        + ", CPU)",
        "",
        f"Indexed **{len(train)} rows** ("
        + (f"the first {args.per_task}" if args.per_task else "all the")
        + f" training rows of each of "
        f"{', '.join(TASKS)}; {sum(len(e.input_ids) for e in logra.attributor.encode(train))} tokens) with "
        f"{len(logra.module_names)} tracked modules (`{args.include}`), LoGra {args.dim}x{args.dim} per module "
        f"(row length {dim:,}), float16, {args.shard_size} rows per shard, one torch thread.",
        "",
        "| step | value |",
        "|---|---|",
        (
            f"| projected Fisher of the {len(train)} stored rows (no fit pass: read back and fitted after the build) "
            f"| {times['store_fit'][0]:.1f} s |"
            if args.empirical
            else f"| projected Fisher fit ({fit_rows} rows) | "
            + (f"{times['fit'][0]:.1f} s |" if times["fit"] else "none (raw projected gradients) |")
        ),
        f"| index build | {times['build'][0]:.1f} s for {sum(built)} rows ({rate:.2f} rows/s)"
        + (f"; {len(train) - sum(built)} rows came from an earlier, interrupted run" if sum(built) < len(train) else "")
        + " |",
        f"| store size on disk | {size / 2**20:.1f} MiB ({size / len(train) / 1024:.1f} KiB per row) |",
        f"| query pass ({len(queries)} queries: forward + backward + projection) | {times['query_pass'][0]:.1f} s "
        f"({times['query_pass'][0] / len(queries):.2f} s per query) |",
        f"| top-10 scan of the store, verified (every shard hashed) | {1e3 * times['scan_verified'][0]:.1f} ms |",
        f"| top-10 scan of the store, memory-mapped | {1e3 * times['scan_mapped'][0]:.1f} ms |",
        *(
            [
                f"| **extrapolation** to all {full:,} training rows at the measured rate | "
                f"{full / rate / 3600:.2f} h build, {full * size / len(train) / 2**20:.0f} MiB |"
            ]
            if len(train) < full
            else []
        ),
        "",
        "Top-10 proponents (own data set among them):",
        "",
        "| query | own set in top 10 | top 3 (id, score) |",
        "|---|---|---|",
        *(
            f"| {qid} | {own[qid]}/10 | " + ", ".join(f"{i} ({v:.3g})" for i, _t, v in proponents[qid][:3]) + " |"
            for qid in query_ids
        ),
    ]
    data = {
        "rows": len(train),
        "per_task": {t: len(v) for t, v in per_task.items()},
        "full_rows": full,
        "modules": len(logra.module_names),
        "row_length": dim,
        "times": times,
        "rows_built_here": sum(built),
        "rows_per_second": rate,
        "store_bytes": size,
        "extrapolated_full_build_seconds": full / rate,
        "proponents": proponents,
        "own_set_in_top10": own,
    }
    path = write_results(
        args.results / args.name, markdown, data, command_line("index_scale.py", argv, args), load_before
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
