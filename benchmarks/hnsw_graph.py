"""HNSW on real gradient stores: the inner-product graph against the angular graph (``--search-option
graph=angular``), and why the first fails on some stores.

``real_recall.py`` found the default HNSW index (``graph=inner-product``) at recall@10 0.72 on the empirical
all-MLP store, where IVF reached 0.97. An inner-product graph links each row mostly to rows of large norm
(Liu et al. 2020, "Understanding and improving proximity graph-based maximum inner product search"); that
suits a search whose best rows are of large norm ("norm bias"), not one whose best rows are not. Per store
(stores and queries written by ``index_scale.py --out``) this records:

* per end (proponents, opponents) of the exact top-10: the norm bias, their share among the 5% of rows of
  largest norm (0.05 is no bias), the mean ``|cos|`` between a query and its rows, and their mean norm over the
  median row's (a row can rank by its norm rather than its direction);
* per graph and ``ef_construction``: the build time, the rows no level-0 link reaches (only an entry point can
  return them), and for each ``ef_search`` the recall@10 of proponents and opponents against the exact search
  (ties counted, :func:`wherefrom.core.search.recall_at_k`) with the time per query (queries searched as one
  batch). Other settings: :class:`wherefrom.core.search.FaissSettings` defaults (``m = 32``).

Usage::

    python benchmarks/hnsw_graph.py --stores .cache/index-real-empirical,.cache/index-mlp4,.cache/index-mlp4-fit512

Writes ``benchmarks/results/hnsw_graph.{md,json}`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import command_line, positive_int, positive_ints, quiet_threads, results_arguments, uptime, write_results
from index_scale import scale_store
from query_latency import K, MemmapRows, sweep
from real_recall import load_store

GRAPHS = ("inner-product", "angular")
TOP_NORM = 0.05
"""The share of rows of largest norm the norm bias is measured against."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stores",
        type=lambda t: [scale_store(s) for s in t.split(",")],
        required=True,
        help="comma-separated stores written by index_scale.py --out",
    )
    p.add_argument("--ef-construction", type=positive_ints, default=[40, 80, 160])
    p.add_argument("--threads", type=positive_int, default=1)
    results_arguments(p, "hnsw_graph")
    return p.parse_args(argv)


def unreachable(index) -> int:
    """Rows of an HNSW ``index`` that no level-0 link points to."""
    import faiss
    import numpy as np

    graph = index.hnsw
    links, offsets = faiss.vector_to_array(graph.neighbors), faiss.vector_to_array(graph.offsets)
    level0 = graph.nb_neighbors(0)
    starts = offsets[: index.ntotal].astype(np.int64)
    targets = links[(starts[:, None] + np.arange(level0)).ravel()]
    reached = np.zeros(index.ntotal, bool)
    reached[targets[targets >= 0]] = True
    return int((~reached).sum())


def end_profile(rows, queries, found) -> dict[str, float]:
    """How the rows ``found`` (:class:`wherefrom.core.search.SearchResult` of the exact search of ``queries``)
    stand out: ``bias``, their share among the ``TOP_NORM`` share of ``rows`` of largest norm; ``cos``, the mean
    ``|cos|`` between a query and its rows; ``norm``, their mean norm over the median row norm."""
    import numpy as np

    norms = np.linalg.norm(rows, axis=1)
    large = norms >= np.quantile(norms, 1 - TOP_NORM)
    chosen = found.rows.numpy()
    cos = found.scores.numpy() / (np.linalg.norm(queries.numpy(), axis=1)[:, None] * norms[chosen])
    return {
        "bias": float(large[chosen].mean()),
        "cos": float(np.abs(cos).mean()),
        "norm": float(norms[chosen].mean() / np.median(norms)),
    }


def measure(path: Path, efcs: list[int]) -> dict:
    import numpy as np

    from wherefrom.core.search import FaissSettings, build_faiss_index, exact_top_k, faiss_top_k, recall_at_k

    store, rows, queries, _ids = load_store(path)
    out = {"store": str(path), "rows": store.count, "dim": store.dim, "runs": []}
    with tempfile.TemporaryDirectory(prefix="hnsw_graph_") as tmp:
        np.save(Path(tmp) / "rows.npy", rows)
        source = MemmapRows(Path(tmp) / "rows.npy")
        truth = [exact_top_k(source, queries, K, end) for end in (False, True)]
        out["ends"] = {end: end_profile(rows, queries, found) for end, found in zip(("proponents", "opponents"), truth)}
        for efc in efcs:
            for graph in GRAPHS:
                start = time.perf_counter()
                index = build_faiss_index(source, FaissSettings(kind="hnsw", graph=graph, ef_construction=efc))
                run = {"graph": graph, "ef_construction": efc, "build_s": time.perf_counter() - start}
                run.update(unreachable=unreachable(index), searches=[])
                for values in sweep("hnsw"):
                    settings = FaissSettings(kind="hnsw", graph=graph, **values)
                    start = time.perf_counter()
                    found = [
                        faiss_top_k(index, source.ids, queries, K, end, settings=settings) for end in (False, True)
                    ]
                    per_query = (time.perf_counter() - start) / (2 * len(queries))
                    recall = [float(recall_at_k(f, t, source, queries).mean()) for f, t in zip(found, truth)]
                    run["searches"].append(
                        {**values, "ms": per_query * 1000, "proponents": recall[0], "opponents": recall[1]}
                    )
                out["runs"].append(run)
                print(json.dumps({"store": str(path), **run}), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_threads(args.threads)
    load_before = uptime()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    results = [measure(path, args.ef_construction) for path in args.stores]
    markdown = [
        "# HNSW on real gradient stores: inner-product graph against angular graph",
        "",
        f"Recall@{K} against the exact search (ties counted; mean over queries) of proponents / opponents, ms per "
        f"query (each end's queries searched as one batch, {args.threads} thread(s)); `unreachable`: rows no level-0 "
        f"link points to; of the exact top-{K} of each end: norm bias, their share among the {TOP_NORM:.0%} of rows "
        f"of largest norm ({TOP_NORM:.2f} is none), the mean |cos| between query and row, and their mean norm over "
        "the median row's. `m = 32`.",
    ]
    for r in results:
        markdown += [
            "",
            f"## `{r['store']}`: {r['rows']:,} rows of {r['dim']:,}; "
            + "; ".join(
                f"{end}: norm bias {e['bias']:.3f}, mean |cos| {e['cos']:.3f}, mean norm {e['norm']:.2f}x the median"
                for end, e in r["ends"].items()
            ),
            "",
            "| graph | ef_construction | build s | unreachable | "
            + " | ".join(f"ef_search={s['ef_search']}" for s in r["runs"][0]["searches"])
            + " |",
            "|---|---|---|---|" + "---|" * len(r["runs"][0]["searches"]),
        ]
        for run in r["runs"]:
            cells = [f"{s['proponents']:.3f} / {s['opponents']:.3f} ({s['ms']:.2f} ms)" for s in run["searches"]]
            markdown.append(
                f"| {run['graph']} | {run['ef_construction']} | {run['build_s']:.1f} | {run['unreachable']} | "
                + " | ".join(cells)
                + " |"
            )
    path = write_results(
        args.results / args.name, markdown, {"stores": results}, command_line("hnsw_graph.py", argv, args), load_before
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
