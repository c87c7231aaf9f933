"""BM25: the formula by hand, exact matches rank first, and the candidate filter over another method."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import build_model
from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.lexical import (
    BM25,
    CandidateScores,
    bm25_candidates,
    prefiltered_scores,
    restrict,
    tokenize,
)

CORPUS = [
    Record("t0", "The cat sat on the mat.", " It was warm."),
    Record("t1", "A dog barked at the mailman", " twice, loudly."),
    Record("t2", "Stock prices fell sharply on Monday", " after the report."),
    Record("t3", "The recipe needs two eggs and flour", " plus sugar."),
    Record("t4", "Rain is expected over the weekend", " in the north."),
    Record("t5", "The cat chased a mouse", " under the table."),
    Record("t6", "Quantum computers use qubits", " instead of bits."),
    Record("t7", "She planted tomatoes in the garden", " last spring."),
]


def test_tokenize_lowercase_words():
    assert tokenize("Hello, World! it's 2+2\nÉtat") == ["hello", "world", "it", "s", "2", "2", "état"]


def test_bm25_formula_by_hand():
    docs = [Record("a", "x y", " x"), Record("b", "y z", " z z"), Record("c", "w", " w")]
    bm25 = BM25(k1=1.2, b=0.75).fit(docs)
    avgdl = (3 + 4 + 2) / 3  # [x y x], [y z z z], [w w]

    def term(tf, df, length):
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * length / avgdl))

    got = bm25.score_matrix(["x z z unseen"])[0]
    # "z" appears twice in the query: counted twice, as in rank_bm25
    expected = [term(2, 1, 3), 2 * term(3, 1, 4), 0.0]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_exact_match_ranks_first_and_scores_layout():
    bm25 = BM25()
    queries = [Record(f"q{i}", r.prompt, r.completion) for i, r in enumerate(CORPUS)]
    queries.append(Record("paraphrase", "a cat on a mat", " warm"))
    scores = bm25.scores(queries, CORPUS)
    assert scores.module_names == ["bm25"] and scores.per_module.shape == (1, len(queries), len(CORPUS))
    assert scores.query_ids == [q.id for q in queries] and scores.train_ids == [r.id for r in CORPUS]
    for i in range(len(CORPUS)):
        assert scores.top(i, 1)[0][0] == CORPUS[i].id
    assert scores.top(len(CORPUS), 1)[0][0] == "t0"
    assert bm25_candidates(queries[-1:], CORPUS, k=2) == [[0, 5]]  # the other cat comes second
    # a different train set refits the index
    other = bm25.scores(queries[:1], CORPUS[4:])
    assert other.train_ids == [r.id for r in CORPUS[4:]]
    with pytest.raises(ValueError):
        BM25(idf="bm25+")  # type: ignore[arg-type]


def test_okapi_idf_matches_rank_bm25():
    rank_bm25 = pytest.importorskip("rank_bm25")
    reference = rank_bm25.BM25Okapi([tokenize(r.prompt + "\n" + r.completion) for r in CORPUS])
    ours = BM25(idf="okapi").fit(CORPUS)
    for text in ["the cat sat", "the the mailman", "qubits in the garden", "nothing matches"]:
        assert ours.score_matrix([text])[0].tolist() == pytest.approx(
            list(reference.get_scores(tokenize(text))), rel=1e-9, abs=1e-12
        )


def test_candidate_filter_on_another_methods_scores(tokenizer, train_records, query_records):
    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=5))
    full = attributor.scores(query_records, train_records)
    candidates = bm25_candidates(query_records, train_records, k=4)
    assert all(len(c) == 4 for c in candidates)

    restricted = restrict(full, candidates)
    assert isinstance(restricted, CandidateScores)
    for i, rows in enumerate(candidates):
        mask = torch.zeros(len(train_records), dtype=torch.bool)
        mask[rows] = True
        assert torch.equal(restricted.total[i, mask], full.total[i, mask])
        assert torch.isnan(restricted.total[i, ~mask]).all() and torch.isnan(restricted.per_module[:, i, ~mask]).all()
        allowed = {train_records[j].id for j in rows}
        proponents, opponents = restricted.top(i, k=10), restricted.top(i, k=10, opponents=True)
        assert len(proponents) == 4 and {t for t, _ in proponents} == allowed
        assert {t for t, _ in opponents} == allowed
        values = sorted((float(full.total[i, j]) for j in rows), reverse=True)  # rows may repeat a text: ties
        assert [v for _, v in proponents] == pytest.approx(values) and [v for _, v in opponents] == pytest.approx(
            values[::-1]
        )
        index = {r.id: j for j, r in enumerate(train_records)}
        assert all(v == float(full.total[i, index[t]]) for t, v in proponents + opponents)

    class Counting:
        rows = 0

        def scores(self, queries, train):
            Counting.rows = len(train)
            return attributor.scores(queries, train)

    prefiltered = prefiltered_scores(Counting(), query_records, train_records, k=4)
    union = {j for rows in candidates for j in rows}
    assert Counting.rows == len(union) < len(train_records)
    assert prefiltered.train_ids == full.train_ids and prefiltered.module_names == full.module_names
    torch.testing.assert_close(prefiltered.per_module, restricted.per_module, rtol=1e-5, atol=1e-6, equal_nan=True)
    with pytest.raises(ValueError, match="one candidate list per query"):
        restrict(full, candidates[:1])


def test_restrict_refuses_candidates_that_are_not_row_indices():
    """``True`` as a mask index made every row a candidate; 2.9 and -1 were index errors of torch or silent."""
    scores = Scores(["q"], [f"t{i}" for i in range(5)], ["m"], torch.arange(5.0)[None, None])
    for entry, message in (
        (True, "must be integers, got True"),
        (2.9, "must be integers, got 2.9"),
        (5, r"must lie in 0\.\.4, got 5"),
        (-1, r"must lie in 0\.\.4, got -1"),
    ):
        with pytest.raises(ValueError, match=f"query 0: candidate rows {message}"):
            restrict(scores, [[1, entry]])
    assert [t for t, _ in restrict(scores, [[1, 3, 3]]).top(0, 5)] == ["t3", "t1"]
