"""Influence scores from preconditioned query gradients and training gradients.

Sign convention (README, "Sign and scale"): the query vector is ``q = -grad f(z_q)`` (for the
default task ``q = grad L(z_q)``), the preconditioned query is ``(G + lambda I)^-1 q``, and

    I(z_m, z_q) = q^T (G + lambda I)^-1 grad L(z_m)

so a positive score marks a **proponent**: upweighting ``z_m`` raises ``f(z_q)``.
Scores are summed over modules; per-module and per-token parts sum to the total exactly.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wherefrom.core.gradients import TokenFactors
from wherefrom.core.store import (
    CHECKSUMS,
    atomic_write_text,
    forget_file,
    load_tensors_checked,
    read_json_checked,
    refuse_folder_in_place,
    save_tensors_checked,
    write_json_checked,
)

LowRank = tuple[torch.Tensor, torch.Tensor]
"""``(U, V)`` with ``U``: ``(q, out, r)`` (singular values folded in) and ``V``: ``(q, in', r)``."""
QueryBlock = torch.Tensor | LowRank


def low_rank(matrices: torch.Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of each ``(out, in')`` matrix in ``(q, out, in')`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(matrices.float(), full_matrices=False)
    r = min(rank, s.shape[-1])
    # a copy, not a view: a view of ``vh`` would keep all ``min(out, in')`` rows of it alive
    return u[..., :r] * s[..., None, :r], vh[..., :r, :].transpose(-1, -2).clone()


def compress_queries(queries: dict[str, torch.Tensor], rank: int | None) -> dict[str, QueryBlock]:
    """Low-rank query batching: rank-``rank`` factors of each module's preconditioned query; ``None`` keeps full rank."""
    if rank is None:
        return dict(queries)
    if rank < 1:
        raise ValueError(f"query rank must be >= 1 or None, got {rank}")
    return {name: low_rank(q, rank) for name, q in queries.items()}


def concat_query_blocks(blocks: list[QueryBlock]) -> QueryBlock:
    """Join one module's query blocks of consecutive query batches along the query axis (dense blocks,
    or low-rank factors ``(U, V)`` of one rank, as :func:`compress_queries` makes them)."""
    if isinstance(blocks[0], tuple):
        return torch.cat([u for u, _ in blocks]), torch.cat([v for _, v in blocks])
    return torch.cat(blocks)


TOP_K = 10
"""The default rows listed per query and end (``--top-k``; the top-k CSV of a score set, the influence tables)."""
QUERY_CHUNK = 16
"""Low-rank queries whose dense ``(out, in')`` matrices :func:`module_scores` rebuilds at once."""


def module_scores(query: QueryBlock, train: torch.Tensor) -> torch.Tensor:
    """``(q, n)`` scores of one module from a query block and dense train gradients ``(n, out, in')``.

    Low-rank factors ``(U, V)`` are expanded to ``U V^T`` for :data:`QUERY_CHUNK` queries at a time
    (``q x out x in' x r`` work, then one matrix product with the training gradients): the rank-``r``
    contraction ``sum_k u_k^T G v_k`` would cost ``r`` times the dense product for every training row,
    and the chunk bounds the memory whatever the number of queries."""
    flat_train = train.reshape(train.shape[0], -1)
    if isinstance(query, tuple):
        parts = [
            (u @ v.mT).reshape(u.shape[0], -1).to(train.dtype) @ flat_train.T
            for u, v in zip(query[0].split(QUERY_CHUNK), query[1].split(QUERY_CHUNK), strict=True)
        ]
        return torch.cat(parts)
    return query.reshape(query.shape[0], -1).to(train.dtype) @ flat_train.T


def token_scores(query: QueryBlock, factors: TokenFactors) -> torch.Tensor | None:
    """``(q, n, T)`` scores of one module split over the train examples' token positions.

    Token ``t`` of train example ``n`` contributes ``g_t^T Q a_t`` (Grosse et al.'s token-wise
    attribution); the sum over ``t`` is :func:`module_scores`. When the module ran several times per
    forward pass (``factors.calls``), calls are summed per position (``T`` is one call's); ``None`` when its
    calls ran on different numbers of positions.
    """
    g, a = factors.g, factors.a
    if isinstance(query, tuple):
        u, v = query
        scores = (
            torch.einsum("nto,qok->qntk", g, u.to(g.dtype)) * torch.einsum("nti,qik->qntk", a, v.to(a.dtype))
        ).sum(-1)
    else:
        scores = torch.einsum("nto,qoi,nti->qnt", g, query.to(g.dtype), a)
    return factors.per_position(scores)


def summed_token_scores(
    queries: Mapping[str, QueryBlock], factors: Mapping[str, TokenFactors], names: Sequence[str], positions: int
) -> torch.Tensor:
    """``(q, n, positions)``: :func:`token_scores` summed over the modules ``names`` (Grosse et al. 2023, section
    5.3.2: token ``t`` gets ``sum_modules g_t^T Q a_t``), for a batch of ``positions`` token positions (its
    padded length). Raises ``ValueError`` naming a module whose calls do not each run on every token position
    (e.g. a head applied to the last position only, or calls on different numbers of positions): its part has
    no token to go to."""
    parts = []
    for name in names:
        part = token_scores(queries[name], factors[name])
        if part is None or part.shape[-1] != positions:
            ran = factors[name].calls or (factors[name].g.shape[1],)
            raise ValueError(
                f"per-token scores: module {name!r} ran on {'/'.join(map(str, ran))} positions per call, not on each "
                f"of the batch's {positions} token positions, so its part of a score has no token to go to; leave it "
                "out of the tracked modules (--exclude) for a per-token split"
            )
        parts.append(part)
    return sum(parts[1:], parts[0])


def row_sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """``(n,)`` float64 squared Euclidean norms of ``rows`` ``(n, ...)`` (each row flattened), taken in float64: the
    float32 squares of entries of about 1e-20 are subnormal or 0."""
    return torch.linalg.vector_norm(rows.flatten(1), dim=1, dtype=torch.float64).square()


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(n, d)`` each divided by its Euclidean norm (:func:`row_sq_norms`; ``torch.nn.functional.normalize``
    divided rows of norm below its ``eps`` 1e-12 by 1e-12, not by their norm), in float32 at least (a float16 row's
    norm may exceed 65504); a zero row stays 0. Same shape and dtype as ``rows``."""
    wide = torch.promote_types(rows.dtype, torch.float32)
    norms = row_sq_norms(rows).sqrt().to(wide)[:, None]
    return (rows.to(wide) / torch.where(norms > 0, norms, torch.ones_like(norms))).to(rows.dtype)


def stable_top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top, columns)``, each ``(n, min(k, m))``: the ``k`` largest of each row of ``values`` ``(n, m)`` and their
    columns, largest first, equal values in column order (the lower column, i.e. training row, first): a stable
    descending sort, computed by ``topk`` where no tie crosses the ``k``-th value (``topk`` alone orders ties
    arbitrarily, so two copies of a training row could be listed in either order). ``ValueError`` for ``k < 0``
    (torch's ``selected index k out of range`` named no setting)."""
    if k < 0:
        raise ValueError(f"k (how many rows to list) must be >= 0, got {k}")
    k = min(k, values.shape[1])
    top, where = torch.topk(values, k, dim=1)
    crossing = (values >= top[:, -1:]).sum(1) > k if k else torch.zeros(values.shape[0], dtype=torch.bool)
    # within the top k, order equal values by column: sort by column, then stably by value
    by_column = where.sort(dim=1).values
    order = torch.sort(values.gather(1, by_column), dim=1, descending=True, stable=True).indices
    where = by_column.gather(1, order)
    for row in torch.nonzero(crossing).flatten().tolist():
        where[row] = torch.sort(values[row], descending=True, stable=True).indices[:k]
    return values.gather(1, where), where


@dataclass
class Scores:
    """Pairwise influence scores with the example ids they belong to.

    ``per_module``: ``(n_modules, n_query, n_train)``, in the order of ``module_names``; ``ValueError`` when its
    shape is not that of the ids and names (scores of rows that are not the ids' were returned silently once).
    """

    query_ids: list[str]
    train_ids: list[str]
    module_names: list[str]
    per_module: torch.Tensor

    def __post_init__(self) -> None:
        expected = (len(self.module_names), len(self.query_ids), len(self.train_ids))
        if tuple(self.per_module.shape) != expected:
            raise ValueError(
                f"scores of shape {tuple(self.per_module.shape)} for {expected[0]} modules x {expected[1]} queries x "
                f"{expected[2]} training rows: they are not the scores of these rows"
            )

    @property
    def total(self) -> torch.Tensor:
        """``(n_query, n_train)``: the sum over modules."""
        return self.per_module.sum(0)

    def top(self, query: int | str, k: int, opponents: bool = False) -> list[tuple[str, float]]:
        """The ``k`` strongest proponents (largest scores) or opponents (most negative) of one query (its position
        in :attr:`query_ids`, or its id), as ``(train id, score)``; equal scores in training-row order
        (:func:`stable_top_k`; ``ValueError`` for ``k < 0``). ``IndexError`` for a position outside
        ``0..n_query-1`` (a negative one counted from the end was taken: userK) and ``LookupError`` for an unknown id,
        each naming the queries there are (an id raised torch's "too many indices")."""
        row = self.total[self.query_position(query)]
        sign = -1.0 if opponents else 1.0
        values, indices = stable_top_k(sign * row[None], k)
        return [(self.train_ids[i], sign * float(v)) for v, i in zip(values[0], indices[0].tolist())]

    def query_position(self, query: int | str) -> int:
        """The row of ``total`` of ``query``: a position in :attr:`query_ids` or an id (see :meth:`top`)."""
        ids = self.query_ids

        def shown() -> str:
            return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

        if isinstance(query, str):
            if query not in ids:
                raise LookupError(f"no query {query!r} in these scores (queries: {shown()})")
            return ids.index(query)
        try:
            position = None if isinstance(query, bool) else operator.index(query)  # numpy's and torch's integers too
        except TypeError:
            position = None
        if position is None or not 0 <= position < len(ids):
            raise IndexError(f"query {query!r}: give a position in 0..{len(ids) - 1} or an id ({shown()})")
        return position


def check_finite(scores: Scores) -> Scores:
    """Return ``scores`` if every per-module value is finite; else raise ``ValueError`` naming the
    modules and the first (query, train) pair with a NaN or infinite value.

    Pairs outside a ``candidate_mask`` (``(n_query, n_train)`` bool, set by
    :class:`wherefrom.methods.lexical.CandidateScores`) are exempt: there NaN is the "not scored" mark.
    """
    bad = ~torch.isfinite(scores.per_module)
    mask = getattr(scores, "candidate_mask", None)
    if mask is not None:
        bad &= mask.to(bad.device, torch.bool)[None]
    if bool(bad.any()):
        modules = [scores.module_names[i] for i in bad.flatten(1).any(1).nonzero().flatten().tolist()]
        _, q, m = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{int(bad.sum())} non-finite score(s) (NaN/inf) in module(s) {modules[:5]}{' ...' if len(modules) > 5 else ''}, "
            f"e.g. query {scores.query_ids[q]!r} x train row {scores.train_ids[m]!r}"
        )
    return scores


SET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""What a score set's name may be: a file stem inside its folder (no ``/``, no leading ``.``, so no ``..``)."""


def set_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a score set (``<name>.safetensors``, ``.json``, ``.top.csv`` in one folder), or
    ``None``: it must match :data:`SET_NAME` (a path such as ``../index/shard-00005`` wrote outside the folder,
    over an index shard) and must not be ``checksums`` (its ``.json`` is the folder's checksum manifest)."""
    if not isinstance(name, str) or not SET_NAME.fullmatch(name):
        return "a score set's name is a file stem: letters, digits, _ . - (not starting with . ; no /)"
    if name == CHECKSUMS.removesuffix(".json"):
        return f"{name!r} is taken: {CHECKSUMS} is the folder's checksum manifest"
    return None


def refuse_folders_in_set(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """The files of score set ``name`` in ``folder`` (``<name>.safetensors``, ``<name>.json``, ``<name>.top.csv``);
    raises ``IsADirectoryError`` naming one that is a folder (not the set's: never deleted), so that a writer can
    refuse before its work and before it forgets an earlier set's files."""
    paths = tuple(Path(folder) / f"{name}{suffix}" for suffix in (".safetensors", ".json", ".top.csv"))
    refuse_folder_in_place(*paths)
    return paths


def save_scores(
    scores: Scores,
    folder: Path,
    name: str,
    labels: Mapping[str, str | None] | None = None,
    top_k: int = TOP_K,
    provenance: Mapping[str, Any] | None = None,
    query_fingerprint: str | None = None,
    similarity: str | None = None,
) -> Path:
    """Write ``<name>.safetensors`` (``total``, ``per_module``) and ``<name>.json`` (ids, modules, the
    training rows' ``train_labels`` when ``labels`` maps their ids to labels, and ``provenance``, e.g. where the
    training side came from, :meth:`wherefrom.engine.run.Run.scores_provenance`, when given) atomically, with their
    checksums recorded in ``folder/checksums.json`` (:mod:`wherefrom.core.store`), and ``query_fingerprint`` (the
    query rows' :func:`wherefrom.core.data.data_fingerprint`, so that a set is replaced only by one of the same
    rows, not only the same ids) when given; then
    ``<name>.top.csv`` (:func:`top_rows`, ``top_k`` per query and kind) for a spreadsheet or pandas. ``sign`` in
    ``<name>.json`` is :func:`sign_note` of ``similarity`` (the family of a method whose scores are a similarity).

    The three files are one set and ``<name>.json`` is its completion marker: an earlier set's ``.json`` and
    ``.top.csv`` are deleted first and the ``.json`` is written last, so a set killed midway has no ``.json``
    (:func:`load_scores` refuses it) and never pairs new scores with an earlier set's ids.

    Raises ``ValueError`` before writing anything if ``name`` is not a set's name (:func:`set_name_problem`) or a
    score is NaN or infinite (:func:`check_finite`), and ``IsADirectoryError`` (:func:`refuse_folders_in_set`).
    """
    problem = set_name_problem(name)
    if problem is not None:
        raise ValueError(f"score set name {name!r}: {problem}")
    check_finite(scores)
    path, marker, top = refuse_folders_in_set(folder, name)
    for earlier in (marker, top):
        forget_file(earlier)
    save_tensors_checked(
        {"total": scores.total.contiguous().cpu(), "per_module": scores.per_module.contiguous().cpu()}, path
    )
    write_top_csv(scores, top, top_k, labels or {}, similarity)
    ids = {"query_ids": scores.query_ids, "train_ids": scores.train_ids, "modules": scores.module_names}
    if labels is not None:
        ids["train_labels"] = [labels.get(i) for i in scores.train_ids]
    if provenance is not None:
        ids["provenance"] = dict(provenance)
    if query_fingerprint is not None:
        ids["query_fingerprint"] = query_fingerprint
    write_json_checked({**ids, "sign": sign_note(similarity)}, marker)
    return path


TOP_COLUMNS = ("query_id", "kind", "rank", "train_id", "label", "score")
"""The columns of a top-k CSV file (:func:`write_top_csv`)."""


def sign_note(similarity: str | None = None) -> str:
    """What the sign of a score means, as every output states it: influence's ``positive = proponent (raises log
    p(completion | prompt))``, or, for a method whose scores are a ``similarity`` (its family, e.g.
    ``representation``: :func:`wherefrom.methods.registry.similarity_family`), ``higher = more similar (a
    representation similarity, not influence)``."""
    if similarity:
        return f"higher = more similar (a {similarity} similarity, not influence)"
    return "positive = proponent (raises log p(completion | prompt))"


def end_kind(score: float, lowest: bool, similarity: str | None = None) -> str:
    """What a row at one end of a query's ranking is: at the high end ``proponent`` when its score is positive
    (it raises the query's log-likelihood), else ``highest``; at the low end (``lowest``) ``opponent`` when
    negative, else ``lowest`` (a row that raises the query's likelihood too). A ``similarity``'s rows are
    ``highest``/``lowest`` whatever their sign (userM: a bm25 CSV called every row a proponent); ``similarity`` is
    such a method's family (:func:`wherefrom.methods.registry.similarity_family`, ``None`` for influence), as in
    :func:`sign_note` and every function below that takes it. NaN (no row) is neither."""
    if similarity:
        return "lowest" if lowest else "highest"
    if lowest:
        return "opponent" if score < 0 else "lowest"
    return "proponent" if score > 0 else "highest"


def end_name(kind: str, scores: Sequence[float], similarity: str | None = None) -> str:
    """What a shown end of the ranking is: ``proponents`` (``opponents``) only where every score shown is
    positive (negative); else ``highest scores`` (``lowest scores``) saying how many are on the other side
    of 0, e.g. ``lowest scores (2 of 10 >= 0, not opponents)``: rows that also raise (lower) the query's
    log-likelihood. A ``similarity``'s ends are ``highest scores`` / ``lowest scores``. NaN scores (the padding
    of a short candidate list, not shown) are left out. Every table of proponents is titled by it: ``query``'s,
    the report's and the query view's (they said "top proponents" over rows of negative score)."""
    lowest = kind == "opponents"
    if similarity:
        return f"{'lowest' if lowest else 'highest'} scores"
    shown = [s for s in scores if not math.isnan(s)]
    other = sum(end_kind(s, lowest) != kind[:-1] for s in shown)
    if not other:
        return kind
    return (
        f"{'lowest' if lowest else 'highest'} scores ({other} of {len(shown)} {'>=' if lowest else '<='} 0, not {kind})"
    )


def top_rows(scores: Scores, k: int, labels: Mapping[str, str | None], similarity: str | None = None) -> list[tuple]:
    """One tuple per query, kind and rank, in :data:`TOP_COLUMNS` order: the ``k`` highest scores (largest
    first) and the ``k`` lowest of each query, ``kind`` by :func:`end_kind` (``proponent``/``highest``,
    ``opponent``/``lowest``; a ``similarity``'s ``highest``/``lowest``); ``label`` from ``labels`` (``""`` when absent); ``score`` in the convention of the
    module docstring."""
    rows = []
    for q, query_id in enumerate(scores.query_ids):
        for lowest in (False, True):
            for rank, (train_id, score) in enumerate(scores.top(q, k, opponents=lowest), 1):
                kind = end_kind(score, lowest, similarity)
                rows.append((query_id, kind, rank, train_id, labels.get(train_id) or "", score))
    return rows


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters a spreadsheet reads as the start of a formula (OWASP's CSV injection list)."""


PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
"""A decimal number as a spreadsheet reads one (not ``-inf``, ``+nan`` or ``-1_000``, which Python's ``float`` takes)."""


def spreadsheet_cell(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text: one starting a formula (:data:`FORMULA_STARTS`) and not
    a number gets a leading ``'`` (an id ``=HYPERLINK(...)`` ran as a formula when the top-k CSV was opened);
    numbers such as ``-5`` and every other text are kept as they are."""
    if not text.startswith(FORMULA_STARTS) or PLAIN_NUMBER.fullmatch(text):
        return text
    return "'" + text


def write_top_csv(
    scores: Scores, path: Path, k: int, labels: Mapping[str, str | None], similarity: str | None = None
) -> Path:
    """Write :func:`top_rows` (``similarity``: see there) as a CSV file with a :data:`TOP_COLUMNS` header (written atomically); ids and labels
    pass through :func:`spreadsheet_cell` (the ``.json`` beside it keeps them as given)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TOP_COLUMNS)
    for query_id, kind, rank, train_id, label, score in top_rows(scores, k, labels, similarity):
        cells = (spreadsheet_cell(str(query_id)), kind, rank, spreadsheet_cell(str(train_id)))
        writer.writerow((*cells, spreadsheet_cell(str(label)), repr(float(score))))
    atomic_write_text(text.getvalue(), Path(path))
    return Path(path)


def score_set_names(folder: Path) -> tuple[list[str], list[str]]:
    """``(finished, unfinished)``: the names of the score sets :func:`save_scores` wrote in ``folder`` (both files;
    ``<name>.json`` is the completion marker) and of those whose writer was stopped before it (a
    ``<name>.safetensors`` without its ``.json``), each sorted; both empty when ``folder`` is not a folder."""
    folder = Path(folder)
    stems = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    finished = [name for name in stems if (folder / f"{name}.json").is_file()]
    return finished, [name for name in stems if name not in finished]


def unfinished_set(folder: Path, name: str) -> str:
    """What an unfinished score set ``name`` in ``folder`` is, in words (``influence`` refuses it, ``report`` leaves
    it out saying so: it left it out without a word)."""
    return (
        f"the score set {Path(folder) / name} is unfinished ({name}.safetensors without its {name}.json, written "
        "last: the `scores` that wrote it was stopped)"
    )


def load_score_set(folder: Path, name: str) -> tuple[Scores, dict[str, Any]]:
    """``(scores, record)``: the :class:`Scores` that :func:`save_scores` wrote as ``<name>.safetensors`` +
    ``<name>.json`` in ``folder``, and that JSON record (ids, ``train_labels``, ``provenance`` where saved: see
    :func:`saved_labels`), each file read once.

    Raises :class:`wherefrom.core.store.DamagedFile` naming the file when either is missing, unfinished (a
    set whose writer was killed) or differs from its recorded checksum."""
    folder = Path(folder)
    record = read_json_checked(folder / f"{name}.json")
    tensors, _ = load_tensors_checked(folder / f"{name}.safetensors")
    return Scores(record["query_ids"], record["train_ids"], record["modules"], tensors["per_module"]), record


def load_scores(folder: Path, name: str) -> Scores:
    """The :class:`Scores` of :func:`load_score_set` (raising as it does)."""
    return load_score_set(folder, name)[0]


def index_rows_text(provenance: Mapping[str, Any]) -> str:
    """``float16 rows, precondition fitted, unit_norm False``: the index rows a score set's training side was read
    from, by its ``provenance`` with ``train_side`` ``index`` (:meth:`wherefrom.engine.run.Run.scores_provenance`; a
    set of an earlier version recorded ``precondition``/``unit_norm`` beside ``dtype``, or no ``dtype``)."""
    options = provenance.get("index_options")
    if not isinstance(options, dict):  # sets of earlier versions kept them beside the dtype
        options = {key: provenance[key] for key in ("precondition", "unit_norm") if key in provenance}
    rows = f"{provenance['dtype']} rows" if provenance.get("dtype") else "rows"
    return rows + "".join(f", {key} {value}" for key, value in options.items())


def saved_labels(record: Mapping[str, Any]) -> dict[str, str | None]:
    """The labels :func:`save_scores` saved with a set, by training id, from its JSON ``record``
    (:func:`load_score_set`; ``{}`` when the set was saved without labels)."""
    return dict(zip(record["train_ids"], record.get("train_labels") or [], strict=False))


@dataclass
class ScoreTable:
    """Saved scores as a table: ``total[q, m]`` is the influence of training row ``train_ids[m]`` (label
    ``labels[m]``, ``None`` when it has none or none was saved) on query ``query_ids[q]``; positive =
    proponent. ``total``: ``(n_query, n_train)`` float tensor."""

    query_ids: list[str]
    train_ids: list[str]
    labels: list[str | None]
    total: torch.Tensor

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` indexed by ``train_id``: a ``label`` column, then one column of scores per
        query id (``frame.sort_values(query_id)`` ranks the rows for one query). Raises ``ImportError``
        naming pandas when it is not installed."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("ScoreTable.to_pandas needs pandas (pip install pandas)") from None
        frame = pd.DataFrame(self.total.T.double().numpy(), index=pd.Index(self.train_ids, name="train_id"))
        frame.columns = self.query_ids
        frame.insert(0, "label", self.labels)
        return frame


def load_score_table(folder: Path, name: str = "scores", as_frame: bool | None = None) -> Any:
    """The scores :func:`save_scores` wrote in ``folder`` (``RUN/scores`` or an ``attribute`` ``--out``)
    under ``name``, with their ids and training labels: a :class:`ScoreTable`, or its
    :meth:`ScoreTable.to_pandas` frame when ``as_frame`` is true, or is ``None`` (the default) and
    pandas is installed. Raises ``FileNotFoundError`` naming the file when a part is missing."""
    folder = Path(folder)
    for part in (f"{name}.safetensors", f"{name}.json"):
        if not (folder / part).is_file():
            raise FileNotFoundError(f"{folder / part}: no such score file (save_scores writes it)")
    scores, record = load_score_set(folder, name)
    labels = saved_labels(record)
    table = ScoreTable(scores.query_ids, scores.train_ids, [labels.get(i) for i in scores.train_ids], scores.total)
    if as_frame is None:
        as_frame = importlib.util.find_spec("pandas") is not None
    return table.to_pandas() if as_frame else table
