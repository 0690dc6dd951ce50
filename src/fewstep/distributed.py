"""Calibration over several processes with torch.distributed (launched by ``torchrun``).

Only the teacher's work is sharded: each rank solves its slice of the calibration batch and the
slices are gathered, so every rank holds the same teacher states. The method then runs on every rank
on identical inputs, and rank 0's schedule is broadcast so all ranks return exactly the same one.
A rank whose share fails reports it in the gather, and every rank raises ``RankFailure`` naming it.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """A rank's share of the work failed: raised on every rank, so none waits for it."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


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
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine.cpu())
    return torch.cat(parts, dim=dim).to(mine.device)


def _raise_failures(failure: str | None) -> None:
    """Gather every rank's failure (None: it succeeded); raise on every rank if any failed."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, failure)
    failed = [(r, f) for r, f in enumerate(parts) if f is not None]
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
