"""Which rank this is, rank-0 printing, and work done on rank 0 of a job with its outcome told to every rank:
reads that would cost too much on every rank (a manifest and its index) and decisions only one rank may take
(the run dir's lock). Imports nothing of ours: the library and the command-line layer both stand on it."""
from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

T = TypeVar("T")


def rank() -> int:
    """This process's rank: the process group's once it exists, else the launcher's (RANK, which the
    command-line layer derives from srun's variables first)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def printer(rank: int) -> Callable[[str], None]:
    """The one rank-0 printer: rank 0 logs and prints a message; the other ranks say nothing."""
    def print0(msg: str) -> None:
        if rank == 0:
            logging.getLogger("pretrain").info(msg)
            print(msg, flush=True)
    return print0


def print0(msg: str) -> None:
    """`printer` for code without a backend at hand: the rank read the one way (`rank()`)."""
    printer(rank())(msg)


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """fn() on rank 0, its result broadcast to the other ranks. An exception there is raised on every rank
    (the same type and message where it pickles; a RuntimeError naming `what` otherwise), so no rank waits
    in a collective that won't come. Without a process group (or with one rank) the caller runs fn itself."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None, None]  # result, error
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:
            failure = e
            box[1] = e if _picklable(e) else RuntimeError(f"rank 0 failed at {what}: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[1] is not None:
        raise box[1]
    return box[0]


def _picklable(e: BaseException) -> bool:
    import pickle
    try:
        return type(pickle.loads(pickle.dumps(e))) is type(e)
    except Exception:
        return False
