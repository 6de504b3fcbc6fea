"""Saving and restoring a run at an update boundary, whatever the backend (torchtitan's CheckpointManager).

    manager = CheckpointManager(backend, cfg, parts={"train": state, "loader": loader}, tensors={"ema": ema})
    step = manager.load("auto")   # or a tag folder; restores every part and this rank's RNG streams
    manager.save(step)            # every rank; the pointer moves only after all of them finished

The backend writes the model and optimizer; every other part is Stateful (state_dict / load_state_dict):
JSON parts go into client_state.json, tensor parts into <name>.safetensors (rank 0), each rank's RNG
streams into rng_rank{r}.pt. The file layout and the `latest_complete` pointer are pretrain.training.
checkpointing's.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Callable, Optional, Protocol

import torch

from ..config import RunConfig
from ..io import write_bytes_atomic
from . import checkpointing as ckpt
from .backend import Backend
from .faults import Faults

log = logging.getLogger("pretrain")
CLIENT = "client_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LoaderPosition:
    """The training loader's position. The sample order depends on the world size, so a resume on another
    number of ranks continues at the next epoch boundary (the rest of the saved epoch is skipped)."""

    def __init__(self, loader, workers: int, print0: Callable[[str], None]):
        self.loader, self.workers, self.print0 = loader, workers, print0

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        world = self.loader.dataset.world
        if state["world"] != world:
            if state["batches_done"]:
                self.print0(f"world size {state['world']} -> {world}: the rest of epoch {state['epoch']} is "
                            "skipped, data resumes at the next epoch")
                state = {**state, "epoch": state["epoch"] + 1, "batches_done": 0}
            state = {**state, "world": world, "workers": self.workers}
        self.loader.load_state_dict(state)


class CheckpointManager:
    def __init__(self, backend: Backend, cfg: RunConfig, parts: dict[str, Stateful],
                 tensors: Optional[dict[str, Stateful]] = None, print0: Callable[[str], None] = print,
                 faults: Optional[Faults] = None):
        self.backend, self.cfg, self.parts, self.tensors = backend, cfg, parts, tensors or {}
        self.dir, self.print0, self.faults = cfg.checkpoint_dir, print0, faults or Faults()
        self.rank = backend.rank
        self.saved_step = -1  # the update whose state is on disk (saved or resumed from) in this process
        self.last_save_s = 0.0

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int) -> str:
        """Checkpoint update `step` on every rank; `latest_complete` moves only after all finished."""
        tag = ckpt.tag_for(step)
        if self.saved_step == step:
            return tag  # this process already saved (or resumed from) this very state
        t0 = time.time()
        path = os.path.join(self.dir, tag)
        self._replace_stale(path, step)
        self.backend.save(self.dir, tag)
        ckpt.save_rng(self.dir, tag, self.rank)
        if self.rank == 0:
            client = {"step": step, "world": self.backend.world,
                      **{name: part.state_dict() for name, part in self.parts.items()}}
            write_bytes_atomic(os.path.join(path, CLIENT), json.dumps(client).encode())
            for name, part in self.tensors.items():
                ckpt.write_state(os.path.join(path, f"{name}.safetensors"), part.state_dict())
        self.backend.barrier()
        self.faults.in_save(step)
        if self.rank == 0:
            ckpt.mark_complete(self.dir, tag, json.dumps(self.cfg.to_dict()))
            ckpt.prune(self.dir, self.cfg.checkpoint.keep)
        self.backend.barrier()
        self.saved_step, self.last_save_s = step, time.time() - t0
        self.print0(f"saved checkpoint {path} ({self.last_save_s:.1f} s)")
        return tag

    def _replace_stale(self, path: str, step: int) -> None:
        """A stale tag (a crash mid-save, or the future of an older resume point) is replaced. Rank 0 looks
        before any rank can write, and every rank takes the same branch."""
        stale = torch.tensor([float(self.rank == 0 and os.path.exists(path))], device=self.backend.device)
        if self.backend.all_reduce(stale, op=torch.distributed.ReduceOp.MAX).item():
            self.print0(f"replacing {path}: written before this run reached update {step}")
            if self.rank == 0:
                shutil.rmtree(path)
            self.backend.barrier()

    # ------------------------------------------------------------------------------------------ load
    def load(self, resume: str) -> int:
        """Restore `resume` ("auto": the newest complete tag, or a tag folder) and return its update."""
        if resume == "auto":
            ckpt_dir, tag = self.dir, ckpt.latest_or_fail(self.dir)
        else:
            ckpt_dir, tag = os.path.split(os.path.abspath(resume.rstrip("/")))
            ckpt.require_complete(ckpt_dir, tag)
        path = os.path.join(ckpt_dir, tag)
        ckpt.check_files(ckpt_dir, tag)
        with open(os.path.join(path, CLIENT)) as f:
            saved = json.load(f)
        ckpt.check_same_architecture(self.cfg, os.path.join(path, "config.json"))
        try:
            self.backend.load(ckpt_dir, tag, saved["world"])
        except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
            raise ckpt.DamagedCheckpointError(f"{path}: the {self.backend.name} backend could not load it "
                                              f"({type(e).__name__}: {str(e)[:300]}); resume from another "
                                              "complete tag") from None
        for name, part in self.parts.items():
            part.load_state_dict(saved[name] if name in saved else _flat(saved, name))
        for name, part in self.tensors.items():
            part.load_state_dict(ckpt.read_state(os.path.join(path, f"{name}.safetensors")))
        ckpt.load_rng(ckpt_dir, tag, self.rank)
        self.saved_step = saved["step"]
        self.print0(f"resumed from {path} at update {saved['step']}")
        return saved["step"]


def _flat(saved: dict, name: str) -> dict:
    """Checkpoints written before the parts had names kept the train state at the top level."""
    if name == "train":
        return {"step": saved["step"], "nonfinite_total": saved.get("nonfinite_total", 0)}
    raise ckpt.DamagedCheckpointError(f"{CLIENT} has no {name!r} state: resume from another complete tag")
