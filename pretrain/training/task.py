"""The objective, as a seam of the loop: what a batch means, its loss, and what evaluation reports.

A task turns a loader batch into a loss (training) and into summable counts (evaluation, all-reduced over
ranks, then turned into metrics). The loop knows nothing else of it, so a new objective (masked image
modelling) is a new task, not a new loop.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..config import RunConfig
from ..data.transforms import BatchAugment
from ..models.simmim import local_stats
from .metrics import topk_counts, topk_metrics
from .optim import build_criterion

Forward = Callable[..., torch.Tensor]  # the model's forward through the backend: (x, *rest) -> output


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

    def picture(self, forward: Forward) -> Optional[np.ndarray]:
        """After an evaluation, on every rank (the forward may be collective): an (H, W, 3) uint8 image of what
        the model does on a few validation images, or None."""
        return None


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


class MaskedImageModeling(Task):
    """SimMIM: batches are (uint8 images, masks (B, H/4, W/4)); the loss is the model's masked L1 (official);
    evaluation reports the masked reconstruction loss over the split, with the loader's fixed validation masks
    (seeded by sample key), so runs are comparable; `picture` draws original | masked | reconstruction (in the
    masked squares, over the visible input)."""

    name = "simmim"
    SHOWN = 4  # validation images in the picture

    def __init__(self, cfg: RunConfig, device: torch.device, training: bool = True):
        self.normalize = BatchAugment(cfg.aug, 0, device, training=False)
        self.mean, self.std = self.normalize.mean / 255, self.normalize.std / 255
        self.norm_target_patch = cfg.simmim.norm_target_patch
        self.device, self._shown = device, None

    def train_loss(self, forward: Forward, batch: tuple, step_seed: Optional[int]) -> torch.Tensor:
        x, mask = self.normalize(batch[0], batch[1])
        return forward(x, mask)

    def eval_counts(self, forward: Forward, batch: tuple) -> torch.Tensor:
        images, masks, valid = batch[:3]
        x, mask = self.normalize(images, masks)
        per = forward(x, mask, "per_sample").double()  # (B, 2): masked L1 sum / channels, masked pixels
        v = valid.to(self.device).double()
        if self._shown is None:
            self._shown = (x[:self.SHOWN], mask[:self.SHOWN])
        return torch.stack([(per[:, 0] * v).sum(), (per[:, 1] * v).sum(), v.sum()])

    def eval_metrics(self, sums: torch.Tensor, prefix: str) -> dict:
        err, pixels, n = sums.tolist()
        return {prefix + "loss": err / (pixels + 1e-5), prefix + "samples": int(n)}

    def describe(self, metrics: dict, prefix: str) -> str:
        return f"masked reconstruction loss {metrics[prefix + 'loss']:.4f}"

    @torch.no_grad()
    def picture(self, forward: Forward) -> Optional[np.ndarray]:
        if self._shown is None:
            return None
        x, mask = self._shown
        self._shown = None
        rec = forward(x, mask, "reconstruction").float()
        if self.norm_target_patch:  # back from locally normalized targets, by the original's local statistics
            mean, std = local_stats(x, self.norm_target_patch)
            rec = rec * std + mean
        p = x.shape[-1] // mask.shape[-1]
        m = mask.float().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
        def pixels(t: torch.Tensor) -> torch.Tensor:
            return (t * self.std + self.mean).clamp(0, 1)
        # masked squares drawn grey; the reconstruction shown where it is trained (masked), the input elsewhere
        cols = [pixels(x), pixels(x) * (1 - m) + 0.5 * m, pixels(x) * (1 - m) + pixels(rec) * m]
        grid = torch.cat([torch.cat(list(c), dim=1) for c in cols], dim=2)  # (3, rows*H, 3*W)
        return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


TASKS = {"classification": Classification, "simmim": MaskedImageModeling}


def task_for(cfg: RunConfig) -> Callable[..., Task]:
    """The task a config names (`task`)."""
    return TASKS[cfg.task]
