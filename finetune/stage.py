"""What fine-tuning adds to the training loop: the pretrained weights (moved to the new resolution and
window), layer-wise lr decay, an EMA, and the export of the result."""
from __future__ import annotations

import os

import torch

from pretrain.cli import print0
from pretrain.config import ConfigError
from pretrain.models import config_from_section, model_from_section
from pretrain.runs import (is_run_folder, latest_or_fail, load_run_weights, read_saved_config, read_state,
                           resolve_tag)
from pretrain.training import Stage, Trainer, evaluate_weights
from pretrain.weights import export_layouts, load_pretrained, pretrained_windows_of, stage_windows

from .config import FinetuneConfig


def resolve_pretrained(source: str):
    """A path/URL/hub id for load_pretrained, or, for one of our run/checkpoint folders, its consolidated fp32
    state dict (whichever backend wrote it)."""
    if "://" not in source and is_run_folder(source):  # else a file, URL, hub id or transformers folder
        return load_run_weights(*resolve_tag(source))
    return source


def derive_pretrained_windows(cfg: FinetuneConfig, source: str = "") -> None:
    """Swin V2 without model.pretrained_window_sizes: take them from the checkpoint (our run's config or
    metadata, or the official relative_coords_table buffers), so the position bias sees the coordinates it
    was trained on at any new window. `source`: default the weights fine-tuning starts from."""
    m, source = cfg.model, source or cfg.finetune.pretrained
    if not m.variant.startswith("swinv2") or m.pretrained_window_sizes is not None or not source:
        return
    if "://" not in source and is_run_folder(source):
        ckpt_dir, tag = resolve_tag(source)
        c = config_from_section(read_saved_config(os.path.join(ckpt_dir, tag), warn=print0).model)
        windows, where = c.pretrained_window_sizes or stage_windows(c), f"{ckpt_dir}/{tag}/config.json"
    else:
        windows, where = pretrained_windows_of(source, allow_pickle=cfg.finetune.allow_pickle), source
    if not windows:
        print0(f"note: {source} does not say which windows its position bias was trained at; set "
                "model.pretrained_window_sizes (the V2 fine-tune recipe: 12,12,12,6 after 192 px / window 12)")
        return
    m.pretrained_window_sizes = list(windows)
    print0(f"model.pretrained_window_sizes = {list(windows)} (from {where})")


def load_weights(cfg: FinetuneConfig, model: torch.nn.Module):
    ft = cfg.finetune
    print0(f"weights: {ft.pretrained}")
    report = load_pretrained(model, resolve_pretrained(ft.pretrained), reset_head=ft.reset_head,
                             allow_pickle=ft.allow_pickle)
    print0(str(report))
    return report


def export_finetuned(trainer: Trainer, tag: str) -> None:
    """fp32 weights of the final checkpoint (and its EMA) in our, timm's and the official layout."""
    if trainer.rank != 0:
        return
    cfg = trainer.cfg
    out = os.path.join(cfg.run_dir, "export")
    path = os.path.join(cfg.checkpoint_dir, tag)
    nets = {"finetuned": load_run_weights(cfg.checkpoint_dir, tag)}
    if os.path.exists(os.path.join(path, "ema.safetensors")):
        nets["finetuned_ema"] = read_state(os.path.join(path, "ema.safetensors"))
    for name, state in nets.items():
        net = model_from_section(cfg.model)
        net.load_state_dict(state, strict=True)
        for written in export_layouts(net, os.path.join(out, name)):
            print0(f"wrote {written}")


def finetune_stage(cfg: FinetuneConfig) -> Stage:
    """The fine-tuning Stage; a Swin V2 model's pretrained windows are filled in from the checkpoint first."""
    derive_pretrained_windows(cfg)
    ft = cfg.finetune
    if ft.from_scratch:
        print0("weights: random init (finetune.from_scratch)")
    return Stage(name="fine-tuning", init_weights=None if ft.from_scratch else lambda model: load_weights(cfg, model),
                 layer_decay=ft.layer_decay, ema_decay=ft.ema_decay, on_finish=export_finetuned)


def evaluate_only(cfg: FinetuneConfig, resume: bool, allow_random_head: bool = False) -> dict:
    """Evaluate the pretrained weights (or, with resume, the run's newest checkpoint) at cfg's resolution.
    A head the weights could not fill (another class count, a headless checkpoint) gives chance accuracy:
    refused unless `allow_random_head`."""
    def weights(model: torch.nn.Module) -> None:
        if not resume:
            report = load_weights(cfg, model)
            heads = [r for r in report.reinitialized if r.startswith("head")]
            if heads and not allow_random_head:
                raise ConfigError(f"--eval-only: {cfg.finetune.pretrained} has no trained head for this model "
                                  f"({'; '.join(heads)}): its accuracy would be chance. Give --num-classes the "
                                  "checkpoint's class count, or pass --allow-random-head to evaluate anyway")
            return
        tag = latest_or_fail(cfg.checkpoint_dir)
        model.load_state_dict(load_run_weights(cfg.checkpoint_dir, tag), strict=True)
        print0(f"weights from {os.path.join(cfg.checkpoint_dir, tag)}")

    derive_pretrained_windows(cfg, cfg.checkpoint_dir if resume else "")  # resume: what the run trained with
    m = evaluate_weights(cfg, weights)
    print0(f"eval at {cfg.model.img_size}px, window {cfg.model.window_size}: top-1 {m['val_top1']:.2f}%  "
            f"top-5 {m['val_top5']:.2f}%  ({m['val_samples']} images)")
    return {k.removeprefix("val_"): v for k, v in m.items()}
