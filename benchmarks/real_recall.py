"""FAISS recall@10 on a real gradient index (issue 12, item 6): the store and the query vectors that
``index_scale.py --out STORE`` wrote, against Gaussian rows with the same second moment.

``query_latency.py`` judges approximate search on synthetic rows (the real rows' spectrum along a random
rotation); whether real rows, with the class structure of their data sets, are easier or harder than such
rows was not measured. Here the same queries (the real query vectors) search

* ``real``: the store's rows (float32; the exact top-10 of the store is the truth), and
* ``gaussian``: as many Gaussian rows with the real rows' uncentred second moment ``X^T X / n`` (its own
  eigenvectors, not a random rotation): only the class structure is gone.

For every FAISS kind (default settings, :class:`wherefrom.core.search.FaissSettings`) and the search-time
settings of ``query_latency.py``'s sweep, it records recall@10 against the exact search of the same rows, of
proponents and of opponents (real rows are not symmetric about 0, so a search of ``-q`` is measured, not
assumed), and the time per query of the proponent queries searched as one batch; recall counts a found row that ties the 10th best
(duplicate rows) as found (:func:`wherefrom.core.search.recall_at_k` with the rows), and the plain set overlap is
recorded beside it. Also recorded: the real rows' eigenvalue
shares (top 1, 10, 100), to set beside ``results/row_spectrum.md``, from which the synthetic rows of
``query_latency.py`` were drawn.

Usage::

    python benchmarks/index_scale.py --per-task 0 --include 'layers\\.(26|27|28|29)\\.mlp\\.' --queries 10 \\
        --out .cache/index-mlp4 --name index_real_mlp4
    python benchmarks/real_recall.py --store .cache/index-mlp4

Writes ``benchmarks/results/real_recall.{md,json}`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (
    command_line,
    names_of,
    nonnegative_int,
    positive_int,
    quiet_threads,
    results_arguments,
    uptime,
    write_results,
)
from index_scale import queries_path, scale_store
from query_latency import K, MemmapRows, pq_m_list, sweep
from wherefrom.core.search import KIND_OPTIONS

KINDS = ["ivf", "ivf-sq8", "ivf-pq", "pq", "hnsw"]
ROW_KINDS = ("real", "gaussian")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=scale_store, required=True, help="a store written by index_scale.py --out")
    p.add_argument(
        "--kinds",
        type=names_of(tuple(KIND_OPTIONS)),
        default=KINDS,
        help=f"FAISS index kinds, of {', '.join(KIND_OPTIONS)}",
    )
    p.add_argument(
        "--pq-m",
        type=pq_m_list,
        default=[None],
        help="ivf-pq / pq sub-quantizers, one index each, e.g. 256,default (default: FaissSettings' rule)",
    )
    p.add_argument("--rows", type=names_of(ROW_KINDS), default=list(ROW_KINDS), help="of real, gaussian")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    results_arguments(p, "real_recall")
    return p.parse_args(argv)


def gaussian_like(rows, seed: int):
    """As many Gaussian rows as ``rows``, each with covariance ``C = rows^T rows / n``, and the eigenvalue shares
    of ``C``, largest first. With ``dim <= n``: ``z diag(sqrt(lambda)) U^T`` from ``U diag(lambda) U^T = C``
    (float64 eigendecomposition). With ``dim > n`` (a ``dim x dim`` eigendecomposition would cost ``dim^3``):
    ``Z rows / sqrt(n)``, ``Z`` an ``n x n`` standard normal matrix (each row ``sum_j z_j x_j / sqrt(n)`` has
    covariance ``C``: the same distribution), and the shares from the ``n x n`` Gram matrix, whose nonzero
    eigenvalues are ``C``'s."""
    import numpy as np

    x = rows.astype(np.float64)
    n, dim = x.shape
    generator = np.random.default_rng(seed)
    if dim > n:
        values = np.clip(np.linalg.eigvalsh(x @ x.T / n)[::-1], 0.0, None)
        z = generator.standard_normal((n, n)).astype(np.float32)
        return (z @ rows.astype(np.float32)) / np.float32(np.sqrt(n)), values / values.sum()
    values, vectors = np.linalg.eigh(x.T @ x / n)
    values = np.clip(values[::-1], 0.0, None)
    vectors = vectors[:, ::-1]
    z = generator.standard_normal((n, dim))
    return ((z * np.sqrt(values)) @ vectors.T).astype(np.float32), values / values.sum()


def measure(name: str, source, queries, kinds: list[str], pq_ms: list[int | None]) -> list[dict]:
    """Recall@10 and batch time per query of every kind (a PQ kind once per sub-quantizer count of ``pq_ms``,
    ``None`` for the default rule) and swept setting on ``source``."""
    from wherefrom.core.search import (
        FaissSettings,
        build_faiss_index,
        exact_top_k,
        faiss_top_k,
        pq_m_label,
        recall_at_k,
    )

    truth = exact_top_k(source, queries, K)
    opposite = exact_top_k(source, queries, K, opponents=True)
    out = []
    for kind, pq_m in [(k, m) for k in kinds for m in (pq_ms if "pq" in k else [None])]:
        start = time.perf_counter()
        index = build_faiss_index(source, FaissSettings(kind=kind, pq_m=pq_m))
        built = time.perf_counter() - start
        codes = pq_m_label(index, FaissSettings(kind=kind, pq_m=pq_m), source.dim)
        for values in sweep(kind):
            settings = FaissSettings(kind=kind, pq_m=pq_m, **values)
            start = time.perf_counter()
            found = faiss_top_k(index, source.ids, queries, K, settings=settings)
            per_query = (time.perf_counter() - start) / len(queries)
            recall, overlap = recall_at_k(found, truth, source, queries), recall_at_k(found, truth)
            opponents = faiss_top_k(index, source.ids, queries, K, opponents=True, settings=settings)
            opponents_recall = recall_at_k(opponents, opposite, source, queries)
            out.append(
                {
                    "rows_kind": name,
                    "kind": kind,
                    "nlist": FaissSettings(kind=kind).lists(source.count) if kind.startswith("ivf") else None,
                    "setting": codes + " ".join(f"{k}={v}" for k, v in values.items()),
                    "build_s": built,
                    "batch_query_ms": per_query * 1000,
                    "recall_at_10": float(recall.mean()),
                    "recall_min": float(recall.min()),
                    "set_overlap": float(overlap.mean()),
                    "opponents_recall_at_10": float(opponents_recall.mean()),
                    "opponents_recall_min": float(opponents_recall.min()),
                }
            )
            print(json.dumps(out[-1]), flush=True)
        index = None  # freed before the next kind is built
    return out


def load_store(path: Path):
    """The store ``index_scale.py --out`` wrote at ``path``: ``(store, rows, queries, query_ids)``, ``rows`` its
    ``(count, dim)`` float32 array, ``queries`` the ``(n_query, dim)`` query vectors saved beside it."""
    import numpy as np

    from wherefrom.core.store import load_tensors_checked
    from wherefrom.core.vectors import VectorStore

    store = VectorStore.open(path)
    tensors, meta = load_tensors_checked(queries_path(path))
    rows = np.concatenate([shard.float().numpy() for _start, shard in store.shards()])
    return store, rows, tensors["vectors"], json.loads(meta["ids"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_threads(args.threads)
    load_before = uptime()
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(args.threads)
    store, rows, queries, query_ids = load_store(args.store)
    duplicates = len(rows) - len(np.unique(rows, axis=0))
    synthetic, shares = gaussian_like(rows, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="real_recall_") as tmp:
        for name, matrix in (("real", rows), ("gaussian", synthetic)):
            if name not in args.rows:
                continue
            path = Path(tmp) / f"{name}.npy"
            np.save(path, matrix)
            results += measure(name, MemmapRows(path), queries, args.kinds, args.pq_m)
    top = {n: float(shares[:n].sum()) for n in (1, 10, 100)}
    markdown = [
        "# FAISS recall@10 on a real gradient index against Gaussian rows of the same second moment",
        "",
        f"Store `{args.store}`: {store.count} rows of {store.dim:,} numbers ({store.dtype}, searched as float32), "
        f"{len(queries)} real queries ({', '.join(sorted({q.split('-test-')[0] for q in query_ids}))} test rows). "
        f"`gaussian`: {store.count} Gaussian rows with the real rows' uncentred second moment (its eigenvectors); "
        f"the same queries. Recall@10 against the exact top-10 of the same rows (mean over queries, and the "
        "worst query), a found row that ties the 10th best (`wherefrom.core.search.TIE_TOLERANCE`) counted as found: "
        f"{duplicates} of the real rows repeat an earlier row exactly (equal scores: ties, which the "
        f"exact search breaks by row order); `set overlap`: the plain overlap with the exact top-10 (ties as "
        "misses); `opponents`: the same recall of the 10 lowest scores (a search of `-q`); time per query of the "
        f"{len(queries)} proponent queries searched as one batch, {args.threads} "
        "thread(s). FAISS build settings: `FaissSettings` defaults but `pq_m` where the setting names it.",
        "",
        f"Eigenvalue shares of the real rows' second moment: top 1 {top[1]:.3f}, top 10 {top[10]:.3f}, "
        f"top 100 {top[100]:.3f}.",
        "",
        "| kind | setting | real: recall@10 (worst) | real: set overlap | real: opponents recall@10 (worst) "
        "| real: ms/query | gaussian: recall@10 (worst) | gaussian: opponents | gaussian: ms/query |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["rows_kind"], r["kind"], r["setting"]): r for r in results}
    for kind, setting in dict.fromkeys((r["kind"], r["setting"]) for r in results):
        r, g = by.get(("real", kind, setting)), by.get(("gaussian", kind, setting))
        real_cells = (
            [
                f"{r['recall_at_10']:.3f} ({r['recall_min']:.1f})",
                f"{r['set_overlap']:.3f}",
                f"{r['opponents_recall_at_10']:.3f} ({r['opponents_recall_min']:.1f})",
                f"{r['batch_query_ms']:.2f}",
            ]
            if r
            else ["-"] * 4
        )
        gaussian_cells = (
            [
                f"{g['recall_at_10']:.3f} ({g['recall_min']:.1f})",
                f"{g['opponents_recall_at_10']:.3f}",
                f"{g['batch_query_ms']:.2f}",
            ]
            if g
            else ["-"] * 3
        )
        markdown.append("| " + " | ".join([kind, setting, *real_cells, *gaussian_cells]) + " |")
    data = {"store": str(args.store), "rows": store.count, "dim": store.dim, "duplicates": duplicates}
    data["queries"] = query_ids
    data.update({"shares_top": top, "results": results})
    path = write_results(
        args.results / args.name, markdown, data, command_line("real_recall.py", argv, args), load_before
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
