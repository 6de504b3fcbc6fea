"""Fault injection for tests: an object handed to the Trainer (`Trainer(cfg, faults=Faults(...))`), never
read from the environment. tests/faulty_train.py builds one from `--faults JSON` for launched runs."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import UserError


class InjectedError(UserError):
    rank_local = True  # met by one rank alone


@dataclass
class Faults:
    nan: list[tuple[int, int]] = field(default_factory=list)  # (update, rank): that rank's loss is NaN on one
    #   micro-batch before `update`; entries fire one per micro-batch, in order, on every rank's list
    sleep_s: float = 0.0  # after every update: slows a run down so a signal or a second job lands mid-run
    crash_in_save: Optional[int] = None  # every rank exits (17) after writing this update's checkpoint,
    #   before the pointer moves
    pause_until: Optional[str] = None  # after the first update, wait until this file exists (a run kept
    #   alive exactly as long as a test needs it)
    fail: Optional[tuple[int, int]] = None  # (update, rank): that rank alone meets a user error (as a bad
    #   sample of its own shard would be) before `update`; the others wait for it in a collective

    @classmethod
    def from_json(cls, text: str) -> "Faults":
        raw = json.loads(text or "{}")
        return cls(nan=[tuple(x) for x in raw.get("nan", [])], sleep_s=float(raw.get("sleep_s", 0.0)),
                   crash_in_save=raw.get("crash_in_save"), pause_until=raw.get("pause_until"),
                   fail=tuple(raw["fail"]) if raw.get("fail") else None)

    def loss(self, loss: torch.Tensor, update: int, rank: int) -> torch.Tensor:
        if self.fail == (update, rank):
            raise InjectedError(f"rank {rank}: injected failure before update {update} (Faults.fail)")
        if self.nan and self.nan[0][0] == update:
            if self.nan.pop(0)[1] == rank:
                return loss * float("nan")
        return loss

    def after_update(self) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.pause_until:
            deadline = time.time() + 600
            while not os.path.exists(self.pause_until) and time.time() < deadline:
                time.sleep(0.1)
            self.pause_until = None

    def in_save(self, step: int) -> None:
        if self.crash_in_save == step:
            os._exit(17)
