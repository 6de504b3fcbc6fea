"""Saving and restoring a run at an update boundary, whatever the backend (torchtitan's CheckpointManager).

    manager = CheckpointManager(backend, cfg.checkpoint, cfg.checkpoint_dir, cfg.to_dict(),
                                parts={"train": state, "loader": loader}, tensors={"ema": ema})
    step = manager.load("auto")   # or a tag folder; restores every part and this rank's RNG streams
    manager.maybe_save(step)      # when due (checkpoint.every_steps, epoch ends); manager.save(step): now
                                  # (every rank; the pointer moves only after all of them finished)

The backend writes the model and optimizer; every other part is Stateful (state_dict / load_state_dict):
JSON parts go into client_state.json, tensor parts into <name>.safetensors (rank 0), each rank's RNG
streams into rng_rank{r}.pt. The file layout and the `latest_complete` pointer are pretrain.runs'.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Callable, Optional, Protocol

import torch

from .. import runs
from ..compat import peer_stopped
from ..config import CheckpointSection
from ..io import save_failure, write_bytes_atomic
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
    def __init__(self, backend: Backend, section: CheckpointSection, ckpt_dir: str, run_config: dict,
                 parts: dict[str, Stateful], tensors: Optional[dict[str, Stateful]] = None,
                 print0: Callable[[str], None] = print, faults: Optional[Faults] = None):
        """`section`: the config's checkpoint section; `run_config`: the run's whole config, saved in each tag
        and checked against on resume."""
        self.backend, self.section, self.run_config = backend, section, run_config
        self.parts, self.tensors = parts, tensors or {}
        self.dir, self.print0, self.faults = ckpt_dir, print0, faults or Faults()
        self.rank = backend.rank
        self.saved_step = -1  # the update whose state is on disk (saved or resumed from) in this process
        self.last_save_s = 0.0

    # ------------------------------------------------------------------------------------------ save
    def maybe_save(self, step: int, epoch_end: bool = False, last: bool = False) -> Optional[str]:
        """Save after update `step` when it is due: every checkpoint.every_steps updates and at each epoch's
        end, but not at the run's `last` update (its checkpoint follows the final evaluation: `save`)."""
        if last or not (epoch_end or step % self.section.every_steps == 0):
            return None
        return self.save(step)

    def save(self, step: int) -> str:
        """Checkpoint update `step` on every rank; `latest_complete` moves only after all finished."""
        tag = runs.tag_for(step)
        if self.saved_step == step:
            return tag  # this process already saved (or resumed from) this very state
        t0 = time.time()
        path = os.path.join(self.dir, tag)
        self._replace_stale(path, step)
        try:
            self.backend.save(self.dir, tag)
        except RuntimeError as e:  # torch.save's own error never says why (a full disk: "file write failed")
            if peer_stopped(e):
                raise
            raise save_failure(e, path) from None
        runs.save_rng(self.dir, tag, self.rank)
        if self.rank == 0:
            client = {"step": step, "world": self.backend.world,
                      **{name: part.state_dict() for name, part in self.parts.items()}}
            write_bytes_atomic(os.path.join(path, CLIENT), json.dumps(client).encode())
            for name, part in self.tensors.items():
                runs.write_state(os.path.join(path, f"{name}.safetensors"), part.state_dict())
        self.backend.barrier()
        self.faults.in_save(step)
        if self.rank == 0:
            runs.mark_complete(self.dir, tag, json.dumps(self.run_config))
            runs.prune(self.dir, self.section.keep)
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
            ckpt_dir, tag = self.dir, runs.latest_or_fail(self.dir)
        else:
            ckpt_dir, tag = os.path.split(os.path.abspath(resume.rstrip("/")))
            runs.require_complete(ckpt_dir, tag)
        path = os.path.join(ckpt_dir, tag)
        runs.check_files(ckpt_dir, tag)
        self._check_contents(ckpt_dir, tag)
        with open(os.path.join(path, CLIENT)) as f:
            saved = json.load(f)
        runs.check_same_architecture(self.run_config, os.path.join(path, runs.CONFIG))
        mid_epoch = bool(saved.get("loader", {}).get("batches_done"))
        runs.check_same_recipe(self.run_config, os.path.join(path, runs.CONFIG), mid_epoch, self.print0)
        try:
            self.backend.load(ckpt_dir, tag, saved["world"])
        except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
            raise runs.DamagedCheckpointError(f"{path}: the {self.backend.name} backend could not load it "
                                              f"({type(e).__name__}: {str(e)[:300]}); resume from another "
                                              "complete tag") from None
        for name, part in self.parts.items():
            part.load_state_dict(saved[name] if name in saved else _flat(saved, name))
        for name, part in self.tensors.items():
            part.load_state_dict(runs.read_state(os.path.join(path, f"{name}.safetensors")))
        runs.load_rng(ckpt_dir, tag, self.rank)
        self.saved_step = saved["step"]
        self.print0(f"resumed from {path} at update {saved['step']}")
        return saved["step"]


    def _check_contents(self, ckpt_dir: str, tag: str) -> None:
        """The tag's checksums, before anything is loaded or "resumed from" said: rank 0 reads the files
        (the others would read the same shared disk again), every rank learns the verdict."""
        error = None
        if self.rank == 0:
            try:
                runs.check_contents(ckpt_dir, tag)
            except runs.DamagedCheckpointError as e:
                error = e
        bad = torch.tensor([float(error is not None)], device=self.backend.device)
        if self.backend.all_reduce(bad, op=torch.distributed.ReduceOp.MAX).item():
            raise error or runs.DamagedCheckpointError(f"{os.path.join(ckpt_dir, tag)}: damaged (rank 0 says which file)")


def _flat(saved: dict, name: str) -> dict:
    """Checkpoints written before the parts had names kept the train state at the top level."""
    if name == "train":
        return {"step": saved["step"], "nonfinite_total": saved.get("nonfinite_total", 0)}
    raise runs.DamagedCheckpointError(f"{CLIENT} has no {name!r} state: resume from another complete tag")
