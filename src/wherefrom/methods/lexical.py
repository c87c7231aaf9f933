"""BM25 (Robertson & Zaragoza, 2009, The Probabilistic Relevance Framework: BM25 and Beyond): a lexical
baseline, and a candidate prefilter for any attribution method.

Each row's text is ``prompt + "\\n" + completion``, tokenised as lower-cased words (the regex
``\\w+``, Unicode-aware). Score of train row ``d`` for query ``q`` (Okapi BM25):

    sum over query tokens w (with repetition) of  idf(w) * tf(w, d) (k1 + 1) / (tf(w, d) + k1 (1 - b + b |d| / avgdl))

with ``k1 = 1.5``, ``b = 0.75`` and, by default, the Lucene idf ``log(1 + (N - n_w + 0.5) / (n_w + 0.5))``
(never negative). ``idf="okapi"`` gives the classic ``log((N - n_w + 0.5) / (n_w + 0.5))`` with
negative values replaced by ``epsilon x mean idf``, which is what ``rank_bm25.BM25Okapi`` computes.
Query words absent from the train rows contribute nothing. All queries are scored at once with one
sparse matrix product (``scipy.sparse``), so no extra dependency is needed.

**Candidate filter** (Grosse et al., 2023 pre-selected candidate training rows with BM25 before
computing influence): :func:`bm25_candidates` gives, per query, the indices of its top-``k`` train
rows; :func:`restrict` masks any method's :class:`~wherefrom.core.scoring.Scores` to those candidates,
and :func:`prefiltered_scores` runs a method only on the union of the candidates (the compute saving)
and returns the same masked result. Masked scores are **NaN** ("not scored"), not ``-inf``: a
``-inf`` would rank first among *opponents*, and NaN propagates into any sum that forgets the mask
instead of passing silently. The result is a :class:`CandidateScores`, whose ``top`` only ever
returns candidates (fewer than ``k`` rows when a query has fewer candidates).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import sparse

from wherefrom.core.data import Record, check_records, records_key
from wherefrom.core.scoring import Scores, stable_top_k
from wherefrom.core.search import candidate_sets

__all__ = [
    "BM25",
    "TOKEN_PATTERN",
    "CandidateScores",
    "bm25_candidates",
    "prefiltered_scores",
    "record_text",
    "restrict",
    "tokenize",
]

TOKEN_PATTERN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words: ``re.findall(r"\\w+", text.lower())``."""
    return TOKEN_PATTERN.findall(text.lower())


def record_text(record: Record) -> str:
    """The text BM25 indexes: prompt and completion, separated by a newline (so words never merge)."""
    return record.prompt + "\n" + record.completion


class BM25:
    """Okapi BM25 over prompt+completion text. ``fit(train)`` builds the index; ``scores`` uses it."""

    name = "bm25"

    def __init__(
        self, k1: float = 1.5, b: float = 0.75, idf: Literal["lucene", "okapi"] = "lucene", epsilon: float = 0.25
    ):
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        if idf not in ("lucene", "okapi"):
            raise ValueError(f"idf must be 'lucene' or 'okapi', got {idf!r}")
        self.k1, self.b, self.idf_kind, self.epsilon = k1, b, idf, epsilon
        self.vocabulary: dict[str, int] = {}
        self.idf: np.ndarray = np.zeros(0)
        self.train_ids: list[str] = []
        self._weights: sparse.csr_matrix | None = None  # (V, n): idf x saturated tf
        self._key: tuple | None = None

    # --- index ----------------------------------------------------------------------------------
    def fit(self, train: Sequence[Record]) -> BM25:
        """Index ``train``; :class:`~wherefrom.core.data.DataError` for no rows, an invalid row or a repeated id."""
        train = check_records(train, "training rows")
        docs = [tokenize(record_text(r)) for r in train]
        vocabulary: dict[str, int] = {}
        rows, cols = [], []
        for j, doc in enumerate(docs):
            for word in doc:
                rows.append(vocabulary.setdefault(word, len(vocabulary)))
                cols.append(j)
        n, size = len(docs), len(vocabulary)
        # duplicates (row, col) are summed: term frequencies
        tf = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, n), dtype=np.float64)
        tf.sum_duplicates()
        lengths = np.array([len(d) for d in docs], dtype=np.float64)
        avgdl = lengths.mean() if n else 0.0
        doc_freq = np.diff(tf.indptr).astype(np.float64)  # rows are words: nonzeros per row
        if self.idf_kind == "lucene":
            idf = np.log1p((n - doc_freq + 0.5) / (doc_freq + 0.5))
        else:
            idf = np.log(n - doc_freq + 0.5) - np.log(doc_freq + 0.5)
            if size:
                idf = np.where(idf < 0, self.epsilon * idf.mean(), idf)
        norm = self.k1 * (1 - self.b + self.b * lengths / avgdl) if avgdl > 0 else np.full(n, self.k1)
        weights = tf.tocoo()
        values = weights.data * (self.k1 + 1) / (weights.data + norm[weights.col]) * idf[weights.row]
        self._weights = sparse.csr_matrix((values, (weights.row, weights.col)), shape=(size, n))
        self.vocabulary, self.idf = vocabulary, idf
        self.train_ids = [r.id for r in train]
        self._key = records_key(train)
        return self

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The corpus statistics: the ``(V, n)`` weight matrix in CSR parts and ``idf`` ``(V,)``, float64,
        with the vocabulary (words in row order) and the train ids."""
        if self._weights is None:
            raise RuntimeError("BM25 is not fitted: call fit(train) first")
        weights = self._weights
        tensors = {
            "weights.data": torch.from_numpy(np.asarray(weights.data, dtype=np.float64)),
            "weights.indices": torch.from_numpy(np.asarray(weights.indices, dtype=np.int64)),
            "weights.indptr": torch.from_numpy(np.asarray(weights.indptr, dtype=np.int64)),
            "idf": torch.from_numpy(np.asarray(self.idf, dtype=np.float64)),
        }
        return tensors, {"vocabulary": list(self.vocabulary), "train_ids": list(self.train_ids)}

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], train: Sequence[Record]) -> None:
        """Adopt saved statistics of ``train``; ``ValueError`` when they are of other training rows."""
        if state["train_ids"] != [r.id for r in train]:
            raise ValueError("bm25: the saved index is of other training rows")
        shape = (len(state["vocabulary"]), len(state["train_ids"]))
        parts = (tensors["weights.data"].numpy(), tensors["weights.indices"].numpy(), tensors["weights.indptr"].numpy())
        self._weights = sparse.csr_matrix(parts, shape=shape)
        self.vocabulary = {word: row for row, word in enumerate(state["vocabulary"])}
        self.idf, self.train_ids, self._key = tensors["idf"].numpy(), list(state["train_ids"]), records_key(train)

    def score_matrix(self, queries: Sequence[Record] | Sequence[str]) -> np.ndarray:
        """``(n_query, n_train)`` BM25 scores (float64) of record or plain-text queries against the index."""
        if self._weights is None:
            raise RuntimeError("BM25 is not fitted: call fit(train) first")
        rows, cols = [], []
        for i, query in enumerate(queries):
            text = query if isinstance(query, str) else record_text(query)
            for word in tokenize(text):
                column = self.vocabulary.get(word)
                if column is not None:
                    rows.append(i)
                    cols.append(column)
        counts = sparse.csr_matrix(
            (np.ones(len(rows)), (rows, cols)), shape=(len(queries), len(self.vocabulary)), dtype=np.float64
        )
        return np.asarray((counts @ self._weights).todense()).reshape(len(queries), len(self.train_ids))

    # --- method contract ------------------------------------------------------------------------
    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        """BM25 scores as :class:`Scores` with one module, ``"bm25"``; refits when ``train`` differs from the index.

        :class:`~wherefrom.core.data.DataError` for an empty ``queries`` or ``train``, an invalid row or a repeated id."""
        queries, train = check_records(queries, "query rows"), check_records(train, "training rows")
        if self._key != records_key(train):
            self.fit(train)
        values = torch.from_numpy(self.score_matrix(queries)).to(torch.float32)
        return Scores([q.id for q in queries], list(self.train_ids), ["bm25"], values.unsqueeze(0))

    def candidates(self, queries: Sequence[Record], k: int) -> list[list[int]]:
        """Per query, indices of the ``k`` highest-scoring train rows of the index, best first (ties: lower index first)."""
        return self.matched_candidates(queries, k)[0]

    def matched_candidates(self, queries: Sequence[Record], k: int) -> tuple[list[list[int]], list[int]]:
        """:meth:`candidates`, and per query how many of them have a positive score (share a word with it): the
        rest, rows scoring 0, fill the list in train order."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        matrix = self.score_matrix(queries)
        k = min(k, matrix.shape[1])
        # stable sort of -score: equal scores keep train order
        order = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
        matched = [int((scores[row] > 0).sum()) for scores, row in zip(matrix, order)]
        return [row.tolist() for row in order], matched


def bm25_candidates(queries: Sequence[Record], train: Sequence[Record], k: int, **bm25_options) -> list[list[int]]:
    """Per query, indices into ``train`` of its top-``k`` rows by BM25 (best first); ``k`` is capped at ``len(train)``.

    ``bm25_options`` go to :class:`BM25` (``k1``, ``b``, ``idf``, ``epsilon``). Rows sharing no word
    with the query score 0 and still fill the list when fewer than ``k`` rows match
    (:meth:`BM25.matched_candidates` says how many did).
    """
    return BM25(**bm25_options).fit(train).candidates(queries, k)


@dataclass
class CandidateScores(Scores):
    """:class:`Scores` restricted to candidate train rows per query.

    ``candidate_mask``: ``(n_query, n_train)`` bool. Non-candidates hold NaN in ``per_module`` (and
    so in ``total``); :meth:`top` ranks candidates only.
    """

    candidate_mask: torch.Tensor = None  # type: ignore[assignment]

    def top(self, query_index: int, k: int, opponents: bool = False) -> list[tuple[str, float]]:
        row = self.total[query_index]
        keep = torch.nonzero(self.candidate_mask[query_index]).flatten()
        sign = -1.0 if opponents else 1.0
        best, order = stable_top_k(sign * row[keep][None], k)
        return [(self.train_ids[int(keep[i])], sign * float(v)) for v, i in zip(best[0], order[0].tolist())]


def _mask(candidates: Sequence[Sequence[int]], n_query: int, n_train: int) -> torch.Tensor:
    """``(n_query, n_train)`` bool: each query's candidate rows, checked by
    :func:`wherefrom.core.search.candidate_sets` (a ``ValueError`` naming the query and entry)."""
    mask = torch.zeros(n_query, n_train, dtype=torch.bool)
    for i, rows in enumerate(candidate_sets(candidates, n_query, n_train)):
        mask[i, rows] = True
    return mask


def restrict(scores: Scores, candidates: Sequence[Sequence[int]], fill: float = math.nan) -> CandidateScores:
    """Mask ``scores`` to ``candidates`` (per query, indices into ``scores.train_ids``).

    Non-candidate entries of every module are set to ``fill`` (NaN by default, see the module note);
    candidate entries are unchanged. ``top`` of the result returns candidates only. Raises ``ValueError``
    (:class:`wherefrom.core.search.SearchError`) for another number of lists than queries, or an entry that is
    not an integer in ``0..n_train-1``.
    """
    n_query, n_train = scores.per_module.shape[1:]
    mask = _mask(candidates, n_query, n_train)
    per_module = scores.per_module.masked_fill(~mask.to(scores.per_module.device), fill)
    return CandidateScores(list(scores.query_ids), list(scores.train_ids), list(scores.module_names), per_module, mask)


def prefiltered_scores(
    method,
    queries: Sequence[Record],
    train: Sequence[Record],
    k: int,
    candidates: Sequence[Sequence[int]] | None = None,
    **bm25_options,
) -> CandidateScores:
    """Score only BM25 candidates with any method (anything with ``scores(queries, train) -> Scores``).

    ``method.scores`` runs once on the union of all queries' top-``k`` rows (``candidates`` may be
    given instead of computed); the result is laid out over the whole ``train`` like
    :func:`restrict` of the full scores, with the same values on candidates. Fit the method
    (curvature, caches) on the full training set beforehand when it needs fitting.
    """
    if candidates is None:
        candidates = bm25_candidates(queries, train, k, **bm25_options)
    mask = _mask(candidates, len(queries), len(train))
    union = torch.nonzero(mask.any(0)).flatten().tolist()
    partial = method.scores(queries, [train[j] for j in union])
    expected = [train[j].id for j in union]
    if list(partial.train_ids) != expected:
        raise ValueError("the method returned scores for other train rows than it was given")
    per_module = torch.full(
        (partial.per_module.shape[0], len(queries), len(train)), math.nan, dtype=partial.per_module.dtype
    )
    per_module[:, :, union] = partial.per_module.cpu()
    per_module = per_module.masked_fill(~mask, math.nan)
    return CandidateScores(list(partial.query_ids), [r.id for r in train], list(partial.module_names), per_module, mask)
