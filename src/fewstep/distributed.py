"""Work over several processes with torch.distributed (launched by ``torchrun``).

``optimize``: the teacher's work is sharded (each rank solves its slice of the batch and the slices are
gathered, so every rank holds the same teacher states); the method then runs on every rank on identical
inputs, and rank 0's schedule is broadcast so all ranks return exactly the same one. ``tune``: the
teacher is sharded the same way, and the cells of each stage are dealt out to the ranks (``deal``), each
run whole on one rank (``local``: no collectives inside), their rows gathered so every rank holds every
result and takes the same next step. A rank whose share fails reports it in the gather, and every rank
raises ``RankFailure`` naming it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """A rank's share of the work failed: raised on every rank, so none waits for it."""


_LOCAL = [0]  # depth of ``local`` blocks: inside one, this process works alone


def _group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def active() -> bool:
    """Whether the work is spread over ranks here (a process group of 2 or more, outside ``local``)."""
    return _group() and not _LOCAL[0]


def rank() -> int:
    """This process's rank (0 without a process group), inside ``local`` blocks too."""
    return dist.get_rank() if _group() else 0


def world() -> int:
    return dist.get_world_size() if _group() else 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """A block this rank runs alone (a cell dealt to it): inside it ``shard_map`` and ``on_every_rank`` run
    on this rank only, with no collective."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPU); False if not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def finish() -> None:
    """Leave the process group: wait for every rank (rank 0 may still be writing files), then tear it
    down, so no rank exits with the backend's threads still running (gloo then aborts the process)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def shard_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int) -> torch.Tensor:
    """``fn`` over this rank's slice of ``x`` (split along the batch), results gathered and concatenated
    along ``dim`` of the output, identical on every rank. Without a process group: ``fn(x)``."""
    if not active():
        return fn(x)
    try:
        mine, failure = fn(x.tensor_split(dist.get_world_size())[dist.get_rank()]), None
    except Exception as e:  # every rank must reach the gather, or the others wait on it forever
        mine, failure = None, f"{type(e).__name__}: {e}"
    _raise_failures(failure)
    return torch.cat(gathered(mine.cpu()), dim=dim).to(mine.device)


def _raise_failures(failure: str | None) -> None:
    """Gather every rank's failure (None: it succeeded); raise on every rank if any failed."""
    failed = [(r, f) for r, f in enumerate(gathered(failure)) if f is not None]
    if failed:
        raise RankFailure("; ".join(f"rank {r} failed: {f}" for r, f in failed))


def on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, rank 0's result returned on all of them; a failure on any rank is raised on
    every rank (none waits for a rank that left). Without a process group: ``fn()``."""
    if not active():
        return fn()
    try:
        result, failure = fn(), None
    except RankFailure:  # raised by a collective: every rank has it already
        raise
    except Exception as e:
        result, failure = None, f"{type(e).__name__}: {e}"
    _raise_failures(failure)
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def deal(fn: Callable[[Any], Any], items: Sequence, weights: Sequence[float], groups: Sequence[Any]) -> list:
    """``[fn(item) for item in items]``, identical on every rank: each item runs on one rank, alone
    (``local``); items of one group run on the same rank (they share what they memoize), the heaviest
    group first to the least loaded rank by the summed ``weights`` (the longest-processing-time rule);
    the results are gathered (picklable). Without a process group: the plain list."""
    if not active():
        return [fn(item) for item in items]
    total: dict[Any, float] = {}
    for g, w in zip(groups, weights):
        total[g] = total.get(g, 0.0) + w
    load, where = [0.0] * world(), {}
    for g in sorted(total, key=lambda g: -total[g]):  # stable: ties in order of first appearance
        where[g] = min(range(world()), key=lambda r: (load[r], r))
        load[where[g]] += total[g]
    owner = [where[g] for g in groups]
    mine, failure = b"", None
    try:
        with local():
            mine = pickle.dumps({i: fn(items[i]) for i, r in enumerate(owner) if r == rank()})
    except Exception as e:  # every rank must reach the gather, or the others wait on it forever
        failure = f"{type(e).__name__}: {e}"
    _raise_failures(failure)
    results = [pickle.loads(p) for p in gathered(mine)]
    return [results[owner[i]][i] for i in range(len(items))]


def from_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (a file it reads or writes), its result (or failure) on every rank."""
    if not active():
        return fn()
    result, failure = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:
            failure = e
    box = [(result, failure)]
    dist.broadcast_object_list(box, src=0)
    if box[0][1] is not None:
        raise box[0][1]
    return box[0][0]


def gathered(value: Any) -> list:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not active():
        return [value]
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, value)
    return parts
