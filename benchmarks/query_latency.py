"""Query latency of the vector-store search (:mod:`wherefrom.core.search`) against store size: exact
streaming top-10 and FAISS (recall@10 against the exact search), with a plain numpy scan of the same
rows measured in the same run as the peer.

    python benchmarks/query_latency.py [--sizes 1000,10000,100000,1000000] [--dims 1024] \\
        [--dtypes float32,float16] [--threads 2] [--data /tmp/wherefrom-query-latency]

Rows are synthetic, of low intrinsic dimension as embeddings and projected gradients are: ``z W + 0.5 e``
with a latent ``z ~ N(0, I_32)``, a fixed Gaussian ``W`` (``32 x dim``, scaled by ``1 / sqrt(32)``) and
isotropic noise ``e ~ N(0, I_dim)`` (``--rank``, ``--noise``). Maximum inner product search on such rows
is not easy for IVF (a query's best rows are spread over many cells); isotropic clusters were tried
first and gave either recall 1.0 at any ``nprobe`` or none worth having. They are written once, shard
by shard, to memory-mapped ``.npy`` files under ``--data`` (10^6 x 1024 float32 is 4 GB; RAM stays at
one shard while writing) and reused by later runs. Queries are drawn the same way, apart from the rows.
Every timing is the median over single queries after one warm-up query (the file is then in the page
cache: this measures the search, not the disk). The FAISS index is built on the float32 rows (FAISS
searches in float32 whatever the store's dtype). HNSW and IVF-SQ8 are built only up to ``--kind-max``
rows (10^4 and 10^5): their builds are the slow part on a small CPU.

Writes ``benchmarks/results/query-latency.{md,json}`` (``--results``) with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from wherefrom.core.search import FaissSettings, build_faiss_index, exact_top_k, faiss_top_k, recall_at_k
from wherefrom.core.store import atomic_write_json
from wherefrom.studies.toolkit import markdown_table, number, provenance, write_report

K = 10
SHARD_ROWS = 65536
"""Rows per shard of the synthetic store (256 MiB at 1024 float32 entries)."""


class MemmapRows:
    """A :class:`wherefrom.core.search.RowSource` over a memory-mapped ``(count, dim)`` ``.npy`` file."""

    def __init__(self, path: Path, shard_rows: int = SHARD_ROWS):
        self.matrix = np.load(path, mmap_mode="c")  # copy-on-write: writable views, the file unchanged
        self.count, self.dim = self.matrix.shape
        self.dtype = str(self.matrix.dtype)
        self.ids = [str(i) for i in range(self.count)]
        self.shard_rows = shard_rows

    def shards(self) -> Iterator[tuple[int, torch.Tensor]]:
        for first in range(0, self.count, self.shard_rows):
            yield first, torch.from_numpy(np.asarray(self.matrix[first : first + self.shard_rows]))


def latent(dim: int, rank: int, seed: int) -> np.ndarray:
    """The ``(rank, dim)`` Gaussian map from the latent space to the rows' space, scaled by ``1 / sqrt(rank)``."""
    return np.random.default_rng(seed).standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)


def draw(generator: np.random.Generator, n: int, mapping: np.ndarray, noise: float) -> np.ndarray:
    """``n`` rows ``z W + noise e`` with ``z ~ N(0, I_rank)``, ``e ~ N(0, I_dim)`` (float32)."""
    rank, dim = mapping.shape
    z = generator.standard_normal((n, rank), dtype=np.float32)
    return z @ mapping + noise * generator.standard_normal((n, dim), dtype=np.float32)


def write_rows(folder: Path, count: int, dim: int, dtype: str, rank: int, noise: float, seed: int = 0) -> Path:
    """The synthetic store ``(count, dim)`` as ``folder/rows-<count>x<dim>-<dtype>-r<rank>-<noise>.npy``
    (written once, shard by shard)."""
    path = folder / f"rows-{count}x{dim}-{dtype}-r{rank}-{noise:g}.npy"
    done = path.with_suffix(".done")
    if done.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    mapping = latent(dim, rank, seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(count, dim))
    for shard, first in enumerate(range(0, count, SHARD_ROWS)):
        n = min(SHARD_ROWS, count - first)
        out[first : first + n] = draw(np.random.default_rng([seed, shard]), n, mapping, noise).astype(dtype)
    out.flush()
    del out
    atomic_write_json({"count": count, "dim": dim, "dtype": dtype, "rank": rank, "noise": noise, "seed": seed}, done)
    return path


def queries(dim: int, n: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """``n`` query vectors drawn like the rows (same latent map, other draws)."""
    return torch.from_numpy(draw(np.random.default_rng([seed, 10**6]), n, latent(dim, rank, seed), noise))


def numpy_scan(matrix: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """The peer: one plain numpy product over every row (float16 rows in float32 blocks), then the top ``k``."""
    if matrix.dtype == np.float32:
        scores = matrix @ query
    else:
        scores = np.concatenate(
            [matrix[a : a + SHARD_ROWS].astype(np.float32) @ query for a in range(0, len(matrix), SHARD_ROWS)]
        )
    top = np.argpartition(-scores, k)[:k] if len(scores) > k else np.arange(len(scores))
    return top[np.argsort(-scores[top], kind="stable")]


def median_seconds(search: Callable[[int], object], n: int) -> float:
    """Median wall time of ``search(i)`` for ``i`` in ``1..n`` after a warm-up ``search(0)``."""
    search(0)
    times = []
    for i in range(1, n + 1):
        start = time.perf_counter()
        search(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep(kind: str) -> tuple[str, list[int]]:
    return ("ef_search", [32, 64, 128, 256]) if kind == "hnsw" else ("nprobe", [8, 16, 32, 64, 128, 256])


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    exact_rows, faiss_rows = [], []
    for dim in args.dims:
        for count in args.sizes:
            ask = queries(dim, args.queries + 1, args.rank, args.noise)
            truth = None
            for dtype in args.dtypes:
                path = write_rows(args.data, count, dim, dtype, args.rank, args.noise)
                source = MemmapRows(path)
                one = median_seconds(lambda i, s=source, a=ask: exact_top_k(s, a[i : i + 1], K), args.queries)
                peer = median_seconds(lambda i, s=source, a=ask: numpy_scan(s.matrix, a[i].numpy(), K), args.queries)
                start = time.perf_counter()
                batch = exact_top_k(source, ask[1:], K)
                batched = time.perf_counter() - start
                agree = all(
                    set(numpy_scan(source.matrix, ask[i].numpy(), K).tolist()) == set(batch.rows[i - 1].tolist())
                    for i in range(1, 4)
                )
                exact_rows.append(
                    {
                        "dim": dim,
                        "dtype": dtype,
                        "rows": count,
                        "exact_ms": one * 1000,
                        "numpy_ms": peer * 1000,
                        "exact_over_numpy": one / peer,
                        "exact_batch_ms": batched * 1000,
                        "batch_queries": args.queries,
                        "agrees_with_numpy": agree,
                    }
                )
                print(json.dumps(exact_rows[-1]), file=sys.stderr, flush=True)
                if dtype == "float32":
                    truth, exact_one, source32 = batch, one, source
            if truth is None:
                continue
            for kind in args.kinds:
                if count > args.kind_max.get(kind, count):
                    continue
                settings = FaissSettings(kind=kind, nlist=args.nlist)
                start = time.perf_counter()
                index = build_faiss_index(source32, settings)
                built = time.perf_counter() - start
                name, values = sweep(kind)
                for value in values:
                    chosen = FaissSettings(kind=kind, nlist=args.nlist, **{name: value})
                    found = faiss_top_k(index, source32.ids, ask[1:], K, settings=chosen)
                    recall = float(recall_at_k(found, truth).mean())
                    latency = median_seconds(
                        lambda i, c=chosen, x=index, s=source32, a=ask: faiss_top_k(
                            x, s.ids, a[i : i + 1], K, settings=c
                        ),
                        args.queries,
                    )
                    faiss_rows.append(
                        {
                            "dim": dim,
                            "rows": count,
                            "kind": kind,
                            "nlist": settings.lists(count) if kind != "hnsw" else None,
                            "setting": f"{name}={value}",
                            "build_s": built,
                            "query_ms": latency * 1000,
                            "recall_at_10": recall,
                            "exact_over_faiss": exact_one / latency,
                        }
                    )
                    print(json.dumps(faiss_rows[-1]), file=sys.stderr, flush=True)
                index = None  # freed before the next kind is built
    return {"exact": exact_rows, "faiss": faiss_rows}


def markdown(result: dict, record: dict) -> str:
    exact = markdown_table(
        ["dim", "dtype", "rows", "exact top-10, 1 query (ms)", "numpy scan (ms)", "exact / numpy", "exact, batch (ms)"],
        [
            [
                str(r["dim"]),
                r["dtype"],
                f"{r['rows']:,}",
                number(r["exact_ms"], ".1f"),
                number(r["numpy_ms"], ".1f"),
                number(r["exact_over_numpy"], ".2f"),
                f"{number(r['exact_batch_ms'], '.1f')} ({r['batch_queries']} queries)",
            ]
            for r in result["exact"]
        ],
    )
    approximate = markdown_table(
        ["dim", "rows", "kind", "nlist", "setting", "build (s)", "query (ms)", "recall@10", "exact / faiss"],
        [
            [
                str(r["dim"]),
                f"{r['rows']:,}",
                r["kind"],
                str(r["nlist"] or "–"),
                r["setting"],
                number(r["build_s"], ".1f"),
                number(r["query_ms"], ".2f"),
                number(r["recall_at_10"], ".3f"),
                number(r["exact_over_faiss"], ".0f"),
            ]
            for r in result["faiss"]
        ],
    )
    hardware = ", ".join(f"{k} {v}" for k, v in record["hardware"].items())
    return "\n\n".join(
        [
            "# Query latency: exact streaming top-10 and FAISS against store size",
            f"Command: `{record['command']}`",
            f"Synthetic rows of low intrinsic dimension (latent rank {record['rank']}, noise {record['noise']}, see the "
            "script's docstring); one query at a time, median over "
            f"{record['queries']} queries after a warm-up (rows in the page cache); threads: {record['threads']} "
            f"(torch and FAISS). Load average at the start: {record['load']}.",
            "## Exact (`exact_top_k`) and the numpy peer\n\n" + exact,
            "## FAISS (`build_faiss_index` + `faiss_top_k`), float32 rows; recall against the exact top-10\n\n"
            + approximate,
            f"Hardware: {hardware}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
            + f", faiss {record['faiss']}.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--dims", type=ints, default=[1024])
    parser.add_argument("--dtypes", type=lambda t: t.split(","), default=["float32", "float16"])
    parser.add_argument("--kinds", type=lambda t: t.split(","), default=["ivf", "ivf-sq8", "hnsw"])
    parser.add_argument(
        "--kind-max",
        type=lambda t: {k: int(v) for k, v in (pair.split("=") for pair in t.split(","))},
        default={"hnsw": 10000, "ivf-sq8": 100000},
        help="largest store to build each kind of index for, e.g. hnsw=10000,ivf-sq8=100000 (builds are slow on a small CPU)",
    )
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default: FaissSettings' rule)")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32, help="latent dimension of the synthetic rows")
    parser.add_argument("--noise", type=float, default=0.5, help="standard deviation of the rows' isotropic noise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/wherefrom-query-latency"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import os

    import faiss

    command = "python benchmarks/query_latency.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = {
        **provenance(command.strip()),
        "rank": args.rank,
        "noise": args.noise,
        "threads": args.threads,
        "queries": args.queries,
        "load": round(os.getloadavg()[0], 2),
        "faiss": faiss.__version__,
    }
    result = measure(args)
    json_path, md_path = write_report(args.results / "query-latency", {**record, **result}, markdown(result, record))
    print(md_path.read_text())
    print(f"-> {json_path}, {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
