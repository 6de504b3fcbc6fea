"""What the Trainer and the Evaluator are built from: the backend a config names, the run's loaders, the
seeds, torch.compile inside the engine, and rank-0 printing."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import slurm
from ..cli import printer
from ..collective import on_rank0
from ..config import ConfigError, RunConfig, auto_augment_check, raise_failed
from ..data.jpeg import roi_decoder
from ..data.loader import LoaderConfig, ShardLoader
from ..models import model_from_section, simmim_from_section
from . import checkpointing as ckpt
from .backend import Backend

log = logging.getLogger("pretrain")


def build_backend(cfg: RunConfig) -> Backend:
    """`backend`: deepspeed | accelerate, imported only when chosen (DeepSpeed's import is slow)."""
    if cfg.backend == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(cfg)
    from .accelerate_backend import AccelerateBackend
    return AccelerateBackend(cfg)


def join(cfg: RunConfig, name: str, ema_decay: float = 0.0, lock: Optional[ckpt.RunLock] = None) -> Backend:
    """What can be checked without a process group, then the group (the backend), then, for a training run,
    the run dir's lock on rank 0 (refused naming the holder) before anything is built or written."""
    if ema_decay and cfg.zero_stage == 3:
        raise ConfigError("an EMA (finetune.ema_decay) needs whole weights on every rank: use optim.zero_stage "
                          "0-2 with it")
    raise_failed([auto_augment_check(cfg.aug.auto_augment)])  # timm's parse: a typo fails before any group
    slurm.init_env_from_slurm()
    backend = build_backend(cfg)
    if lock is not None:
        on_rank0(lambda: ckpt.claim_run_dir(lock, cfg.checkpoint_dir), f"locking {cfg.run_dir}")
    printer(backend.rank)(f"{name} on {backend.world} rank(s), backend {backend.name}" + (
        f" (ZeRO-{cfg.zero_stage})" if backend.name == "deepspeed" else "") + f", {cfg.optim.precision}, device "
        f"{backend.device.type}")
    return backend


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def loader_config(cfg: RunConfig, source: str, split: str) -> LoaderConfig:
    """The shard loader's settings for one split of a run: the data section, the micro-batch per rank, the
    run's seed, augmentation and class count."""
    simmim = cfg.task == "simmim"
    return LoaderConfig.from_section(cfg.data, source, split, batch_size=cfg.optim.micro_batch, seed=cfg.seed,
                                     aug=cfg.aug, num_classes=0 if simmim else cfg.model.num_classes,
                                     simmim=cfg.simmim if simmim else None)


def model_for(cfg: RunConfig) -> torch.nn.Module:
    """The model a run trains: the model section's Swin, or (task simmim) SimMIM on that Swin as the encoder."""
    if cfg.task != "simmim":
        return model_from_section(cfg.model)
    return simmim_from_section(cfg.model, cfg.simmim.norm_target_patch)


def val_loader(cfg: RunConfig, backend: Backend) -> ShardLoader:
    return ShardLoader(loader_config(cfg, cfg.data.val, cfg.data.val_split), backend.rank, backend.world,
                       training=False)


def train_loader(cfg: RunConfig, backend: Backend, print0: Callable[[str], None]) -> ShardLoader:
    if not cfg.data.train:
        raise ConfigError("data.train is empty: point it at the training shards' _info.json")
    # The JPEG decoder is built (or found) now, on every node, before any data is read.
    decoder = roi_decoder(cfg.aug.jpeg_roi)
    print0("training JPEG decoding: " + (f"libjpeg-turbo, crop only ({decoder.path})" if decoder else
                                         f"Pillow, whole images (aug.jpeg_roi={cfg.aug.jpeg_roi})"))
    return ShardLoader(loader_config(cfg, cfg.data.train, cfg.data.train_split), backend.rank, backend.world,
                       training=True)


@dataclass
class TrainingData:
    loader: ShardLoader
    updates_per_epoch: int
    total_updates: int
    epoch_share: float  # of the split's samples, all ranks together: equal whole batches and whole updates


def plan_training(cfg: RunConfig, backend: Backend, accum: int, print0: Callable[[str], None]) -> TrainingData:
    """The training loader and what an epoch is: whole updates of `accum` micro-batches on every rank."""
    loader = train_loader(cfg, backend, print0)
    per_epoch = len(loader) // accum
    if per_epoch < 1:
        raise ConfigError(f"one epoch gives {len(loader)} micro-batches per rank, fewer than the {accum} "
                          "accumulation steps of one update: use a smaller optim.global_batch")
    share = loader.epoch_share() * per_epoch * accum / len(loader)
    print0(f"an epoch is {per_epoch} updates: {share:.2%} of the {loader.num_samples:,} samples of "
           f"{cfg.data.train} split {cfg.data.train_split!r}")
    return TrainingData(loader, per_epoch, cfg.optim.max_steps or cfg.optim.epochs * per_epoch, share)


def compile_model(backend: Backend, cfg: RunConfig, print0: Callable[[str], None]) -> bool:
    """model.compile: torch.compile inside the engine, with inductor's and Triton's caches in a persistent
    folder so a requeued or resumed job reuses the kernels instead of compiling them again."""
    m = cfg.model
    if not (backend.device.type == "cuda" if m.compile == "auto" else m.compile):
        return False
    if m.attn_impl == "flex" and backend.device.type == "cpu":
        raise ConfigError("model.attn_impl=flex with model.compile on CPU: torch's CPU FlexAttention kernel "
                          "cannot read a position bias computed inside the compiled graph; on CPU use "
                          "model.attn_impl=math (or model.compile=false)")
    cache = m.compile_cache or os.path.join(cfg.run_dir, "compile_cache")
    warm = os.path.isdir(cache) and any(os.scandir(cache))
    os.makedirs(cache, exist_ok=True)
    # Inductor reads its cache folders from the environment when it first compiles (no API for it).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    backend.compile()
    print0(f"model compiled with torch.compile (cache {cache}: {'warm' if warm else 'empty'}); the first update "
           "includes the compilation")
    return True
