"""Preemption: Slurm's warning (SIGUSR1, before the time limit or a preemption) and SIGTERM.

    with Preemption() as signals:      # handlers installed, the previous ones restored on exit
        ... signals.code ...           # 0, USR1 or TERM (the strongest seen), polled at update boundaries

The loop agrees on the code across ranks (one all-reduce per update) and then calls `act`, which
checkpoints and raises `Preempted` with the exit code: USR1 saves and requeues (exit 0), TERM saves when
the last save fitted in the budget (exit 143, the code of a process killed by TERM).
"""
from __future__ import annotations

import os
import signal
from typing import Callable

from .. import slurm


class Preempted(SystemExit):
    """Raised after the checkpoint on a preemption signal; the exit code says what happened."""


class Preemption:
    USR1, TERM = 1, 2
    SIGNALS = ((signal.SIGUSR1, USR1), (signal.SIGTERM, TERM))

    def __init__(self) -> None:
        self.code = 0
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        for sig, code in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, lambda s, f, c=code: self._set(c))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _set(self, code: int) -> None:
        self.code = max(self.code, code)


def act(code: int, step: int, save: Callable[[], None], last_save_s: float, term_budget_s: float,
        rank: int, log0: Callable[[str], None]) -> None:
    """What every rank does once all agreed on `code` (nonzero) at update `step`: save, then exit."""
    if code == Preemption.USR1:
        log0(f"preemption warning (SIGUSR1) at update {step}: checkpointing and requeueing")
        save()
        if rank == 0 and slurm.requeue():
            log0(f"requeued job {os.environ['SLURM_JOB_ID']}; it resumes with --resume auto")
        raise Preempted(0)
    if last_save_s <= term_budget_s:
        log0(f"SIGTERM at update {step}: checkpointing (last save took {last_save_s:.1f} s)")
        save()
    else:
        log0(f"SIGTERM at update {step}: no time to checkpoint (last save took {last_save_s:.1f} s > "
             "checkpoint.term_save_budget_s)")
    raise Preempted(143)
