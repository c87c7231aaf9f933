"""Score decompositions, low-rank query batching, self-influence and the sign convention."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import build_model
from wherefrom.curvature import make_curvature
from wherefrom.engine.api import AttributionConfig, Attributor


@pytest.fixture(scope="module")
def fitted(tokenizer, train_records):
    attributor = Attributor(build_model("gpt2"), tokenizer, AttributionConfig(strategy="ekfac", batch_size=5))
    attributor.fit(train_records)
    return attributor


def test_module_scores_sum_to_flat_dot_product(fitted, query_records, train_records):
    scores = fitted.scores(query_records, train_records)
    _, pre = fitted.preconditioned_queries(query_records)
    names = fitted.module_names
    flat_queries = torch.cat([pre[n].flatten(1) for n in names], dim=1)
    flat_train = torch.cat(
        [torch.cat([g[n].flatten(1) for n in names], dim=1) for _, g in fitted.gradients(train_records)]
    )
    torch.testing.assert_close(scores.total, flat_queries @ flat_train.T, rtol=1e-4, atol=1e-5)
    assert scores.per_module.shape == (len(names), len(query_records), len(train_records))


@pytest.mark.parametrize("rank", [None, 2])
def test_token_scores_sum_to_example_scores(fitted, query_records, train_records, rank):
    fitted.config.query_rank = rank
    try:
        scores = fitted.scores(query_records, train_records)
        _, per_token = fitted.token_scores(query_records, train_records)
    finally:
        fitted.config.query_rank = None
    for j, (row_id, input_ids, tokens) in enumerate(per_token):
        assert row_id == train_records[j].id and tokens.shape == (len(query_records), len(input_ids))
        torch.testing.assert_close(tokens.sum(1), scores.total[:, j], rtol=1e-4, atol=1e-5)


def test_low_rank_queries_converge_to_full_rank(fitted, query_records, train_records):
    full = fitted.scores(query_records, train_records).total
    errors = []
    max_rank = max(min(m.shape) for m in fitted.modules)
    for rank in (1, 2, 4, 8, max_rank):
        fitted.config.query_rank = rank
        approx = fitted.scores(query_records, train_records).total
        errors.append(float((approx - full).norm() / full.norm()))
    fitted.config.query_rank = None
    print("relative error of rank-r query batching, r = 1, 2, 4, 8, full:", [round(e, 4) for e in errors])
    assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-4 and errors[0] > errors[-1]


def test_self_influence_is_the_diagonal_of_train_by_train_scores(fitted, train_records):
    ids, values = fitted.self_influence(train_records)
    square = fitted.scores(train_records, train_records).total
    assert ids == [r.id for r in train_records]
    torch.testing.assert_close(values, torch.diagonal(square), rtol=1e-4, atol=1e-5)
    assert (values > 0).all()  # a positive-definite preconditioner


def test_top_k_orders_proponents_and_opponents(fitted, query_records, train_records):
    scores = fitted.scores(query_records, train_records)
    top = scores.top(0, 3)
    bottom = scores.top(0, 3, opponents=True)
    row = scores.total[0]
    assert [v for _, v in top] == sorted(row.tolist(), reverse=True)[:3]
    assert [v for _, v in bottom] == sorted(row.tolist())[:3]
    assert top[0][0] == train_records[int(row.argmax())].id


def _shift(modules, direction: dict[str, torch.Tensor], eps: float) -> None:
    with torch.no_grad():
        for m in modules:
            for param, delta in zip(m.parameters(), m.to_param_layout(direction[m.name])):
                param.add_(eps * delta.to(param.dtype))


SIGN_CASES = [
    ("identity", {}),
    ("diagonal", {}),
    ("kfac", {}),
    ("ekfac", {}),
    ("exact", {}),
    ("datainf", {}),
    ("cg", {"max_iter": 400}),
    ("arnoldi", {}),
]  # cg: converged, so that P is the (linear) inverse


@pytest.mark.parametrize("strategy,options", SIGN_CASES, ids=[name for name, _ in SIGN_CASES])
def test_sign_matches_actual_change_after_upweighting(strategy, options, tokenizer, train_records, query_records):
    """Upweighting z_m by eps moves the weights by -eps P grad L(z_m); f(z_q) must move by eps * I."""
    model = build_model("llama").double()
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy=strategy, batch_size=6))
    attributor.fit(train_records, make_curvature(strategy, **options))
    scores = attributor.scores(query_records[:2], train_records[:3]).total
    _, train_grads = next(attributor.gradients(train_records[:3]))
    step = attributor.curvature.precondition(train_grads)
    query_batch = next(attributor.batches(query_records[:2]))[1]
    for m_index in range(3):
        direction = {n: -step[n][m_index] for n in attributor.module_names}  # weight change per unit eps
        # a 1e-2 step in weight space: smaller steps drown in the float32 RMSNorm of the tiny Llama
        eps = 1e-2 / float(torch.cat([d.flatten() for d in direction.values()]).norm())
        _shift(attributor.modules, direction, eps)
        f_plus = attributor.task.measurement(model, query_batch).detach()
        _shift(attributor.modules, direction, -2 * eps)
        f_minus = attributor.task.measurement(model, query_batch).detach()
        _shift(attributor.modules, direction, eps)
        observed = (f_plus - f_minus) / (2 * eps)
        # central-difference truncation error, direction dependent: up to 2.5e-3 (ekfac, true Fisher, seed 0)
        torch.testing.assert_close(observed.float(), scores[:, m_index].float(), rtol=3e-3, atol=1e-6)
        assert (torch.sign(observed) == torch.sign(scores[:, m_index])).all()


def test_low_rank_queries_are_compressed_one_batch_at_a_time(fitted, query_records, train_records, monkeypatch):
    """Query memory: with ``query_rank`` the dense preconditioned queries of at most one batch exist at
    once (issue 12: peak independent of the number of queries), and the result equals compressing all
    queries after joining them (the SVD is per query, so batching changes nothing)."""
    import wherefrom.engine.api as api
    from wherefrom.core.scoring import compress_queries

    seen = []

    def spy(queries, rank):
        seen.append(max(q.shape[0] for q in queries.values()))
        return compress_queries(queries, rank)

    fitted.config.query_rank, fitted.config.batch_size = 2, 2
    monkeypatch.setattr(api, "compress_queries", spy)
    try:
        ids, batched = fitted.preconditioned_queries(query_records)
        fitted.config.query_rank = None
        _, dense = fitted.preconditioned_queries(query_records)
    finally:
        fitted.config.query_rank, fitted.config.batch_size = None, 5
    assert ids == [r.id for r in query_records] and len(query_records) > 2
    assert max(seen) <= 2  # never more than one batch of dense queries handed to the compression
    whole = compress_queries(dict(dense), 2)
    for name in fitted.module_names:
        (u, v), (u_all, v_all) = batched[name], whole[name]
        torch.testing.assert_close(u @ v.mT, u_all @ v_all.mT, rtol=1e-4, atol=1e-6)  # rank-2 matrices
    torch.testing.assert_close(batched.norms, dense.norms)


def test_scoring_memory_with_query_rank_does_not_grow_with_dense_queries(fitted):
    """The predicted dense query part stays one batch with ``query_rank``; at full rank it grows with ``n_q``."""
    fitted.config.query_rank = 2
    try:
        few, many = fitted.check_scoring_memory(10), fitted.check_scoring_memory(1000)
    finally:
        fitted.config.query_rank = None
    full_few, full_many = fitted.check_scoring_memory(10), fitted.check_scoring_memory(1000)
    assert many - few < (full_many - full_few) / 2


def test_low_rank_factors_do_not_hold_the_full_svd():
    """The rank-r factors own their storage (a view of the SVD's ``V^H`` kept ``min(out, in')`` rows alive)."""
    from wherefrom.core.scoring import low_rank

    u, v = low_rank(torch.randn(3, 40, 30), 2)
    assert u.shape == (3, 40, 2) and v.shape == (3, 30, 2)
    assert u.untyped_storage().nbytes() == u.numel() * 4 and v.untyped_storage().nbytes() == v.numel() * 4


def test_top_lists_equal_scores_in_training_row_order_at_both_ends():
    """Copies of a training row score alike; ``top`` lists them lowest row first, as the store's exact search
    does, where ``torch.topk`` alone ordered them arbitrarily (it gave t9 first at k = 1 on this machine)."""
    from wherefrom.core.scoring import Scores
    from wherefrom.methods.lexical import restrict

    total = torch.tensor([[0.0, 1.0, 5.0, -3.0, 5.0, 0.5, -3.0, 5.0, 2.0, 5.0, -3.0, 1.0]])
    ids = [f"t{i}" for i in range(total.shape[1])]
    scores = Scores(["q"], ids, ["m"], total[None])
    for k in (1, 2, 3, 4, 6):
        assert [t for t, _ in scores.top(0, k)] == ["t2", "t4", "t7", "t9", "t8", "t1"][:k]
        assert [t for t, _ in scores.top(0, k, opponents=True)] == ["t3", "t6", "t10", "t0", "t5", "t1"][:k]
    assert [v for _, v in scores.top(0, 3, opponents=True)] == [-3.0, -3.0, -3.0]
    restricted = restrict(scores, [[9, 7, 1, 11, 3]])
    assert [t for t, _ in restricted.top(0, 3)] == ["t7", "t9", "t1"]
    assert [t for t, _ in restricted.top(0, 3, opponents=True)] == ["t3", "t1", "t11"]
    assert scores.top(0, 0) == [] and len(scores.top(0, 99)) == 12
    with pytest.raises(ValueError, match=r"k \(how many rows to list\) must be >= 0, got -1"):
        scores.top(0, -1)  # userV: torch's "selected index k out of range"


def test_top_rows_name_each_end_by_its_sign():
    """A high-end row that scores <= 0 lowers (or leaves) the query's log-likelihood: it is ``highest``, not a
    ``proponent`` (every top row was ``proponent``, negative ones too, while ``query``'s tables already said
    "not proponents"); a low-end row >= 0 is ``lowest``, not an ``opponent``."""
    from wherefrom.core.scoring import Scores, end_kind, top_rows

    total = torch.tensor([[-1.0, -2.0, -3.0, 0.5], [4.0, 3.0, 2.0, 0.0]])
    scores = Scores(["neg", "pos"], ["a", "b", "c", "d"], ["m"], total[None])
    kinds = [(query, kind, train) for query, kind, _, train, _, _ in top_rows(scores, 2, {})]
    assert kinds == [
        ("neg", "proponent", "d"), ("neg", "highest", "a"), ("neg", "opponent", "c"), ("neg", "opponent", "b"),
        ("pos", "proponent", "a"), ("pos", "proponent", "b"), ("pos", "lowest", "d"), ("pos", "lowest", "c"),
    ]  # fmt: skip
    assert [end_kind(0.0, lowest) for lowest in (False, True)] == ["highest", "lowest"]


def test_top_takes_a_query_position_or_id_and_names_one_that_is_not_there():
    """userK: ``top(5)`` of 2 queries raised torch's bare IndexError, ``top("q-id")`` "too many indices" with a
    deprecation warning, and ``top(-1)`` gave the last query's rows."""
    import numpy as np

    from wherefrom.core.scoring import Scores

    total = torch.tensor([[-1.0, -2.0, -3.0, 0.5], [4.0, 3.0, 2.0, 0.0]])
    scores = Scores(["neg", "pos"], ["a", "b", "c", "d"], ["m"], total[None])
    assert scores.top("pos", 2) == scores.top(1, 2) == scores.top(np.int64(1), 2) == [("a", 4.0), ("b", 3.0)]
    for query in (5, -1, True, 1.0):
        with pytest.raises(IndexError, match=r"give a position in 0\.\.1 or an id \(neg, pos\)"):
            scores.top(query, 2)
    with pytest.raises(LookupError, match=r"no query 'q-id' in these scores \(queries: neg, pos\)"):
        scores.top("q-id", 2)


def test_the_top_k_csv_shows_formula_like_ids_and_labels_as_text_and_keeps_numbers(tmp_path):
    """userC: an id ``=cmd()`` went into ``.top.csv`` as it was, so a spreadsheet opening the file ran it as a
    formula. Text starting a formula gets a leading ``'`` (ids, query ids and labels); numbers (``-5``, ``+1.5``)
    and the ``.json``'s ids stay as given."""
    import csv
    import json

    from wherefrom.core.scoring import Scores, save_scores

    train = ["=cmd()", "-5", "+x", "@SUM(A1)", "\tt", "plain", "-inf", "-1.5e3"]
    scores = Scores(["-q", "+1.5"], train, ["m"], torch.arange(16.0).reshape(1, 2, 8))
    labels = {"plain": "=label", "-5": "-3"}
    save_scores(scores, tmp_path, "s", top_k=8, labels=labels)
    with (tmp_path / "s.top.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["query_id"] for row in rows} == {"'-q", "+1.5"}
    expected = {"'=cmd()", "-5", "'+x", "'@SUM(A1)", "'\tt", "plain", "'-inf", "-1.5e3"}  # -inf: a formula there
    assert {row["train_id"] for row in rows} == expected
    assert {row["label"] for row in rows if row["train_id"] in ("plain", "-5")} == {"'=label", "-3"}
    assert json.loads((tmp_path / "s.json").read_text())["train_ids"] == train


def test_a_score_set_killed_midway_is_refused_not_paired_with_an_earlier_sets_ids(tmp_path, monkeypatch):
    """``save_scores`` over an earlier set: a writer killed after the new tensors (before the ``.json``, the set's
    marker) left the earlier ``.json`` and ``.top.csv`` beside the new scores, both intact, so every reader paired
    the new queries' scores with the earlier query ids. Now the earlier ``.json``/``.top.csv`` go first and
    ``load_scores`` refuses a set without its ``.json``, or one whose files differ from their checksums."""
    from wherefrom.core import scoring
    from wherefrom.core.scoring import Scores, load_scores, save_scores
    from wherefrom.core.store import DamagedFile

    def scores(first_id: str, value: float) -> Scores:
        return Scores([first_id, "q2"], ["t0", "t1", "t2"], ["m"], torch.full((1, 2, 3), value))

    save_scores(scores("earlier", 1.0), tmp_path, "s")
    assert load_scores(tmp_path, "s").query_ids == ["earlier", "q2"]

    class Killed(BaseException):
        pass

    def killed(*_args, **_kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(scoring, "write_json_checked", killed)
        with pytest.raises(Killed):
            save_scores(scores("new", 2.0), tmp_path, "s")
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(DamagedFile, match=r"s\.json is missing"):
        load_scores(tmp_path, "s")
    save_scores(scores("new", 2.0), tmp_path, "s")  # the rerun finishes the set
    loaded = load_scores(tmp_path, "s")
    assert loaded.query_ids == ["new", "q2"] and loaded.total.eq(2.0).all()
    assert "new" in (tmp_path / "s.top.csv").read_text() and "earlier" not in (tmp_path / "s.top.csv").read_text()

    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "s.safetensors").write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match=r"s\.safetensors is damaged"):
        load_scores(tmp_path, "s")


@pytest.mark.parametrize("name", ["../index/shard-00005", "../../escape", "a/b", ".hidden", "..", "", "checksums"])
def test_a_score_set_name_that_is_not_a_file_stem_in_its_folder_is_refused(tmp_path, name):
    """``scores --name ../index/shard-00005`` wrote score data over an index shard (and recorded its checksum, so
    the store was refused and ``index`` did not repair it); ``checksums`` would replace the folder's manifest."""
    from wherefrom.cli.settings import SETTINGS
    from wherefrom.core.scoring import Scores, save_scores

    scores = Scores(["q"], ["t0"], ["m"], torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="score set name"):
        save_scores(scores, tmp_path / "scores", name)
    assert not (tmp_path / "scores").exists() and list(tmp_path.iterdir()) == []
    assert SETTINGS["name"].validate(name) is not None  # the CLI's --name, before any work
    assert SETTINGS["name"].validate("ekfac-v2.1_b") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_unit_rows_of_tiny_huge_and_zero_rows(dtype):
    """``unit_rows`` divides each row by its norm taken in float64: rows of entries about 1e-30 (float32 squares 0;
    ``torch.nn.functional.normalize`` divided them by its eps 1e-12, giving norms of about 1e-18) and float16 rows of
    norm above 65504 come out unit (relative 1e-3 for float16, 1e-6 otherwise); a zero row stays 0."""
    from wherefrom.core.scoring import row_sq_norms, unit_rows

    rows = torch.tensor([[3.0, 4.0], [3e-30, 4e-30], [0.0, 0.0], [3e3, 4e4]], dtype=torch.float64)
    if dtype == torch.float16:
        rows = rows[[0, 2, 3]]  # 3e-30 is 0 in float16
    unit = unit_rows(rows.to(dtype))
    assert unit.dtype == dtype and torch.isfinite(unit).all()
    norms = row_sq_norms(unit).sqrt()
    zero = (rows == 0).all(1)
    tolerance = 1e-3 if dtype == torch.float16 else 1e-6
    assert torch.allclose(norms[~zero], torch.ones_like(norms[~zero]), rtol=tolerance, atol=0)
    assert (unit[zero] == 0).all()
    assert torch.allclose(unit.double()[0], torch.tensor([0.6, 0.8], dtype=torch.float64), rtol=tolerance)
