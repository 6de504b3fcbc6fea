"""The one training loop, for pretraining and fine-tuning, on any backend, for any task.

    Trainer(cfg, resume="auto" | TAG_DIR | None, stage=Stage(...)).fit()

load -> for each micro-batch: train_step -> on each update: maybe log, evaluate, save, act on a signal.
A micro-batch: the task's loss (augmentation on the device, seeded by (seed, epoch, micro-batch, rank)) ->
backward (accumulation) -> on the boundary, the step, which the optimizer skips on the device when the
global gradient norm is non-finite. One host sync per update, where all ranks agree on a preemption signal
and learn whether the update was skipped. The parts: the backend (pretrain.training.backend), the task,
the CheckpointManager, the Evaluator, Preemption, StepStats/MetricsWriter.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import runs
from ..collective import printer
from ..config import RunConfig
from ..errors import UserError
from ..seeding import mix_seed
from ..tasks import Task, task_class
from . import data, distributed
from .checkpoint_manager import CheckpointManager, LoaderPosition
from .evaluator import Evaluator
from .faults import Faults
from .metrics import MetricsWriter, StepStats, forward_flops
from .optim import WeightEma, build_optimizer, build_scheduler, nonfinite
from .preemption import Preemption, act
from .probe import KnnProbe


class NonFiniteLossError(UserError, RuntimeError):
    pass


@dataclass
class Stage:
    """What a stage adds to the loop: weights to start from, layer decay, an EMA, the task, the end."""
    name: str = "pretrain"
    init_weights: Optional[Callable[[torch.nn.Module], None]] = None  # fresh runs only (resume: the checkpoint)
    layer_decay: float = 1.0
    ema_decay: float = 0.0
    on_finish: Optional[Callable[["Trainer", str], None]] = None  # (trainer, final tag): e.g. export
    task: Optional[Callable[[RunConfig, torch.device], Task]] = None  # default: the config's `task`


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # in a row, now

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, s: dict) -> None:
        self.step, self.nonfinite_total = s["step"], s.get("nonfinite_total", 0)

    def count_update(self, skipped: bool, max_nonfinite: int, print0: Callable[[str], None]) -> None:
        """After update `step`: was it skipped for a non-finite gradient norm? Too many in a row stop the run."""
        self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
        if not skipped:
            return
        self.nonfinite_total += 1
        print0(f"non-finite gradient norm at update {self.step}: update skipped on all ranks "
               f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)")
        if self.nonfinite_run >= max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_run} non-finite updates in a row (optim.max_nonfinite="
                                     f"{max_nonfinite}) at update {self.step}: lower the lr, check the data, or use "
                                     "bf16 instead of fp16")


class Trainer:
    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, stage: Optional[Stage] = None,
                 faults: Optional[Faults] = None):
        self._t_start = time.time()
        self.cfg, self.stage, self.resume, self.faults = cfg, stage or Stage(), resume, faults or Faults()
        self.run_lock = runs.RunLock(cfg.run_dir)  # first, before anything is built or written
        self.train_loader = self.evaluator = self.probe = self.metrics = None
        try:
            self._build(cfg, resume)
        except BaseException:  # a Trainer that failed to build holds nothing: its lock, its loader workers
            self.close()
            raise

    def _build(self, cfg: RunConfig, resume: Optional[str]) -> None:
        self.backend = b = distributed.join(cfg, self.stage.name, self.stage.ema_decay, self.run_lock)
        self.rank, self.world, self.device, self.print0 = b.rank, b.world, b.device, printer(b.rank)
        self.accum = cfg.accumulation(self.world)
        distributed.seed_everything(cfg.seed + self.rank)
        model = task_class(cfg.task).model_for(cfg)
        if self.stage.init_weights is not None and not resume:
            self.stage.init_weights(model)
        self.stats = StepStats(self.device, forward_flops(model, cfg.model.img_size) if self.rank == 0 else 0.0)
        self.ema = WeightEma(model, self.stage.ema_decay, self.device) if self.stage.ema_decay else None
        self.optimizer = build_optimizer(model, cfg.optim, self.stage.layer_decay)
        b.prepare(model, self.optimizer, self.accum)
        self.compiled = distributed.compile_model(b, cfg, self.print0)
        self.task = (self.stage.task or task_class(cfg.task))(cfg, self.device)
        if not resume:
            runs.refuse_existing_run(cfg.run_dir, cfg.checkpoint_dir)
        self.data = data.plan_training(cfg, b, self.accum, self.print0)
        self.train_loader, self.total_updates = self.data.loader, self.data.total_updates
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.data.updates_per_epoch)
        self.evaluator = (Evaluator(b, data.val_loader(cfg, b), self.task, cfg.data.val, self.print0, cfg.run_dir,
                                    cfg.log.eval_every_steps) if cfg.data.val else None)
        self.probe = KnnProbe(b, cfg, self.task, self.print0) if cfg.probe.data else None
        self.state, self.signals, self._micro, self._grad_norm = TrainState(), Preemption(), 0, None
        self._last_eval, self._last_probe, self._preempt_code, self.result = -1, -1, 0, {}
        self.checkpoints = CheckpointManager(
            b, cfg.checkpoint, cfg.checkpoint_dir, cfg.to_dict(),
            {"train": self.state, "loader": LoaderPosition(self.train_loader, cfg.data.workers, self.print0)},
            {"ema": self.ema} if self.ema else {}, self.print0, self.faults)
        if resume:
            self.checkpoints.load(resume)
        self.scheduler.step_update(self.state.step)
        self.metrics = MetricsWriter(cfg.run_dir, self.rank == 0, cfg.log.tensorboard, cfg.log.progress,
                                     self.total_updates, self.state.step, cfg.log.every_steps)

    # ------------------------------------------------------------------------------------ one step
    def train_step(self, batch: tuple, step_seed: Optional[int] = None) -> bool:
        """One micro-batch; on the accumulation boundary also the step and the update's host sync: returns
        whether an update finished. A non-finite loss on any rank makes the global gradient norm non-finite
        and the optimizer skips that update on every rank, on the device (SkipNonFinite): no wait before."""
        self.backend.train()
        loss = self.faults.loss(self.task.train_loss(self.backend.forward, batch, step_seed), self.state.step + 1,
                                self.rank)
        self.stats.add(loss.detach(), batch[0].shape[0])
        self._micro += 1
        boundary = self._micro == self.accum
        self.backend.backward(loss, boundary)
        if not boundary:
            return False
        self._micro, self._grad_norm = 0, self.backend.step()
        self.state.step += 1
        self._sync_update()
        return True

    def _sync_update(self) -> None:
        """Did any rank get a preemption signal, and was the update skipped (the same on every rank: the
        norm is global)?"""
        skipped = nonfinite(self._grad_norm if self._grad_norm is not None else torch.zeros(()))
        flags = torch.stack([torch.tensor(float(self.signals.code), device=self.device), skipped.to(self.device)])
        preempt, skipped = self.backend.all_reduce(flags, op=torch.distributed.ReduceOp.MAX).tolist()
        self._preempt_code = int(preempt)
        self.state.count_update(bool(skipped), self.cfg.optim.max_nonfinite, self.print0)

    # ------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        try:
            with Preemption() as self.signals:
                return self._fit()
        finally:
            self.close()

    def close(self) -> None:
        """On every exit (done, preempted, failed, or failed to build): the run dir's lock, and the loader
        workers (which ignore SIGTERM)."""
        self.run_lock.release()
        for part in (self.metrics, self.train_loader, self.evaluator, self.probe):
            if part is not None:
                part.close()

    def _fit(self) -> dict:
        cfg, state = self.cfg, self.state
        if self.rank == 0:
            os.makedirs(cfg.run_dir, exist_ok=True)
            runs.write_config(cfg.run_dir, cfg.to_dict())
        self.metrics.start(state.step if self.resume else None)
        if self.probe is not None and not self.resume:
            self._probe(None)  # update 0: the initial encoder's features, the baseline the curve starts from
        while state.step < self.total_updates:
            epoch, finished = self._epoch()
            if not finished:
                break  # finished mid-epoch: the loader keeps its position in the final checkpoint
            self._measure(epoch, self.evaluator is not None and self.evaluator.should_run(state.step, epoch_end=True))
            self.checkpoints.maybe_save(state.step, epoch_end=True, last=state.step >= self.total_updates)
        # A run that stops mid-epoch still reports its final accuracy (and probe).
        self._measure(None, self.evaluator is not None and self._last_eval != state.step, last=True)
        tag = self.checkpoints.save(state.step)
        if self.stage.on_finish is not None:
            self.stage.on_finish(self, tag)
        return self.result

    def _epoch(self) -> tuple[int, bool]:
        """One epoch's micro-batches (from the loader's position); whether the epoch ran to its end."""
        loader, epoch = self.train_loader, self.train_loader.epoch
        micro, limit = loader.batches_done, self.data.updates_per_epoch * self.accum  # a partial update's tail is unused
        for batch in loader:
            micro += 1
            if self.train_step(batch, mix_seed(self.cfg.seed, epoch, micro, self.rank)):
                self._after_update(epoch)
            if self.state.step >= self.total_updates or micro >= limit:
                break
        if micro < limit and self.state.step >= self.total_updates:
            return epoch, False
        if loader.epoch == epoch:
            loader.set_epoch(epoch + 1)  # skip the epoch's tail that can't fill an update
        return epoch, True

    def _after_update(self, epoch: int) -> None:
        step = self.state.step
        if self._t_start is not None:  # the first update of this process: how long a (re)start costs
            self.metrics.first_update(step, time.time() - self._t_start, self.compiled, self.data.epoch_share,
                                      self.print0)
            self._t_start = None
        self.scheduler.step_update(step)
        if self.ema is not None:
            self.ema.update(self.backend.module)
        self.faults.after_update()
        if self.metrics.should_log(step):
            self._log(epoch)
        self._measure(epoch, self.evaluator is not None and self.evaluator.should_run(step))
        self.checkpoints.maybe_save(step, last=step >= self.total_updates)
        if self._preempt_code:  # every rank agreed on it at this update's sync
            act(self._preempt_code, step, lambda: self.checkpoints.save(step), self.checkpoints.last_save_s,
                self.checkpoints.section.term_save_budget_s, self.rank, self.print0)

    def _measure(self, epoch: Optional[int], evaluate: bool, last: bool = False) -> None:
        """The evaluation when due, then the probe when due (probe.every_steps, or with the evaluation); the
        last update gets both (`last`)."""
        if evaluate:
            self.evaluate(epoch)
        step = self.state.step
        if self.probe is not None and self._last_probe != step and (last or self.probe.should_run(step, evaluate)):
            self._probe(epoch)

    def _probe(self, epoch: Optional[int]) -> None:
        step = self.state.step
        m = self.probe.report(step)
        self._last_probe, self.result = step, {**self.result, **m}
        self.metrics.write({"step": step, **({} if epoch is None else {"epoch": epoch}), **m})
        self.metrics.note(knn=f"{m['probe_knn_top1']:.1f}%")

    def evaluate(self, epoch: Optional[int] = None) -> dict:
        """The task's metrics on the validation split (and of the EMA weights, if any)."""
        m = self.evaluator.report(self.state.step, self.ema)
        self._last_eval, self.result = self.state.step, {**self.result, **m}
        self.metrics.write({"step": self.state.step, **({} if epoch is None else {"epoch": epoch}), **m})
        return m

    def _log(self, epoch: int) -> None:
        s = self.state
        rec = {"step": s.step, "epoch": epoch, **self.stats.record(self.backend.all_reduce, self.world),
               "lr": max(g["lr"] for g in self.optimizer.param_groups), "nonfinite_total": s.nonfinite_total,
               **({} if self._grad_norm is None else {"grad_norm": float(self._grad_norm)})}
        self.metrics.log_step(rec, self.total_updates, self.cfg.optim.global_batch)
        self.result = {**self.result, **rec}
