"""Swin Transformer building blocks.

Tokens travel in NHWC layout (B, H, W, C) between blocks, as in timm: window partitioning is then a
view/permute, and LayerNorm/Linear act on the last dimension without reshapes.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Size2 = Tuple[int, int]

# The official code fills masked (cross-region) logits with -100, not -inf: softmax then gives ~e-44
# weight instead of exactly zero. We keep the value so logits match released checkpoints bit for bit.
MASK_FILL = -100.0


def to_2tuple(x: int | Size2) -> Size2:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def window_partition(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C); H, W must be multiples of the window."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def relative_position_index(window: Size2) -> torch.Tensor:
    """(wh*ww, wh*ww) int64 index into a ((2wh-1)*(2ww-1), heads) bias table, official ordering."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def shifted_window_mask(resolution: Size2, window: Size2, shift: Size2) -> Optional[torch.Tensor]:
    """Additive mask (nW, N, N) with 0 inside a region and MASK_FILL across regions, or None without shift.

    `resolution` is the padded (window-divisible) feature size; regions are cut from the end, which is
    where the cyclic shift wraps tokens around.
    """
    if not any(shift):
        return None
    H, W = resolution
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            img[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    win = window_partition(img, window).squeeze(-1)  # nW, N
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_FILL)


def window_token_order(resolution: Size2, window: Size2, shift: Size2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token permutations that replace cyclic shift + padding + window partition (and their inverse).

    Returns (part, merge): `part[p]` is the flat (h*W + w) token that lands at window-ordered position p
    (H*W for a zero-padded slot), `merge[j]` is where token j sits in window order. Same order as the
    official roll -> pad (bottom/right) -> partition, as one gather instead of three copies.
    """
    H, W = resolution
    Hp, Wp = ceil_to(H, window[0]), ceil_to(W, window[1])
    grid = torch.full((Hp, Wp), H * W, dtype=torch.long)
    grid[:H, :W] = torch.roll(torch.arange(H * W).view(H, W), shifts=(-shift[0], -shift[1]), dims=(0, 1))
    part = window_partition(grid.view(1, Hp, Wp, 1), window).reshape(-1)
    valid = part < H * W
    merge = torch.empty(H * W, dtype=torch.long)
    merge[part[valid]] = torch.arange(Hp * Wp)[valid]
    return part, merge


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, len(index), C); an index equal to N reads a zero row (padding)."""
    if index.numel() > x.shape[1]:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
    return x.index_select(1, index)


class _PermuteTokens(torch.autograd.Function):
    """Gather rows by `index`; the gradient is the gather by `inverse` (the maps are inverse bijections
    on real tokens), which is much cheaper than index_select's scatter-add backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _gather_rows(grad.contiguous(), inverse), None, None


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, len(index), C) by `index`, differentiable through `inverse`."""
    return _PermuteTokens.apply(x, index, inverse)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero the residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on the last dimension: (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, img_size: Size2, patch_size: int, in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} but the model was built for img_size={self.img_size}; "
                "build it at that size (build_model(..., img_size=...)) and load the weights with "
                "pretrain.weights.load_pretrained, which resizes position tables")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): each 2x2 neighbourhood concatenated, zero-padded to even
    sizes, in the official order (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2])."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    H, W = x.shape[1], x.shape[2]
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + Linear: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C).
    `norm_after` (Swin V2): Linear first, then LayerNorm on the 2C output.

    The concat order is the official one, so `reduction.weight` is interchangeable with released checkpoints.
    """

    def __init__(self, dim: int, norm_after: bool = False):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)  # registered first, as the official
        self.norm = nn.LayerNorm(2 * dim if norm_after else 4 * dim)
        self.norm_after = norm_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = merge_2x2(x)
        return self.norm(self.reduction(x)) if self.norm_after else self.reduction(self.norm(x))


ATTN_IMPLS = ("auto", "sdpa", "flex", "math")
_FLEX = None


def compiled_flex_attention():
    """torch's FlexAttention, compiled once (eager flex_attention is an unfused reference implementation)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def check_attn_impl(impl: str, attn_drop: float) -> None:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn impl must be one of {'|'.join(ATTN_IMPLS)}, got {impl!r}")
    if impl == "flex" and attn_drop > 0:
        raise ValueError("attn impl 'flex' has no attention dropout: use attn_drop=0 or impl 'sdpa'/'math'")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, impl: str,
                     dropout: float, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per window (scale None: 1/sqrt(d) in sdpa and flex, none in math, the
    caller having scaled q). q, k, v: (Bw, heads, N, d); bias: (nW, heads, N, N) or (1, heads, N, N), one
    per window position, broadcast over the images (window b is at position b % nW).

    "sdpa": one fused call with the bias expanded to an additive mask; "flex": FlexAttention (compiled) with
    the bias read inside the kernel by a score_mod, nothing materialized per window; "math": the explicit
    matmul/softmax of the official code; "auto": sdpa on CUDA, math elsewhere."""
    Bw, heads, N, _ = q.shape
    nW = bias.shape[0]
    if impl == "flex":
        if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError("attn impl 'flex' has no CPU backward in torch: train on CPU with "
                               "model.attn_impl=math (or sdpa); flex is for CUDA and for CPU inference")
        bias = bias.to(q.dtype)

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[b % nW, h, q_idx, kv_idx]
        return compiled_flex_attention()(q, k, v, score_mod=add_bias, scale=scale)
    if impl == "sdpa" or (impl == "auto" and q.is_cuda):
        bias = bias.to(q.dtype).unsqueeze(0).expand(Bw // nW, -1, -1, -1, -1).reshape(Bw, -1, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    attn = (q if scale is None or scale == 1.0 else q * scale) @ k.transpose(-2, -1)
    attn = (attn.view(-1, nW, heads, N, N) + bias).view(Bw, heads, N, N).softmax(dim=-1)
    if dropout > 0:
        attn = F.dropout(attn, dropout)
    return attn @ v


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias.

    x: (B * nW, N, C) with N = wh * ww; mask: (nW, N, N) additive or None.

    `impl` picks the kernel (window_attention): "sdpa", "flex" (FlexAttention), "math" (the official code's
    matmul/softmax) or "auto" (sdpa on CUDA and math elsewhere).
    """

    def __init__(self, dim: int, num_heads: int, window: Size2, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        check_attn_impl(impl, attn_drop)
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.impl = impl
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
        # Derived from the window alone: never saved, rebuilt for every window size.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        N = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (Bw, heads, N, d)
        bias = self.position_bias().unsqueeze(0)  # 1, heads, N, N
        if mask is not None:
            bias = bias + mask.unsqueeze(1).to(bias.dtype)  # nW, heads, N, N: bias and mask in one add
        out = window_attention(q, k, v, bias, self.impl, self.attn_drop if self.training else 0.0, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(Bw, N, C)))


def log_spaced_coords(window: Size2, pretrained: Size2 = (0, 0)) -> torch.Tensor:
    """(1, 2wh-1, 2ww-1, 2) relative coordinates for the continuous position bias (Swin V2): divided by
    (pretrained window - 1), or by (window - 1) without one, scaled to [-8, 8] and log-spaced,
    sign(x) * log2(|x| + 1) / log2(8). A window larger than the pretrained one reaches past +-1 before the
    log: that is how V2 moves to larger windows without resizing anything."""
    ref = pretrained if pretrained[0] > 0 else window
    h = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32) / max(ref[0] - 1, 1)
    w = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32) / max(ref[1] - 1, 1)
    table = torch.stack(torch.meshgrid(h, w, indexing="ij"), dim=-1).unsqueeze(0) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def coords_reference(table: torch.Tensor) -> int:
    """The window a (1, 2M-1, 2M-1, 2) `relative_coords_table` was normalised by (its pretrained window, or
    M itself): the largest coordinate is log2(8 (M-1) / (ref-1) + 1) / 3."""
    M = (table.shape[1] + 1) // 2
    top = float(table[0, -1, M - 1, 0])  # the coordinate of offset M-1 along the first axis
    ratio = (2.0 ** (3.0 * top) - 1.0) / 8.0  # (M-1) / (ref-1)
    return M if M == 1 or ratio <= 0 else round((M - 1) / ratio + 1)


class WindowAttentionV2(nn.Module):
    """Swin V2 window attention: scaled cosine attention with a learnable per-head temperature (clamped
    at log(100)) and a continuous position bias, 16 * sigmoid(MLP(log-spaced coordinates)).

    x: (B * nW, N, C) with N = wh * ww; mask: (nW, N, N) additive or None. Same `impl` choice as V1.
    """

    def __init__(self, dim: int, num_heads: int, window: Size2, pretrained_window: Size2 = (0, 0),
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        check_attn_impl(impl, attn_drop)
        self.num_heads, self.window, self.pretrained_window = num_heads, window, pretrained_window
        self.impl, self.attn_drop = impl, attn_drop
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        # Derived from the windows alone: never saved, rebuilt for every window size.
        self.register_buffer("relative_coords_table", log_spaced_coords(window, pretrained_window), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N): the CPB MLP on this window's coordinates, 16 * sigmoid."""
        N = self.window[0] * self.window[1]
        coords = self.relative_coords_table.to(self.cpb_mlp[0].weight.dtype)  # a bf16 module (DeepSpeed) too
        table = self.cpb_mlp(coords).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        Bw, N, C = x.shape
        bias_qkv = None if self.q_bias is None else torch.cat(
            (self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias_qkv).reshape(Bw, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (Bw, heads, N, d)
        # Cosine attention: the temperature goes on the normalized q (N x d), not on the N x N logits.
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (heads, 1, 1)
        q, k = F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(k, dim=-1)
        bias = self.position_bias().unsqueeze(0)  # 1, heads, N, N
        if mask is not None:
            bias = bias + mask.unsqueeze(1).to(bias.dtype)  # nW, heads, N, N
        out = window_attention(q, k, v, bias, self.impl, self.attn_drop if self.training else 0.0, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(Bw, N, C)))


def trunc_normal_init(module: nn.Module) -> None:
    """Official init: truncated normal (std .02) for Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


def ceil_to(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)
