"""The one training loop, for pretraining and fine-tuning, on any backend (pretrain.training.backend).

    Trainer(cfg, resume="auto" | TAG_DIR | None, stage=Stage(...)).fit()

Per update: loader batches (uint8, workers) -> BatchAugment on the device (normalize, erase, Mixup, seeded
by (seed, epoch, micro-batch, rank)) -> forward -> backward (accumulation) -> step on the boundary, which
the optimizer skips on the device when the global gradient norm is non-finite. No host sync per micro-batch:
one per update, where all ranks agree on a preemption signal (USR1: save + requeue; TERM: save within the
budget) and learn whether the update was skipped. Then, on cadence: logs (all-reduced loss), evaluation,
checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import slurm
from ..collective import on_rank0
from ..config import ConfigError, RunConfig, auto_augment_check, raise_failed
from ..data.jpeg import roi_decoder
from ..data.loader import LoaderConfig, ShardLoader
from ..data.transforms import BatchAugment
from ..io import write_bytes_atomic
from ..models import model_from_section
from ..seeding import mix_seed
from . import checkpointing as ckpt
from .backend import Backend, build_backend
from .metrics import MetricsWriter, forward_flops, peak_tflops, topk_counts, topk_metrics
from .optim import WeightEma, build_criterion, build_optimizer, build_scheduler, nonfinite

log = logging.getLogger("pretrain")


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised after the checkpoint on a preemption signal; the exit code says what happened."""


@dataclass
class Stage:
    """What a stage adds to the loop: weights to start from, layer decay, an EMA, what to do at the end."""
    name: str = "pretrain"
    init_weights: Optional[Callable[[torch.nn.Module], None]] = None  # fresh runs only (resume: the checkpoint)
    layer_decay: float = 1.0
    ema_decay: float = 0.0
    on_finish: Optional[Callable[["Trainer", str], None]] = None  # (trainer, final tag): e.g. export


def loader_config(cfg: RunConfig, source: str, split: str) -> LoaderConfig:
    """The shard loader's settings for one split of a run (micro-batch per rank, the run's augmentation)."""
    d = cfg.data
    return LoaderConfig(source, split=split, batch_size=cfg.optim.micro_batch, workers=d.workers, seed=cfg.seed,
                        shuffle_buffer=d.shuffle_buffer, allow_pipe=d.allow_pipe, max_corrupt=d.max_corrupt,
                        on_bad_shard=d.on_bad_shard, retries=d.retries, start_method=d.start_method, aug=cfg.aug,
                        num_classes=cfg.model.num_classes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


class Trainer:
    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, stage: Optional[Stage] = None,
                 training: bool = True):
        self._t_start = time.time()
        self.cfg, self.stage, self.resume = cfg, stage or Stage(), resume
        if self.stage.ema_decay and cfg.zero_stage == 3:
            raise ConfigError("an EMA (finetune.ema_decay) needs whole weights on every rank: use "
                              "optim.zero_stage 0-2 with it")
        raise_failed([auto_augment_check(cfg.aug.auto_augment)])  # timm's parse, before any process group
        slurm.init_env_from_slurm()
        self.backend: Backend = build_backend(cfg)
        self.rank, self.world, self.device = self.backend.rank, self.backend.world, self.backend.device
        self.run_lock = ckpt.RunLock(cfg.run_dir)
        if training:  # first, before anything is built or written: one run at a time in a run dir
            on_rank0(self._claim_run_dir, f"locking {cfg.run_dir}")
        self.accum = cfg.accumulation(self.world)
        self._log0(f"{self.stage.name} on {self.world} rank(s), backend {self.backend.name}"
                   + (f" (ZeRO-{cfg.zero_stage})" if self.backend.name == "deepspeed" else "")
                   + f", {cfg.optim.precision}, device {self.device.type}")
        seed_everything(cfg.seed + self.rank)
        model = model_from_section(cfg.model)
        if self.stage.init_weights is not None and not resume:
            self.stage.init_weights(model)
        self.flops_per_image = forward_flops(model, cfg.model.img_size) if self.rank == 0 and training else 0.0
        self.ema = WeightEma(model, self.stage.ema_decay, self.device) if self.stage.ema_decay else None
        self.optimizer = build_optimizer(model, cfg, self.stage.layer_decay) if training else None
        self.backend.prepare(model, self.optimizer, self.accum)
        self.compiled = self._compile()
        self.step = 0
        self.nonfinite_total = self.nonfinite_run = 0
        self._micro_in_update = 0
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_n = torch.zeros((), device=self.device)
        self._preempt_code = 0
        self.preempt = slurm.PreemptionFlag()  # installed by fit()
        self._grad_norm: Optional[torch.Tensor] = None
        self._last_save_s = 0.0
        self._saved_step = -1
        self._last_eval_step = -1
        self.val_loader = (ShardLoader(loader_config(cfg, cfg.data.val, cfg.data.val_split), self.rank, self.world,
                                       training=False) if cfg.data.val else None)
        self.eval_augment = BatchAugment(cfg.aug, cfg.model.num_classes, self.device, training=False)
        self.train_loader = None
        self.metrics = MetricsWriter(cfg.run_dir, False, False, False, 0, 0)
        if training:
            self._setup_training()
        self._inject_nan = self._parse_injection(os.environ.get("PRETRAIN_INJECT_NAN", ""))
        self._inject_sleep = float(os.environ.get("PRETRAIN_INJECT_SLEEP_S", "0"))  # tests: slow steps down

    # ------------------------------------------------------------------------------------- setup
    def _setup_training(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        if not cfg.data.train:
            raise ConfigError("data.train is empty: point it at the training shards' _info.json")
        if not self.resume:
            ckpt.refuse_existing_run(cfg.run_dir, cfg.checkpoint_dir)
        # The JPEG decoder is built (or found) now, on every node, before any data is read.
        decoder = roi_decoder(cfg.aug.jpeg_roi)
        self._log0("training JPEG decoding: " + (f"libjpeg-turbo, crop only ({decoder.path})" if decoder else
                                                 f"Pillow, whole images (aug.jpeg_roi={cfg.aug.jpeg_roi})"))
        self.train_loader = ShardLoader(loader_config(cfg, cfg.data.train, cfg.data.train_split), self.rank,
                                        self.world, training=True)
        self.updates_per_epoch = len(self.train_loader) // self.accum
        if self.updates_per_epoch < 1:
            raise ConfigError(f"one epoch gives {len(self.train_loader)} micro-batches per rank, fewer than the "
                              f"{self.accum} accumulation steps of one update: use a smaller optim.global_batch")
        self.total_updates = o.max_steps or o.epochs * self.updates_per_epoch
        # Equal whole batches on every rank and whole updates: the share of the split an epoch trains on.
        self.epoch_share = (self.train_loader.epoch_share() * self.updates_per_epoch * self.accum
                            / len(self.train_loader))
        self._log0(f"an epoch is {self.updates_per_epoch} updates: {self.epoch_share:.2%} of the "
                   f"{self.train_loader.num_samples:,} samples of {cfg.data.train} split {cfg.data.train_split!r}")
        self.scheduler = build_scheduler(self.optimizer, cfg, self.updates_per_epoch)
        self.augment = BatchAugment(cfg.aug, cfg.model.num_classes, self.device, training=True)
        self.criterion = build_criterion(cfg.aug)
        if self.resume:
            self._resume(self.resume)
        self.metrics = MetricsWriter(cfg.run_dir, self.rank == 0, cfg.log.tensorboard, cfg.log.progress,
                                     self.total_updates, self.step)

    def _claim_run_dir(self) -> None:
        """Rank 0: the run dir's lock (refused naming the holder), and a writable checkpoint dir."""
        self.run_lock.acquire()
        d = self.cfg.checkpoint_dir
        try:
            os.makedirs(d, exist_ok=True)
            probe = os.path.join(d, f".write_test.{os.getpid()}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"checkpoint dir {d} can't be written ({e.strerror}): set checkpoint.dir (or "
                              "run_dir) to a writable place") from None

    def _compile(self) -> bool:
        """model.compile: torch.compile inside the engine, with inductor's and Triton's caches in a persistent
        folder so a requeued or resumed job reuses the kernels instead of compiling them again."""
        m = self.cfg.model
        if not (self.device.type == "cuda" if m.compile == "auto" else m.compile):
            return False
        if m.attn_impl == "flex" and self.device.type == "cpu":
            raise ConfigError("model.attn_impl=flex with model.compile on CPU: torch's CPU FlexAttention kernel "
                              "cannot read a position bias computed inside the compiled graph; on CPU use "
                              "model.attn_impl=math (or model.compile=false)")
        cache = m.compile_cache or os.path.join(self.cfg.run_dir, "compile_cache")
        warm = os.path.isdir(cache) and any(os.scandir(cache))
        os.makedirs(cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
        self.backend.compile()
        self._log0(f"model compiled with torch.compile (cache {cache}: {'warm' if warm else 'empty'}); the first "
                   "update includes the compilation")
        return True

    @staticmethod
    def _parse_injection(spec: str) -> list:
        """Fault injection for tests: PRETRAIN_INJECT_NAN="update:rank,..." makes `rank`'s loss NaN on one
        micro-batch before `update`; entries fire one per micro-batch, in order, on every rank's list."""
        return [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item]

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            ckpt_dir, tag = self.cfg.checkpoint_dir, ckpt.latest_or_fail(self.cfg.checkpoint_dir)
        else:
            ckpt_dir, tag = os.path.split(os.path.abspath(resume.rstrip("/")))
            ckpt.require_complete(ckpt_dir, tag)
        ckpt.check_files(ckpt_dir, tag)
        with open(os.path.join(ckpt_dir, tag, "client_state.json")) as f:
            saved = json.load(f)
        self._check_same_architecture(os.path.join(ckpt_dir, tag, "config.json"))
        try:
            self.backend.load(ckpt_dir, tag, saved["world"])
        except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
            raise ckpt.DamagedCheckpointError(f"{os.path.join(ckpt_dir, tag)}: the {self.backend.name} backend could "
                                              f"not load it ({type(e).__name__}: {str(e)[:300]}); resume from "
                                              "another complete tag") from None
        self.step = self._saved_step = saved["step"]
        self.nonfinite_total = saved.get("nonfinite_total", 0)
        loader_state = saved["loader"]
        changed = saved["world"] != self.world
        if changed and loader_state["batches_done"]:
            # The sample order depends on the world size: continue at the next epoch boundary.
            self._log0(f"world size {saved['world']} -> {self.world}: the rest of epoch {loader_state['epoch']} "
                       "is skipped, data resumes at the next epoch")
            loader_state = {**loader_state, "epoch": loader_state["epoch"] + 1, "batches_done": 0}
        self.train_loader.load_state_dict({**loader_state, "world": self.world, "workers": max(1, self.cfg.data.workers)}
                                          if changed else loader_state)
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt.read_state(os.path.join(ckpt_dir, tag, "ema.safetensors")))
        ckpt.load_rng(ckpt_dir, tag, self.rank)
        self.scheduler.step_update(self.step)
        self._log0(f"resumed from {os.path.join(ckpt_dir, tag)} at update {self.step} (epoch "
                   f"{self.train_loader.epoch}, micro-batch {self.train_loader.batches_done})")

    ARCHITECTURE_KEYS = ("variant", "img_size", "window_size", "num_classes", "embed_dim", "depths", "num_heads",
                         "ape", "pretrained_window_sizes")

    def _check_same_architecture(self, saved_config: str) -> None:
        """A resume continues the saved run: its model must be the same shape (the state dict would not
        fit, in 30 lines of mismatches); name what changed instead."""
        if not os.path.exists(saved_config):
            return
        with open(saved_config) as f:
            saved = json.load(f).get("model", {})
        now = self.cfg.to_dict()["model"]
        changed = {k: (saved.get(k), now.get(k)) for k in self.ARCHITECTURE_KEYS if k in saved and saved[k] != now[k]}
        if changed:
            shown = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"--resume {os.path.dirname(saved_config)}: the architecture changed since it was saved "
                              f"({shown}); resume with the saved values, or start a new run (fine-tuning moves "
                              "weights to a new size: finetune/run.py --pretrained)")

    # ---------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        try:
            return self._fit()
        finally:  # on every exit (done, preempted, failed): stop loader workers, which ignore SIGTERM
            self.run_lock.release()
            self.metrics.close()
            for loader in (self.train_loader, self.val_loader):
                if loader is not None:
                    loader.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        if self.rank == 0:
            write_bytes_atomic(os.path.join(cfg.run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=1).encode())
        self.metrics.start(self.step if self.resume else None)
        self.preempt.install()
        result: dict = {}
        self._t_last, self._imgs = time.time(), 0
        limit = self.updates_per_epoch * self.accum  # micro-batches used per epoch (a partial update's tail is not)
        while self.step < self.total_updates:
            epoch, micro = self.train_loader.epoch, self.train_loader.batches_done
            for images, labels in self.train_loader:
                micro += 1
                self._imgs += images.shape[0]
                if self._micro_step(images, labels, epoch, micro):
                    result = self._after_update(epoch, result)
                if self.step >= self.total_updates or micro >= limit:
                    break
            if micro < limit and self.step >= self.total_updates:
                break  # finished mid-epoch: the loader keeps its position in the final checkpoint
            if self.train_loader.epoch == epoch:
                self.train_loader.set_epoch(epoch + 1)  # skip the epoch's tail that can't fill an update
            if self.val_loader is not None and not cfg.log.eval_every_steps:
                result.update(self.evaluate(epoch))
            if self.step < self.total_updates:
                self.save()
        if self.val_loader is not None and self._last_eval_step != self.step:
            result.update(self.evaluate())  # a run that stops mid-epoch still reports its final accuracy
        tag = self.save()
        if self.stage.on_finish is not None:
            self.stage.on_finish(self, tag)
        return result

    def _after_update(self, epoch: int, result: dict) -> dict:
        self.step += 1
        self._sync_update()
        if self._t_start is not None:  # the first update of this process: how long a (re)start costs
            first = time.time() - self._t_start
            self._t_start = None
            self.metrics.write({"step": self.step, "time_to_first_step_s": first, "compiled": self.compiled,
                                "epoch_share": self.epoch_share})
            self._log0(f"first update after {first:.1f} s (process group, engine, data, "
                       f"{'compilation, ' if self.compiled else ''}forward/backward)")
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.backend.module)
        if self._inject_sleep:
            time.sleep(self._inject_sleep)
        if self.step % self.cfg.log.every_steps == 0 or self.step == self.total_updates:
            result = {**result, **self._log_step(epoch)}
        if self.cfg.log.eval_every_steps and self.step % self.cfg.log.eval_every_steps == 0:
            result.update(self.evaluate(epoch))
        if self.step % self.cfg.checkpoint.every_steps == 0 and self.step < self.total_updates:
            self.save()
        self._check_preemption()
        return result

    def _check_preemption(self) -> None:
        """All ranks agree on a signal any of them got (USR1 or TERM), at this update boundary (_sync_update)."""
        code = self._preempt_code
        if not code:
            return
        if code == slurm.PreemptionFlag.USR1:
            self._log0(f"preemption warning (SIGUSR1) at update {self.step}: checkpointing and requeueing")
            self.save()
            if self.rank == 0 and slurm.requeue():
                self._log0(f"requeued job {os.environ['SLURM_JOB_ID']}; it resumes with --resume auto")
            raise Preempted(0)
        if self._last_save_s <= self.cfg.checkpoint.term_save_budget_s:
            self._log0(f"SIGTERM at update {self.step}: checkpointing (last save took {self._last_save_s:.1f} s)")
            self.save()
        else:
            self._log0(f"SIGTERM at update {self.step}: no time to checkpoint (last save took "
                       f"{self._last_save_s:.1f} s > checkpoint.term_save_budget_s)")
        raise Preempted(143)

    def _micro_step(self, images, labels, epoch: int, micro: int) -> bool:
        """Forward/backward of one micro-batch; returns whether this was an update boundary.

        Nothing here waits for the device: a non-finite loss on any rank makes the all-reduced gradients and
        so the global gradient norm non-finite, and the optimizer skips that whole update on every rank, on
        the device (SkipNonFinite); the loop learns of it at the update's one host sync (_sync_update).
        """
        x, y = self.augment(images, labels, step_seed=mix_seed(self.cfg.seed, epoch, micro, self.rank))
        self.backend.train()
        loss = self.criterion(self.backend.forward(x), y)
        if self._inject_nan and self._inject_nan[0][0] == self.step + 1:
            if self._inject_nan.pop(0)[1] == self.rank:
                loss = loss * float("nan")
        finite = torch.isfinite(loss.detach())
        self._loss_sum += torch.where(finite, loss.detach(), 0.0)  # the logged mean is over finite losses
        self._loss_n += finite
        self._micro_in_update += 1
        boundary = self._micro_in_update == self.accum
        self.backend.backward(loss, boundary)
        if not boundary:
            return False
        self._micro_in_update = 0
        self._grad_norm = self.backend.step()
        return True

    def _sync_update(self) -> None:
        """The update's one host sync: did any rank get a preemption signal, and was the update skipped for
        a non-finite gradient norm (the same on every rank: the norm is global)?"""
        norm = self._grad_norm if self._grad_norm is not None else torch.zeros(())
        skipped = nonfinite(norm)
        flags = torch.stack([torch.tensor(float(self.preempt.value), device=self.device), skipped.to(self.device)])
        preempt, skipped = self.backend.all_reduce(flags, op=torch.distributed.ReduceOp.MAX).tolist()
        self._preempt_code = int(preempt)
        if not skipped:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self._log0(f"non-finite gradient norm at update {self.step}: update skipped on all ranks "
                   f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)")
        if self.nonfinite_run >= self.cfg.optim.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_run} non-finite updates in a row (optim.max_nonfinite="
                                     f"{self.cfg.optim.max_nonfinite}) at update {self.step}: lower the lr, check "
                                     "the data, or use bf16 instead of fp16")

    # ---------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, epoch: Optional[int] = None) -> dict:
        """Top-1/top-5 over exactly the validation split's samples (and of the EMA weights, if any)."""
        metrics = self._evaluate(self.backend.forward, "val_")
        expected = self.val_loader.num_samples
        if metrics["val_samples"] != expected:  # short or corrupt validation shards: say so, report the truth
            metrics["val_expected"] = expected
            msg = (f"WARNING: evaluated {metrics['val_samples']} of the {expected} validation images the manifest "
                   f"lists ({self.cfg.data.val}): some shards are short or corrupt (python -m pretrain.make_shards "
                   "verify); the accuracy below is over the images read")
            log.warning(msg)
            if self.rank == 0:
                print(msg, flush=True)
        if self.ema is not None:
            def ema_forward(x):
                with self.backend.autocast():
                    return self.ema.module(x).float()
            metrics.update(self._evaluate(ema_forward, "val_ema_"))
        self._last_eval_step = self.step
        self.metrics.write({"step": self.step, **({} if epoch is None else {"epoch": epoch}), **metrics})
        self._log0(f"eval at update {self.step}: top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%"
                   f"  ({metrics['val_samples']} images)"
                   + (f"  EMA top-1 {metrics['val_ema_top1']:.2f}%" if self.ema is not None else ""))
        return metrics

    def _evaluate(self, forward, prefix: str) -> dict:
        self.backend.train(False)
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # top1, top5, count
        for images, labels, valid in self.val_loader:
            x, y = self.eval_augment(images, labels)
            sums += topk_counts(forward(x), y, valid.to(self.device))
        return topk_metrics(self.backend.all_reduce(sums), prefix=prefix)

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self) -> str:
        """Checkpoint the current update on every rank; `latest_complete` moves only after all finished."""
        ckpt_dir, tag = self.cfg.checkpoint_dir, ckpt.tag_for(self.step)
        if self._saved_step == self.step:
            return tag  # this process already saved (or resumed from) this very state
        t0 = time.time()
        path = os.path.join(ckpt_dir, tag)
        # A stale tag (a crash mid-save, or the future of an older resume point) is replaced. Rank 0 looks
        # before any rank can write, and every rank takes the same branch.
        stale = torch.tensor([float(self.rank == 0 and os.path.exists(path))], device=self.device)
        if self.backend.all_reduce(stale, op=torch.distributed.ReduceOp.MAX).item():
            self._log0(f"replacing {path}: written before this run reached update {self.step}")
            if self.rank == 0:
                shutil.rmtree(path)
            self.backend.barrier()
        client = {"step": self.step, "world": self.world, "loader": self.train_loader.state_dict(),
                  "nonfinite_total": self.nonfinite_total, "backend": self.backend.name}
        self.backend.save(ckpt_dir, tag)
        ckpt.save_rng(ckpt_dir, tag, self.rank)
        if self.rank == 0:
            write_bytes_atomic(os.path.join(path, "client_state.json"), json.dumps(client).encode())
            if self.ema is not None:
                ckpt.write_state(os.path.join(path, "ema.safetensors"), self.ema.module.state_dict())
        self.backend.barrier()
        if os.environ.get("PRETRAIN_INJECT_CRASH_IN_SAVE") == str(self.step):
            os._exit(17)  # fault injection for tests: die after writing, before the pointer
        if self.rank == 0:
            ckpt.mark_complete(ckpt_dir, tag, json.dumps(self.cfg.to_dict()))
            ckpt.prune(ckpt_dir, self.cfg.checkpoint.keep)
        self.backend.barrier()
        self._saved_step = self.step
        self._last_save_s = time.time() - t0
        self._log0(f"saved checkpoint {path} ({self._last_save_s:.1f} s)")
        return tag

    # ---------------------------------------------------------------------------------- logging
    def _log0(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)
            print(msg, flush=True)

    def _log_step(self, epoch: int) -> dict:
        """The loss averaged over every micro-batch on every rank since the last record."""
        sums = self.backend.all_reduce(torch.stack([self._loss_sum.float(), self._loss_n.float()]))
        mean_loss = (sums[0] / sums[1].clamp(min=1)).item()
        self._loss_sum.zero_()
        self._loss_n.zero_()
        img_s_rank = self._imgs / max(time.time() - self._t_last, 1e-9)
        self._t_last, self._imgs = time.time(), 0
        lr = max(g["lr"] for g in self.optimizer.param_groups)
        tflops = 3 * self.flops_per_image * img_s_rank / 1e12  # forward + backward ~ 3x forward
        rec = {"step": self.step, "epoch": epoch, "loss": mean_loss, "lr": lr, "img_s_per_rank": img_s_rank,
               "img_s": img_s_rank * self.world, "tflops_per_rank": tflops, "nonfinite_total": self.nonfinite_total}
        if self._grad_norm is not None:
            rec["grad_norm"] = float(self._grad_norm)
        peak = peak_tflops(self.device)
        if peak:
            rec["mfu"] = tflops / peak
        self.metrics.write(rec)
        left = (self.total_updates - self.step) * self.cfg.optim.global_batch / max(rec["img_s"], 1e-9)
        self.metrics.progress(self.step, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_s']:.0f}",
                              eta=f"{left / 3600:.1f}h")
        return rec
