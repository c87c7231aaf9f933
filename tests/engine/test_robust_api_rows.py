"""Every public entry point that takes rows checks them as the file loaders do: an empty list, a
repeated id or an invalid row is a DataError naming the rows, before any pass over the model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model, make_records
from wherefrom.core.data import DataError, Record, check_records
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.lexical import BM25
from wherefrom.methods.projection import ProjectedInfluence
from wherefrom.methods.registry import make_method
from wherefrom.methods.representation import RepSim
from wherefrom.methods.tracin import TracIn, tracin_scores
from wherefrom.studies.benchtasks import BenchTask

TRAIN = make_records(4, seed=3)
QUERIES = make_records(2, seed=4, prefix="q")
DUPLICATE = [Record("r0", "ab:", " cd"), Record("r0", "gh ij:", " kl ab")]
BAD = [Record("r0", "ab:", " cd"), Record("r1", "ab:", "   ")]  # an empty completion


def attributor(tokenizer, strategy: str = "identity") -> Attributor:
    return Attributor(build_model("llama"), tokenizer, AttributionConfig(strategy=strategy))


def forbid_forward(monkeypatch, model) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the rows were checked")

    monkeypatch.setattr(model, "forward", boom)


def test_check_records_matches_loader_rules() -> None:
    assert check_records([{"id": 7, "prompt": "p", "completion": "c", "label": 1.0}]) == [Record("7", "p", "c", "1")]
    with pytest.raises(DataError, match=r"^training rows: no rows"):
        check_records([], "training rows")
    with pytest.raises(
        DataError, match=r"training rows, index 1: field 'id': duplicate id 'r0' \(first used at index 0\)"
    ):
        check_records(DUPLICATE, "training rows")
    with pytest.raises(DataError, match=r"query rows, index 1: field 'completion': empty completion"):
        check_records(BAD, "query rows")


@pytest.mark.parametrize("strategy", ["identity", "ekfac", "diagonal"])
def test_attributor_fit_refuses_empty_and_duplicates(tokenizer, monkeypatch, strategy: str) -> None:
    att = attributor(tokenizer, strategy)
    forbid_forward(monkeypatch, att.model)
    with pytest.raises(DataError, match="training rows: no rows"):
        att.fit([])
    with pytest.raises(DataError, match="duplicate id 'r0'"):
        att.fit(DUPLICATE)
    with pytest.raises(DataError, match="empty completion"):
        att.fit(BAD)
    with pytest.raises(DataError, match="duplicate id 'r0'"):  # already-encoded rows: ids checked
        att.fit(att.encode(TRAIN[:1]) + att.encode(DUPLICATE[:1]))


def test_attributor_every_entry_point(tokenizer, monkeypatch) -> None:
    att = attributor(tokenizer)
    att.fit(TRAIN)
    forbid_forward(monkeypatch, att.model)
    calls = {
        "scores(queries, [])": (lambda: att.scores(QUERIES, []), "training rows: no rows"),
        "scores([], train)": (lambda: att.scores([], TRAIN), "query rows: no rows"),
        "scores(queries, dup)": (
            lambda: att.scores(QUERIES, DUPLICATE),
            "training rows, index 1: field 'id': duplicate id 'r0'",
        ),
        "scores(dup, train)": (
            lambda: att.scores(DUPLICATE, TRAIN),
            "query rows, index 1: field 'id': duplicate id 'r0'",
        ),
        "self_influence([])": (lambda: att.self_influence([]), "training rows: no rows"),
        "self_influence(dup)": (lambda: att.self_influence(DUPLICATE), "duplicate id 'r0'"),
        "token_scores(q, [])": (lambda: att.token_scores(QUERIES, []), "training rows: no rows"),
        "token_scores([], t)": (lambda: att.token_scores([], TRAIN), "query rows: no rows"),
        # query_token_scores encoded its queries unchecked, after the training pass (found by code review)
        "query_token_scores([], t)": (lambda: att.query_token_scores([], TRAIN), "query rows: no rows"),
        "query_token_scores(dup, t)": (
            lambda: att.query_token_scores(DUPLICATE, TRAIN),
            "query rows, index 1: field 'id': duplicate id 'r0'",
        ),
        "gradients([])": (lambda: next(att.gradients([])), "no rows"),
        "gradients(dup)": (lambda: next(att.gradients(DUPLICATE)), "duplicate id 'r0'"),
        "preconditioned_queries([])": (lambda: att.preconditioned_queries([]), "query rows: no rows"),
    }
    for name, (call, message) in calls.items():
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
        assert name


def test_valid_rows_still_score_and_ids_are_kept(tokenizer) -> None:
    att = attributor(tokenizer)
    att.fit(TRAIN)
    scores = att.scores(QUERIES, TRAIN)
    assert scores.train_ids == [r.id for r in TRAIN] and scores.query_ids == [q.id for q in QUERIES]
    assert torch.isfinite(scores.total).all()
    # an int id given through a mapping-free Record is kept as the loaders keep it
    assert att.scores(QUERIES, [Record("5", "ab:", " cd")]).train_ids == ["5"]


@pytest.mark.parametrize("name", ["gradsim", "ekfac", "datainf", "exact", "trak", "logra", "repsim", "bm25"])
def test_every_method_refuses_empty_and_duplicate_rows(tokenizer, name: str) -> None:
    options = {"dim": 4} if name == "trak" else {"dim_in": 2, "dim_out": 2} if name == "logra" else {}
    method = make_method(name, build_model("llama"), tokenizer, AttributionConfig(), **options)
    with pytest.raises(DataError, match="training rows: no rows"):
        method.fit([])
    with pytest.raises(DataError, match="duplicate id 'r0'"):
        method.fit(DUPLICATE)
    method.fit(TRAIN)
    with pytest.raises(DataError, match="query rows: no rows"):
        method.scores([], TRAIN)
    with pytest.raises(DataError, match="training rows: no rows"):
        method.scores(QUERIES, [])
    with pytest.raises(DataError, match="query rows, index 1: field 'id': duplicate id 'r0'"):
        method.scores(DUPLICATE, TRAIN)
    assert method.scores(QUERIES, TRAIN).total.shape == (len(QUERIES), len(TRAIN))
    if hasattr(method, "query_vectors"):  # the query side of a search of the method's index
        with pytest.raises(DataError, match="query rows, index 1: field 'completion': empty completion"):
            method.query_vectors(BAD)


def test_direct_classes_and_tracin(tokenizer) -> None:
    model = build_model("llama")
    with pytest.raises(DataError, match="training rows: no rows"):
        BM25().fit([])
    with pytest.raises(DataError, match="duplicate id 'r0'"):
        RepSim(model, tokenizer).scores(QUERIES, DUPLICATE)
    with pytest.raises(DataError, match="training rows: no rows"):
        ProjectedInfluence.trak(model, tokenizer, AttributionConfig(), dim=4).index([])
    # TracIn checks before loading any checkpoint: a missing folder is never reached
    with pytest.raises(DataError, match="query rows: no rows"):
        tracin_scores(None, ["/does/not/exist"], tokenizer, [], TRAIN)
    with pytest.raises(DataError, match="training rows, index 1: field 'id': duplicate id 'r0'"):
        tracin_scores(None, ["/does/not/exist"], tokenizer, QUERIES, DUPLICATE)
    with pytest.raises(DataError, match="query rows, index 1: field 'completion': empty completion"):
        TracIn(lambda: model, ["/does/not/exist"], tokenizer, AttributionConfig()).query_vectors(BAD)


def test_bench_task_rows_are_checked() -> None:
    with pytest.raises(DataError, match="task 'mine': training rows, index 1: field 'id': duplicate id 'r0'"):
        BenchTask("mine", "class", DUPLICATE, QUERIES)
    with pytest.raises(DataError, match="task 'mine': test rows: no rows"):
        BenchTask("mine", "class", TRAIN, [])
    assert BenchTask("mine", "class", TRAIN, QUERIES).train == TRAIN


def test_finetune_and_groundtruth_entry_points(tokenizer, tmp_path) -> None:
    from wherefrom.models.finetune import FinetuneConfig, finetune
    from wherefrom.studies.groundtruth.pbrf import pbrf_influence
    from wherefrom.studies.groundtruth.retrain import measure_queries

    model = build_model("llama")
    with pytest.raises(DataError, match="fine-tuning rows, index 1: field 'id': duplicate id 'r0'"):
        finetune(model, tokenizer, DUPLICATE, FinetuneConfig(epochs=1), tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").iterdir())
    with pytest.raises(DataError, match=r"queries \(query rows\): no rows"):
        pbrf_influence(model, tokenizer, TRAIN, [], [0])
    with pytest.raises(DataError, match=r"train \(training rows\), index 1: field 'id': duplicate id 'r0'"):
        pbrf_influence(model, tokenizer, DUPLICATE, QUERIES, [0])
    with pytest.raises(DataError, match="query rows, index 1: field 'completion': empty completion"):
        measure_queries(model, tokenizer, BAD)


@pytest.mark.parametrize("method", ["ekfac", "gradsim", "trak"])
def test_a_query_left_with_no_token_to_measure_is_named(tokenizer, method):
    """`query_without_eos` leaves out each query's EOS; a query whose only other token is context (an empty prompt,
    a tokenizer without BOS) then had no token left: its measurement 0, every score +0, printed and saved without a
    word. Refused naming the query; the same row with its EOS measured is scored."""
    from wherefrom.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert tokenizer.bos_token_id is None  # the case needs a tokenizer that prepends nothing to an empty prompt
    train = make_records(4, seed=5)
    lone = Record("lone", "", "a")
    built = make_method(method, build_model("llama"), tokenizer, AttributionConfig(query_without_eos=True))
    built.fit(train)
    with pytest.raises(DataError, match=r"query row 'lone': no token of the query is left to measure"):
        built.scores([lone], train)
    measured = make_method(method, build_model("llama"), tokenizer, AttributionConfig())
    measured.fit(train)
    assert torch.isfinite(measured.scores([lone], train).total).all()


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "datainf", "exact", "cg"])
def test_scoring_before_the_fit_names_the_strategy(tokenizer, strategy) -> None:
    """userC: `scores` of an EK-FAC or K-FAC `Attributor` before `fit` raised `KeyError: '...q_proj.s_eigvecs'`. Every
    strategy that needs a fit now says so by name, for scores, token splits and self-influence alike; identity, which
    fits nothing, scores at once."""
    rows = make_records(3, seed=5)
    att = attributor(tokenizer, strategy)
    for call in (
        lambda: att.scores(rows[:1], rows),
        lambda: att.token_scores(rows[:1], rows),
        lambda: att.query_token_scores(rows[:1], rows),
        lambda: att.self_influence(rows),
    ):
        with pytest.raises(RuntimeError, match=rf"strategy '{strategy}' is not fitted: call fit"):
            call()
    att.fit(rows)
    assert torch.isfinite(att.scores(rows[:1], rows).total).all()
    assert torch.isfinite(attributor(tokenizer, "identity").scores(rows[:1], rows).total).all()


def test_scoring_after_an_interrupted_fit_names_the_strategy(tokenizer, monkeypatch) -> None:
    """reviewZ: a fit interrupted part-way (Ctrl-C in a notebook) left its modules and half its state, which scoring
    took as fitted: a KeyError on a factor's name. The fit now leaves nothing behind."""
    from wherefrom.curvature import EKFAC

    rows = make_records(3, seed=5)
    att = attributor(tokenizer, "ekfac")

    def interrupted(self, *args, **kwargs):
        self.state["half"] = torch.zeros(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(EKFAC, "_fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        att.fit(rows)
    with pytest.raises(RuntimeError, match=r"strategy 'ekfac' is not fitted"):
        att.scores(rows[:1], rows)
