"""The objective, as a seam of the loop: what a batch means, its loss, and what evaluation reports.

A task turns a loader batch into a loss (training) and into summable counts (evaluation, all-reduced over
ranks, then turned into metrics). The loop knows nothing else of it, so a new objective (masked image
modelling) is a new task, not a new loop.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import RunConfig
from ..data.transforms import BatchAugment
from .metrics import topk_counts, topk_metrics
from .optim import build_criterion

Forward = Callable[[torch.Tensor], torch.Tensor]


class Task:
    name = ""

    def train_loss(self, forward: Forward, batch: tuple, step_seed: Optional[int]) -> torch.Tensor:
        raise NotImplementedError

    def eval_counts(self, forward: Forward, batch: tuple) -> torch.Tensor:
        """Counts to sum over every batch and rank (float64)."""
        raise NotImplementedError

    def eval_metrics(self, sums: torch.Tensor, prefix: str) -> dict:
        raise NotImplementedError

    def describe(self, metrics: dict, prefix: str) -> str:
        raise NotImplementedError


class Classification(Task):
    """Supervised classification: on-device augmentation (erasing, Mixup/CutMix seeded per micro-batch),
    smoothed or soft-target cross-entropy; evaluation reports top-1/top-5 over the valid samples."""

    name = "classification"

    def __init__(self, cfg: RunConfig, device: torch.device, training: bool = True):
        n = cfg.model.num_classes
        self.augment = BatchAugment(cfg.aug, n, device, training=True) if training else None
        self.eval_augment = BatchAugment(cfg.aug, n, device, training=False)
        self.criterion = build_criterion(cfg.aug) if training else None
        self.device = device

    def train_loss(self, forward: Forward, batch: tuple, step_seed: Optional[int]) -> torch.Tensor:
        x, y = self.augment(batch[0], batch[1], step_seed=step_seed)
        return self.criterion(forward(x), y)

    def eval_counts(self, forward: Forward, batch: tuple) -> torch.Tensor:
        images, labels, valid = batch
        x, y = self.eval_augment(images, labels)
        return topk_counts(forward(x), y, valid.to(self.device))

    def eval_metrics(self, sums: torch.Tensor, prefix: str) -> dict:
        return topk_metrics(sums, prefix=prefix)

    def describe(self, metrics: dict, prefix: str) -> str:
        return f"top-1 {metrics[prefix + 'top1']:.2f}%  top-5 {metrics[prefix + 'top5']:.2f}%"
