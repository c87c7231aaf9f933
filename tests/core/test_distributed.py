"""torch.distributed helpers and distributed curvature fits: 2 processes on gloo against one process.

Tolerance: the statistics are float64 sums of float32 per-batch products; splitting the rows changes
the batches and the order of summation only, so fitted states agree to rtol 1e-5 (measured: < 1e-6).
"""

from __future__ import annotations

import threading
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from tests.conftest import build_model, make_records, scale_lora_b
from wherefrom.core import distributed
from wherefrom.core.distributed import (
    NotDistributable,
    World,
    gather_columns,
    gather_rows,
    on_every,
    on_main,
    refuse,
    rows_for_rank,
    session,
    shards_for_rank,
    sum_counts,
    sum_over_ranks,
)
from wherefrom.core.store import StageFolder
from wherefrom.core.task import DrawCounts
from wherefrom.curvature.base import DataShape
from wherefrom.curvature.kronecker import KFAC
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.models.tiny import tiny_gpt2, tiny_tokenizer

STRATEGIES = {"ekfac": {}, "kfac": {}, "diagonal": {}, "exact": {"blocks": "module"}, "datainf": {}}
ORDER = ["t3", "t0", "t1", "t2"]


def fitting_rows():
    """14 rows with repeats: the true Fisher draws each identical row's labels by its draw count."""
    rows = make_records(12, seed=1)
    return rows + [rows[0].__class__(f"dup{i}", rows[i].prompt, rows[i].completion) for i in (1, 2)]


def fitted_states(config: dict) -> dict[str, dict[str, torch.Tensor]]:
    model, tokenizer = build_model("llama"), tiny_tokenizer()
    states = {}
    for strategy, options in STRATEGIES.items():
        attributor = Attributor(model, tokenizer, AttributionConfig(strategy=strategy, batch_size=3, **config))
        attributor.fit(fitting_rows(), attributor.new_curvature().__class__(**options))
        states[strategy] = {k: v.cpu() for k, v in attributor.curvature.state.items()}
    return states


def factor(state: dict[str, torch.Tensor], name: str, side: str) -> torch.Tensor:
    """K-FAC's ``A`` (``side="a"``) or ``S`` (``"s"``) of module ``name``: ``Q diag(values) Q^T``."""
    vectors, values = state[f"{name}.{side}_eigvecs"].double(), state[f"{name}.{side}_eigvals"].double()
    return vectors @ torch.diag(values) @ vectors.T


def by_norm(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(n, ...)`` sorted by their norms (the order of DataInf's kept gradients does not matter)."""
    return rows[rows.flatten(1).norm(dim=1).argsort()]


def shared_input_stream(rank: int):
    """Rank 0: one batch in which modules m0 and m2, not m1 between them, read one input tensor (their ``a^T a``
    sums are one tensor); any other rank: no rows."""
    from wherefrom.core.gradients import TokenFactors

    def stream():
        if rank == 0:
            generator = torch.Generator().manual_seed(0)
            shared, other = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
            mask = torch.ones(2, 3, dtype=torch.bool)
            inputs = {"m0": shared, "m1": other, "m2": shared}
            yield 2, {n: TokenFactors(a, torch.randn(2, 3, 2, generator=generator), mask) for n, a in inputs.items()}

    return stream


SHARED_SHAPES = dict.fromkeys(("m0", "m1", "m2"), (2, 4))


class TwoArgs(Exception):
    """Pickles, but does not unpickle (``__reduce__`` makes it again from its one ``args``, a message)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


SHAPES = {"m": (2, 3)}


def fail_with(error: Exception):
    raise error


def raised_on(call) -> tuple[str, str, bool]:
    """``call()``'s exception: its type, its message and whether its traceback reaches :func:`fail_with`."""
    try:
        call()
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        return type(error).__name__, str(error), any(frame.name == "fail_with" for frame in frames)
    raise AssertionError("nothing raised")


def datainf_fit(rows, model=None, **options) -> dict[str, torch.Tensor]:
    """DataInf's fitted state on ``rows`` of the tiny Llama (``model`` when given)."""
    from wherefrom.curvature.datainf import DataInf

    attributor = Attributor(model or build_model("llama"), tiny_tokenizer(), AttributionConfig(strategy="datainf"))
    attributor.fit(rows, DataInf(**options))
    return {k: v.cpu() for k, v in attributor.curvature.state.items()}


def datainf_on_one_row() -> dict[str, torch.Tensor]:
    """DataInf on a float64 model and one row: under two processes rank 0 holds no rows."""
    return datainf_fit(make_records(1, seed=1), build_model("llama").double())


def datainf_bytes(n_rows: int) -> int:
    """Bytes of DataInf's kept float32 per-example gradients of ``n_rows`` rows of the tiny Llama."""
    from wherefrom.curvature.datainf import DataInf

    attributor = Attributor(build_model("llama"), tiny_tokenizer(), AttributionConfig(strategy="datainf"))
    return DataInf().state_bytes(attributor.modules, DataShape(n_rows, 1, 1, 1, 0))


DATAINF_LIMIT = datainf_bytes(len(fitting_rows())) - 1
"""One byte under DataInf's kept gradients of every fitting row, over each process's half."""


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One of ``world`` gloo processes: every helper and strategy; results saved to ``out/rank<r>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        results: dict = {
            "rows": rows_for_rank(list(range(7))),
            "grouped": rows_for_rank(list("abcdefg"), groups=[0, 1, 2, 3, 0, 5, 1]),
            "shards": shards_for_rank(5),
            "sums": sum_over_ranks({"x": torch.full((2,), rank + 1.0, dtype=torch.float64)})["x"],
            "counts": sum_counts({"a": rank + 1, "b": 10}),
            "gathered": gather_rows(torch.arange(rank + 1)),
            "to_main": gather_rows(torch.arange(rank + 1), to_main=True),
            # a rank without rows makes its empty tensor in a default dtype: it takes the dtype of the rows
            "empty_rank": gather_rows(torch.zeros(0, 2) if rank == 0 else torch.ones(1, 2, dtype=torch.float64)),
            "mixed": raised_on(lambda: gather_rows(torch.ones(1, dtype=torch.float32 if rank else torch.float64))),
            "datainf_float64": datainf_on_one_row(),
            "datainf_limit": raised_on(lambda: datainf_fit(fitting_rows(), max_bytes=DATAINF_LIMIT)),
            "shared_sums": KFAC.covariance_sums(shared_input_stream(rank), SHARED_SHAPES),
        }
        ids = ["t0", "t1"] if rank == 0 else ["t2", "t3"]
        results["columns"] = gather_columns(ids, torch.tensor([[rank * 2.0, rank * 2.0 + 1]]), ORDER)
        try:
            on_main(lambda: (_ for _ in ()).throw(ValueError("checked on rank 0")))
        except ValueError as error:
            results["error"] = str(error)
        results["sent"] = {
            "main": raised_on(lambda: on_main(lambda: fail_with(ValueError("held", threading.Lock())))),
            "every": raised_on(
                lambda: on_every(lambda: fail_with(ValueError("held", threading.Lock())) if rank else 0)
            ),
            "lowest": raised_on(lambda: on_every(lambda: fail_with(KeyError(f"rank {rank}")))),
            "unpickled": raised_on(lambda: on_every(lambda: fail_with(TwoArgs(1, 2)) if rank else 0)),
            "result": raised_on(lambda: on_main(threading.Lock)),
            "same": on_main(lambda: SHAPES) is SHAPES,
            "none": on_every(lambda: rank + 10),
        }
        try:
            Attributor(build_model("llama"), tiny_tokenizer(), AttributionConfig(strategy="cg")).fit(fitting_rows())
        except NotDistributable as error:
            results["refused"] = str(error)
        results["states"] = fitted_states({})
        results["empirical"] = fitted_states({"fisher": "empirical"})["diagonal"]
        with warnings.catch_warnings(record=True) as seen:  # about all-reduced statistics: said by rank 0 alone
            warnings.simplefilter("always")
            tokenizer = tiny_tokenizer()
            ekfac = AttributionConfig(strategy="ekfac")  # true Fisher on 2 rows: S singular (ArbitraryBasisWarning)
            Attributor(tiny_gpt2(len(tokenizer)), tokenizer, ekfac).fit(make_records(2, seed=3))
            zero = scale_lora_b(build_model("lora"), 0.0)  # lora_A's gradients are 0 (DegenerateCurvatureWarning)
            Attributor(zero, tokenizer, AttributionConfig(strategy="kfac")).fit(fitting_rows())
        results["warned"] = sorted(w.category.__name__ for w in seen if issubclass(w.category, RuntimeWarning))
        staged = Attributor(build_model("llama"), tiny_tokenizer(), AttributionConfig(batch_size=3))
        staged.fit(fitting_rows(), stages=StageFolder(Path(out) / "stages"))  # rank 0 writes every stage
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    results[0]["folder"] = folder
    return results


def test_helpers_split_and_gather(two_processes):
    rank0, rank1 = two_processes
    assert rank0["rows"] == [0, 1, 2] and rank1["rows"] == [3, 4, 5, 6]  # floor(r n / W) blocks, in order
    assert rank0["grouped"] == ["a", "b", "c", "e", "g"] and rank1["grouped"] == ["d", "f"]
    assert rank0["shards"] == [0, 2, 4] and rank1["shards"] == [1, 3]
    for result in two_processes:
        assert result["sums"].tolist() == [3.0, 3.0]
        assert result["counts"] == {"a": 3, "b": 20}
        assert result["gathered"].tolist() == [0, 0, 1]
        assert result["error"] == "checked on rank 0"
    assert rank0["to_main"].tolist() == [0, 0, 1] and rank1["to_main"].shape == (0,)  # rank 0 alone holds them
    ids, columns = rank0["columns"]
    assert ids == ORDER and columns.tolist() == [[3.0, 0.0, 1.0, 2.0]]
    assert rank1["columns"][0] == []


def test_a_warning_about_all_reduced_curvature_is_said_once(two_processes):
    """userY/reviewX: under torchrun every rank printed the same ``ArbitraryBasisWarning`` (and a zero-curvature
    ``DegenerateCurvatureWarning``), though each is about statistics every rank holds alike: rank 0 says each once,
    the other ranks nothing."""
    rank0, rank1 = two_processes
    assert rank0["warned"] == ["ArbitraryBasisWarning", "DegenerateCurvatureWarning"], rank0["warned"]
    assert rank1["warned"] == [], rank1["warned"]


def test_an_exception_reaches_every_rank_and_its_own_keeps_its_traceback(two_processes):
    """``on_main`` / ``on_every``: the failing rank raises its own exception (traceback kept), the others a copy;
    one that cannot be pickled or unpickled reaches them as a ``RuntimeError`` naming it (they waited for it until
    the timeout before), and a result of ``on_main`` that does not pickle as a ``TypeError``; ``on_every`` raises
    the lowest failing rank's on every rank."""
    rank0, rank1 = (result["sent"] for result in two_processes)
    assert rank0["main"][0] == "ValueError" and rank0["main"][2]
    assert rank1["main"][0] == "RuntimeError" and rank1["main"][1].startswith("ValueError on rank 0: ('held'")
    assert rank1["every"][0] == "ValueError" and rank1["every"][2]
    assert rank0["every"][0] == "RuntimeError" and rank0["every"][1].startswith("ValueError on rank 1: ('held'")
    assert rank0["lowest"] == ("KeyError", "'rank 0'", True) and rank1["lowest"][:2] == ("KeyError", "'rank 0'")
    assert (rank0["none"], rank1["none"]) == (10, 11)
    assert rank1["unpickled"][0] == "TwoArgs" and rank0["unpickled"][:2] == ("RuntimeError", "TwoArgs on rank 1: 1/2")
    for sent in (rank0, rank1):  # a result that does not pickle: rank 0 raised inside the broadcast before
        assert sent["result"][0] == "TypeError" and "on rank 0 does not pickle" in sent["result"][1]
    assert rank0["same"] and not rank1["same"]  # rank 0 gets the object itself, the others a copy


def test_covariance_sums_of_a_shared_input_when_one_process_has_no_rows(two_processes):
    """Rank 0 sums one batch whose modules m0 and m2 share an input, rank 1 has no rows: both processes reduce
    the same sums in the same order and end with the one-process sums (a mismatch made gloo abort)."""
    alone, info = KFAC.covariance_sums(shared_input_stream(0), SHARED_SHAPES)
    assert alone["m0.a_cov"] is alone["m2.a_cov"] and not torch.equal(alone["m0.a_cov"], alone["m1.a_cov"])
    for result in two_processes:
        sums, counts = result["shared_sums"]
        assert counts == info and sums.keys() == alone.keys()
        assert all(torch.equal(sums[n], value) for n, value in alone.items())


def test_a_rank_without_rows_gathers_in_the_dtype_of_the_rows(two_processes):
    """``gather_rows``: a rank without rows takes the other ranks' dtype (its float32 empty tensor against float64
    rows made gloo abort: "Received data size doesn't match expected size"); ranks whose rows differ in dtype
    are refused on every rank (no hang)."""
    for result in two_processes:
        assert result["empty_rank"].dtype == torch.float64 and result["empty_rank"].tolist() == [[1.0, 1.0]]
        assert result["mixed"][0] == "ValueError" and "different dtypes" in result["mixed"][1]
    alone = datainf_on_one_row()
    for result in two_processes:
        state = result["datainf_float64"]
        assert state.keys() == alone.keys()
        for key, value in alone.items():
            assert state[key].dtype == value.dtype
            assert_close(state[key], value, rtol=1e-5, atol=1e-7 * float(value.abs().max()))


def test_datainf_memory_limit_counts_the_rows_of_every_process(two_processes):
    """DataInf gathers every row's gradients onto every process: its ``max_bytes`` is checked against all rows,
    not a process's share (each half is under the limit; before, the fit went through on both processes)."""
    assert datainf_bytes(9) < DATAINF_LIMIT  # the larger share: rows 0-6 and the copies of rows 1 and 2
    for result in two_processes:
        kind, message, _ = result["datainf_limit"]
        assert kind == "MemoryLimitError" and "the datainf option max_bytes" in message, message
    with pytest.raises(MemoryError, match="the datainf option max_bytes"):
        datainf_fit(fitting_rows(), max_bytes=DATAINF_LIMIT)


def test_strategy_that_iterates_over_all_rows_is_refused_by_name(two_processes):
    message = two_processes[0]["refused"]
    assert "strategy 'cg'" in message and "WORLD_SIZE=2" in message and "ekfac" in message


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, torch.Tensor]]:
    return fitted_states({})


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_fit_the_one_process_curvature(two_processes, one_process, strategy):
    alone = one_process[strategy]
    for result in two_processes:
        state = result["states"][strategy]
        assert set(state) == set(alone)
        for key, value in alone.items():
            if "eigvecs" in key:  # eigenvectors are defined up to sign (and rotation in ties): compare A, S
                name, side = key.rsplit(".", 1)[0], key.rsplit(".", 1)[1][0]
                scale = float(alone[f"{name}.{side}_eigvals"].max())
                assert_close(factor(state, name, side), factor(alone, name, side), rtol=1e-5, atol=1e-5 * scale)
            elif key.endswith(".gradients"):  # datainf keeps every row's gradient, gathered in rank order
                assert_close(by_norm(state[key]), by_norm(value), rtol=1e-5, atol=1e-7)
            elif "eigenvalues" in key and strategy == "ekfac":  # the corrected eigenvalues live in that basis
                assert_close(state[key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()))
            else:
                assert_close(state[key], value, rtol=1e-5, atol=1e-7 * float(value.abs().max()))


def test_a_fit_resumes_from_stages_written_by_two_processes(two_processes, one_process):
    """The stages hold the label-draw counts of both ranks: a one-process fit that reuses the covariances
    and eigenbases draws the eigenvalue correction's labels as a fit from scratch does."""
    stages = StageFolder(two_processes[0]["folder"] / "stages")
    assert stages.path("eigenvalue correction").exists()
    stages.path("eigenvalue correction").unlink()
    attributor = Attributor(build_model("llama"), tiny_tokenizer(), AttributionConfig(batch_size=3))
    attributor.fit(fitting_rows(), stages=stages)
    assert stages.path("eigenvalue correction").exists()  # recomputed here, the other two reused
    for key, value in one_process["ekfac"].items():
        if key.endswith(".eigenvalues"):
            assert_close(attributor.curvature.state[key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()))


def test_empirical_fisher_fits_the_same_under_two_processes(two_processes):
    alone = fitted_states({"fisher": "empirical"})["diagonal"]
    for key, value in alone.items():
        assert_close(two_processes[1]["empirical"][key], value, rtol=1e-5, atol=1e-9)


def test_one_process_is_the_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World(0, 1, 0)
    assert rows_for_rank([1, 2, 3]) == [1, 2, 3] and shards_for_rank(3) == [0, 1, 2]
    x = {"x": torch.ones(2)}
    assert sum_over_ranks(x) is x and sum_counts({"a": 2}) == {"a": 2}
    assert on_main(lambda: 5) == 5
    ids, columns = gather_columns(["t0", "t1", "t2", "t3"], torch.tensor([[0.0, 1.0, 2.0, 3.0]]), ORDER)
    assert ids == ORDER and columns.tolist() == [[3.0, 0.0, 1.0, 2.0]]
    with pytest.raises(ValueError, match="not the 4 training ids"):
        gather_columns(["t0", "t1", "t2"], torch.zeros(1, 3), ORDER)
    refuse("strategy 'cg'", "one process")  # nothing to refuse


def test_launch_variables_are_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        World.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"):
        World.from_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(NotDistributable, match=r"command index cannot run under torch.distributed \(WORLD_SIZE=2\)"):
        refuse("command index", "build it in one process")
    # userY: a WORLD_SIZE left over without torchrun's MASTER_ADDR gave torch's bare "environment variable
    # MASTER_ADDR expected, but not set"
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    said = r"WORLD_SIZE=2 is set but MASTER_ADDR not, .* or unset WORLD_SIZE and RANK"
    with pytest.raises(ValueError, match=said), session():
        pass


def test_a_process_waiting_for_its_group_says_so_and_where(monkeypatch, caplog):
    """A process started with WORLD_SIZE=2 and no peer waited in torch's rendezvous without a word (torch gives up
    after its 30-minute process-group timeout); now it says where it waits once RENDEZVOUS_NOTE_S have passed, and a
    group that forms in time says nothing."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "RENDEZVOUS_NOTE_S", 0.05)

    def rendezvous(wait: float):
        def init_process_group(**_):
            time.sleep(wait)
            raise RuntimeError("rendezvous ended")  # a group is not needed to see what was said while waiting

        return init_process_group

    note = "rank 0 of 2 has waited 0 s for the rest of its process group at 127.0.0.1:29999 (WORLD_SIZE=2"
    for wait, said in ((2.0, [note]), (0.0, [])):  # 2 s: time for the note on a loaded machine
        monkeypatch.setattr(dist, "init_process_group", rendezvous(wait))
        caplog.clear()
        with caplog.at_level("WARNING", logger="wherefrom.core.distributed"):
            with pytest.raises(RuntimeError, match="rendezvous ended"), session():
                pass
            time.sleep(0.2)  # a note not cancelled would be said now
        assert [r.getMessage()[: len(note)] for r in caplog.records] == said


def test_gathered_draw_counts_keep_the_latest_count():
    counts = DrawCounts()
    counts.set_state(torch.tensor([[7, 1], [9, 2], [7, 2]]))  # key 7 from two processes: one saw a later pass
    assert counts.next([7, 9]) == [2, 2]


def test_rank_split_ignores_environment_without_a_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rows_for_rank([1, 2, 3]) == [1, 2, 3]  # no process group joined: this process has every row


def test_local_device_is_the_local_ranks_gpu_round_robin(monkeypatch):
    """Under torchrun with CUDA: ``cuda:LOCAL_RANK`` modulo the GPUs (more processes than GPUs share them round
    robin); one process, or no CUDA: ``None`` (the command's own ``--device`` decides)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for local_rank, expected in ((0, "cuda:0"), (1, "cuda:1"), (3, "cuda:1")):
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert str(distributed.local_device()) == expected
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.local_device() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device() is None


def orphan_worker(rank: int, init_file: str, out: str) -> None:
    """Rank 0 joins the group and ends at once (as ``kill -9`` ends it); rank 1 then meets the group's barrier and
    a sum, and saves what each raised to ``out/orphan.pt``."""
    import os

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    if rank == 0:
        os._exit(0)
    time.sleep(1)  # rank 0 has gone
    try:
        raised = {"barrier": raised_on(distributed.barrier), "sum": raised_on(lambda: sum_counts({"a": 1}))}
        torch.save(raised, Path(out) / "orphan.pt")
    finally:
        os._exit(0)  # its group's teardown would wait for rank 0


def test_a_collective_without_its_peers_raises_peers_lost_naming_the_rank_and_what_to_do(tmp_path):
    """userG: an orphaned torchrun rank (its launcher and rank 0 killed) ended in gloo's traceback at a barrier
    ("Connection closed by peer", a plain ``RuntimeError``). Every collective now raises
    :class:`wherefrom.core.distributed.PeersLost` (a ``RuntimeError``) naming the rank, the operation and gloo's
    line, and saying to rerun the command; the CLI prints it as one line (``tests/cli/test_distributed.py``)."""
    mp.spawn(orphan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    raised = torch.load(tmp_path / "orphan.pt", weights_only=False)
    for operation, (name, message, _) in {"barrier": raised["barrier"], "all_reduce": raised["sum"]}.items():
        assert name == "PeersLost", (name, message)
        assert message.startswith(f"rank 1 of 2: torch.distributed's {operation} failed ("), message
        assert message.endswith("What finished is kept: rerun the whole command to resume"), message
    assert issubclass(distributed.PeersLost, RuntimeError)


def test_a_collectives_own_error_is_not_taken_for_a_lost_peer():
    """reviewS: every ``RuntimeError`` of a collective read as "another process has ended", a programming error
    (tensors of other shapes) or a lack of memory too. Only an error saying a peer is gone becomes ``PeersLost``."""

    def raising(message: str):
        def operation():
            raise RuntimeError(message)

        return operation

    with pytest.raises(distributed.PeersLost, match=r"rank 0 of 1: torch\.distributed's operation failed"):
        distributed.collective(raising("[pair.cc:553] Connection closed by peer [127.0.0.1]:51891"))
    with pytest.raises(RuntimeError, match=r"^Tensors must have the same shape$") as kept:
        distributed.collective(raising("Tensors must have the same shape"))
    assert type(kept.value) is RuntimeError
