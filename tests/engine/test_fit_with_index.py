"""``fit --with-index``: a K-FAC/EK-FAC fit that keeps its per-example gradients (engine/passes.py) writes
RUN/index/ from its own pass, so neither the index nor a later ``scores`` makes a training pass; the store is
the one ``wherefrom index`` builds after a plain ``fit`` (bit for bit: the kept gradients are the same
per-example gradients of the same batches), and a method without index rows is refused before any fit."""

from __future__ import annotations

import pytest
import torch

from tests.engine.robust_workspace import fit_args, invoke, make_workspace
from wherefrom.core.vectors import MARKER, VectorStore, shard_name
from wherefrom.engine.api import Attributor


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("with-index"), n_train=10)


@pytest.fixture
def passes(monkeypatch) -> list[str]:
    """The description of every gradient pass made through :meth:`Attributor.gradients` (index shards,
    queries), in order."""
    made: list[str] = []
    original = Attributor.gradients

    def spy(self, records, loss_fn=None, description="gradients"):
        made.append(description)
        return original(self, records, loss_fn, description)

    monkeypatch.setattr(Attributor, "gradients", spy)
    return made


def rows(folder) -> torch.Tensor:
    store = VectorStore.open(folder / "index")
    store.verify()
    return torch.cat([shard for _start, shard in store.shards()])


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_fit_with_index_writes_the_index_from_the_fits_pass(workspace, passes, strategy):
    code, out = invoke(
        *fit_args(
            workspace, f"{strategy}-with", "--strategy", strategy, "--with-index", "--shard-size", 4, "--batch-size", 4
        )
    )
    assert code == 0, out
    assert "index complete (3 shards written now; 10 rows x " in out
    assert passes == []  # the index shards came from the fit's kept gradients

    code, out = invoke(*fit_args(workspace, f"{strategy}-after", "--strategy", strategy, "--batch-size", 4))
    assert code == 0, out
    code, out = invoke("index", "--run", workspace / f"{strategy}-after", "--shard-size", 4)
    assert code == 0, out
    assert passes == [f"index shard {k}/3" for k in (1, 2, 3)]
    assert torch.equal(rows(workspace / f"{strategy}-with"), rows(workspace / f"{strategy}-after"))

    passes.clear()
    code, out = invoke("scores", "--run", workspace / f"{strategy}-with", "--queries", workspace / "queries.jsonl")
    assert code == 0, out
    assert passes == ["query gradients"]  # the training side read from the index


def test_fit_with_index_resumed_after_losing_shards_gives_the_same_bytes(workspace, passes):
    """What a kill part-way through the index leaves (some shards, no marker): the rerun finds the factors
    intact (no fit, so no kept gradients), recomputes the missing shard in the fit's batches and gives the
    uninterrupted store bit for bit; a second rerun reuses everything."""
    args = fit_args(workspace, "resumed", "--strategy", "ekfac", "--with-index", "--shard-size", 4, "--batch-size", 2)
    assert invoke(*args)[0] == 0
    whole = rows(workspace / "resumed")
    (workspace / "resumed" / "index" / MARKER).unlink()
    (workspace / "resumed" / "index" / shard_name(1)).unlink()
    code, out = invoke(*args)
    assert code == 0, out
    assert "already fitted" in out and "index complete (1 shard written now; " in out
    assert passes == ["index shard 2/3"]
    assert torch.equal(rows(workspace / "resumed"), whole)
    code, out = invoke(*args)
    assert code == 0 and "index complete (0 shards written now; " in out, out
    assert passes == ["index shard 2/3"]


def test_fit_with_index_recomputes_when_shards_split_the_fits_batches(workspace, passes):
    code, out = invoke(*fit_args(workspace, "split", "--strategy", "kfac", "--with-index", "--shard-size", 3))
    assert code == 0, out
    assert "shard_size 3 is not a multiple of batch_size 8" in " ".join(out.split())
    assert passes == [f"index shard {k}/4" for k in (1, 2, 3, 4)]


def test_fit_with_index_refuses_a_method_without_index_rows_before_fitting(workspace):
    code, out = invoke(*fit_args(workspace, "bm25", "--method", "bm25", "--with-index"))
    assert code != 0
    assert "--with-index" in out and "bm25" in out
    assert not (workspace / "bm25" / "method").exists()
