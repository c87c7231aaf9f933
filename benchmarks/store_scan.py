"""The exact search as `wherefrom query --search exact` runs it, on a real on-disk store: what a query costs at
10^4 .. 10^6 rows once integrity checks are counted (``query_latency.py`` times the search alone, on
memory-mapped ``.npy`` rows).

    python benchmarks/store_scan.py [--sizes 10000,100000,1000000] [--dim 1024] [--dtype float16] \\
        [--threads 2] [--data /tmp/wherefrom-store-scan] [--results benchmarks/results] [--name store_scan]

Each store is written with :class:`wherefrom.core.vectors.VectorStoreWriter` (the default 256 rows a shard,
checksums recorded), its rows drawn like ``query_latency.py``'s ``fitted`` rows (the eigen-spectrum measured on
real preconditioned LoGra rows, ``results/row_spectrum.json``), and reused by later runs. Timed, per size, with
the store's files in the page cache after a warm-up (so this measures hashing and arithmetic, not the disk):

* ``open``: :meth:`VectorStore.open` (marker, manifest and ids hashed; every shard's size checked);
* ``verify``: :meth:`VectorStore.verify` (every shard hashed with its recorded checksum, XXH3-128: what a
  command did once before searching, until the search hashed the shards as it read them);
* ``search``: :func:`wherefrom.core.search.exact_ends`, proponents and opponents of one query in one pass over
  the shards, read into one reused buffer without hashing them again (as after ``verify``,
  :meth:`VectorStore.blocks`, the next block read ahead on a thread): the median of ``--queries`` queries;
* ``in turn``: the same search with each block read in turn into one buffer (``blocks(size, ahead=False)``,
  what the search did before it read ahead);
* ``one pass``: what ``query --search exact`` runs now: the store opened, then the same search over its shards
  unverified, each read once into the buffer and hashed on the way (:meth:`VectorStore.blocks`): the median of
  ``--queries`` queries, each with a newly opened store;
* ``evicted``: ``verify, then search`` and ``one pass`` again with the store's files dropped from this machine's
  page cache before each (``posix_fadvise(POSIX_FADV_DONTNEED)``; a virtual machine's host may still cache
  them), alternating, median of 5 each: what reading each shard once saves when the bytes come from the disk;
* ``mapped``: the same search over the shards memory-mapped (:meth:`VectorStore.shards` with ``verify=False``),
  joined by the search's generic reader (what the search read before :meth:`VectorStore.blocks`);
* the peers: ``verify, sha256``: the same shard files hashed with hashlib's sha256 in the same 4 MiB reads (the
  checksum wherefrom recorded and verified before XXH3-128); ``numpy``: a plain scan of the same rows held in
  memory (one end: one product and a top-k).

``verify, then search`` = open + verify + search (the command before); ``with sha256`` = open + verify, sha256 +
search; ``query total`` = one pass. Writes
``benchmarks/results/store_scan.{md,json}`` (``--results``, ``--name``) with the command that made it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import command_line, json_file, positive_int, positive_ints, results_arguments
from query_latency import Spectral, median_seconds, numpy_scan
from wherefrom.core.search import exact_ends
from wherefrom.core.vectors import VectorStore, VectorStoreWriter
from wherefrom.studies.toolkit import markdown_table, number, provenance, write_report

K = 10
HERE = Path(__file__).resolve().parent


class Mapped:
    """A :class:`wherefrom.core.search.RowSource` over ``store``'s shards memory-mapped (no ``blocks``)."""

    def __init__(self, store: VectorStore):
        self.store, self.dim, self.count, self.ids, self.dtype = store, store.dim, store.count, store.ids, store.dtype

    def shards(self):
        return self.store.shards(verify=False)


class InTurn:
    """A :class:`wherefrom.core.search.RowSource` over ``store``'s blocks read in turn (no read-ahead thread)."""

    def __init__(self, store: VectorStore):
        self.store, self.dim, self.count, self.ids, self.dtype = store, store.dim, store.count, store.ids, store.dtype

    def blocks(self, size: int):
        return self.store.blocks(size, ahead=False)


def sha256_files(folder: Path) -> None:
    """Hash every shard file of ``folder`` with sha256, in 4 MiB reads (the peer of :meth:`VectorStore.verify`)."""
    for path in sorted(folder.glob("shard-*")):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda f=fh: f.read(1 << 22), b""):
                digest.update(block)
        digest.hexdigest()


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from this machine's page cache."""
    for path in folder.iterdir():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def evicted_seconds(folder: Path, run) -> float:
    """Wall time of ``run()`` with ``folder``'s files dropped from the page cache first."""
    evict(folder)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def verify_then_search(folder: Path, query: torch.Tensor) -> None:
    """What ``query --search exact`` ran before: open, hash every shard, then search."""
    store = VectorStore.open(folder)
    store.verify()
    exact_ends(store, query, K)


def build(folder: Path, count: int, dim: int, dtype: str, rows: Spectral) -> float:
    """Write the store of ``count`` rows in ``folder`` (seconds; 0 when an intact one is reused)."""
    ids = [f"row-{i}" for i in range(count)]
    writer = VectorStoreWriter(folder, ids, dim, {"generator": rows.name, "seed": 0}, dtype=dtype)
    if writer.complete():
        return 0.0
    writer.start()
    start = time.perf_counter()

    def produce(shard: int, shard_ids: list[str]):
        draw = rows.draw(np.random.default_rng([0, shard]), len(shard_ids))
        yield shard_ids, torch.from_numpy(draw)

    writer.build(produce)
    writer.finalize()
    return time.perf_counter() - start


def seconds(run, repeats: int = 1) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after one warm-up call (``median_seconds``)."""
    return median_seconds(lambda _i: run(), repeats)


def measure(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    spectrum = json.loads(args.spectrum.read_text())
    rows = Spectral.measured(args.dim, spectrum["fitted"], f"fitted-{args.spectrum.stem}")
    ask = torch.from_numpy(rows.draw(np.random.default_rng([0, 10**6]), args.queries))
    out = []
    for count in args.sizes:
        folder = args.data / f"store-{count}x{args.dim}-{args.dtype}"
        built = build(folder, count, args.dim, args.dtype, rows)
        opened = seconds(lambda f=folder: VectorStore.open(f))
        store = VectorStore.open(folder)
        verified = seconds(store.verify)
        sha256_seconds = seconds(lambda f=folder: sha256_files(f))
        times = [seconds(lambda s=store, v=ask[q : q + 1]: exact_ends(s, v, K)) for q in range(args.queries)]
        once = [
            seconds(lambda f=folder, v=ask[q : q + 1]: exact_ends(VectorStore.open(f), v, K))
            for q in range(args.queries)
        ]
        in_turn = InTurn(store)
        turns = [seconds(lambda s=in_turn, v=ask[q : q + 1]: exact_ends(s, v, K)) for q in range(args.queries)]
        plain = Mapped(store)
        mapped = [seconds(lambda s=plain, v=ask[q : q + 1]: exact_ends(s, v, K)) for q in range(args.queries)]
        cold: dict[str, list[float]] = {"before": [], "once": []}
        for _ in range(5):
            cold["before"].append(evicted_seconds(folder, lambda f=folder: verify_then_search(f, ask[:1])))
            cold["once"].append(evicted_seconds(folder, lambda f=folder: exact_ends(VectorStore.open(f), ask[:1], K)))
        matrix = np.concatenate([r.numpy() for _, r in store.shards()])
        first = ask[0].numpy()
        peer = seconds(lambda m=matrix, v=first: numpy_scan(m, v, K), 3)
        found = exact_ends(store, ask[:1], K)[0]
        scan = statistics.median(times)
        row = {
            "count": count,
            "dim": args.dim,
            "dtype": args.dtype,
            "shards": store.shard_count,
            "bytes": sum(p.stat().st_size for p in folder.glob("shard-*")),
            "build_seconds": built,
            "open_seconds": opened,
            "verify_seconds": verified,
            "verify_sha256_seconds": sha256_seconds,
            "search_seconds": scan,
            "in_turn_search_seconds": statistics.median(turns),
            "mapped_search_seconds": statistics.median(mapped),
            "numpy_seconds": peer,
            "verify_then_search_seconds": opened + verified + scan,
            "query_total_seconds": statistics.median(once),
            "evicted_verify_then_search_seconds": statistics.median(cold["before"]),
            "evicted_one_pass_seconds": statistics.median(cold["once"]),
            "with_sha256_seconds": opened + sha256_seconds + scan,
            "top1": found.ids[0][0],
        }
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def render(rows: list[dict], command: str, load: str) -> str:
    table = markdown_table(
        ["rows", "shards", "GiB", "build (s)", "open (s)", "verify (s)", "verify, sha256 (s)", "sha256 / verify",
         "search, both ends (ms)", "in turn (ms)", "in turn / search", "mapped (ms)", "mapped / search", "numpy, one end (ms)", "search / numpy",
         "verify, then search (s)", "with sha256 (s)", "query total: one pass (s)", "one pass / verify, then search",
         "evicted: verify, then search (s)", "evicted: one pass (s)", "evicted: one pass / verify, then search"],
        [
            [
                f"{r['count']:,}", str(r["shards"]), number(r["bytes"] / 2**30, ".2f"), number(r["build_seconds"], ".1f"),
                number(r["open_seconds"], ".3f"), number(r["verify_seconds"], ".3f"),
                number(r["verify_sha256_seconds"], ".2f"), number(r["verify_sha256_seconds"] / r["verify_seconds"], ".1f"),
                number(1000 * r["search_seconds"], ".1f"), number(1000 * r["in_turn_search_seconds"], ".1f"),
                number(r["in_turn_search_seconds"] / r["search_seconds"], ".2f"), number(1000 * r["mapped_search_seconds"], ".1f"),
                number(r["mapped_search_seconds"] / r["search_seconds"], ".2f"), number(1000 * r["numpy_seconds"], ".1f"),
                number(r["search_seconds"] / r["numpy_seconds"], ".2f"), number(r["verify_then_search_seconds"], ".2f"),
                number(r["with_sha256_seconds"], ".2f"), number(r["query_total_seconds"], ".2f"),
                number(r["query_total_seconds"] / r["verify_then_search_seconds"], ".2f"),
                number(r["evicted_verify_then_search_seconds"], ".2f"), number(r["evicted_one_pass_seconds"], ".2f"),
                number(r["evicted_one_pass_seconds"] / r["evicted_verify_then_search_seconds"], ".2f"),
            ]
            for r in rows
        ],
    )  # fmt: skip
    return (
        "# Exact search through the on-disk store (the `query --search exact` path)\n\n"
        f"Command: `{command}`\n\nLoad average at the start: {load}. Build 0 = an intact store reused. "
        "Verify: every shard hashed with its recorded checksum (XXH3-128); verify, sha256: the same files hashed "
        "with sha256 (the checksum recorded before). Search: proponents and opponents of one query in one pass over "
        "the shards read into reused buffers, the next block read ahead on a thread (median); in turn: the same with each "
        "block read in turn into one buffer (the search before); mapped: the same search over memory-mapped shards joined by "
        "the search's generic reader (the path before); numpy: one product and one top-k over the same rows in memory (one end). "
        "Verify, then search = open + verify + search (the command before); with sha256 = open + verify, sha256 + "
        "search; query total: one pass = what `query --search exact` runs now, the store opened and searched with each "
        "shard hashed as it is read into the buffer (median, a newly opened store per query). Evicted: the same two with "
        "the store's files dropped from this machine's page cache first (posix_fadvise DONTNEED; the virtual machine's "
        "host may still cache them), median of 5.\n\n"
        f"{table}\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every number and name is checked here (``error: argument --sizes: ...``, exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=positive_ints, default=[10000, 100000, 1000000])
    parser.add_argument("--dim", type=positive_int, default=1024)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--queries", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--spectrum", type=json_file, default=str(HERE / "results" / "row_spectrum.json"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/wherefrom-store-scan"))
    results_arguments(parser, "store_scan")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = command_line("store_scan.py", argv, args).strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    rows = measure(args)
    report = {**provenance(command), "load_at_start": " ".join(load), "rows": rows}
    write_report(args.results / args.name, report, render(rows, command, " ".join(load)))


if __name__ == "__main__":
    main()
