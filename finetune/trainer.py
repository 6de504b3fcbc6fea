"""Fine-tuning with accelerate: a pretrained Swin moved to a new resolution/window, trained and evaluated.

Each process reads its own shards through `pretrain.data` (the loader is not `prepare()`d: accelerate would
otherwise read on rank 0 and broadcast).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from pretrain import run_checkpoint as rc
from pretrain.checkpoint import export, load_pretrained
from pretrain.data.loader import ShardLoader, _mix
from pretrain.data.transforms import BatchAugment
from pretrain.engine import loader_config, model_from_section, skips_weight_decay, topk_counts, topk_metrics

from .config import FinetuneConfig


def resolve_pretrained(source: str):
    """A path/URL for load_pretrained, or, for one of our DeepSpeed run/checkpoint folders, its consolidated
    fp32 state dict."""
    if "://" not in source and os.path.isdir(source):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from pretrain.release import resolve_tag
        ckpt_dir, tag = resolve_tag(source)
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return source


def layer_id(name: str, depths: list[int]) -> int:
    """0 for the stem, 1..sum(depths) for blocks in order (patch merging goes with its stage's first block),
    sum(depths)+1 for the final norm and head."""
    if name.startswith(("patch_embed", "absolute_pos_embed")):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        offset = sum(depths[:stage])
        return offset + 1 + (int(parts[3]) if parts[2] == "blocks" else 0)
    return sum(depths) + 1


def param_groups(model, weight_decay: float, layer_decay: float) -> list[dict]:
    """No decay on 1-D params, biases and position tables; lr scaled by layer_decay^(depth - layer)."""
    depths = list(model.cfg.depths)
    top = sum(depths) + 1
    skip = model.no_weight_decay()
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = skips_weight_decay(name, p, skip)
        lid = layer_id(name, depths) if layer_decay < 1 else top
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (top - lid)}
        groups[key]["params"].append(p)
    return list(groups.values())


class FinetuneRunner:
    def __init__(self, cfg: FinetuneConfig, resume: Optional[str] = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cfg.optim.precision]
        self.acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.accum = cfg.accumulation(self.world)
        set_seed(cfg.seed + self.rank)
        self.model = model_from_section(cfg)
        self.report = None
        self.resume = resume
        self.step, self.epoch0 = 0, 0
        self._inject_sleep = float(os.environ.get("PRETRAIN_INJECT_SLEEP_S", "0"))

    # ------------------------------------------------------------------------------------------ setup
    def _loader(self, split: str, training: bool) -> ShardLoader:
        source = self.cfg.data.train if training else self.cfg.data.val
        return ShardLoader(loader_config(self.cfg, source, split), self.rank, self.world, training=training)

    def load_weights(self) -> None:
        ft = self.cfg.finetune
        self.print(f"weights: {ft.pretrained}")
        self.report = load_pretrained(self.model, resolve_pretrained(ft.pretrained), reset_head=ft.reset_head,
                                      allow_pickle=ft.allow_pickle)
        self.print(str(self.report))

    def print(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model, loader: ShardLoader) -> dict:
        model.eval()
        augment = BatchAugment(self.cfg.aug, self.cfg.model.num_classes, self.acc.device, training=False)
        sums = torch.zeros(3, dtype=torch.float64, device=self.acc.device)
        for images, labels, valid in loader:
            x, y = augment(images, labels)
            with self.acc.autocast():
                logits = model(x).float()
            sums += topk_counts(logits, y, valid.to(self.acc.device))
        return topk_metrics(self.acc.reduce(sums, reduction="sum"))

    def eval_only(self) -> dict:
        if self.resume:
            self._load_run_weights()
        else:
            self.load_weights()
        model = self.acc.prepare(self.model)
        val = self._loader(self.cfg.data.val_split, training=False)
        try:
            metrics = self.evaluate(model, val)
        finally:
            val.close()
        self.print(f"eval at {self.cfg.model.img_size}px, window {self.cfg.model.window_size}: top-1 "
                   f"{metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['samples']} images)")
        return metrics

    def _load_run_weights(self) -> None:
        tag = rc.latest_tag(self.cfg.checkpoint_dir)
        if tag is None:
            raise FileNotFoundError(f"--resume auto: no complete checkpoint in {self.cfg.checkpoint_dir}")
        from safetensors.torch import load_file
        self.model.load_state_dict(load_file(os.path.join(self.cfg.checkpoint_dir, tag, "model.safetensors")))
        self.print(f"weights from {os.path.join(self.cfg.checkpoint_dir, tag)}")

    # ------------------------------------------------------------------------------------------ train
    def fit(self) -> dict:
        cfg, o = self.cfg, self.cfg.optim
        if not self.resume:
            self.load_weights()
        train, val = self._loader(cfg.data.train_split, True), self._loader(cfg.data.val_split, False)
        try:
            return self._fit(train, val)
        finally:  # loader workers ignore SIGTERM: stop them through the DataLoader on every exit
            train.close()
            val.close()

    def _fit(self, train: ShardLoader, val: ShardLoader) -> dict:
        cfg, o = self.cfg, self.cfg.optim
        updates_per_epoch = len(train) // self.accum
        if updates_per_epoch < 1:
            raise ValueError(f"an epoch has {len(train)} micro-batches per process, fewer than one update "
                             f"({self.accum}): lower optim.global_batch")
        optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay, cfg.finetune.layer_decay), lr=cfg.lr,
                                      betas=tuple(o.betas), eps=o.eps)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * g["lr_scale"]
        scale = o.global_batch / o.lr_scale_batch
        warmup = int(o.warmup_epochs * updates_per_epoch)
        scheduler = CosineLRScheduler(optimizer, t_initial=max(1, o.epochs * updates_per_epoch - warmup),
                                      lr_min=o.min_lr * scale, warmup_lr_init=o.warmup_lr * scale, warmup_t=warmup,
                                      warmup_prefix=True, t_in_epochs=False)
        model, optimizer = self.acc.prepare(self.model, optimizer)
        ema = None
        if cfg.finetune.ema_decay:
            from timm.utils import ModelEmaV3
            ema = ModelEmaV3(self.acc.unwrap_model(model), decay=cfg.finetune.ema_decay)
        if self.resume:
            self._restore(train, ema)
            scheduler.step_update(self.step)
        mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
        criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(cfg.aug.label_smoothing)
        augment = BatchAugment(cfg.aug, cfg.model.num_classes, self.acc.device, training=True)
        total = o.max_steps or o.epochs * updates_per_epoch
        os.makedirs(cfg.run_dir, exist_ok=True)
        metrics_file = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") if self.acc.is_main_process else None
        if metrics_file:
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        result: dict = {}
        limit = updates_per_epoch * self.accum
        t0, imgs = time.time(), 0
        while self.step < total:
            epoch, micro = train.epoch, train.batches_done
            model.train()
            for images, labels in train:
                micro += 1
                imgs += images.shape[0] * self.world
                x, y = augment(images, labels, step_seed=_mix(cfg.seed, epoch, micro, self.rank))
                boundary = micro % self.accum == 0
                with (contextlib.nullcontext() if boundary else self.acc.no_sync(model)):
                    with self.acc.autocast():
                        out = model(x)
                    loss = criterion(out.float(), y)
                    self.acc.backward(loss / self.accum)
                if boundary:
                    if o.clip_grad:
                        self.acc.clip_grad_norm_(model.parameters(), o.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    scheduler.step_update(self.step)
                    if ema is not None:
                        ema.update(self.acc.unwrap_model(model), step=self.step)
                    if self._inject_sleep:
                        time.sleep(self._inject_sleep)
                    if self.step % cfg.log.every_steps == 0 and metrics_file:
                        rec = {"step": self.step, "epoch": epoch, "loss": loss.item(),
                               "lr": optimizer.param_groups[0]["lr"], "img_s": imgs / (time.time() - t0)}
                        metrics_file.write(json.dumps(rec) + "\n")
                        metrics_file.flush()
                        t0, imgs = time.time(), 0
                if self.step >= total or micro >= limit:
                    break
            if micro < limit and self.step >= total:
                break
            if train.epoch == epoch:
                train.set_epoch(epoch + 1)
            result = {"epoch": epoch, **self.evaluate(model, val)}
            if ema is not None:
                result.update({f"ema_{k}": v for k, v in self.evaluate(ema.module, val).items()})
            self.print(f"epoch {epoch}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
                       + (f"  (EMA top-1 {result['ema_top1']:.2f}%)" if ema is not None else ""))
            if metrics_file:
                metrics_file.write(json.dumps({"step": self.step, **{f"val_{k}": v for k, v in result.items()}}) + "\n")
                metrics_file.flush()
            self._save(train, ema)
        self._save(train, ema)
        if metrics_file:
            metrics_file.close()
        self._export(model, ema)
        return result

    # ------------------------------------------------------------------------------------------ state
    def _save(self, train: ShardLoader, ema) -> None:
        tag = rc.tag_for(self.step)
        path = os.path.join(self.cfg.checkpoint_dir, tag)
        if os.path.exists(os.path.join(path, rc.MARKER)):
            return
        self.acc.save_state(path, safe_serialization=True)
        if self.acc.is_main_process:
            with open(os.path.join(path, "client_state.json"), "w") as f:
                json.dump({"step": self.step, "world": self.world, "loader": train.state_dict()}, f)
            if ema is not None:
                export(ema.module, os.path.join(path, "ema.safetensors"), layout="ours")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            rc.mark_complete(self.cfg.checkpoint_dir, tag, json.dumps(self.cfg.to_dict()))
            rc.prune(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep)
        self.acc.wait_for_everyone()
        self.print(f"saved checkpoint {path}")

    def _restore(self, train: ShardLoader, ema) -> None:
        tag = rc.latest_tag(self.cfg.checkpoint_dir) if os.path.isdir(self.cfg.checkpoint_dir) else None
        if tag is None:
            raise FileNotFoundError(f"--resume auto: no complete checkpoint in {self.cfg.checkpoint_dir}; "
                                    "start without --resume")
        path = os.path.join(self.cfg.checkpoint_dir, tag)
        self.acc.load_state(path)
        with open(os.path.join(path, "client_state.json")) as f:
            state = json.load(f)
        self.step = state["step"]
        train.load_state_dict(state["loader"])
        if ema is not None and os.path.exists(os.path.join(path, "ema.safetensors")):
            load_pretrained(ema.module, os.path.join(path, "ema.safetensors"))
        self.print(f"resumed from {path} at update {self.step} (epoch {train.epoch}, micro-batch {train.batches_done})")

    def _export(self, model, ema) -> None:
        if not self.acc.is_main_process:
            return
        out = os.path.join(self.cfg.run_dir, "export")
        m = self.acc.unwrap_model(model)
        for name, net in (("finetuned", m), ("finetuned_ema", ema.module if ema is not None else None)):
            if net is None:
                continue
            for layout in ("ours", "timm", "official"):
                if layout == "timm" and net.cfg.ape:
                    continue
                path = export(net, os.path.join(out, f"{name}.{layout}.safetensors"), layout=layout)
                self.print(f"wrote {path}")
