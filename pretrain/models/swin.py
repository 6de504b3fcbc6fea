"""Swin Transformer V1 (Liu et al., 2021) and V2 (Liu et al., 2022), numerically the same networks as the
official code and timm. `SwinConfig.version` picks the block: V1 pre-norm with a learned bias table, V2
res-post-norm with scaled cosine attention and a continuous position bias (V2 patch merging: reduction,
then norm).

Parameter names follow timm's layout (patch merging at the start of stage i+1, classifier `head.fc`), so
our state dict loads into `timm.create_model(...)` unchanged; `pretrain.weights` converts to and from
the official layout.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..architecture import VARIANTS, architecture_problem
from .layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    PatchMerging,
    Size2,
    WindowAttention,
    WindowAttentionV2,
    ceil_to,
    permute_tokens,
    shifted_window_mask,
    to_2tuple,
    trunc_normal_init,
    window_token_order,
)


@dataclass
class SwinConfig:
    """Everything needed to rebuild a model; stored in exported checkpoints."""
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    attn_impl: str = "auto"
    version: int = 1  # 1: Swin, 2: Swin V2
    pretrained_window_sizes: tuple[int, ...] = ()  # V2: per stage, the window the CPB was trained at (0: none)

    def __post_init__(self) -> None:
        self.img_size = to_2tuple(self.img_size)
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        self.pretrained_window_sizes = tuple(int(w) for w in self.pretrained_window_sizes or ())
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        problem = architecture_problem(self.img_size, self.patch_size, self.embed_dim, self.depths, self.num_heads,
                                       self.window_size, self.version, self.pretrained_window_sizes)
        if problem:
            raise ValueError(problem)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)




class SwinBlock(nn.Module):
    """(S)W-MSA + MLP, pre-norm residual: (B, H, W, C) -> (B, H, W, C) at a fixed resolution.

    Where the resolution is no larger than the window, the window shrinks to it and the block doesn't
    shift (official rule, per axis as in timm). Resolutions the window doesn't divide are zero-padded
    after the cyclic shift. The shift mask is built once here, never per forward pass.
    """

    def __init__(self, dim: int, resolution: Size2, num_heads: int, window_size: int, shift: bool,
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float,
                 attn_impl: str, version: int = 1, pretrained_window: int = 0):
        super().__init__()
        self.resolution = resolution
        self.window = tuple(min(r, window_size) for r in resolution)
        self.shift = tuple(0 if (not shift or r <= window_size) else window_size // 2 for r in resolution)
        self.padded = tuple(ceil_to(r, w) for r, w in zip(resolution, self.window))
        self.post_norm = version == 2  # V2: x + norm(f(x)) instead of x + f(norm(x))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (WindowAttentionV2(dim, num_heads, self.window, to_2tuple(pretrained_window), qkv_bias, attn_drop,
                                       drop, attn_impl) if version == 2 else
                     WindowAttention(dim, num_heads, self.window, qkv_bias, attn_drop, drop, attn_impl))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)
        # Buffers derived from (resolution, window, shift) alone: built here once, never saved.
        self.register_buffer("attn_mask", shifted_window_mask(self.padded, self.window, self.shift),
                             persistent=False)
        part, merge = window_token_order(resolution, self.window, self.shift)
        self.register_buffer("part_index", part, persistent=False)
        self.register_buffer("merge_index", merge, persistent=False)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Shift, pad and partition as one token gather, attend per window, and gather back."""
        B, H, W, C = x.shape
        windows = permute_tokens(x.reshape(B, H * W, C), self.part_index, self.merge_index)
        out = self.attn(windows.view(-1, self.window[0] * self.window[1], C), self.attn_mask)
        out = permute_tokens(out.view(B, -1, C), self.merge_index, self.part_index)
        return out.view(B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self._attn(x)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        x = x + self.drop_path(self._attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating W-MSA and SW-MSA."""

    def __init__(self, dim: int, in_resolution: Size2, depth: int, num_heads: int, downsample: bool,
                 drop_path: Sequence[float], cfg: SwinConfig, pretrained_window: int = 0):
        super().__init__()
        self.downsample = PatchMerging(dim // 2, norm_after=cfg.version == 2) if downsample else nn.Identity()
        res = tuple((r + 1) // 2 for r in in_resolution) if downsample else in_resolution
        self.resolution = res
        self.blocks = nn.ModuleList([
            SwinBlock(dim, res, num_heads, cfg.window_size, shift=i % 2 == 1, mlp_ratio=cfg.mlp_ratio,
                      qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                      drop_path=drop_path[i], attn_impl=cfg.attn_impl, version=cfg.version,
                      pretrained_window=pretrained_window)
            for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool + dropout + Linear: (B, H, W, C) -> (B, num_classes). Named like timm's."""

    def __init__(self, dim: int, num_classes: int, drop: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.id2label: Optional[dict[int, str]] = None  # class names, where the weights came with them
        n = len(cfg.depths)
        self.num_features = cfg.embed_dim * 2 ** (n - 1)
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                      cfg.patch_norm)
        grid = self.patch_embed.grid_size
        if cfg.ape:  # official layout (1, L, C)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], cfg.embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # Per-block linear stochastic-depth schedule over the whole depth, as the official code.
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        stages, res, start = [], grid, 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            stage = SwinStage(cfg.embed_dim * 2 ** i, res, depth, heads, downsample=i > 0,
                              drop_path=dpr[start:start + depth], cfg=cfg,
                              pretrained_window=(cfg.pretrained_window_sizes or (0,) * len(cfg.depths))[i])
            stages.append(stage)
            res, start = stage.resolution, start + depth
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.drop_rate)
        self.apply(trunc_normal_init)
        if cfg.version == 2:  # official V2: residual post-norms start at zero, each block starts as identity
            for stage in self.layers:
                for blk in stage.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (per-block activation checkpointing)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides 1-D params and biases (official recipe)."""
        keys = ("relative_position_bias_table", "cpb_mlp", "logit_scale")  # the official lists (V1, V2)
        names = {n for n, _ in self.named_parameters() if any(k in n for k in keys)}
        if self.absolute_pos_embed is not None:
            names.add("absolute_pos_embed")
        return names

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for layer-wise lr decay (timm's matcher format): the stem, then each block in order (patch
        merging with its stage's first block), then the final norm and the head together as the top layer
        (SimMIM's Swin fine-tuning; timm's own Swin puts the norm with the last block, the head above)."""
        blocks = r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+).downsample", (0,)),
                                                  (r"^layers\.(\d+)\.\w+\.(\d+)", None)]
        return dict(stem=r"^patch_embed|^absolute_pos_embed", blocks=blocks, head=r"^norm|^head")

    def forward_tokens(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) -> normalized last-stage tokens (B, H/32, W/32, C). With `mask` (B, H/4, W/4) of 0/1,
        masked patch embeddings are replaced by `mask_token` (C,) before the position embedding (SimMIM)."""
        return self.norm(self._stages(x, mask, mask_token))

    def _stages(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None,
                stages: Optional[int] = None) -> torch.Tensor:
        """The tokens after the first `stages` stages (None: all), before the final norm."""
        x = self.patch_embed(x)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + mask_token.to(x.dtype) * w
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed.view(1, *x.shape[1:3], -1)
        x = self.pos_drop(x)
        for stage in self.layers if stages is None else self.layers[:stages]:  # the training path: no slice
            x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled features (B, num_features), for fine-tuning and linear probes."""
        return self.forward_tokens(x).mean(dim=(1, 2))

    def forward_pooled(self, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
        """(B, 3, H, W) -> the average-pooled tokens after stage `stage` (B, its channels), no norm; -1: after
        the final norm (forward_features). A probe's features: for masked image modelling a middle stage
        often holds more of what it learned."""
        if stage < 0:
            return self.forward_features(x)
        return self._stages(x, stages=stage + 1).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes), or pooled features when num_classes == 0."""
        return self.head(self.forward_features(x))


def build_config(variant: str, **overrides) -> SwinConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(SwinConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown model override(s) {sorted(unknown)}; valid: {sorted(fields)}")
    kw = {**VARIANTS[variant], **{k: v for k, v in overrides.items() if v is not None}}
    return SwinConfig(**kw)


def build_model(variant: str = "swin_tiny", **overrides) -> SwinTransformer:
    """Build a Swin model: `variant` in VARIANTS, overrides are SwinConfig fields.

    >>> m = build_model("swin_base", img_size=384, window_size=12, num_classes=1000)
    """
    return SwinTransformer(build_config(variant, **overrides))


def config_from_section(m) -> SwinConfig:
    """The architecture a run config's `model` section describes (variant + any architecture overrides)."""
    arch = {k: getattr(m, k) for k in ("embed_dim", "depths", "num_heads", "pretrained_window_sizes")
            if getattr(m, k, None) is not None}
    return build_config(m.variant, img_size=m.img_size, window_size=m.window_size, num_classes=m.num_classes,
                        drop_path_rate=m.drop_path_rate, ape=m.ape, attn_impl=m.attn_impl, **arch)


def model_from_section(m) -> SwinTransformer:
    """The model a run config's `model` section describes, with its activation checkpointing set."""
    model = SwinTransformer(config_from_section(m))
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def model_from_config(cfg: SwinConfig | dict) -> SwinTransformer:
    return SwinTransformer(cfg if isinstance(cfg, SwinConfig) else SwinConfig(**cfg))


# ------------------------------------------------------------------ the official key layout (timm's is ours)
# Beside the model it maps, as timm keeps checkpoint_filter_fn: pretrain.weights detects a file's layout and
# calls these; the differences are the downsample's stage (official: end of stage i; ours/timm: start of
# stage i+1), the classifier's name (head.* vs head.fc.*) and the derived buffers the official files store.
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "relative_coords_table")


def from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to ours (= timm's) and drop the derived buffers."""
    out = {}
    for k, v in sd.items():
        if k.endswith(BUFFER_SUFFIXES):
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
        if k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def to_official(model: "SwinTransformer") -> dict[str, torch.Tensor]:
    """Our model's weights in the official key layout and module order, with the index/mask buffers
    the release stores (a block's `attn_mask` first, each index right after its bias table).

    Our `layers.{i+1}.downsample` directly follows stage i's blocks, so renaming it to the official
    `layers.{i}.downsample` keeps the release's order.
    """
    blocks = {}
    for si, stage in enumerate(model.layers):
        for bi, blk in enumerate(stage.blocks):
            if blk.window[0] != blk.window[1]:
                raise ValueError(
                    f"layers.{si}.blocks.{bi} has a non-square window {blk.window}: the official code "
                    "only supports square windows; export with layout='timm' or 'ours'")
            blocks[f"layers.{si}.blocks.{bi}."] = blk
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        m = re.match(r"(layers\.\d+\.blocks\.\d+\.)", k)
        blk = blocks[m[1]] if m else None
        if blk is not None and k == m[1] + "norm1.weight" and blk.attn_mask is not None:
            out[m[1] + "attn_mask"] = blk.attn_mask
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda d: f"layers.{int(d[1]) - 1}.downsample", k)
        out["head." + k[len("head.fc."):] if k.startswith("head.fc.") else k] = v
        if blk is not None and k.endswith("attn.relative_position_bias_table"):
            out[m[1] + "attn.relative_position_index"] = blk.attn.relative_position_index
        if blk is not None and blk.post_norm and k.endswith("attn.v_bias" if blk.attn.v_bias is not None
                                                              else "attn.logit_scale"):
            out[m[1] + "attn.relative_coords_table"] = blk.attn.relative_coords_table  # V2 release order
            out[m[1] + "attn.relative_position_index"] = blk.attn.relative_position_index
    return out
