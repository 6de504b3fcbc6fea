"""Supervised classification: labels from the shards, on-device augmentation, cross-entropy, top-k accuracy."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..config import AugConfig, ModelSection, RunConfig
from ..data.targets import Labels
from ..data.transforms import BatchAugment
from ..models import model_from_section
from .base import Forward, Task


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


def build_criterion(aug: AugConfig) -> torch.nn.Module:
    """Soft-target cross-entropy when Mixup/CutMix make the targets (smoothing is in them), else smoothed CE."""
    if aug.mixup > 0 or aug.cutmix > 0:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(aug.label_smoothing)


class Classification(Task):
    """Supervised classification: on-device augmentation (erasing, Mixup/CutMix seeded per micro-batch),
    smoothed or soft-target cross-entropy; evaluation reports top-1/top-5 over the valid samples."""

    name = "classification"
    export_layouts = ("ours", "timm", "official", "transformers")

    @classmethod
    def build_model(cls, model: ModelSection, settings: Mapping[str, Any]) -> torch.nn.Module:
        return model_from_section(model)

    @classmethod
    def targets(cls, cfg: RunConfig) -> Labels:
        return Labels(cfg.model.num_classes)

    @classmethod
    def export_name(cls, model: torch.nn.Module) -> str:
        return f"{model.cfg.num_classes}cls"

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


