"""SimMIM (Xie et al., 2022): masked image modelling on a Swin V1 or V2 encoder, the official computation.

    model = build_simmim("swin_base", img_size=192, window_size=6)           # V1, the SimMIM Swin-B recipe
    model = build_simmim("swinv2_base", window_size=12, norm_target_patch=47)  # V2
    loss = model(x, mask)                 # x: normalized (B, 3, H, W); mask: (B, H/4, W/4) of 0/1
    x_rec = model.reconstruct(x, mask)    # (B, 3, H, W)

The encoder is our SwinTransformer (no classifier): masked patch embeddings are replaced by a learned
`mask_token` before the position embedding and dropout, every stage and the final norm run, a 1x1 conv to
stride^2*3 channels and PixelShuffle(stride) decode (stride 32 for four stages) the pixels, and the loss is L1 on the masked pixels only, divided
by the channel count. `norm_target_patch` normalizes the targets by their local mean and variance (the
official `norm_targets`, on in the V2 recipe). The masks come with the data (pretrain.data.masks).

State dict: `encoder.*` (our = timm's Swin layout), `mask_token` (C,), `decoder.0.*`. The official SimMIM
layout (`encoder.*` in the official Swin layout, `encoder.mask_token` (1, 1, C)) converts with
`from_official` / `to_official`, beside the model as for the plain Swin.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..architecture import mask_problem
from . import swin
from .swin import SwinConfig, SwinTransformer, build_config

OUTPUTS = ("loss", "per_sample", "reconstruction")


def local_stats(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's mean and (unbiased) std over its patch x patch neighbourhood (borders: the pixels inside
    the image), as the official `norm_targets` computes them (std with its 1e-6 inside the root)."""
    if patch % 2 != 1:
        raise ValueError(f"norm_target_patch must be odd, got {patch}")
    pad = patch // 2
    mean = F.avg_pool2d(x, patch, stride=1, padding=pad, count_include_pad=False)
    sq_mean = F.avg_pool2d(x * x, patch, stride=1, padding=pad, count_include_pad=False)
    count = F.avg_pool2d(torch.ones_like(x), patch, stride=1, padding=pad, count_include_pad=True) * patch ** 2
    var = ((sq_mean - mean ** 2) * (count / (count - 1))).clamp(min=0.0)
    return mean, (var + 1e-6) ** 0.5


def norm_targets(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The official `norm_targets`: each pixel normalized by its neighbourhood's `local_stats`."""
    mean, std = local_stats(x, patch)
    return (x - mean) / std


class SimMIM(nn.Module):
    def __init__(self, cfg: SwinConfig, norm_target_patch: Optional[int] = None):
        super().__init__()
        if cfg.num_classes:
            cfg = dataclasses.replace(cfg, num_classes=0)  # the encoder has no classifier
        if norm_target_patch is not None and norm_target_patch % 2 != 1:
            raise ValueError(f"norm_target_patch must be odd (the recipe: 47), got {norm_target_patch}")
        self.cfg, self.norm_target_patch = cfg, norm_target_patch
        self.encoder = SwinTransformer(cfg)
        self.mask_token = nn.Parameter(torch.zeros(cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # PixelShuffle by the encoder's total downsampling (32 for 4 stages, the official's encoder_stride)
        stride = cfg.patch_size * 2 ** (len(cfg.depths) - 1)
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, stride ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(stride))
        # The decoder keeps PyTorch's default Conv2d init, as the official (its init touches Linear only).

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    def config_dict(self) -> dict:
        """What rebuilds the model: the encoder's SwinConfig plus the SimMIM settings."""
        return {**self.cfg.to_dict(), "simmim": {"norm_target_patch": self.norm_target_patch}}

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, H/4, W/4) -> reconstructed pixels (B, 3, H, W) (in the target space)."""
        z = self.encoder.forward_tokens(x, mask, self.mask_token)  # (B, h, w, C)
        return self.decoder(z.permute(0, 3, 1, 2))

    def masked_l1(self, x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (sum of |target - x_rec| over masked pixels and channels / channels, masked pixels),
        in fp32 whatever the model's precision."""
        p = self.patch_size
        m = mask.to(torch.float32).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
        target = x.float()
        if self.norm_target_patch:
            target = norm_targets(target, self.norm_target_patch)
        err = (F.l1_loss(target, x_rec.float(), reduction="none") * m).sum(dim=(1, 2, 3)) / x.shape[1]
        return err, m.sum(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, output: str = "loss") -> torch.Tensor:
        """`output`: "loss" (the official scalar: masked L1 / (masked pixels + 1e-5) / channels),
        "per_sample" ((B, 2): the loss's numerator and masked pixel count per sample, to sum over a split),
        "reconstruction" (x_rec)."""
        x_rec = self.reconstruct(x, mask)
        if output == "reconstruction":
            return x_rec
        err, count = self.masked_l1(x, x_rec, mask)
        if output == "per_sample":
            return torch.stack([err, count], dim=1)
        return err.sum() / (count.sum() + 1e-5)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of the model's shape (FLOP counting, benchmarks): zeros and a recipe-like mask."""
        h, w = (s // self.patch_size for s in self.cfg.img_size)
        mask = torch.zeros(batch, h, w, dtype=torch.uint8)
        mask[:, : math.ceil(0.6 * h)] = 1
        return torch.zeros(batch, 3, *self.cfg.img_size), mask

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """The encoder's list (bias tables / CPB MLP / logit scales, ape) and the mask token (official)."""
        return {"encoder." + n for n in self.encoder.no_weight_decay()} | {"mask_token"}


def build_simmim(variant: str, img_size: int = 192, window_size: int = 6, norm_target_patch: Optional[int] = None,
                 mask_patch_size: int = 32, mask_ratio: float = 0.6, **overrides) -> SimMIM:
    """A SimMIM model on a `variant` encoder (swin_* or swinv2_*); overrides are SwinConfig fields. The mask
    settings are checked here (the masks themselves come with the data: MaskGenerator)."""
    cfg = build_config(variant, img_size=img_size, window_size=window_size, **{"num_classes": 0, **overrides})
    problem = mask_problem(img_size, mask_patch_size, cfg.patch_size, mask_ratio)
    if problem:
        raise ValueError(problem)
    return SimMIM(cfg, norm_target_patch)


def simmim_from_section(m, norm_target_patch: int = 0) -> SimMIM:
    """SimMIM on the encoder a run config's `model` section describes (`simmim.norm_target_patch`: 0 is off),
    with its activation checkpointing set: the twin of `swin.model_from_section`."""
    model = SimMIM(swin.config_from_section(m), norm_target_patch or None)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


# ------------------------------------------------------------------ the official SimMIM key layout
def is_simmim_state(sd: Mapping[str, torch.Tensor]) -> bool:
    """A SimMIM state dict (ours or official): the encoder's keys under `encoder.`."""
    return any(k.startswith("encoder.") for k in sd)


def split_state(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the encoder's keys without `encoder.`, the SimMIM parts: `mask_token` as (C,), `decoder.*`). The
    official `encoder.mask_token` (1, 1, C) and our `mask_token` both land on `mask_token`; anything else
    outside the encoder stays in the second dict under its own name (reported by the loader)."""
    encoder, rest = {}, {}
    for k, v in sd.items():
        if k in ("encoder.mask_token", "mask_token"):
            rest["mask_token"] = v.reshape(-1)
        elif k.startswith("encoder."):
            encoder[k[len("encoder."):]] = v
        else:
            rest[k] = v
    return encoder, rest


def to_official(model: SimMIM) -> dict[str, torch.Tensor]:
    """The model's weights as the official `SimMIM.state_dict()` writes them."""
    out = {"encoder." + k: v for k, v in swin.to_official(model.encoder).items()}
    out["encoder.mask_token"] = model.mask_token.detach().view(1, 1, -1)
    out.update({k: v for k, v in model.state_dict().items() if k.startswith("decoder.")})
    return out
