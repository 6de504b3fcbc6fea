"""Work done on rank 0 of a job and its outcome told to every rank: reads that would cost too much on every
rank (a manifest and its index) and decisions only one rank may take (the run dir's lock)."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


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
