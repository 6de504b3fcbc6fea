"""A run's data: the shard loaders of its splits (the data section, the micro-batch per rank, the task's
targets) and what an epoch is in whole updates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import ConfigError, RunConfig
from ..data.jpeg import roi_decoder
from ..data.loader import LoaderConfig, ShardLoader
from ..tasks import task_class
from .backend import Backend


def loader_config(cfg: RunConfig, source: str, split: str) -> LoaderConfig:
    """The shard loader's settings for one split of a run: the data section, the micro-batch per rank, the
    run's seed, augmentation, and the task's targets."""
    return LoaderConfig.from_section(cfg.data, source, split, batch_size=cfg.optim.micro_batch, seed=cfg.seed,
                                     aug=cfg.aug, targets=task_class(cfg.task).targets(cfg))


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


