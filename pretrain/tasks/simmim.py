"""SimMIM (task simmim): masked image modelling on the Swin encoder; its settings are the config's `simmim`
section, its per-sample transform and masks pretrain.data.masks, its model pretrain.models.simmim."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..config import ModelSection, RunConfig
from ..data.masks import Masks
from ..data.transforms import BatchAugment
from ..models.simmim import local_stats, simmim_from_section
from .base import Forward, Task


class MaskedImageModeling(Task):
    """SimMIM: batches are (uint8 images, masks (B, H/4, W/4)); the loss is the model's masked L1 (official);
    evaluation reports the masked reconstruction loss over the split, with the loader's fixed validation masks
    (seeded by sample key), so runs are comparable; `picture` draws original | masked | reconstruction (in the
    masked squares, over the visible input)."""

    name = "simmim"
    export_layouts = ("ours", "official", "encoder", "transformers")  # encoder: the backbone alone, timm's layout
    SHOWN = 4  # validation images in the picture

    @classmethod
    def build_model(cls, model: ModelSection, settings: Mapping[str, Any]) -> torch.nn.Module:
        return simmim_from_section(model, int(settings.get("norm_target_patch") or 0))

    @classmethod
    def targets(cls, cfg: RunConfig) -> Masks:
        return Masks(cfg.simmim, cfg.model.img_size)

    @classmethod
    def export_name(cls, model: torch.nn.Module) -> str:
        return "simmim"

    def __init__(self, cfg: RunConfig, device: torch.device, training: bool = True):
        self.normalize = BatchAugment(cfg.aug, 0, device, training=False)
        self.mean, self.std = self.normalize.mean / 255, self.normalize.std / 255
        self.norm_target_patch = cfg.simmim.norm_target_patch
        self.device, self._shown = device, None

    def encoder(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.encoder  # without its mask token: a probe sees whole images

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


