"""The pretraining engine: DeepSpeed ZeRO around our Swin, fed by the shard loader.

`Trainer(cfg, resume).fit()`; the same code runs on CUDA/NCCL and, for tests, on CPU/gloo
(`DS_ACCELERATOR=cpu`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from . import run_checkpoint as rc
from . import slurm
from .config import ConfigError, RunConfig, TrainConfig
from .data.loader import LoaderConfig, ShardLoader, _mix
from .data.transforms import BatchAugment
from .models import build_model

log = logging.getLogger("pretrain")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "L40S": 362.0}  # bf16 dense


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised after the checkpoint on a preemption signal; the exit code says what happened."""


def skips_weight_decay(name: str, p: torch.Tensor, skip: set) -> bool:
    """Official recipe: no weight decay on 1-D params (norms), biases, and `model.no_weight_decay()`
    (bias tables, ape)."""
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if skips_weight_decay(name, p, skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    o = cfg.optim
    ds = {
        "train_batch_size": o.global_batch,
        "train_micro_batch_size_per_gpu": o.micro_batch,
        "gradient_accumulation_steps": cfg.accumulation(world),
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": o.zero_stage},
        "bf16": {"enabled": o.precision == "bf16"},
        "fp16": {"enabled": o.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def loader_config(cfg: RunConfig, source: str, split: str) -> LoaderConfig:
    """The shard loader's settings for one split of a run (micro-batch per rank, the run's augmentation)."""
    d = cfg.data
    return LoaderConfig(source, split=split, batch_size=cfg.optim.micro_batch, workers=d.workers, seed=cfg.seed,
                        shuffle_buffer=d.shuffle_buffer, allow_pipe=d.allow_pipe, max_corrupt=d.max_corrupt,
                        on_bad_shard=d.on_bad_shard, retries=d.retries, aug=cfg.aug)


def model_from_section(cfg: TrainConfig) -> torch.nn.Module:
    m = cfg.model
    arch = {k: getattr(m, k) for k in ("embed_dim", "depths", "num_heads") if getattr(m, k) is not None}
    model = build_model(m.variant, img_size=m.img_size, window_size=m.window_size, num_classes=m.num_classes,
                        drop_path_rate=m.drop_path_rate, ape=m.ape, attn_impl=m.attn_impl, **arch)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def topk_counts(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits, samples] over the valid entries of a batch (float64, for all-reduce)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return torch.stack([(hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum(), valid.sum()]).double()


def topk_metrics(sums: torch.Tensor, prefix: str = "") -> dict:
    """Summed `topk_counts` (all ranks) -> top-1 / top-5 in percent and the sample count."""
    n = max(sums[2].item(), 1.0)
    return {f"{prefix}top1": 100 * sums[0].item() / n, f"{prefix}top5": 100 * sums[1].item() / n,
            f"{prefix}samples": int(sums[2].item())}


def forward_flops(model: torch.nn.Module, img_size: int) -> float:
    """FLOPs of one forward pass on one image (torch's FLOP counter on the CPU model)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    return float(counter.get_total_flops())


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        slurm.init_env_from_slurm()
        deepspeed.init_distributed(timeout=timedelta(seconds=cfg.dist_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.acc = get_accelerator()
        self.device = torch.device(self.acc.current_device_name())
        self.accum = cfg.accumulation(self.world)
        if not cfg.data.train:
            raise ConfigError("data.train is empty: point it at the training shards' _info.json")
        torch.manual_seed(cfg.seed + self.rank)
        model = model_from_section(cfg)
        self.flops_per_image = forward_flops(model, cfg.model.img_size) if self.rank == 0 else 0.0
        o = cfg.optim
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=cfg.lr, betas=tuple(o.betas),
                                           eps=o.eps, **({"fused": True} if fused else {}))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    config=deepspeed_config(cfg, self.world))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[o.precision]
        self.train_loader = ShardLoader(loader_config(cfg, cfg.data.train, cfg.data.train_split), self.rank,
                                        self.world, training=True)
        self.val_loader = (ShardLoader(loader_config(cfg, cfg.data.val, cfg.data.val_split), self.rank, self.world,
                                       training=False) if cfg.data.val else None)
        self.updates_per_epoch = len(self.train_loader) // self.accum
        if self.updates_per_epoch < 1:
            raise ConfigError(f"one epoch gives {len(self.train_loader)} micro-batches per rank, fewer than the "
                              f"{self.accum} accumulation steps of one update: use a smaller optim.global_batch")
        self.total_updates = o.max_steps or o.epochs * self.updates_per_epoch
        warmup = int(o.warmup_epochs * self.updates_per_epoch)
        scale = o.global_batch / o.lr_scale_batch
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, (o.epochs * self.updates_per_epoch) - warmup),
            lr_min=o.min_lr * scale, warmup_lr_init=o.warmup_lr * scale, warmup_t=warmup, warmup_prefix=True,
            cycle_limit=1, t_in_epochs=False)
        self.augment = BatchAugment(cfg.aug, cfg.model.num_classes, self.device, training=True)
        self.eval_augment = BatchAugment(cfg.aug, cfg.model.num_classes, self.device, training=False)
        mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
        self.criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(cfg.aug.label_smoothing)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self._metrics = None
        self._tb = None
        self._last_save_s = 0.0
        self._last_eval_step = -1
        if resume:
            self._resume(resume)
        self._inject_nan = self._parse_injection(os.environ.get("PRETRAIN_INJECT_NAN", ""))
        self._inject_sleep = float(os.environ.get("PRETRAIN_INJECT_SLEEP_S", "0"))  # tests: slow steps down

    # ------------------------------------------------------------------------------------- setup
    @staticmethod
    def _parse_injection(spec: str) -> list:
        """Fault injection for tests: PRETRAIN_INJECT_NAN="update:rank,..." makes `rank`'s loss NaN on one
        micro-batch before `update`; entries fire one per micro-batch, in order, on every rank's list."""
        return [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item]

    def _resume(self, resume: str) -> None:
        ckpt_dir = self.cfg.checkpoint_dir
        if resume == "auto":
            tag = rc.latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
            if tag is None:
                raise FileNotFoundError(f"--resume auto: no complete checkpoint in {ckpt_dir}; start without "
                                        "--resume for a fresh run")
        else:
            ckpt_dir, tag = os.path.split(os.path.abspath(resume.rstrip("/")))
        with open(os.path.join(ckpt_dir, tag, "client_state.json")) as f:
            saved = json.load(f)
        universal = saved["world"] != self.world
        if universal:
            tag = self._universal(ckpt_dir, tag)
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} in {ckpt_dir}")
        self.step = saved["step"]
        self.nonfinite_total = saved.get("nonfinite_total", 0)
        loader_state = saved["loader"]
        if universal and loader_state["batches_done"]:
            # The sample order depends on the world size: continue at the next epoch boundary.
            self._log0(f"world size {saved['world']} -> {self.world}: the rest of epoch {loader_state['epoch']} "
                       "is skipped, data resumes at the next epoch")
            loader_state = {**loader_state, "epoch": loader_state["epoch"] + 1, "batches_done": 0}
        self.train_loader.load_state_dict({**loader_state, "world": self.world, "workers": max(1, self.cfg.data.workers)}
                                          if universal else loader_state)
        rc.load_rng(ckpt_dir, tag.removesuffix(".universal"), self.rank)
        self.scheduler.step_update(self.step)
        self._log0(f"resumed from {os.path.join(ckpt_dir, tag)} at update {self.step} (epoch "
                   f"{self.train_loader.epoch}, micro-batch {self.train_loader.batches_done})")

    def _universal(self, ckpt_dir: str, tag: str) -> str:
        """Convert `tag` to DeepSpeed's universal format (once, on rank 0) for a different world size."""
        out = f"{tag}.universal"
        if self.rank == 0 and not os.path.exists(os.path.join(ckpt_dir, out, rc.MARKER)):
            import subprocess
            import sys
            self._log0(f"converting {tag} to a universal checkpoint for {self.world} rank(s)")
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            os.path.join(ckpt_dir, tag), "--output_folder", os.path.join(ckpt_dir, out),
                            "--inject_missing_state", "--no_strict"], check=True, stdout=subprocess.DEVNULL)
            open(os.path.join(ckpt_dir, out, rc.MARKER), "w").close()
        dist.barrier()
        self.engine._config.load_universal_checkpoint = True
        return out

    # ---------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        try:
            return self._fit()
        finally:  # on every exit (done, preempted, failed): stop loader workers, which ignore SIGTERM
            self.train_loader.close()
            if self.val_loader is not None:
                self.val_loader.close()

    def _fit(self) -> dict:
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        if self.rank == 0:
            with open(os.path.join(self.cfg.run_dir, "config.json"), "w") as f:
                json.dump(self.cfg.to_dict(), f, indent=1)
        bar = self._progress()
        self.preempt = slurm.PreemptionFlag()
        self.preempt.install()
        result: dict = {}
        t_last, imgs = time.time(), 0
        limit = self.updates_per_epoch * self.accum  # micro-batches used per epoch (a partial update's tail is not)
        while self.step < self.total_updates:
            epoch, micro = self.train_loader.epoch, self.train_loader.batches_done
            for images, labels in self.train_loader:
                micro += 1
                imgs += images.shape[0]
                loss, updated = self._micro_step(images, labels, epoch, micro)
                if updated:
                    self.step += 1
                    self.scheduler.step_update(self.step)
                    if self._inject_sleep:
                        time.sleep(self._inject_sleep)
                    if self.step % self.cfg.log.every_steps == 0 or self.step == self.total_updates:
                        result = self._log_step(loss, imgs / max(time.time() - t_last, 1e-9), epoch, bar)
                        t_last, imgs = time.time(), 0
                    if self.cfg.log.eval_every_steps and self.step % self.cfg.log.eval_every_steps == 0:
                        result.update(self.evaluate())
                    if self.step % self.cfg.checkpoint.every_steps == 0 and self.step < self.total_updates:
                        self.save()
                    self._check_preemption()
                if self.step >= self.total_updates or micro >= limit:
                    break
            if micro < limit and self.step >= self.total_updates:
                break  # finished mid-epoch: the loader keeps its position in the final checkpoint
            if self.train_loader.epoch == epoch:
                self.train_loader.set_epoch(epoch + 1)  # skip the epoch's tail that can't fill an update
            if self.val_loader is not None and not self.cfg.log.eval_every_steps:
                result.update(self.evaluate())
            if self.step < self.total_updates:
                self.save()
        if self.val_loader is not None and self._last_eval_step != self.step:
            result.update(self.evaluate())  # a run that stops mid-epoch still reports its final accuracy
        self.save()
        if bar is not None:
            bar.close()
        self._close_logs()
        return result

    def _check_preemption(self) -> None:
        """All ranks agree on a signal any of them got (USR1 or TERM), at this update boundary."""
        flag = torch.tensor([float(self.preempt.value)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if not code:
            return
        if code == slurm.PreemptionFlag.USR1:
            self._log0(f"preemption warning (SIGUSR1) at update {self.step}: checkpointing and requeueing")
            self.save()
            if self.rank == 0 and slurm.requeue():
                self._log0(f"requeued job {os.environ['SLURM_JOB_ID']}; it resumes with --resume auto")
            self._close_logs()
            raise Preempted(0)
        if self._last_save_s <= self.cfg.checkpoint.term_save_budget_s:
            self._log0(f"SIGTERM at update {self.step}: checkpointing (last save took {self._last_save_s:.1f} s)")
            self.save()
        else:
            self._log0(f"SIGTERM at update {self.step}: no time to checkpoint (last save took "
                       f"{self._last_save_s:.1f} s > checkpoint.term_save_budget_s)")
        self._close_logs()
        raise Preempted(143)

    def _micro_step(self, images, labels, epoch: int, micro: int) -> tuple[torch.Tensor, bool]:
        """Forward/backward of one micro-batch; returns (loss, whether an optimizer update happened).

        A non-finite loss on any rank skips this micro-batch on every rank (no backward, no step), so the
        update is made of finite micro-batches only and the ranks stay in step.
        """
        x, y = self.augment(images, labels, step_seed=_mix(self.cfg.seed, epoch, micro, self.rank))
        self.engine.train()
        loss = self.criterion(self.engine(x.to(self.dtype)).float(), y)
        update = self.step + 1
        if self._inject_nan and self._inject_nan[0][0] == update:
            if self._inject_nan.pop(0)[1] == self.rank:
                loss = loss * float("nan")
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self._log0(f"non-finite loss before update {update} (epoch {epoch}, micro-batch {micro}): skipped on "
                       f"all ranks ({self.nonfinite_run} in a row, {self.nonfinite_total} in all)")
            if self.nonfinite_run >= self.cfg.optim.max_nonfinite:
                raise NonFiniteLossError(f"{self.nonfinite_run} non-finite losses in a row (optim.max_nonfinite="
                                         f"{self.cfg.optim.max_nonfinite}) before update {update}: lower the lr, "
                                         "check the data, or use bf16 instead of fp16")
            return loss.detach(), False
        self.nonfinite_run = 0
        before = self.engine.global_steps
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), self.engine.global_steps > before

    # ---------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # top1, top5, count
        for images, labels, valid in self.val_loader:
            x, y = self.eval_augment(images, labels)
            sums += topk_counts(self.engine(x.to(self.dtype)).float(), y, valid.to(self.device))
        dist.all_reduce(sums)
        metrics = topk_metrics(sums, prefix="val_")
        self._write_metrics({"step": self.step, **metrics})
        self._last_eval_step = self.step
        self._log0(f"eval at update {self.step}: top-1 {metrics['val_top1']:.2f}%  top-5 "
                   f"{metrics['val_top5']:.2f}%  ({metrics['val_samples']} images)")
        return metrics

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self) -> str:
        ckpt_dir = self.cfg.checkpoint_dir
        tag = rc.tag_for(self.step)
        if os.path.exists(os.path.join(ckpt_dir, tag, rc.MARKER)):
            return tag
        t0 = time.time()
        client = {"step": self.step, "world": self.world, "loader": self.train_loader.state_dict(),
                  "nonfinite_total": self.nonfinite_total}
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
        rc.save_rng(ckpt_dir, tag, self.rank)
        if self.rank == 0:
            with open(os.path.join(ckpt_dir, tag, "client_state.json"), "w") as f:
                json.dump(client, f)
        dist.barrier()
        if os.environ.get("PRETRAIN_INJECT_CRASH_IN_SAVE") == str(self.step):
            os._exit(17)  # fault injection for tests: die after writing, before the pointer
        if self.rank == 0:
            rc.mark_complete(ckpt_dir, tag, json.dumps(self.cfg.to_dict()))
            rc.prune(ckpt_dir, self.cfg.checkpoint.keep)
        dist.barrier()
        self._last_save_s = time.time() - t0
        self._log0(f"saved checkpoint {os.path.join(ckpt_dir, tag)} ({self._last_save_s:.1f} s)")
        return tag

    # ---------------------------------------------------------------------------------- logging
    def _log0(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)
            print(msg, flush=True)

    def _progress(self):
        if self.rank != 0 or not self.cfg.log.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.total_updates, initial=self.step, unit="step", dynamic_ncols=True)

    def _log_step(self, loss: torch.Tensor, img_s_rank: float, epoch: int, bar) -> dict:
        mean_loss = loss.detach().float().clone().reshape(1).to(self.device)
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / self.world
        lr = self.optimizer.param_groups[0]["lr"]
        tflops = 3 * self.flops_per_image * img_s_rank / 1e12  # forward + backward ~ 3x forward
        rec = {"step": self.step, "epoch": epoch, "loss": mean_loss, "lr": lr, "img_s_per_rank": img_s_rank,
               "img_s": img_s_rank * self.world, "tflops_per_rank": tflops, "nonfinite_total": self.nonfinite_total}
        peak = next((v for k, v in PEAK_TFLOPS.items() if self.device.type == "cuda"
                     and k in torch.cuda.get_device_name()), None)
        if peak:
            rec["mfu"] = tflops / peak
        self._write_metrics(rec)
        if bar is not None:
            left = (self.total_updates - self.step) * self.cfg.optim.global_batch / max(rec["img_s"], 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_s']:.0f}",
                            eta=f"{left / 3600:.1f}h")
            bar.n = self.step
            bar.refresh()
        return rec

    def _write_metrics(self, rec: dict) -> None:
        if self.rank != 0:
            return
        if self._metrics is None:
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            self._metrics = open(os.path.join(self.cfg.run_dir, "metrics.jsonl"), "a")
            if self.cfg.log.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(os.path.join(self.cfg.run_dir, "tb"))
                except ImportError:
                    log.warning("tensorboard is not installed: TensorBoard logging off")
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, rec["step"])

    def _close_logs(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        self._metrics = self._tb = None
