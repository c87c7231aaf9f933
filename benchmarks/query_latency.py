"""Query latency of the vector-store search (:mod:`wherefrom.core.search`) against store size: exact
streaming top-10 and FAISS (recall@10 against the exact search), with a plain numpy scan of the same
rows measured in the same run as the peer.

    python benchmarks/query_latency.py [--sizes 1000,10000,100000,1000000] [--dims 1024] \\
        [--rows fitted,none] [--dtypes float32,float16] [--threads 2] [--data /tmp/wherefrom-query-latency]

Rows are synthetic, of one of these kinds (``--rows``), queries drawn the same way apart from the rows:

* ``fitted`` / ``none``: Gaussian rows whose second moment has the eigen-spectrum measured on real LoGra
  index rows by ``benchmarks/row_spectrum.py`` (``--spectrum``, ``results/row_spectrum.json``: SmolLM2,
  emotion, ``--precondition fitted`` or ``none``): ``x = (z * sqrt(lambda)) U^T`` with ``z ~ N(0, I_dim)``,
  a fixed random rotation ``U``, ``lambda_i`` the measured eigenvalue shares for ``i`` up to where the
  power law was fitted and ``lambda_i ~ i^-alpha`` (the fitted law) beyond. Preconditioned rows are
  nearly white (the projected Fisher whitens them: the worst case for any approximate index, close to
  iid Gaussian rows); raw projected gradients are dominated by a few directions.
* ``iid``: iid Gaussian rows, the worst case.
* ``latent``: low intrinsic dimension, ``z W + 0.5 e`` with a latent ``z ~ N(0, I_32)``, a fixed Gaussian
  ``W`` (``32 x dim``, scaled by ``1 / sqrt(32)``) and isotropic noise ``e ~ N(0, I_dim)`` (``--rank``,
  ``--noise``; the rows of the previous results file).

Rows are written once, shard by shard, to memory-mapped ``.npy`` files under ``--data`` (10^6 x 1024
float32 is 4 GB; RAM stays at one shard while writing) and reused by later runs. Every timing is the
median over single queries after one warm-up query (the file is then in the page cache: this measures
the search, not the disk); FAISS is also timed on the ``--queries`` queries as one batch (per query:
the batch's wall time divided by its size; FAISS spreads a batch over its threads). The numpy peer is
timed on float32 rows only, over ``--peer-queries`` queries. The FAISS index is built on the float32
rows (FAISS searches in float32 whatever the store's dtype); every index is freed before the next is
built. HNSW and IVF-SQ8 are built only up to ``--kind-max`` rows (10^4 and 10^5): their builds are the
slow part on a small CPU.

Writes ``benchmarks/results/query-latency.{md,json}`` (``--results``) with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from common import command_line, json_file, names_of, nonnegative_float, positive_int, positive_ints, results_arguments
from wherefrom.core.search import (
    KIND_OPTIONS,
    FaissSettings,
    build_faiss_index,
    exact_top_k,
    faiss_top_k,
    pq_m_label,
    recall_at_k,
)
from wherefrom.core.store import atomic_write_json
from wherefrom.studies.toolkit import markdown_table, number, provenance, write_report

HERE = Path(__file__).resolve().parent
K = 10
ROW_KINDS = ("fitted", "none", "iid", "latent")
"""``--rows``: the synthetic row kinds (module docstring)."""
DTYPES = ("float32", "float16", "float64")
"""``--dtypes``: the numpy dtypes the rows are stored in (FAISS builds on the float32 rows)."""
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


class Latent:
    """Rows ``z W + noise e``: ``z ~ N(0, I_rank)``, ``W`` a fixed ``(rank, dim)`` Gaussian map scaled by
    ``1 / sqrt(rank)``, ``e ~ N(0, I_dim)``."""

    def __init__(self, dim: int, rank: int, noise: float, seed: int = 0):
        self.mapping = np.random.default_rng(seed).standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
        self.noise, self.name = noise, f"latent-r{rank}-{noise:g}"

    def draw(self, generator: np.random.Generator, n: int) -> np.ndarray:
        rank, dim = self.mapping.shape
        z = generator.standard_normal((n, rank), dtype=np.float32)
        return z @ self.mapping + self.noise * generator.standard_normal((n, dim), dtype=np.float32)


class Spectral:
    """Gaussian rows ``(z * sqrt(lambda)) U^T`` whose second moment has eigenvalues ``lambda`` (normalised to
    sum to ``dim``, so an entry has unit variance on average) along a fixed random rotation ``U``."""

    def __init__(self, dim: int, shares: np.ndarray, name: str, seed: int = 0):
        self.scale = np.sqrt(shares * dim / shares.sum()).astype(np.float32)
        q, r = np.linalg.qr(np.random.default_rng([seed, 7]).standard_normal((dim, dim)))
        self.rotation = (q * np.sign(np.diag(r))).T.astype(np.float32)  # Haar-distributed
        self.name = name

    @classmethod
    def measured(cls, dim: int, spectrum: dict, name: str) -> Spectral:
        """The measured eigenvalue shares up to ``fitted_on``, continued by the fitted ``i^-alpha`` law."""
        measured = np.asarray(spectrum["eigenvalue_shares"][: spectrum["fitted_on"]])[:dim]
        i = np.arange(len(measured) + 1, dim + 1)
        tail = measured[-1] * (i / len(measured)) ** -spectrum["alpha"]
        return cls(dim, np.concatenate([measured, tail]), name)

    def draw(self, generator: np.random.Generator, n: int) -> np.ndarray:
        z = generator.standard_normal((n, len(self.scale)), dtype=np.float32)
        return (z * self.scale) @ self.rotation


def generator_for(kind: str, dim: int, args: argparse.Namespace) -> Latent | Spectral:
    """The row generator of ``--rows`` kind ``kind`` (module docstring)."""
    if kind == "latent":
        return Latent(dim, args.rank, args.noise)
    if kind == "iid":
        return Spectral(dim, np.ones(dim), "iid")
    measured = json.loads(args.spectrum.read_text())
    return Spectral.measured(dim, measured[kind], f"{kind}-{args.spectrum.stem}")


def write_rows(folder: Path, count: int, dim: int, dtype: str, rows: Latent | Spectral, seed: int = 0) -> Path:
    """The synthetic store ``(count, dim)`` as ``folder/rows-<count>x<dim>-<dtype>-<kind>.npy`` (written
    once, shard by shard)."""
    path = folder / f"rows-{count}x{dim}-{dtype}-{rows.name}.npy"
    done = path.with_suffix(".done")
    if done.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(count, dim))
    for shard, first in enumerate(range(0, count, SHARD_ROWS)):
        n = min(SHARD_ROWS, count - first)
        out[first : first + n] = rows.draw(np.random.default_rng([seed, shard]), n).astype(dtype)
    out.flush()
    del out
    atomic_write_json({"count": count, "dim": dim, "dtype": dtype, "rows": rows.name, "seed": seed}, done)
    return path


def queries(rows: Latent | Spectral, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` query vectors drawn like the rows (other draws)."""
    return torch.from_numpy(rows.draw(np.random.default_rng([seed, 10**6]), n))


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


def pq_m_list(text: str) -> list[int | None]:
    """``--pq-m``'s values: comma-separated sub-quantizer counts (integers >= 1), ``default`` (``None``) for
    ``FaissSettings``' rule; an ``argparse`` type."""
    try:
        return [None if v == "default" else positive_int(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 or 'default', got {text!r}") from None


def kind_limits(text: str) -> dict[str, int]:
    """``--kind-max``'s value: comma-separated ``kind=rows`` pairs, each kind a FAISS kind (``KIND_OPTIONS``), each
    ``rows`` an integer >= 1; an ``argparse`` type."""
    limits = {}
    for pair in text.split(","):
        kind, _, rows = pair.partition("=")
        try:
            if kind not in KIND_OPTIONS:
                raise argparse.ArgumentTypeError
            limits[kind] = positive_int(rows)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected kind=rows pairs, each kind one of {', '.join(KIND_OPTIONS)} and rows an integer >= 1, "
                f"got {pair!r}"
            ) from None
    return limits


def sweep(kind: str) -> list[dict[str, int]]:
    """The search-time settings tried for an index ``kind``."""
    if kind == "hnsw":
        return [{"ef_search": v} for v in (32, 64, 128, 256)]
    if kind == "ivf-pq":
        return [{"nprobe": p, "refine": r} for p in (16, 32, 64, 128, 256) for r in (16, 64, 256, 1024)]
    if kind == "pq":
        return [{"refine": r} for r in (16, 64, 256, 1024)]
    return [{"nprobe": v} for v in (8, 16, 32, 64, 128, 256)]


def measure(args: argparse.Namespace) -> dict:
    exact_rows, faiss_rows = [], []
    for dim in args.dims:
        for kind in args.rows:
            generator = generator_for(kind, dim, args)
            for count in args.sizes:
                ask = queries(generator, args.queries + 1)
                truth = None
                for dtype in args.dtypes:
                    source = MemmapRows(write_rows(args.data, count, dim, dtype, generator))
                    one = median_seconds(lambda i, s=source, a=ask: exact_top_k(s, a[i : i + 1], K), args.queries)
                    start = time.perf_counter()
                    batch = exact_top_k(source, ask[1:], K)
                    batched = time.perf_counter() - start
                    peer = None
                    if dtype == "float32":
                        peer = median_seconds(
                            lambda i, s=source, a=ask: numpy_scan(s.matrix, a[i].numpy(), K), args.peer_queries
                        )
                        truth, exact_one, source32 = batch, one, source
                    agree = all(
                        set(numpy_scan(source.matrix, ask[i].numpy(), K).tolist()) == set(batch.rows[i - 1].tolist())
                        for i in range(1, 3)
                    )
                    exact_rows.append(
                        {
                            "dim": dim,
                            "rows_kind": kind,
                            "dtype": dtype,
                            "rows": count,
                            "exact_ms": one * 1000,
                            "numpy_ms": None if peer is None else peer * 1000,
                            "exact_over_numpy": None if peer is None else one / peer,
                            "exact_batch_ms": batched * 1000,
                            "batch_queries": args.queries,
                            "agrees_with_numpy": agree,
                        }
                    )
                    print(json.dumps(exact_rows[-1]), file=sys.stderr, flush=True)
                if truth is None:
                    continue
                for index_kind, pq_m in [(k, m) for k in args.kinds for m in (args.pq_m if "pq" in k else [None])]:
                    if count > args.kind_max.get(index_kind, count):
                        continue
                    settings = FaissSettings(kind=index_kind, nlist=args.nlist, pq_m=pq_m)
                    start = time.perf_counter()
                    index = build_faiss_index(source32, settings)
                    built = time.perf_counter() - start
                    codes = pq_m_label(index, settings, source32.dim)
                    for values in sweep(index_kind):
                        chosen = FaissSettings(kind=index_kind, nlist=args.nlist, pq_m=pq_m, **values)
                        start = time.perf_counter()
                        found = faiss_top_k(index, source32.ids, ask[1:], K, settings=chosen)
                        batched = (time.perf_counter() - start) / args.queries
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
                                "rows_kind": kind,
                                "rows": count,
                                "kind": index_kind,
                                "nlist": settings.lists(count) if index_kind.startswith("ivf") else None,
                                "setting": codes + " ".join(f"{k}={v}" for k, v in values.items()),
                                "build_s": built,
                                "query_ms": latency * 1000,
                                "batch_query_ms": batched * 1000,
                                "recall_at_10": recall,
                                "exact_over_faiss": exact_one / latency,
                            }
                        )
                        print(json.dumps(faiss_rows[-1]), file=sys.stderr, flush=True)
                    index = None  # freed before the next kind is built
    return {"exact": exact_rows, "faiss": faiss_rows}


def best_under(result: dict, millis: float, recall: float) -> list[list[str]]:
    """Per row kind and store size, the fastest FAISS setting with recall@10 >= ``recall`` and its batch time
    per query under ``millis`` (else the best recall under ``millis``), as table cells."""
    out = []
    groups = sorted({(r["rows_kind"], r["rows"]) for r in result["faiss"]})
    for kind, count in groups:
        rows = [r for r in result["faiss"] if (r["rows_kind"], r["rows"]) == (kind, count)]
        fast = [r for r in rows if r["batch_query_ms"] < millis]
        met = [r for r in fast if r["recall_at_10"] >= recall]
        pick = (
            min(met, key=lambda r: r["batch_query_ms"]) if met else max(fast or rows, key=lambda r: r["recall_at_10"])
        )
        out.append(
            [
                kind,
                f"{count:,}",
                "**yes**" if met else "no",
                f"{pick['kind']} {pick['setting']}",
                number(pick["recall_at_10"], ".3f"),
                number(pick["batch_query_ms"], ".2f"),
                number(pick["query_ms"], ".2f"),
                number(pick["build_s"], ".0f"),
            ]
        )
    return out


def markdown(result: dict, record: dict) -> str:
    exact = markdown_table(
        [
            "rows",
            "dim",
            "dtype",
            "count",
            "exact top-10, 1 query (ms)",
            "numpy scan (ms)",
            "exact / numpy",
            "exact, batch (ms)",
        ],
        [
            [
                r["rows_kind"],
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
        [
            "rows",
            "count",
            "kind",
            "nlist",
            "setting",
            "build (s)",
            "1 query (ms)",
            "batch, per query (ms)",
            "recall@10",
            "exact / faiss",
        ],
        [
            [
                r["rows_kind"],
                f"{r['rows']:,}",
                r["kind"],
                str(r["nlist"] or "–"),
                r["setting"],
                number(r["build_s"], ".1f"),
                number(r["query_ms"], ".2f"),
                number(r["batch_query_ms"], ".2f"),
                number(r["recall_at_10"], ".3f"),
                number(r["exact_over_faiss"], ".3g"),
            ]
            for r in result["faiss"]
        ],
    )
    verdict = markdown_table(
        ["rows", "count", "met", "setting", "recall@10", "batch, per query (ms)", "1 query (ms)", "build (s)"],
        best_under(result, 50.0, 0.95),
    )
    spectra = "; ".join(
        f"`{kind}`: top-1 / top-10 / top-100 eigenvalue shares {s['top1']:.3f} / {s['top10']:.3f} / "
        f"{s['top100']:.3f}, alpha {s['alpha']:.2f}"
        for kind, s in record["spectrum"].items()
    )
    hardware = ", ".join(f"{k} {v}" for k, v in record["hardware"].items())
    return "\n\n".join(
        [
            "# Query latency: exact streaming top-10 and FAISS against store size",
            f"Command: `{record['command']}`",
            f"Synthetic rows (see the script's docstring): {', '.join(record['rows'])}. The spectra of real LoGra "
            f"rows they follow (`{record['spectrum_file']}`, SmolLM2, emotion): {spectra}. One query at a time, "
            f"median over {record['queries']} queries after a warm-up (rows in the page cache), and FAISS also on "
            f"the {record['queries']} queries as one batch (wall time / {record['queries']}); threads: "
            f"{record['threads']} (torch and FAISS). Load average at the start: {record['load']}.",
            "## Target: recall@10 >= 0.95 in < 50 ms per query (batch)\n\n" + verdict,
            "## Exact (`exact_top_k`) and the numpy peer (float32 rows)\n\n" + exact,
            "## FAISS (`build_faiss_index` + `faiss_top_k`), float32 rows; recall against the exact top-10\n\n"
            + approximate,
            f"Hardware: {hardware}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
            + f", faiss {record['faiss']}.",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every number and name is checked here (``error: argument --sizes: ...``, exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=positive_ints, default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--dims", type=positive_ints, default=[1024])
    parser.add_argument(
        "--dtypes", type=names_of(DTYPES), default=["float32", "float16"], help=f"of {', '.join(DTYPES)}"
    )
    parser.add_argument(
        "--rows", type=names_of(ROW_KINDS), default=["fitted", "none"], help=f"of {', '.join(ROW_KINDS)}"
    )
    parser.add_argument("--spectrum", type=json_file, default=str(HERE / "results" / "row_spectrum.json"))
    parser.add_argument(
        "--kinds",
        type=names_of(tuple(KIND_OPTIONS)),
        default=["ivf", "ivf-pq", "pq", "ivf-sq8", "hnsw"],
        help=f"FAISS index kinds, of {', '.join(KIND_OPTIONS)}",
    )
    parser.add_argument(
        "--kind-max",
        type=kind_limits,
        default={"hnsw": 10000, "ivf-sq8": 100000},
        help="largest store to build each kind of index for, e.g. hnsw=10000,ivf-sq8=100000 (builds are slow on a small CPU)",
    )
    parser.add_argument("--nlist", type=positive_int, default=None, help="IVF cells (default: FaissSettings' rule)")
    parser.add_argument(
        "--pq-m",
        type=pq_m_list,
        default=[None],
        help="ivf-pq / pq sub-quantizers, one index each, e.g. 256,512,default (default: FaissSettings' rule)",
    )
    parser.add_argument("--queries", type=positive_int, default=20)
    parser.add_argument("--peer-queries", type=positive_int, default=5, help="queries timed for the numpy peer")
    parser.add_argument("--rank", type=positive_int, default=32, help="latent dimension of the synthetic rows")
    parser.add_argument(
        "--noise", type=nonnegative_float, default=0.5, help="standard deviation of the rows' isotropic noise"
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/wherefrom-query-latency"))
    results_arguments(parser, "query-latency")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import os

    import faiss

    torch.set_num_threads(args.threads)  # before the provenance, which records torch's threads
    faiss.omp_set_num_threads(args.threads)
    command = command_line("query_latency.py", argv, args).strip()
    record = {
        **provenance(command),
        "rows": args.rows,
        "spectrum_file": os.path.relpath(args.spectrum.resolve(), HERE.parent),  # from the repository's root
        "spectrum": {
            k: {m: v for m, v in s.items() if m != "eigenvalue_shares"}
            for k, s in json.loads(args.spectrum.read_text()).items()
            if k in ("fitted", "none")
        },
        "rank": args.rank,
        "noise": args.noise,
        "threads": args.threads,
        "queries": args.queries,
        "load": round(os.getloadavg()[0], 2),
        "faiss": faiss.__version__,
    }
    result = measure(args)
    json_path, md_path = write_report(args.results / args.name, {**record, **result}, markdown(result, record))
    print(md_path.read_text())
    print(f"-> {json_path}, {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
