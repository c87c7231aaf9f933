"""Many processes with ``torch.distributed``: the process group, the split of rows, and the collectives.

Launch ``fit`` or ``scores`` under ``torchrun``: ``torchrun --nproc_per_node=N -m wherefrom.cli -- fit ...``
(the ``--`` keeps torchrun's parser from taking ``--run`` for its ``--run-path``); several machines
with the usual rendezvous arguments ``--nnodes``, ``--node_rank``, ``--rdzv_endpoint`` or
``--master_addr/--master_port``: nothing else is needed. torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`session` reads them and joins the process
group with ``gloo`` for CPU tensors and, when CUDA is available, ``nccl`` for CUDA tensors
(``"cpu:gloo,cuda:nccl"``). Every process must see the run folder (one machine, or a shared file system).

A single process, without those variables, is the identity: no process group is made, every helper
returns its input (or runs its function) at no cost, and :func:`rank` is 0.

Conventions every distributed command follows:

* **Rows**: each process takes :func:`rows_for_rank` of the training rows, a contiguous block (rank
  ``r`` of ``W`` takes rows ``[floor(r n / W), floor((r + 1) n / W))``), so the concatenation over ranks
  is the rows in their order (not so with ``groups``: results are put back in row order by id, as
  :func:`gather_columns` does). Rows with equal ``groups`` keys go to the rank of the first of them
  (the true Fisher's label draws are counted per identical row, :class:`wherefrom.core.task.DrawCounts`,
  so identical rows must be drawn by one process to draw as one process would).
* **Statistics**: a process accumulates sums and counts over its rows; :func:`sum_over_ranks` and
  :func:`sum_counts` add them over all processes *before* any division by a count, so a fit equals
  the one-process fit up to float rounding of the order of summation.
* **Writes**: only rank 0 writes files (:func:`is_main`); :func:`on_main` runs a function (a check, a
  load, a write) on rank 0 and hands its result, or its exception, to every rank.
* **Results by row**: :func:`gather_rows` concatenates each rank's rows in rank order on every rank;
  :func:`gather_columns` puts the ranks' score columns in training-row order on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
logger = logging.getLogger(__name__)

RENDEZVOUS_NOTE_S = 10.0
"""Seconds :func:`session` waits for the other processes before it says that it is waiting (and where)."""

_ALONE: ContextVar[bool] = ContextVar("wherefrom_alone", default=False)


class NotDistributable(ValueError):
    """A command, method or strategy that cannot run under ``WORLD_SIZE > 1``."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes in all, ``local_rank`` on its machine
    (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; ``0, 1, 0`` without them)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """Read torchrun's variables; ``ValueError`` naming the variable when one is not a valid number."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            text = os.environ.get(name, "")
            try:
                values[name] = int(text) if text.strip() else default
            except ValueError:
                raise ValueError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None
        world = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        if world.size < 1 or not 0 <= world.rank < world.size:
            raise ValueError(f"RANK={world.rank} and WORLD_SIZE={world.size}: need 0 <= RANK < WORLD_SIZE")
        return world


def active() -> bool:
    """Whether a process group of more than one process is joined (and this process is not :func:`alone`)."""
    return not _ALONE.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process acts as the only one: :func:`active` is False, so every helper here is the
    identity (no collective is called) and :func:`refuse` refuses nothing. For work that one process does for
    all inside :func:`on_main`, whose result must not depend on the number of processes (e.g. a sum in one
    fixed order)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def rank() -> int:
    """This process's rank in the joined group (0 without one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Processes in the joined group (1 without one)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank() == 0


def warn_once(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """``warnings.warn(message, category)`` on rank 0 alone: for a finding about state that every rank holds alike
    (all-reduced curvature statistics), which ``torchrun --nproc_per_node=N`` printed N times. One process: a plain
    ``warnings.warn``; ``stacklevel`` counts from the caller, as there. Under ``-W error`` rank 0 alone raises, and
    the other ranks wait for it at their next collective until torch's timeout (every rank raised before)."""
    if is_main():
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def backend() -> str:
    """``"cpu:gloo,cuda:nccl"`` where CUDA is available, else ``"gloo"``."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` under torchrun with CUDA available (one GPU per process; with more processes than GPUs,
    ``LOCAL_RANK`` modulo their count: they share them round robin), else ``None``."""
    world = World.from_env()
    if world.size > 1 and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return None


@contextmanager
def session() -> Iterator[World]:
    """Join the process group described by torchrun's variables for the block, and leave it after.

    A block that ends without an error ends with a barrier, so no rank leaves the group while another
    still communicates; a process that left a group ends through :func:`end_process`. With
    ``WORLD_SIZE`` unset or 1, or a group already joined (by the caller), nothing is done. Raises
    ``ValueError`` for malformed variables, and for ``WORLD_SIZE`` > 1 without ``MASTER_ADDR`` or ``MASTER_PORT``
    (a variable left over from another job); the rendezvous itself is torch's ``env://`` initialisation.
    """
    world = World.from_env()
    if world.size == 1 or (dist.is_available() and dist.is_initialized()):
        yield world
        return
    if not dist.is_available():
        raise NotDistributable(f"WORLD_SIZE={world.size}, but this torch build has no torch.distributed")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # torch's own error named the variable alone
        raise ValueError(
            f"WORLD_SIZE={world.size} is set but {' and '.join(missing)} not, so no process group can form: start the "
            "command with torchrun (which sets them all), or unset WORLD_SIZE and RANK to run in one process"
        )
    device = local_device()
    if device is not None:
        torch.cuda.set_device(device)
    global left_group
    note = threading.Timer(RENDEZVOUS_NOTE_S, waiting_note, args=(world,))
    note.daemon = True
    note.start()
    try:
        dist.init_process_group(backend=backend(), rank=world.rank, world_size=world.size)
    finally:
        note.cancel()
    try:
        yield world
        collective(dist.barrier)  # no rank leaves while another still communicates (after an error: no barrier,
        # the other ranks may never get here)
    finally:
        dist.destroy_process_group()
        left_group = True


def waiting_note(world: World) -> None:
    """Say (a warning in wherefrom's log, on stderr) that rank ``world.rank`` still waits for the other processes
    of its group at ``MASTER_ADDR:MASTER_PORT``: :func:`session` says it after :data:`RENDEZVOUS_NOTE_S` seconds.
    Under torchrun the group forms in well under a second; a wait this long is a process started by hand with
    ``WORLD_SIZE`` set (or left over) and no peers, or a machine of a multi-machine run not started yet."""
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    logger.warning(
        "rank %d of %d has waited %.0f s for the rest of its process group at %s (WORLD_SIZE=%d in the "
        "environment): start the other processes, or unset WORLD_SIZE and RANK to run in one process; torch gives "
        "up after its process-group timeout",
        world.rank,
        world.size,
        RENDEZVOUS_NOTE_S,
        address,
        world.size,
    )


left_group = False
"""Whether this process joined a process group in :func:`session` and has left it (see :func:`end_process`)."""


def end_process(code: int) -> None:
    """End this process now with exit status ``code`` (stdout and stderr flushed, ``os._exit``) when it left a
    process group joined by :func:`session`; otherwise return.

    Why: under ``torchrun`` on gloo a rank sometimes aborted in the C++ teardown at interpreter exit, after
    all its Python code had run and its group was destroyed ("terminate called without an active
    exception", SIGABRT, no Python frame on the stack; 3 of 40 two-process ``index`` runs on a loaded
    2-core machine, 0 of 40 with this exit), failing a command whose results were complete. A command's
    files are written and closed before it returns, so skipping the teardown loses nothing."""
    if left_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def refuse(what: str, hint: str) -> None:
    """Raise :class:`NotDistributable` naming ``what`` (e.g. ``"strategy 'cg'"``) when more than one
    process runs (a joined group, or torchrun's ``WORLD_SIZE > 1``); ``hint`` says what to do instead."""
    if _ALONE.get():
        return
    size = world_size() if active() else World.from_env().size
    if size > 1:
        raise NotDistributable(f"{what} cannot run under torch.distributed (WORLD_SIZE={size}): {hint}")


def refuse_other_arguments(arguments: Mapping[str, Any]) -> None:
    """``ValueError`` on every rank, before any work, when the processes of the group were started with other
    ``arguments`` (``{name: value}``, e.g. a command's flags) than rank 0, naming each that differs with both
    values: rank 0 recorded its settings and wrote its share before the barrier where the others, refusing them,
    had left (a traceback of a closed connection there). One process: nothing."""
    if not active():
        return
    every: list[Any] = [None] * world_size()
    collective(dist.all_gather_object, every, dict(arguments))
    first = every[0]
    differing = [
        f"{name}: rank 0 {first.get(name)!r}, rank {r} {theirs.get(name)!r}"
        for r, theirs in enumerate(every[1:], start=1)
        for name in sorted(set(first) | set(theirs), key=str)
        if first.get(name) != theirs.get(name)
    ]
    if differing:
        raise ValueError(
            f"the {world_size()} processes of this torch.distributed group were started with other arguments "
            f"({'; '.join(differing)}); start every process with the same command"
        )


def rows_for_rank(rows: Sequence[T], groups: Sequence[Hashable] | None = None) -> list[T]:
    """This rank's share of ``rows``, in their order: the contiguous block
    ``rows[floor(r n / W) : floor((r + 1) n / W)]`` for rank ``r`` of ``W`` (block sizes differ by at most
    one; a rank may get no rows when ``n < W``). With ``groups`` (one key per row), each row goes to
    the rank whose block holds the first row of its key, so rows with one key stay in one process.
    One process: every row."""
    size, me, n = world_size(), rank(), len(rows)
    if size == 1:
        return list(rows)

    def owner(position: int) -> int:
        return ((position + 1) * size - 1) // n  # the r with floor(r n / W) <= position < floor((r + 1) n / W)

    if groups is None:
        return list(rows[me * n // size : (me + 1) * n // size])
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} rows")
    first: dict[Hashable, int] = {}
    return [row for i, (row, key) in enumerate(zip(rows, groups)) if owner(first.setdefault(key, i)) == me]


def shards_for_rank(shards: int) -> list[int]:
    """This rank's share of ``shards`` numbered files (index shards): ``k`` with ``k % W == r``, so each
    rank's files are spread over the whole set. One process: every shard."""
    return list(range(rank(), shards, world_size()))


class PeersLost(RuntimeError):
    """A collective operation of the process group failed, as it does when another process of the command has
    ended (killed, or stopped by an error only it saw): gloo raises a plain ``RuntimeError`` ("Connection closed by
    peer"), which a command printed as a traceback (userG: an orphaned rank, its launcher and rank 0 killed)."""


LOST_PEER = ("connection closed", "closed by peer", "reset by peer", "broken pipe", "timed out", "timeout")
"""Words of a collective's ``RuntimeError`` that say a peer is gone (gloo: "Connection closed by peer"; nccl and the
store: timeouts), beside torch's own :class:`torch.distributed.DistError` subclasses."""


def collective(operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``operation(*args, **kwargs)``, a ``torch.distributed`` collective; the error it raises when a peer is gone
    (a ``torch.distributed.DistError``, or a ``RuntimeError`` saying so: :data:`LOST_PEER`) raised as
    :class:`PeersLost`, naming this rank, the operation and the error's first line, and saying what to do: rerun the
    whole command, which resumes from what finished. Any other error (tensors of other shapes, memory) is raised as
    it is (reviewS: it read as a lost peer)."""
    try:
        return operation(*args, **kwargs)
    except RuntimeError as error:
        if not isinstance(error, dist.DistError) and not any(w in str(error).lower() for w in LOST_PEER):
            raise
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise PeersLost(
            f"rank {rank()} of {world_size()}: torch.distributed's {operation.__name__} failed ({first}); another "
            "process of this command has ended (killed, or stopped by an error only it saw: its own output says "
            "which). What finished is kept: rerun the whole command to resume"
        ) from error


def barrier() -> None:
    """Wait until every process gets here (nothing in one process)."""
    if active():
        collective(dist.barrier)


def on_main(function: Callable[[], T]) -> T:
    """``function()`` run on rank 0 alone; its result, or the exception it raised, reaches every rank
    (pickled; an exception by :func:`sendable`; a result that does not pickle raises on every rank). Use it for
    checks, loads and writes that one process must make for all. One process: ``function()``. Rank 0 raises its
    own exception, with its traceback."""
    if not active():
        return function()
    box: list[Any] = [None]
    error: Exception | None = None
    if is_main():
        try:
            value = function()
        except Exception as raised:  # handed to every rank, then raised there too
            error = raised
        else:
            try:  # pickled here, where a failure is caught, not in the broadcast (the others would wait for it)
                box[0] = pickle.dumps((True, value))
            except Exception as raised:
                error = TypeError(
                    f"the result of {getattr(function, '__qualname__', function)} on rank 0 does "
                    f"not pickle, so it cannot reach the other ranks: {raised}"
                )
                error.__cause__ = raised
        if error is not None:
            box[0] = pickle.dumps((False, sendable(error)))
    collective(dist.broadcast_object_list, box, src=0, device=torch.device("cpu"))
    if is_main():
        if error is not None:
            raise error
        return value  # the object itself, not a copy
    ok, received = pickle.loads(box[0])
    if not ok:
        raise received
    return received


def sendable(error: Exception) -> Exception:
    """``error`` when it pickles and unpickles; else a ``RuntimeError`` naming its type, its message and this rank,
    which does: an exception that cannot be pickled (one holding a lock, a file; a local class) would stop the rank
    sending it while the others waited for it, and one whose class cannot be made again from its ``args`` would
    stop the others with an unpickling error in place of its own."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        try:
            message = str(error)
        except Exception:  # its __str__ fails too
            message = object.__repr__(error)
        return RuntimeError(f"{type(error).__name__} on rank {rank()}: {message}")
    return error


def on_every(function: Callable[[], T]) -> T:
    """``function()`` run on every rank; when it raised on any, the exception of the lowest such rank is raised on
    every rank (pickled; :func:`sendable`), so all stop together rather than some waiting for the others in a later
    collective; that rank raises its own, with its traceback. Use it for checks each process makes of its own share
    (e.g. the index shards it reads). One process: ``function()``."""
    if not active():
        return function()
    error: Exception | None = None
    try:
        value = function()
    except Exception as raised:
        error = raised
    every: list[Any] = [None] * world_size()
    collective(dist.all_gather_object, every, None if error is None else sendable(error))
    first = next((r for r, sent in enumerate(every) if sent is not None), None)
    if first is None:
        return value
    raise error if first == rank() else every[first]


@contextmanager
def held_by_main(enter: Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
    """The context ``enter()`` (e.g. a folder's writer lock) held by rank 0 alone for the block; an error
    on entering it (the lock is taken) reaches every rank. One process: ``with enter(): ...``."""
    with ExitStack() as stack:
        on_main(lambda: stack.enter_context(enter()))
        yield


def sum_over_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor replaced by its sum over all ranks (in place, on its own device; returned). Call it
    on sums, before dividing by a count. One process: ``tensors`` unchanged."""
    if active():
        for value in tensors.values():
            collective(dist.all_reduce, value, op=dist.ReduceOp.SUM)
    return tensors


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """``{name: count}`` summed over all ranks (a new dict). One process: a copy of ``counts``."""
    if not active():
        return dict(counts)
    names = sorted(counts)
    total = torch.tensor([int(counts[name]) for name in names], dtype=torch.int64)
    collective(dist.all_reduce, total, op=dist.ReduceOp.SUM)
    return dict(zip(names, total.tolist()))


GATHERED_DTYPES = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
)
"""The dtypes :func:`gather_rows` carries (its ranks agree on one through its index in this tuple)."""


def gather_rows(tensor: torch.Tensor, to_main: bool = False) -> torch.Tensor:
    """The ranks' ``(n_r, ...)`` tensors concatenated along dim 0 in rank order, on every rank, on CPU (with
    ``to_main``: on rank 0 only, the others getting an empty ``(0, ...)`` tensor, so that only rank 0 holds them).

    Ranks may hold different ``n_r``, including 0; the trailing shapes must agree. A rank without rows
    takes the dtype of the ranks with rows (its empty tensor's dtype is whatever its caller could make
    without any row), so every rank sends the same bytes per row. One process: ``tensor`` on CPU.
    Raises ``ValueError`` when ranks with rows hold different dtypes, or a dtype not in
    :data:`GATHERED_DTYPES`."""
    tensor = tensor.detach().cpu().contiguous()
    if not active():
        return tensor
    if tensor.dtype not in GATHERED_DTYPES:
        raise ValueError(f"gather_rows carries {', '.join(map(str, GATHERED_DTYPES))}; got {tensor.dtype}")
    mine = torch.tensor([tensor.shape[0], GATHERED_DTYPES.index(tensor.dtype)], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(world_size())]
    collective(dist.all_gather, everyone, mine)
    counts = [int(size) for size, _ in everyone]
    held = {GATHERED_DTYPES[int(code)] for size, code in everyone if size > 0}
    if len(held) > 1:
        raise ValueError(f"the ranks hold rows of different dtypes ({', '.join(sorted(map(str, held)))}) to gather")
    dtype = held.pop() if held else tensor.dtype
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=dtype)
    padded[: tensor.shape[0]] = tensor
    if to_main:
        parts = [torch.empty_like(padded) for _ in counts] if is_main() else None
        collective(dist.gather, padded, parts, dst=0)
        if parts is None:
            return padded[:0]
    else:
        parts = [torch.empty_like(padded) for _ in counts]
        collective(dist.all_gather, parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_columns(ids: list[str], columns: torch.Tensor, order: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Score columns of every rank, on rank 0, in the order of ``order`` (the training ids).

    ``ids``: the ``n_r`` training ids of this rank's columns; ``columns``: ``(..., n_r)``, the last
    dimension by training row. Returns ``(order as a list, (..., n) in that order)`` on rank 0 and
    ``([], an empty tensor)`` elsewhere. Raises ``ValueError`` when the gathered ids are not ``order``'s
    ids, each once. One process: the columns rearranged into ``order``.
    """
    if active():
        # ids travel as JSON lines (one line per rank) in a byte tensor, so gloo and nccl both carry them
        line = torch.tensor(list((json.dumps(ids) + "\n").encode()), dtype=torch.uint8)
        text = bytes(gather_rows(line, to_main=True).tolist()).decode()
        gathered = gather_rows(columns.movedim(-1, 0), to_main=True).movedim(0, -1)  # held by rank 0 alone
        if not is_main():
            return [], torch.empty(0)
        ids = [row_id for part in text.split("\n")[:-1] for row_id in json.loads(part)]
        columns = gathered
    position = {row_id: j for j, row_id in enumerate(ids)}
    if len(position) != len(ids) or set(position) != set(order) or len(ids) != len(order):
        raise ValueError(
            f"the ranks returned {len(ids)} score columns that are not the {len(order)} training ids, each once"
        )
    index = torch.tensor([position[row_id] for row_id in order], dtype=torch.long)
    return list(order), columns.index_select(-1, index)
