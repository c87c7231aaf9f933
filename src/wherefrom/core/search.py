"""Top-k search of query vectors over a sharded row store: exact by streaming, approximate with FAISS.

A row store holds one vector per training row (projected, optionally preconditioned training
gradients, ``(count, dim)``, float32/float16/bfloat16) and hands them out shard by shard
(:class:`RowSource`). The score of row ``m`` for query ``q`` is the inner product

    s(q, m) = <q, x_m>      (float32 accumulation)

which is the influence ``I(z_m, z_q)`` of the README when the store holds preconditioned training
gradients and ``q`` the query gradient in the same projection (positive = proponent).

- **Exact** (:func:`exact_top_k`, :func:`exact_ends` for both ends in one pass): the queries
  ``(n_query, dim)`` are multiplied with each shard in chunks of at most ``chunk_rows`` rows in float32
  (half-precision rows converted exactly, on one thread, into a reused cache-sized buffer), and a running
  top-``k`` per query is merged with the scores of every ``chunk_rows`` rows; shards smaller than a
  cache-sized block are joined first (the index's default is 256 rows). Memory: one shard (as the source
  yields it) + one such block (two from the store on disk, which reads the next one ahead) + one float32 block + ``n_query x (chunk_rows + one block)`` scores +
  ``n_query x k`` kept, never the whole store.
  **Proponents** are the ``k`` largest scores, **opponents** the ``k`` smallest (most negative), each
  best first. **Ties** are broken by row order (the lower row first), so the result is deterministic
  and equals a stable sort of the full score matrix. A searched row with a NaN or infinite entry is
  refused (:class:`SearchError` naming its id), as is a non-finite query.
- **Approximate** (:func:`build_faiss_index`, :func:`faiss_top_k`): a FAISS inner-product index
  (Johnson, Douze & Jegou 2019, "Billion-scale similarity search with GPUs"): ``ivf`` (inverted
  lists over ``nlist`` k-means cells, ``nprobe`` of them searched, rows kept exactly), ``ivf-sq8``
  (the same with rows quantised to 8 bits per entry between each entry's min and max over every row: a quarter
  of the memory; its scores are those of the 8-bit rows, not exact), ``ivf-pq`` (the same
  cells holding 4-bit product-quantisation codes of ``pq_m`` sub-vectors, Jegou, Douze & Schmid
  2011, scanned with SIMD lookup tables, Andre et al. 2017 "fast scan"; the ``refine x k`` best
  codes are re-ranked with the exact float32 rows, which the index also keeps, so the scores returned
  are exact and the memory is that of ``ivf`` plus ``dim / 16`` bytes per row), ``pq`` (no cells: every
  row's 4-bit code of ``dim / 2`` sub-vectors, or 256 where a probe on held-out training rows ranks better with
  those (:data:`PQ_M_CONCENTRATED`), scanned, then the same exact re-ranking: memory of the
  float32 rows plus ``dim / 4`` bytes per row; preconditioned rows are nearly white, so their best rows are spread over every IVF cell
  and only a scan of every row finds them: ``benchmarks/results/query-latency-pq.md``) or ``hnsw`` (Malkov &
  Yashunin 2018, graph of ``M`` links per row, ``ef_search`` candidates per search; ``graph``: each row linked
  to the rows of largest inner product, as ip-NSW, or to the rows of smallest angle, after Liu et al. 2020's
  angular graph, then searched by inner product). Opponents are
  searched as proponents of ``-q``. The index is built from the source in one streamed pass (two for an
  angular HNSW graph) after
  k-means training on a strided sample, saved atomically with its checksum beside the store
  (:func:`wherefrom.core.store.save_tensors_checked`) and reused while the store and the settings
  are the same. ``ivf`` and ``ivf-sq8`` indexes move to the GPUs when ``faiss.get_num_gpus() > 0``.
  :func:`recall_at_k` measures it against the exact search (counting a row that ties the k-th best, such
  as a duplicate row, as found).
- **Candidates** (the BM25 prefilter of Grosse et al. 2023, computed by
  :func:`wherefrom.methods.lexical.bm25_candidates`): with ``candidates`` (per query, row indices)
  either search ranks only the query's candidate rows; a query with fewer than ``k`` candidates gets
  fewer results (padding: row ``-1``, score NaN). FAISS restricts its search with an ID selector,
  so an IVF search only finds candidates in its ``nprobe`` probed cells; a ``pq`` index (its fast
  scan takes no selector) ranks the candidates by their exact float32 rows, so :func:`search_store` runs
  the exact search of the candidates for it and builds no index.

Defaults, from ``benchmarks/query_latency.py`` (``benchmarks/results/query-latency.md``, dim 1024,
synthetic rows with the eigen-spectra of real LoGra rows, ``benchmarks/row_spectrum.py``):
``nlist = sqrt(count)`` (k-means cost grows with ``nlist^2``; the IVF build over 10^6 rows took 46 s on
2 cores); ``nprobe = 128`` (IVF recall@10 0.91 at 10^6 rows of raw projected gradients, 1.00 at 256);
``ivf-pq``: ``pq_m = dim / 8`` and ``refine = 1024``, the smallest measured shortlist factor with
recall@10 >= 0.95 at 10^6 rows (0.985 with ``nprobe = 256``, 10 ms per query in a batch of 20, 23 ms
alone; refine 64: 0.32); HNSW ``M = 32``, ``ef_search = 128`` (its build, superlinear, is the cost).
Rows preconditioned by a fitted Fisher are nearly white: no IVF setting reached recall 0.95 on them
beyond 10^4 rows (0.91 at 10^5, 0.42 at 10^6). Real rows with class structure are far easier than
Gaussian rows of the same second moment (``benchmarks/results/real_recall.md``: the 4,700 training rows of
the shared sets, preconditioned by a Fisher fitted on 32 rows; ``nprobe = 32`` of 69 cells: 0.988 against 0.84;
fitted on 512 rows, ``real_recall_fit512.md``: 0.963 against 0.67). ``pq`` (``benchmarks/results/query-latency-pq.md``):
``pq_m = dim / 2`` and the same ``refine``; on those rows at 10^6 refine 64 gives 0.995 (6.3 ms per query
in a batch of 20) and 1024 gives 1.00 (11 ms), where ``pq_m = dim / 4`` needs refine 1024 for 0.99
(``query-latency-pq-m256.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from wherefrom.core.options import OptionError, OptionSpec, check_options, from_signature
from wherefrom.core.scoring import end_name, stable_top_k, unit_rows
from wherefrom.core.store import (
    DamagedFile,
    StoreError,
    cache_save_lock,
    check_file,
    load_tensors_checked,
    save_tensors_checked,
)

__all__ = [
    "FAISS_OPTIONS",
    "KIND_OPTIONS",
    "ROW_TILE",
    "TIE_TOLERANCE",
    "TILED_DIM",
    "FaissSettings",
    "RowSource",
    "SearchError",
    "SearchReport",
    "SearchResult",
    "build_faiss_index",
    "built_pq_m",
    "candidate_sets",
    "exact_ends",
    "exact_top_k",
    "faiss_settings",
    "faiss_top_k",
    "load_faiss_index",
    "pq_m_label",
    "recall_at_k",
    "rows_sha256",
    "search_store",
]

JOHNSON_2019 = "Johnson, Douze & Jegou 2019, Billion-scale similarity search with GPUs (FAISS)"
JEGOU_2011 = "Jegou, Douze & Schmid 2011, Product quantization for nearest neighbor search"
ANDRE_2017 = "Andre, Kermarrec & Le Scouarnec 2017, Accelerated nearest neighbor search with Quick ADC"
MALKOV_2018 = "Malkov & Yashunin 2018, Efficient and robust approximate nearest neighbor search using HNSW graphs"
LIU_2020 = "Liu, Yan, Dai, Li, Cheng & Yang 2020, Understanding and improving proximity graph-based maximum inner product search"

logger = logging.getLogger(__name__)


class RowSource(Protocol):
    """A store of ``count`` rows of ``dim`` entries read shard by shard (the reader of the vector store).

    ``ids``: the row ids in row order; ``dtype``: the stored dtype's name (``float32``, ``float16``,
    ``bfloat16``); ``shards()`` yields ``(first_row, rows)`` with ``rows`` of shape ``(n_k, dim)``, in
    row order, covering rows ``0 .. count - 1`` once, holding at most one shard in memory. A source may also
    have ``blocks(size)``: the same rows, consecutive shards joined into blocks of ``size`` rows or more, each valid
    until the next is asked for (the exact search reads those when present).
    """

    dim: int
    count: int
    ids: list[str]
    dtype: str

    def shards(self) -> Iterator[tuple[int, torch.Tensor]]: ...


class SearchError(ValueError):
    """A search that cannot run as asked: a non-finite row or query, mismatched shapes, bad candidates."""


@dataclass
class SearchResult:
    """Per query, the ``k`` best rows found, best first.

    ``rows``: ``(n_query, k')`` int64 row indices, ``k' = min(k, rows that could be returned)`` (the exact search:
    the store's rows, or the union of every query's candidates; FAISS: the index's rows), ``-1`` where a query has
    fewer than ``k'`` results (fewer candidates); ``scores``: ``(n_query, k')`` float32 inner products (the stored sign: opponents hold the most
    negative scores first), NaN where ``rows`` is ``-1``; ``ids``: per query, the ids of its found
    rows (no padding); ``opponents``: which end was searched.
    """

    rows: torch.Tensor
    scores: torch.Tensor
    ids: list[list[str]]
    opponents: bool = False


# --- exact ---------------------------------------------------------------------------------------
CHUNK_ROWS = 32768
"""Rows whose scores are merged into the running top-``k`` at once (the default ``chunk_rows``)."""


def _check_queries(queries: torch.Tensor, dim: int) -> torch.Tensor:
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise SearchError(f"queries must be (n_query, {dim}) to match the store's rows, got {tuple(queries.shape)}")
    queries = queries.detach().to("cpu", torch.float32)
    bad = torch.nonzero(~torch.isfinite(queries).all(1)).flatten().tolist()
    if bad:
        raise SearchError(f"query vector {bad[0]} has a NaN or infinite entry")
    return queries


def candidate_sets(candidates: Sequence[Sequence[int]], n_query: int, count: int) -> list[torch.Tensor]:
    """Each query's candidate rows (indices into ``count`` rows; a list, or an integer numpy array or torch tensor,
    checked by its dtype at once) as a sorted int64 tensor without repeats.

    Raises :class:`SearchError` for another number of lists than ``n_query``, an entry that is not an integer
    (a float such as 2.9 was cut to row 2, and ``True`` taken as row 1 here or, as a mask index, as every row
    in :func:`wherefrom.methods.lexical.restrict`) or one outside ``0..count-1``."""
    if len(candidates) != n_query:
        raise SearchError(f"need one candidate list per query: {n_query} queries, {len(candidates)} lists")
    out = []
    for query, rows in enumerate(candidates):
        if isinstance(rows, torch.Tensor | np.ndarray):  # checked by dtype at once (a list entry by entry)
            found = torch.as_tensor(rows)
            if found.dtype == torch.bool or found.is_floating_point() or found.is_complex():
                raise SearchError(f"query {query}: candidate rows must be integers, got a {found.dtype} array")
        else:
            found = torch.tensor([_candidate_row(query, row) for row in rows], dtype=torch.int64)
        found = found.to("cpu", torch.int64).flatten().unique()
        outside = found[(found < 0) | (found >= count)]
        if outside.numel():
            shown = ", ".join(map(str, outside.tolist()[:5])) + (", ..." if outside.numel() > 5 else "")
            raise SearchError(f"query {query}: candidate rows must lie in 0..{count - 1}, got {shown}")
        out.append(found)
    return out


def _candidate_row(query: int, row: Any) -> int:
    """``row`` as an int: an int, or a numpy/torch integer scalar; :class:`SearchError` for a bool (of any kind),
    a float or anything else."""
    bool_tensor = isinstance(row, torch.Tensor) and row.dtype == torch.bool
    try:
        if isinstance(row, bool | np.bool_) or bool_tensor:
            raise TypeError
        return operator.index(row)
    except TypeError:
        raise SearchError(f"query {query}: candidate rows must be integers, got {row!r}") from None


def _row_error(row: int, ids: Sequence[str], problem: str = "has a NaN or infinite entry") -> SearchError:
    """:class:`SearchError` naming store row ``row`` by index and id, and its ``problem``."""
    return SearchError(f"row {row} (id {ids[row]!r}) of the store {problem}")


def _check_rows(
    values: torch.Tensor, chunk: torch.Tensor, rows: torch.Tensor, ids: Sequence[str], queries: torch.Tensor
) -> None:
    """:class:`SearchError` naming the first row of ``chunk`` with a NaN or infinite entry. Such a row makes
    its scores non-finite (``0 x inf`` is NaN too), so only the rows of non-finite score columns are read. A
    finite row with a non-finite float32 score ``values`` ``(n_query, n)`` is recomputed with ``queries`` in float64:
    a score beyond float32's range there is +-inf in truth too, ranked as such; one within it overflowed in the
    float32 sum only (products that overflow both ways: ``+inf + -inf`` is NaN, which ``topk`` ranks first at both
    ends, or +-inf, by the order in which the BLAS kernel adds them), and that row is named too."""
    if bool(torch.isfinite(values).all()):
        return
    columns = torch.nonzero(~torch.isfinite(values).all(0)).flatten()
    bad = columns[~torch.isfinite(chunk[columns]).all(1)]
    if bad.numel():
        raise _row_error(int(rows[bad[0]]), ids)
    exact = queries.double() @ chunk[columns].double().T
    wrong = (~torch.isfinite(values[:, columns]) & (exact.abs() <= torch.finfo(torch.float32).max)).any(0)
    if bool(wrong.any()):
        raise _row_error(
            int(rows[columns[wrong][0]]),
            ids,
            "has finite entries, but its float32 products with a query overflow (+inf and -inf) where the score "
            "itself does not; scale the rows or the queries down",
        )


def exact_top_k(
    source: RowSource,
    queries: torch.Tensor,
    k: int,
    opponents: bool = False,
    candidates: Sequence[Sequence[int]] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> SearchResult:
    """The exact top-``k`` rows of ``source`` per query by streaming matrix products (module docstring).

    ``queries``: ``(n_query, source.dim)``, any float dtype (used as float32); ``k >= 1`` (capped at the
    rows available); ``candidates``: per query, the row indices it may return; ``chunk_rows``: rows
    scored and merged into the running top-``k`` at once (float16/bfloat16 rows are converted exactly to
    float32 in 16 MiB blocks into one reused buffer, so the result is that of the rows' float32 values).
    Raises :class:`SearchError` naming the first row id with a NaN or infinite entry, a non-finite
    query, a shape mismatch or bad candidates.
    """
    return exact_ends(source, queries, k, (opponents,), candidates, chunk_rows)[0]


def exact_ends(
    source: RowSource,
    queries: torch.Tensor,
    k: int,
    ends: Sequence[bool] = (False, True),
    candidates: Sequence[Sequence[int]] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> list[SearchResult]:
    """:func:`exact_top_k` of each of ``ends`` (``False``: proponents, ``True``: opponents) in one pass over the
    store: each chunk's products are computed once and merged into each end's running top-``k``."""
    if k < 1 or chunk_rows < 1:
        raise SearchError(f"k and chunk_rows must be >= 1, got k={k}, chunk_rows={chunk_rows}")
    queries = _check_queries(queries, source.dim)
    n_query = queries.shape[0]
    allowed = None if candidates is None else candidate_sets(candidates, n_query, source.count)
    union = None if allowed is None else torch.cat([torch.empty(0, dtype=torch.int64), *allowed]).unique()
    signs = [-1.0 if opponents else 1.0 for opponents in ends]
    kept = [(torch.empty(n_query, 0), torch.empty(n_query, 0, dtype=torch.int64)) for _ in ends]
    products = _Products(queries)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores (n_query, n), their rows (n,)) not yet merged
    held = 0  # rows in pending

    def merge() -> None:
        values, rows = (torch.cat(part, -1) for part in zip(*pending)) if len(pending) > 1 else pending[0]
        inside = None
        if allowed is not None:  # (n_query, n): which of the rows each query may return
            queried = [torch.isin(rows, rows_q) for rows_q in allowed]
            inside = torch.stack(queried) if queried else torch.zeros(0, len(rows), dtype=torch.bool)
        for end, sign in enumerate(signs):  # kept rows precede the chunk's: ties stay in row order
            if inside is None:
                top, where = stable_top_k(sign * values, k)
                values_so_far = torch.cat([kept[end][0], top], 1)
                rows_so_far = torch.cat([kept[end][1], rows[where]], 1)
                top, where = stable_top_k(values_so_far, k)
            else:  # one ranking of the kept rows and the chunk's, the rows a query may not return marked -1
                values_so_far = torch.cat([kept[end][0], sign * values], 1)
                rows_so_far = torch.cat([kept[end][1], rows.expand(n_query, -1).masked_fill(~inside, -1)], 1)
                top, where = _top_of_candidates(values_so_far, rows_so_far >= 0, k)
            kept[end] = top, rows_so_far.gather(1, where)
        pending.clear()

    for first, shard in _blocks(source, _cast_rows(source.dim)):
        for start in range(0, shard.shape[0], chunk_rows):
            chunk = shard[start : start + chunk_rows]
            rows = torch.arange(first + start, first + start + chunk.shape[0])
            if allowed is not None:  # score only the chunk's rows that some query may return
                rows = rows[torch.isin(rows, union)]
                chunk = chunk[rows - first - start]
            values = products(chunk)
            _check_rows(values, chunk, rows, source.ids, queries)
            pending.append((values, rows))
            held += len(rows)
            if held >= chunk_rows:
                merge()
                held = 0
    if pending:
        merge()
    return [
        _result(sign * values, rows, source.ids, opponents)
        for (values, rows), sign, opponents in zip(kept, signs, ends)
    ]


def _top_of_candidates(values: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wherefrom.core.scoring.stable_top_k` of each row of ``values`` ``(n_query, n)`` among its ``valid``
    entries (a boolean mask of that shape), which come before every other entry, even one of value ``-inf`` (a
    row's float32 products overflow at that end): the others are filled with ``-inf`` and, moved behind the valid
    ones, can no longer win a tie with them by coming first. ``(top, columns)``, columns into ``values``; a column
    that is not valid (fewer than ``k`` valid entries) is for the caller to mark."""
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # the valid columns first, in order
    top, where = stable_top_k(values.masked_fill(~valid, -math.inf).gather(1, order), k)
    return top, order.gather(1, where)


def _blocks(source: RowSource, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, rows)`` of ``source`` in row order: its shards, consecutive ones joined until they hold ``size``
    rows (:func:`_cast_rows`: a cache-sized block). Scoring the index's default 256-row shards one by one made a
    search 1.4x as long on two threads (100,000 x 1024 float16 rows: 202 against 146 ms; joined into 32,768-row
    chunks, 178 ms). The shards are joined into one reused buffer, so a yielded block is valid until the next one
    is asked for (a new tensor per block made the search of 10^6 x 1024 float32 rows 1.5x as long: every block's
    fresh pages faulted in); a source with ``blocks(size)`` (the store on disk,
    :meth:`wherefrom.core.vectors.VectorStore.blocks`) reads its shards straight into its own buffer instead."""
    if hasattr(source, "blocks"):
        yield from source.blocks(size)
        return
    parts: list[torch.Tensor] = []
    buffer: torch.Tensor | None = None
    held, start = 0, 0

    def joined() -> torch.Tensor:
        nonlocal buffer
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if buffer is None or buffer.dtype != first.dtype or buffer.shape[0] < held or buffer.shape[1] != first.shape[1]:
            buffer = torch.empty(max(held, size), first.shape[1], dtype=first.dtype)
        return torch.cat(parts, out=buffer[:held])

    for first, shard in source.shards():
        if not parts:
            start = first
        parts.append(shard)
        held += shard.shape[0]
        if held >= size:
            yield start, joined()
            parts, held = [], 0
    if parts:
        yield start, joined()


_CAST_BYTES = 16 * 2**20
"""Largest float32 block that half-precision rows are converted into at once (a cache-sized buffer:
200,000 x 1024 float16 rows searched in 4,096-row blocks took 107 ms, in 32,768-row blocks 161 ms)."""

ROW_TILE = 64
"""Rows are multiplied with the queries in multiples of this many, so a row's float32 score is the same bits in
whatever block, chunk or shard it is scored: MKL's kernels sum a ragged edge of rows in another order, and an
exact copy of a row (the shared data sets hold 561 in 4,700 rows) scored in a shorter last block differed from the
original in the last bits, which broke the ties-by-row-order rule (module docstring). Checked on this machine's
MKL for 1-64 queries, dims 7-70,000, 1-8,192 rows at the first, middle and last position, blocks starting at 17
offsets (``tests/core/test_search.py`` keeps a few); multiples of 16 sufficed, 8 did not for 20 queries. It is
applied, and so promised, for rows of up to :data:`TILED_DIM` entries only (:meth:`_Products.tiled`)."""

_ALIGNED = 64
"""Bytes a row block's start is aligned to before it is multiplied (:meth:`_Products.tiled`)."""


def _cast_rows(dim: int) -> int:
    """Rows of ``dim`` entries converted to float32 at once: :data:`_CAST_BYTES` of float32 (at least one row), a
    multiple of :data:`ROW_TILE` where that many fit (rows up to :data:`TILED_DIM` entries)."""
    rows = max(1, _CAST_BYTES // (4 * dim))
    return rows - rows % ROW_TILE if rows >= ROW_TILE else rows


TILED_DIM = _CAST_BYTES // (4 * ROW_TILE)
"""Widest rows (65,536 entries) whose blocks hold whole tiles of :data:`ROW_TILE` rows within :data:`_CAST_BYTES`:
rows up to this width are tiled, padded and aligned as :meth:`_Products.tiled` says; wider rows (raw gradients of
whole layers) are multiplied as they come, with no copy, so they keep the memory of one block, and their copies
may score a few ulps apart."""


class _Products:
    """``queries @ rows.T`` in float32 for chunks of rows of any stored dtype.

    Rows of up to :data:`TILED_DIM` entries are multiplied in multiples of :data:`ROW_TILE` rows, all row-major,
    so a row's score does not depend on the chunk it is in (:meth:`tiled`); wider rows as they come. Float32 rows are multiplied at once. Float16/bfloat16 rows are converted
    exactly to float32 (every such value is a float32 value) in blocks of :func:`_cast_rows` rows, on one thread,
    into one reused buffer, and each block is multiplied while it is in cache, so the chunk's scores are those of
    its float32 values (bit for bit those of the same rows stored in float32). Why: converting was the cost of a
    half-precision search on a loaded 2-core CPU (measured, 200,000 x 1024 float16 rows in 4,096-row blocks:
    24 ms on one thread into one buffer, 392 ms on two threads, about 260 ms into a new tensor per block; the
    float32 product with one query on two threads: 53 ms). The products keep every thread.
    """

    def __init__(self, queries: torch.Tensor):
        self.queries = queries
        self.buffer: torch.Tensor | None = None
        self.tile: torch.Tensor | None = None  # the zero-padded tile of a block of fewer rows, made when needed

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n_query, n)`` float32 products with ``rows`` ``(n, dim)``."""
        if not rows.shape[0]:  # a chunk none of whose rows is a candidate
            return self.queries.new_empty(self.queries.shape[0], 0)
        if rows.dtype == torch.float32:
            return self.tiled(rows)
        step = _cast_rows(rows.shape[1])
        parts = [self.tiled(self.as_float32(rows[start : start + step])) for start in range(0, rows.shape[0], step)]
        return torch.cat(parts, 1) if len(parts) != 1 else parts[0]

    def tiled(self, rows: torch.Tensor) -> torch.Tensor:
        """``queries @ rows.T`` for float32 ``rows`` ``(n, dim)``, in products of whole tiles only: the whole tiles
        at once, then a ragged rest of ``r`` rows as the last ``r`` columns of the product with the block's last
        tile (a view, rows scored twice; copied, one tile, where that tile does not start 64-byte aligned); a block of fewer rows than a tile is copied into a zero-padded
        tile. Rows that are not row-major (a source may yield any strides) or not 64-byte aligned (a chunk starting
        inside a block, for a width not a multiple of 16) are copied first: MKL sums another layout in another
        order, and one query's matrix-vector kernel an unaligned block, as it does a ragged edge. Rows of more than
        :data:`TILED_DIM` entries are multiplied as they are (no copy of such rows)."""
        n, dim = rows.shape
        if dim > TILED_DIM:
            return self.queries @ rows.T
        if not rows.is_contiguous() or rows.data_ptr() % _ALIGNED:
            rows = rows.clone(memory_format=torch.contiguous_format)  # torch aligns CPU allocations to 64 bytes
        rest = n % ROW_TILE
        if not rest:
            return self.queries @ rows.T
        if n > ROW_TILE:
            last = rows[n - ROW_TILE :]
            if last.data_ptr() % _ALIGNED:  # a width not a multiple of 16: a copy of one tile
                last = last.clone()
            return torch.cat([self.queries @ rows[: n - rest].T, (self.queries @ last.T)[:, ROW_TILE - rest :]], 1)
        if self.tile is None:
            self.tile = torch.zeros(ROW_TILE, dim)
        self.tile[:n].copy_(rows)
        self.tile[n:].zero_()
        return (self.queries @ self.tile.T)[:, :n]

    def as_float32(self, rows: torch.Tensor) -> torch.Tensor:
        """Half-precision ``rows`` in float32, converted on one thread into the buffer (a new one, kept,
        when it is missing or too small)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.buffer is None or self.buffer.shape[0] < rows.shape[0]:
                self.buffer = torch.empty(rows.shape, dtype=torch.float32)  # row-major whatever rows' strides
                self.buffer.copy_(rows)
                return self.buffer
            return self.buffer[: rows.shape[0]].copy_(rows)
        finally:
            torch.set_num_threads(threads)


def _result(scores: torch.Tensor, rows: torch.Tensor, ids: Sequence[str], opponents: bool) -> SearchResult:
    """Pad to ``k`` columns where fewer rows were found, mark non-rows (``-1``) with NaN, name the ids."""
    rows = rows.to(torch.int64)
    scores = scores.to(torch.float32).masked_fill(rows < 0, math.nan)
    found = [[ids[r] for r in row.tolist() if r >= 0] for row in rows]
    return SearchResult(rows, scores, found, opponents)


TIE_TOLERANCE = 1e-5
"""Scores of one query within this times the largest ``|score|`` of its exact top-k are a tie in
:func:`recall_at_k` (float32 products of one row by two kernels may differ in the last bits)."""


def recall_at_k(
    approximate: SearchResult,
    exact: SearchResult,
    source: RowSource | None = None,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(n_query,)`` recall@k: the share of each query's exact top-k rows that the approximate search
    found (set overlap, the FAISS convention; ``k`` = the exact result's columns); NaN for a query
    whose exact result is empty (no candidates).

    With the ``source`` and ``queries`` both searched, ties count. Rows of equal score (duplicate rows: the
    shared data sets hold identical rows) are equally good answers, which the exact search breaks by row
    order, and set overlap counts as misses (on a real store of 4,700 rows, 561 of them copies, an IVF search
    probing every cell scored 0.982). So the exact top-k splits into the rows scoring above the k-th
    (beyond :data:`TIE_TOLERANCE`) and the places of the rows that tie it; a query's hits are its found rows
    of the first kind, plus its found rows whose exact score ties the k-th, up to the number of tied places.
    The exact scores of the found rows outside the exact top-k come from :func:`exact_top_k` over those rows
    (one more pass over ``source``, only when the approximate search returned such rows).
    """
    if (source is None) != (queries is None):
        raise SearchError("recall_at_k needs both the source and the queries to score ties, or neither")
    truths = [[r for r in row if r >= 0] for row in exact.rows.tolist()]
    founds = [{r for r in row if r >= 0} for row in approximate.rows.tolist()]
    extra = [sorted(found - set(truth)) for found, truth in zip(founds, truths)]
    rescored = None
    if source is not None and any(extra):
        width = max(1, approximate.rows.shape[1])
        rescored = exact_top_k(source, queries, width, exact.opponents, candidates=extra)
    sign = -1.0 if exact.opponents else 1.0
    out = []
    for q, (found, truth) in enumerate(zip(founds, truths)):
        if not truth:
            out.append(math.nan)
            continue
        hits = len(found & set(truth))
        if source is not None:
            scores = [sign * score for score in exact.scores[q, : len(truth)].tolist()]
            kth, tolerance = scores[-1], TIE_TOLERANCE * max(abs(score) for score in scores)
            above = {r for r, score in zip(truth, scores) if score > kth + tolerance}
            tied = len(found & (set(truth) - above))
            if rescored is not None:
                rows, values = rescored.rows[q].tolist(), rescored.scores[q].tolist()
                tied += sum(1 for r, value in zip(rows, values) if r >= 0 and sign * value >= kth - tolerance)
            hits = len(found & above) + min(tied, len(truth) - len(above))
        out.append(hits / len(truth))
    return torch.tensor(out, dtype=torch.float64)


# --- FAISS ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaissSettings:
    """How the approximate index is built and searched (the options :data:`FAISS_OPTIONS` checks)."""

    kind: Literal["ivf", "ivf-sq8", "ivf-pq", "pq", "hnsw"] = "ivf"
    nlist: int | None = None
    nprobe: int = 128
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    graph: Literal["inner-product", "angular"] = "inner-product"
    train_per_list: int = 64
    pq_m: int | None = None
    refine: int = 1024

    def __post_init__(self) -> None:
        """:class:`wherefrom.core.options.OptionError` naming a setting :data:`FAISS_OPTIONS` refuses: made
        directly (a benchmark's ``kind="bogus"`` built an IVF-SQ8 index and labelled it "bogus") as through
        :func:`faiss_settings`."""
        check_options("FAISS settings", FAISS_OPTIONS, {k: v for k, v in asdict(self).items() if v is not None})

    def lists(self, count: int) -> int:
        """IVF cells for ``count`` rows: ``nlist``, by default ``sqrt(count)``; at most ``count``."""
        return max(1, min(count, self.nlist or round(math.sqrt(count))))

    def capped(self, count: int) -> str | None:
        """What an IVF index over ``count`` rows changes of these settings, in words (``None`` when nothing): an
        ``nlist`` above the rows is cut to one cell per row (:meth:`lists`), and an ``nprobe`` that reaches every
        cell makes the search exhaustive over the cells (the default 128 does up to 16,512 rows, where sqrt rounds to 128)."""
        if not self.kind.startswith("ivf"):
            return None
        lists, notes = self.lists(count), []
        if self.nlist is not None and self.nlist > count:
            notes.append(f"nlist {self.nlist} cut to the store's {count} rows")
        if self.nprobe >= lists:
            notes.append(f"nprobe {self.nprobe} reaches all {lists} cells: every cell searched")
        return "; ".join(notes) or None

    def sub_quantizers(self, dim: int) -> int:
        """4-bit PQ sub-quantizers for rows of ``dim``: ``pq_m``, by default ``dim / 8`` for ``ivf-pq`` (8 entries
        per code, ``dim / 16`` bytes per row) and ``dim / 2`` for ``pq`` (2 entries per code, ``dim / 4`` bytes:
        every code is scanned, so it must rank nearly white rows well), at least 4 (or ``dim``, when smaller: with 1 or 2
        sub-quantizers FAISS's 4-bit fast scan returned fewer rows than asked, 280-299 of 300 with every cell probed and
        every row refined, on rows of 8 and 16 numbers), or where that does not divide ``dim`` its largest divisor
        below (where that is under 4, e.g. a prime dimension: its smallest divisor from 4 up); :class:`SearchError`
        unless a given ``pq_m`` divides ``dim`` and is at least 4 (or ``dim``). A ``pq`` build without ``pq_m`` probes
        this and a smaller one (:meth:`pq_m_candidates`)."""
        entries = 2 if self.kind == "pq" else 8
        least = min(dim, 4)
        m = self.pq_m or _divisor_at_most(dim, max(dim // entries, least))
        if dim % m:
            raise SearchError(f"FAISS option pq_m={m} must divide the rows' dimension {dim}")
        if m < least and self.pq_m:
            raise SearchError(
                f"FAISS option pq_m={m} on rows of {dim} numbers: with fewer than {least} sub-quantizers FAISS's "
                "4-bit fast scan returns fewer rows than asked (rows go missing even with every cell probed); give a "
                "pq_m of at least 4 that divides the dimension, or leave it out"
            )
        return m if m >= least else next(d for d in range(least, dim + 1) if dim % d == 0)

    def pq_m_candidates(self, dim: int) -> list[int]:
        """The ``pq_m`` values a build of rows of ``dim`` chooses among, largest first: the one
        :meth:`sub_quantizers` gives and, for ``pq`` without a given ``pq_m``, also the largest divisor of ``dim``
        up to :data:`PQ_M_CONCENTRATED` where that is smaller and at least a quarter of it (a dimension such as
        2 x 257 has only 2: too coarse a code to be worth a build) (:func:`_probed_pq` keeps the one of better probe
        recall)."""
        m = self.sub_quantizers(dim)
        small = _divisor_at_most(dim, PQ_M_CONCENTRATED)
        if self.kind != "pq" or self.pq_m is not None or m <= PQ_M_CONCENTRATED or small < PQ_M_CONCENTRATED // 4:
            return [m]
        return [m, small]

    def probes(self, dim: int) -> bool:
        """Whether a build of rows of ``dim`` chooses its ``pq_m`` by a probe (two :meth:`pq_m_candidates`)."""
        return len(self.pq_m_candidates(dim)) > 1

    def recall_advice(self, count: int | None = None) -> str:
        """What raises this search's recall: its kind's search-time settings (:data:`SEARCH_TIME`; not ``nprobe``
        where it reaches every cell of an IVF index over ``count`` rows), and the kind or graph measured to suit
        rows it does not (``benchmarks/results/query-latency-pq.md``, ``benchmarks/results/hnsw_graph.md``)."""
        names = [name for name in KIND_OPTIONS[self.kind] if name in SEARCH_TIME]
        if count is not None and "nprobe" in names and self.nprobe >= self.lists(count):
            names.remove("nprobe")  # every cell is searched already
        if not names:  # ivf-sq8 with every cell searched loses recall to its 8-bit codes (ivf: none is lost)
            other = "use kind=ivf (float32 rows), kind=pq for a fitted index, or " if self.kind == "ivf-sq8" else ""
            return f"every cell is searched already: {other}search exactly"
        raise_ = " or ".join(names)
        if self.kind == "hnsw":
            other = "use graph=angular, or " if self.graph == "inner-product" else ""
            return f"raise {raise_}, or for raw rows searched with preconditioned queries (an empirical index) {other}search exactly"
        if self.kind == "pq":  # userN: pq_m=16 gave recall 0.075, and the advice named refine only
            return f"raise {raise_}, or rebuild with a larger pq_m (a finer code: pq_m / 2 bytes per row)"
        return (  # userD: on an empirical index pq misses proponents until refine=1024 (query-latency-pq-probe.md)
            f"raise {raise_}, or for preconditioned (nearly white) rows (a fitted index) use kind=pq; for raw rows "
            "searched with preconditioned queries (an empirical index) search exactly"
        )

    def file_name(self) -> str:
        """The file the index of these settings is saved to beside the store: ``faiss-<kind>.safetensors``, and
        ``faiss-hnsw-angular.safetensors`` for the angular graph (so the two graphs do not replace each other)."""
        graph = "-angular" if self.kind == "hnsw" and self.graph == "angular" else ""
        return f"faiss-{self.kind}{graph}.safetensors"

    def builds_index(self, filtered: bool) -> bool:
        """Whether a search with these settings builds an index: not a ``pq`` search of BM25 candidates
        (``filtered``), which ranks the candidates by their float32 rows, i.e. is the exact search."""
        return not (filtered and self.kind == "pq")

    def check_store(self, count: int, dim: int) -> None:
        """:class:`SearchError` when this kind's index cannot be built on ``count`` rows of ``dim``: a PQ kind
        (``ivf-pq``, ``pq``) on fewer than ``2 ** PQ_BITS`` rows (FAISS's own error names no setting), or a
        ``pq_m`` that does not divide ``dim``. Cheap: callers check before computing the queries."""
        if self.kind not in ("ivf-pq", "pq"):
            return
        if count < 2**PQ_BITS:
            raise SearchError(
                f"FAISS kind={self.kind} trains {2**PQ_BITS} centroids per sub-quantizer and needs at least "
                f"{2**PQ_BITS} rows; the store has {count} (use kind=ivf, or the exact search)"
            )
        self.sub_quantizers(dim)


FAISS_INT = 2**31 - 1
"""The largest value of FAISS's integer settings (C ``int``): larger ones failed inside FAISS, after the build."""

FAISS_OPTIONS: tuple[OptionSpec, ...] = from_signature(
    FaissSettings,
    OptionSpec(
        "kind",
        help="ivf (exact rows in k-means cells) | ivf-sq8 (rows 8-bit) | ivf-pq (4-bit PQ codes in cells, float32 "
        "re-rank) | pq (every row's 4-bit PQ code scanned, float32 re-rank: for nearly white rows) | hnsw (graph)",
        source=JOHNSON_2019,
    ),
    OptionSpec("nlist", high=FAISS_INT, low=1, help="IVF cells (default sqrt(rows))", source=JOHNSON_2019),
    OptionSpec(
        "nprobe", high=FAISS_INT, low=1, help="IVF cells searched per query (recall vs latency)", source=JOHNSON_2019
    ),
    OptionSpec("m", high=FAISS_INT, low=2, help="HNSW links per row", source=MALKOV_2018),
    OptionSpec("ef_construction", high=FAISS_INT, low=1, help="HNSW candidates while building", source=MALKOV_2018),
    OptionSpec(
        "ef_search", high=FAISS_INT, low=1, help="HNSW candidates per search (recall vs latency)", source=MALKOV_2018
    ),
    OptionSpec(
        "graph",
        help="HNSW links by inner product (ip-NSW) | angular (links by the angle between rows, searched by inner "
        "product: for raw rows searched with preconditioned queries, an empirical index)",
        source=LIU_2020,
    ),
    OptionSpec("train_per_list", high=FAISS_INT, low=1, help="IVF k-means training rows per cell (a strided sample)"),
    OptionSpec(
        "pq_m",
        high=FAISS_INT,
        low=1,
        help="ivf-pq, pq: 4-bit PQ sub-quantizers per row (default dim/8; pq: dim/2 or 256, probed at build)",
        source=ANDRE_2017,
    ),
    OptionSpec(
        "refine",
        high=FAISS_INT,
        low=1,
        help="ivf-pq, pq: refine x k PQ candidates re-ranked with the float32 rows",
        source=JEGOU_2011,
    ),
)
"""The ``--search-option`` / ``faiss_options`` of :func:`search_store`."""

SEARCH_TIME = ("nprobe", "ef_search", "refine")
"""Settings that change only how the index is searched, not its bytes."""

RECALL_HINT = 0.95
"""A FAISS search whose recall@k against the exact search is below this says which settings raise it."""

KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "ivf": ("nlist", "train_per_list", "nprobe"),
    "ivf-sq8": ("nlist", "train_per_list", "nprobe"),
    "ivf-pq": ("nlist", "train_per_list", "pq_m", "nprobe", "refine"),
    "pq": ("pq_m", "refine"),
    "hnsw": ("m", "ef_construction", "graph", "ef_search"),
}
"""The settings each ``kind`` uses (besides ``kind``): another given to it is refused, and only these key its
saved index."""

PQ_BITS = 4
"""Bits per product-quantisation code (``ivf-pq``, ``pq``): ``2 ** PQ_BITS`` centroids per sub-quantizer, so a
store needs at least that many rows to train them."""

PQ_TRAINING_ROWS = 65536
"""Rows (a strided sample) the ``pq`` kind's centroids are trained on."""

PQ_M_CONCENTRATED = 256
"""The smaller ``pq_m`` a ``pq`` build probes beside ``dim / 2`` (:meth:`FaissSettings.pq_m_candidates`). Why:
the fast scan sums ``pq_m`` lookup tables quantised to 8 bits with one scale, chosen so the sum fits 16 bits
(Andre et al. 2017; FAISS ``quantize_lut``), so each table keeps about ``65535 / pq_m`` levels. On rows whose
second moment is concentrated in a few directions (raw gradients) that noise ranks the codes wrongly at large
``pq_m`` (measured on 4,000 raw-spectrum rows of dim 8,192 at ``pq_m`` 4,096: the same codes with float lookup
tables, FAISS ``IndexPQ``, found all of the exact top 10 in a shortlist of 640, the fast scan none), while on
nearly white (preconditioned) rows a large ``pq_m`` is needed: ``benchmarks/results/query-latency-pq-probe.md``."""

PQ_PROBE_QUERIES = 64
"""Training-sample rows a ``pq`` build with two candidate ``pq_m`` searches for (:func:`_probed_pq`)."""

PQ_PROBE_MIN_QUERIES = 16
"""Fewer held-out rows than this (a sample under ``2 * 16 + 2 ** PQ_BITS = 48`` rows) and the probe is not run: its
recall would move in steps of 1/(queries x k) and the margin would decide on noise (the first candidate is built)."""

PQ_PROBE_SHORTLIST = 16
"""The probe's recall@k counts the exact top-k (among the training sample's other rows) found in the
``PQ_PROBE_SHORTLIST x k`` best codes: a shortlist such as the float32 re-ranking sees."""

PQ_PROBE_K = 10
"""``k`` of the probe's recall@k."""

PQ_PROBE_VERSION = 2
"""Bumped when the rows a probe trains on change for the same settings (2: the held-out rows swapped to the end of
the sample, the rest a view; 1 took the rest through a boolean mask, in order): a saved probed index is rebuilt."""

PQ_PROBE_MARGIN = 0.05
"""The smaller ``pq_m`` is kept only where its probe recall exceeds the larger's by more than this. Measured gaps
where the larger one's lookup tables fail: 0.36 to 0.97; where both rank well (dim 1024, 2 * 10^4 raw-spectrum
rows) 0.001 either way, which is noise."""


def faiss_settings(options: Mapping[str, Any] | None) -> FaissSettings:
    """:class:`FaissSettings` from ``{name: value}``; :class:`wherefrom.core.options.OptionError` naming a bad option,
    or an option the kind does not use (:data:`KIND_OPTIONS`: it would be ignored)."""
    settings = FaissSettings(**check_options("FAISS search", FAISS_OPTIONS, dict(options or {})))
    unused = sorted(set(options or {}) - {"kind", *KIND_OPTIONS[settings.kind]})
    if unused:
        raise OptionError(
            f"FAISS kind={settings.kind} does not use option(s) {unused}; its options are "
            f"{list(KIND_OPTIONS[settings.kind])}"
        )
    return settings


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("approximate search needs FAISS: pip install 'wherefrom[index]' (faiss-cpu)") from None
    return faiss


def rows_sha256(source: RowSource) -> str:
    """sha256 of the store's ids (as a JSON list: ids holding a newline do not run together) and row bytes in
    row order (one streamed pass)."""
    digest = hashlib.sha256(json.dumps(list(source.ids)).encode())
    for _, shard in source.shards():
        digest.update(shard.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(source: RowSource, settings: FaissSettings, store_key: str | None) -> dict[str, Any]:
    """What decides the index's bytes: the store's shape, dtype and contents, and the build settings, ``nlist`` and
    ``pq_m`` as built (:meth:`FaissSettings.lists`; :meth:`FaissSettings.pq_m_candidates`, the list where a build
    probes two, with the probe's settings, :func:`_probe_rule`): a value given equal to the default rule's reuses the
    index (not a probed build's choice), and a change of the rule or of the probe rebuilds it."""
    uses = {"kind", *KIND_OPTIONS[settings.kind]} - set(SEARCH_TIME)
    build = {k: v for k, v in asdict(settings).items() if k in uses}
    if "nlist" in build:
        build["nlist"] = settings.lists(source.count)
    if settings.kind == "ivf-sq8":  # indexes saved before _cover_every_row coded residuals in sampled ranges
        build["ranges"] = "rows, every row's min and max"
    if "pq_m" in build:
        candidates = settings.pq_m_candidates(source.dim)
        build["pq_m"] = (
            {"candidates": candidates, "probe": _probe_rule()} if settings.probes(source.dim) else candidates[0]
        )
    contents = store_key if store_key is not None else rows_sha256(source)
    return {"count": source.count, "dim": source.dim, "dtype": source.dtype, "store": contents, **build}


def _finite(source: RowSource, first: int, rows: torch.Tensor, step: int = 1) -> np.ndarray:
    """``rows`` (rows ``first``, ``first + step``, ... of ``source``) as contiguous float32 for FAISS, which
    takes NaN or infinite entries silently (HNSW, IVF adds) or fails in its k-means with a message naming no row:
    :class:`SearchError` naming the first such row, as the exact search does."""
    finite = torch.isfinite(rows).all(1)
    if not bool(finite.all()):
        raise _row_error(first + step * int(torch.nonzero(~finite)[0]), source.ids)
    return np.ascontiguousarray(rows.to(torch.float32).numpy())


def _training_sample(source: RowSource, size: int) -> np.ndarray:
    """Every ``floor(count / size)``-th row, float32 (rows spread over the whole store): at least
    ``min(size, count)`` rows, fewer than ``2 size``."""
    step = _sample_step(source.count, size)
    parts = []
    for first, shard in source.shards():
        offset = (-first) % step
        parts.append(_finite(source, first + offset, shard[offset::step], step))
    return np.ascontiguousarray(np.concatenate(parts))


def _quiet_kmeans(clustering, rows: int, centroids: int, what: str | None = None, meaning: str = "") -> None:
    """Let a FAISS k-means (``clustering``: its ``ClusteringParameters``) of ``centroids`` centroids train on
    ``rows`` rows without FAISS's own warning line on stderr (one per k-means: thousands for a PQ of raw gradient
    rows) when there are under ``min_points_per_centroid`` (39) rows per centroid; the threshold changes nothing
    else (same index bytes). Where it applies, "``what`` trained on N rows (FAISS suggests at least M): ``meaning``"
    is said once in wherefrom's log instead; ``what=None``: not said (a probe's second candidate, trained on the
    same rows; an IVF-PQ's coarse cells, beside its codebooks' warning)."""
    suggested = clustering.min_points_per_centroid * centroids
    if what is not None and rows < suggested:
        logger.warning("%s trained on %d rows (FAISS suggests at least %d): %s", what, rows, suggested, meaning)
    clustering.min_points_per_centroid = 1


def _train_quietly(index, sample: np.ndarray, warn: bool = True) -> None:
    """Train a refined PQ ``index`` (``PQ`` or ``IVF,PQ`` fast-scan, ``RFlat``) on ``sample``, its k-means quieted
    by :func:`_quiet_kmeans` (``warn``: the codebooks' warning said at all)."""
    faiss = _faiss()
    base = faiss.downcast_index(index.base_index)
    _quiet_kmeans(
        base.pq.cp,
        len(sample),
        2**PQ_BITS,
        "PQ codebooks" if warn else None,
        "the codes are coarse, the float32 re-ranking still returns exact scores (raise refine if recall is low)",
    )
    if isinstance(base, faiss.IndexIVF):
        _quiet_kmeans(base.cp, len(sample), base.nlist)
    index.train(sample)


def _divisor_at_most(dim: int, m: int) -> int:
    """The largest divisor of ``dim`` at most ``max(1, m)``."""
    return next(d for d in range(max(1, m), 0, -1) if dim % d == 0)


def _trained_pq(m: int, rows: np.ndarray, warn: bool = True):
    """An empty ``pq`` index of ``m`` 4-bit fast-scan sub-quantizers re-ranked by the float32 rows, trained on
    ``rows`` (``warn``: as :func:`_train_quietly`)."""
    index = _faiss().index_factory(rows.shape[1], f"PQ{m}x{PQ_BITS}fs,RFlat", _faiss().METRIC_INNER_PRODUCT)
    _train_quietly(index, rows, warn)
    return index


def _probe_rule() -> dict[str, Any]:
    """The settings of a ``pq`` build's probe (:func:`_probed_pq`), recorded in a saved index's key."""
    return {
        "queries": PQ_PROBE_QUERIES,
        "min_queries": PQ_PROBE_MIN_QUERIES,
        "shortlist": PQ_PROBE_SHORTLIST,
        "k": PQ_PROBE_K,
        "margin": PQ_PROBE_MARGIN,
        "version": PQ_PROBE_VERSION,
    }


def _probe_queries(sample_rows: int) -> int:
    """The held-out queries of a ``pq`` probe (:func:`_probed_pq`) on a training sample of ``sample_rows`` rows: the
    probe runs only where they are at least :data:`PQ_PROBE_MIN_QUERIES`."""
    return min(PQ_PROBE_QUERIES, (sample_rows - 2**PQ_BITS) // 2)


def _probe_runs(sample_rows: int) -> bool:
    """Whether a ``pq`` probe holds enough queries out of a training sample of ``sample_rows`` rows to run."""
    return _probe_queries(sample_rows) >= PQ_PROBE_MIN_QUERIES


def _sample_step(count: int, size: int) -> int:
    """The stride of :func:`_training_sample` over a store of ``count`` rows for a sample of ``size``."""
    return max(1, count // size)


def _sample_rows(count: int, size: int) -> int:
    """How many rows :func:`_training_sample` takes of a store of ``count`` rows for a sample of ``size``."""
    return -(-count // _sample_step(count, size))


def _probed_pq(candidates: Sequence[int], sample: np.ndarray) -> tuple[Any, str | None]:
    """A trained, empty ``pq`` index (:func:`_trained_pq`) of the ``pq_m`` in ``candidates`` (largest first) a probe
    chooses, and what the probe measured (``None`` for one candidate). The probe: up to :data:`PQ_PROBE_QUERIES`
    strided rows of the training ``sample`` are held out as queries (a search's queries are not rows the codebooks
    were trained on); each candidate is trained on the rest and searched among the rest's codes; the recall@k
    (:data:`PQ_PROBE_K`) of the exact top-k in a shortlist of the :data:`PQ_PROBE_SHORTLIST` ``x k`` best codes (at
    most an eighth of the rows, at least ``k``) is measured, and the smaller ``pq_m`` kept only where its recall is
    higher by more than :data:`PQ_PROBE_MARGIN` (:data:`PQ_M_CONCENTRATED` says why the best ``pq_m`` depends on
    the rows). Too few rows to hold :data:`PQ_PROBE_MIN_QUERIES` out (under 48): the first candidate, trained on the
    whole sample. Deterministic: the sample is strided and FAISS's k-means seeded."""
    if len(candidates) == 1 or not _probe_runs(len(sample)):
        return _trained_pq(candidates[0], sample), None
    held = _probe_queries(len(sample))
    # the held-out rows swapped into the last ``held`` places of the (private) sample: the rest is a view of it, not
    # a second copy (a boolean mask copied it: 4-8 GB more at PQ_TRAINING_ROWS rows of dim 16,384)
    picked = np.linspace(0, len(sample) - 1, held).round().astype(int)
    tail = len(sample) - held
    held_rows = set(picked.tolist())
    free = [row for row in range(tail, len(sample)) if row not in held_rows]
    for row, place in zip([row for row in picked.tolist() if row < tail], free, strict=True):
        sample[[row, place]] = sample[[place, row]]
    rest, queries = sample[:tail], sample[tail:].copy()
    k = min(PQ_PROBE_K, len(rest))
    shortlist = max(k, min(PQ_PROBE_SHORTLIST * k, len(rest) // 8))
    truth = np.argsort(-(queries @ rest.T), axis=1, kind="stable")[:, :k]
    trained = []
    for m in candidates:
        index = _trained_pq(m, rest, warn=not trained)
        codes = _faiss().clone_index(index.base_index)
        codes.add(rest)
        _, found = codes.search(queries, shortlist)
        recall = float(np.mean([np.isin(truth[q], found[q]).mean() for q in range(len(queries))]))
        trained.append((recall, m, index))
    (large, *_), (small, *_) = trained  # pq_m_candidates: at most two, largest first
    best = trained[1] if small > large + PQ_PROBE_MARGIN else trained[0]
    measured = ", ".join(f"{m}: {recall:.3f}" for recall, m, _ in trained)
    note = (
        f"pq_m {best[1]} chosen by probe recall@{k} in {shortlist} codes, {held} held-out of {len(sample)} sample "
        f"rows ({measured})"
    )
    return best[2], note


def built_pq_m(index) -> int | None:
    """The sub-quantizers of a PQ kind's built ``index`` (``ivf-pq``, ``pq``: for a ``pq`` index without a given
    ``pq_m``, what the build's probe chose, :func:`_probed_pq`); ``None`` for the other kinds."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexRefine):
        return None
    return faiss.downcast_index(index.base_index).pq.M


def pq_m_label(index, settings: FaissSettings, dim: int) -> str:
    """``"pq_m=N "`` of a PQ kind's built ``index`` (:func:`built_pq_m`) with how N was set: ``(probed)`` where the
    build chose among :meth:`FaissSettings.pq_m_candidates`, ``(default)`` where no ``pq_m`` was given and the rule
    alone set it; ``""`` for the other kinds (the benchmarks' row labels)."""
    m = built_pq_m(index)
    if m is None:
        return ""
    how = " (probed)" if settings.probes(dim) else " (default)" if settings.pq_m is None else ""
    return f"pq_m={m}{how} "


def _cover_every_row(index, source: RowSource) -> None:
    """Set the 8-bit ranges of a trained ``ivf-sq8`` ``index`` to each entry's min and max over every row of
    ``source`` (one streamed pass). FAISS trains them on the k-means sample alone and clips a row outside them:
    a row with larger entries than the sampled ones, such as a training row of outsized influence, was scored
    far too low and could be missed with every cell probed (a row of score 50 coded as about 6). The rows are
    coded, not their residuals to the cell centroid, so that the ranges of the rows bound every coded value."""
    low = high = None
    for first, shard in source.shards():
        rows = torch.from_numpy(_finite(source, first, shard))
        low = rows.amin(0) if low is None else torch.minimum(low, rows.amin(0))
        high = rows.amax(0) if high is None else torch.maximum(high, rows.amax(0))
    if low is None or high is None:
        raise SearchError("an ivf-sq8 index needs rows; the store has none")
    # a constant entry gets a tiny positive width (FAISS divides by it): its rows decode to it within 2^-21
    width = torch.where(high > low, high - low, low.abs().clamp(min=1.0) * 2**-20)
    trained = torch.cat([low, width]).numpy()
    if index.sq.trained.size() != trained.size:
        raise SearchError(f"FAISS's 8-bit quantizer holds {index.sq.trained.size()} ranges, not 2 x {source.dim}")
    _faiss().copy_array_to_vector(np.ascontiguousarray(trained), index.sq.trained)


def _add_angular(index, source: RowSource) -> None:
    """Add the rows of ``source`` to an empty HNSW ``index`` linked by angle: the graph is built on the unit rows,
    then a second pass overwrites its stored rows with the rows themselves (bit for bit), so a search walks the
    angular graph ranking by inner product and returns exact scores. Why: an inner-product graph links rows
    mostly to rows of large norm (Liu et al. 2020); where the best rows of a query are not those (raw rows,
    preconditioned queries) it leaves rows unreachable: ``benchmarks/results/hnsw_graph.md``."""
    faiss = _faiss()
    for first, shard in source.shards():
        unit = unit_rows(torch.from_numpy(_finite(source, first, shard)))  # 0 stays 0
        index.add(np.ascontiguousarray(unit.numpy()))
    stored = faiss.rev_swig_ptr(faiss.downcast_index(index.storage).get_xb(), source.count * source.dim)
    stored = stored.reshape(source.count, source.dim)
    for first, shard in source.shards():
        stored[first : first + len(shard)] = shard.to(torch.float32).numpy()


def build_faiss_index(
    source: RowSource, settings: FaissSettings | None = None, path: Path | None = None, store_key: str | None = None
):
    """A FAISS inner-product index of every row of ``source`` (one streamed pass after training; two for
    ``kind="hnsw"``, ``graph="angular"``).

    With ``path`` (a ``.safetensors`` file beside the store) an intact index built from the same
    store contents with the same build settings is loaded instead, and a new one is saved there
    atomically with its checksum (without the folder's writer lock: searches are readers; a save that fails,
    e.g. on a full disk, is logged and the index used unsaved). The contents are identified by
    ``store_key`` (e.g. a digest of the store's recorded shard checksums), else by
    :func:`rows_sha256` (one more pass over the rows). Returns the CPU index (search with
    :func:`faiss_top_k`). Raises :class:`SearchError` when FAISS is missing, or for a store the
    kind cannot index (:meth:`FaissSettings.check_store`).
    """
    return _saved_or_built(source, settings, path, store_key).index


@dataclass
class BuiltIndex:
    """What :func:`_saved_or_built` had: the ``index``, what it did (``done``: ``"reused"`` the index saved at the
    path, ``"saved"`` a new one there, or ``"built"`` one it did not save: no path, or the save failed), why a file
    at the path was not reused (``previous``: ``"damaged"``, ``"stale"``: of other rows or build settings;
    ``None``: none was there) and, for a ``pq`` index, its ``pq_m`` and what a build's probe measured
    (``codes``, :func:`_probed_pq`; ``None`` for other kinds)."""

    index: Any
    done: str
    previous: str | None = None
    codes: str | None = None


def _saved_or_built(
    source: RowSource, settings: FaissSettings | None, path: Path | None, store_key: str | None
) -> BuiltIndex:
    """:func:`build_faiss_index`, with what it did (:class:`BuiltIndex`)."""
    faiss = _faiss()
    settings = settings or FaissSettings()
    key = None if path is None else _fingerprint(source, settings, store_key)
    previous = None
    if path is not None and Path(path).exists():
        saved = load_faiss_index(path, key)
        if saved is not None:
            codes = None
            # too few rows: the build ran no probe and said none
            if settings.probes(source.dim) and _probe_runs(_sample_rows(source.count, PQ_TRAINING_ROWS)):
                codes = f"pq_m {built_pq_m(saved)}, chosen by probe recall when built"
            return BuiltIndex(saved, "reused", codes=codes)
        try:
            check_file(Path(path))
            previous = "stale"
        except DamagedFile:
            previous = "damaged"
    dim = source.dim
    settings.check_store(source.count, dim)
    codes = None
    if settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
    elif settings.kind == "ivf-pq":
        lists, m = settings.lists(source.count), settings.sub_quantizers(dim)
        index = faiss.index_factory(dim, f"IVF{lists},PQ{m}x{PQ_BITS}fs,RFlat", faiss.METRIC_INNER_PRODUCT)
        _train_quietly(index, _training_sample(source, max(lists * settings.train_per_list, 2**PQ_BITS)))
    elif settings.kind == "pq":
        index, codes = _probed_pq(settings.pq_m_candidates(dim), _training_sample(source, PQ_TRAINING_ROWS))
    else:
        lists = settings.lists(source.count)
        quantizer = faiss.IndexFlatIP(dim)
        if settings.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            index.by_residual = False  # the rows themselves are coded, in ranges _cover_every_row sets
        sample = _training_sample(source, lists * settings.train_per_list)
        _quiet_kmeans(
            index.cp,
            len(sample),
            lists,
            "IVF cells",
            # userN: "the 3000 cells are coarse" of 3,000 rows in 3,000 cells: few rows fit the centroids, not few cells
            f"the {lists} cells' centroids are fitted to few rows each, so a row may lie outside the cells a query "
            "probes: the search may miss rows the exact search finds (recall@k counts them)",
        )
        index.train(sample)
        if settings.kind == "ivf-sq8":
            _cover_every_row(index, source)
    if settings.graph == "angular" and settings.kind == "hnsw":
        _add_angular(index, source)
    else:
        for first, shard in source.shards():
            index.add(_finite(source, first, shard))
    if path is None:
        return BuiltIndex(index, "built", previous, codes)
    try:  # a cache beside the store, written by readers: no writer lock (atomic, checksummed: never half read)
        with cache_save_lock(Path(path)) as held:
            if not held:
                logger.warning("the FAISS index was not saved: another search is saving %s now", Path(path).name)
                return BuiltIndex(index, "built", previous, codes)
            data = torch.from_numpy(faiss.serialize_index(index).copy())
            save_tensors_checked({"index": data}, Path(path), {"key": json.dumps(key, sort_keys=True)})
    except (OSError, MemoryError) as error:  # the index serialised for the save may not fit beside it
        logger.warning("the FAISS index was not saved (%s); the next search builds it again", error)
        return BuiltIndex(index, "built", previous, codes)
    return BuiltIndex(index, "saved", previous, codes)


def load_faiss_index(path: Path, key: Mapping[str, Any]):
    """The index saved at ``path`` if it is intact and was built with ``key`` (:func:`build_faiss_index`),
    else ``None`` (missing, damaged, or of another store or other settings: it will be rebuilt)."""
    try:
        tensors, meta = load_tensors_checked(Path(path))
    except DamagedFile:
        return None
    if meta.get("key") != json.dumps(dict(key), sort_keys=True):
        return None
    return _faiss().deserialize_index(tensors["index"].numpy())


def _on_device(index):
    """``index`` on every GPU FAISS sees (IVF kinds; HNSW has no GPU version), else ``index``."""
    faiss = _faiss()
    if faiss.get_num_gpus() > 0 and isinstance(index, faiss.IndexIVF):
        return faiss.index_cpu_to_all_gpus(index)
    return index


def faiss_top_k(
    index,
    ids: Sequence[str],
    queries: torch.Tensor,
    k: int,
    opponents: bool = False,
    candidates: Sequence[Sequence[int]] | None = None,
    settings: FaissSettings | None = None,
) -> SearchResult:
    """Approximate top-``k`` of ``queries`` ``(n_query, dim)`` in a FAISS ``index`` of the rows named ``ids``.

    ``settings`` give ``nprobe`` / ``ef_search`` / ``refine``; ``candidates`` restrict each query to its rows (an
    ID selector; on the CPU index; a ``pq`` index, whose fast scan takes no selector, searches the candidates'
    float32 rows it keeps for re-ranking: exactly; :func:`search_store` runs the exact search instead). Same result layout and sign as :func:`exact_top_k`;
    :class:`SearchError` for a non-finite query, a shape mismatch or bad candidates.
    """
    faiss = _faiss()
    settings = settings or FaissSettings()
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    queries = _check_queries(queries, index.d)
    sign = -1.0 if opponents else 1.0
    search = (sign * queries).numpy()
    k = min(k, index.ntotal)
    hnsw = isinstance(index, faiss.IndexHNSW)
    refined = isinstance(index, faiss.IndexRefine)
    flat = refined and not isinstance(faiss.downcast_index(index.base_index), faiss.IndexIVF)
    cells = None if hnsw or flat else faiss.extract_index_ivf(index)
    k_factor = min(settings.refine, -(-index.ntotal // k))  # refine x k past the rows: every row re-ranked
    if candidates is None:
        if hnsw:
            index.hnsw.efSearch = max(settings.ef_search, k)
        elif cells is not None:
            cells.nprobe = min(settings.nprobe, cells.nlist)
        if refined:
            index.k_factor = k_factor
        values, rows = _on_device(index).search(search, k)
    else:
        values, rows = np.full((len(search), k), -np.inf, np.float32), np.full((len(search), k), -1, np.int64)
        for query, allowed in enumerate(candidate_sets(candidates, len(search), index.ntotal)):
            selector = faiss.IDSelectorBatch(allowed.numpy())
            searched = index
            if hnsw:
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(settings.ef_search, k))
            elif flat:
                searched, params = faiss.downcast_index(index.refine_index), faiss.SearchParameters(sel=selector)
            else:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=min(settings.nprobe, cells.nlist))
            if refined and not flat:
                params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=params)
            values[query : query + 1], rows[query : query + 1] = searched.search(
                search[query : query + 1], k, params=params
            )
    # equal scores in row order, as the exact search lists them (FAISS listed copies of a row higher row first)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -values), axis=-1)
    values, rows = np.take_along_axis(values, order, -1), np.take_along_axis(rows, order, -1)
    return _result(sign * torch.from_numpy(values), torch.from_numpy(rows), ids, opponents)


# --- the search a command runs -------------------------------------------------------------------
@dataclass
class SearchReport:
    """What :func:`search_store` found: ``proponents`` and ``opponents`` (:class:`SearchResult`),
    ``mode`` (the search that ran: ``exact`` also for a ``pq`` search of candidates), ``seconds`` of the search
    itself, for ``faiss`` the ``recall`` against the exact search, ``(2, n_query)`` (proponents, opponents), with
    ``exact_seconds`` and the ``settings`` it ran with, ``index`` (how the FAISS index was had: built in how many
    seconds, or the saved one reused) and a ``note`` the summary line adds (why a FAISS search ran exactly, or
    what an IVF index changed of the settings: :meth:`FaissSettings.capped`), and the store's ``rows`` (what the
    recall advice and the widths of full lists depend on), and how many candidate rows each query had when candidates restricted the search
    (``candidates``; ``None``: every row): a query gets at most that many."""

    proponents: SearchResult
    opponents: SearchResult
    mode: str
    seconds: float
    recall: torch.Tensor | None = None
    exact_seconds: float | None = None
    note: str | None = None
    settings: FaissSettings | None = None
    index: str | None = None
    rows: int | None = None
    candidates: tuple[int, ...] | None = None

    def ends(self) -> tuple[tuple[str, SearchResult], tuple[str, SearchResult]]:
        """``(("proponents", result), ("opponents", result))``."""
        return ("proponents", self.proponents), ("opponents", self.opponents)

    def summary(self, k: int, similarity: str | None = None) -> str:
        """One line (each end named ``proponents``/``opponents``, or a ``similarity``'s ``highest``/``lowest scores``:
        reviewV): mode, time, that a search of candidates (a prefilter) searched only them and, for FAISS, the mean recall@k of each end against the exact search (``k`` at
        most the store's rows: every row is found then), with what to change when either is below
        :data:`RECALL_HINT`; that ``ivf-sq8`` scores are the 8-bit rows'; how many queries had fewer than ``k``
        candidate rows (a prefilter of fewer rows than ``k``: their lists are shorter, in any mode); how many queries
        a FAISS search found fewer than ``k`` rows for, or than their candidates where fewer (its probed cells or
        graph walk held fewer)."""
        named = {name: end_name(name, [], similarity) for name in ("proponents", "opponents")}  # no score: the kind
        line = f"{self.mode} search: {self.seconds * 1000:.1f} ms"
        if self.candidates is not None:  # userL: a prefiltered search's lists read as the whole store's
            line += f" among each query's candidate rows only (up to {max(self.candidates, default=0)}"
            line += f" of {self.rows} rows)" if self.rows is not None else ")"
        if self.index:
            line += f" ({self.index})"
        if self.note:
            line += f" ({self.note})"
        if self.mode == "faiss" and self.settings is not None and self.settings.kind == "ivf-sq8":
            line += " (scores of the 8-bit rows, not exact)"
        width = min(k, self.rows or k)
        few = [count for count in self.candidates or () if count < width]
        if few:  # each such query's lists hold every one of its candidates, and no more
            line += (
                f" ({len(few)} of {len(self.candidates)} queries had fewer than {width} candidate rows, as few as "
                f"{min(few)}: their lists are that short)"
            )
        if self.mode == "faiss":
            limits = torch.full((self.proponents.rows.shape[0],), width)
            if self.candidates is not None:  # a query with fewer candidates gets fewer rows: not short
                limits = limits.clamp(max=torch.tensor(self.candidates))
            counts = {name: int(((end.rows >= 0).sum(1) < limits).sum()) for name, end in self.ends()}
            short = [f"{n} of {len(limits)} queries' {named[name]}" for name, n in counts.items() if n]
            if short:
                wanted = f"{width} rows" if self.candidates is None else f"{width} rows (or their candidates)"
                line += f" (fewer than {wanted} found for {' and '.join(short)})"
        if self.recall is not None:
            proponents, opponents = (float(end.nanmean()) for end in self.recall)
            line += (
                f"; recall@{min(k, self.rows or k)} vs exact: {named['proponents']} {proponents:.3f}, "
                f"{named['opponents']} {opponents:.3f} (exact "
                f"{self.exact_seconds * 1000:.1f} ms)"
            )
            if min(proponents, opponents) < RECALL_HINT:
                line += f"; below {RECALL_HINT}: {(self.settings or FaissSettings()).recall_advice(self.rows)}"
        return line


@contextmanager
def _faiss_failure(settings: FaissSettings, doing: str) -> Iterator[None]:
    """FAISS's own failures (out of memory: ``MemoryError``; a failed check: ``RuntimeError``) as a
    :class:`SearchError` naming the kind and its settings, not a traceback."""
    try:
        yield
    except StoreError:  # the store's own (a damaged shard read for the build): already says what to do
        raise
    except (MemoryError, RuntimeError) as error:
        used = ", ".join(f"{name}={getattr(settings, name)}" for name in KIND_OPTIONS[settings.kind])
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SearchError(
            f"FAISS failed {doing} a kind={settings.kind} index ({used}): {reason}; use smaller settings, or the "
            "exact search"
        ) from error


def search_store(
    source: RowSource,
    queries: torch.Tensor,
    k: int,
    mode: Literal["exact", "faiss"] = "exact",
    candidates: Sequence[Sequence[int]] | None = None,
    faiss_options: Mapping[str, Any] | None = None,
    index_folder: Path | None = None,
    store_key: str | None = None,
    check_recall: bool = True,
) -> SearchReport:
    """Top-``k`` proponents and opponents of ``queries`` ``(n_query, dim)`` in ``source``.

    ``mode``: ``exact`` (:func:`exact_top_k`) or ``faiss`` (:func:`build_faiss_index`, saved as
    ``index_folder/`` :meth:`FaissSettings.file_name` (the store's folder) and reused while current, then
    :func:`faiss_top_k`; ``store_key``: see :func:`build_faiss_index`; with ``check_recall`` the exact
    search runs too and :func:`recall_at_k` is reported, ties counted: one more pass over the store for both ends, and
    one more where the approximate search returned rows outside the exact top-k). ``candidates``: per query, the row
    indices it may return (e.g. :func:`wherefrom.methods.lexical.bm25_candidates`); a ``pq`` search of
    candidates is the exact one (:meth:`FaissSettings.builds_index`: reported so, no index built). Options are
    checked before any work: :class:`wherefrom.core.options.OptionError` for a bad FAISS option,
    :class:`SearchError` for an unknown mode, FAISS missing where an index is built, or the errors of the searches.
    """
    if mode not in ("exact", "faiss"):
        raise SearchError(f"search mode must be exact or faiss, got {mode!r}")
    if k < 1:  # here, not only in the searches: a FAISS index is built before its search
        raise SearchError(f"k must be >= 1, got {k}")
    queries = _check_queries(queries, source.dim)
    counts = None
    if candidates is not None:  # checked once here; the searches' own checks of these tensors are cheap
        candidates = candidate_sets(candidates, queries.shape[0], source.count)
        counts = tuple(len(c) for c in candidates)
    settings = faiss_settings(faiss_options)
    if mode == "exact" and faiss_options:
        raise SearchError(f"FAISS options {sorted(faiss_options)} were given to an exact search; use mode 'faiss'")

    def exact() -> tuple[SearchResult, SearchResult]:
        return tuple(exact_ends(source, queries, k, (False, True), candidates))

    if mode == "exact" or not settings.builds_index(candidates is not None):
        start = time.perf_counter()
        found = exact()
        note = None
        if mode == "faiss":
            unused = sorted(set(faiss_options or {}) - {"kind"})
            note = "kind=pq ranks the candidates by their float32 rows: the exact search, no index built" + (
                f"; options {unused} unused" if unused else ""
            )
        return SearchReport(
            *found, "exact", time.perf_counter() - start, note=note, rows=source.count, candidates=counts
        )
    path = None if index_folder is None else Path(index_folder) / settings.file_name()
    start = time.perf_counter()
    with _faiss_failure(settings, "building"):
        built = _saved_or_built(source, settings, path, store_key)
    how = f"index built in {time.perf_counter() - start:.1f} s"
    if built.done == "reused":
        how = f"index reused: {settings.file_name()}"
    elif built.done == "saved":
        how += f", saved as {settings.file_name()}"
    if built.previous is not None:
        why = "damaged" if built.previous == "damaged" else "of other rows or build settings"
        fate = "replaced" if built.done == "saved" else "kept, since this index could not be saved"
        how += f"; the saved {settings.file_name()} is {why}: {fate}"
    if built.codes is not None:
        how += f"; {built.codes}"
    start = time.perf_counter()
    with _faiss_failure(settings, "searching"):
        found = tuple(
            faiss_top_k(built.index, source.ids, queries, k, end, candidates, settings) for end in (False, True)
        )
    report = SearchReport(
        *found,
        mode,
        time.perf_counter() - start,
        note=settings.capped(source.count),
        settings=settings,
        index=how,
        rows=source.count,
        candidates=counts,
    )
    if check_recall:
        start = time.perf_counter()
        truth = exact()
        report.exact_seconds = time.perf_counter() - start
        report.recall = torch.stack([recall_at_k(f, t, source, queries) for f, t in zip(found, truth)])
    return report
