"""The Swin variants' shapes and the rules an architecture must keep, without torch: a config is checked
against them when it is read (pretrain.config), and a model is built from them (pretrain.models.swin)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

VARIANTS: dict[str, dict] = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "swinv2_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), version=2),
    "swinv2_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), version=2),
    "swinv2_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), version=2),
    "swinv2_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), version=2),
}


def architecture_problem(img_size: Sequence[int], patch_size: int, embed_dim: int, depths: Sequence[int],
                         num_heads: Sequence[int], window_size: int, version: int,
                         pretrained_window_sizes: Optional[Sequence[int]]) -> Optional[str]:
    """What makes these values not fit together (None: they do)."""
    if len(depths) != len(num_heads):
        return f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length"
    if version not in (1, 2):
        return f"version must be 1 (Swin) or 2 (Swin V2), got {version}"
    if pretrained_window_sizes and (version != 2 or len(pretrained_window_sizes) != len(depths)):
        return (f"pretrained_window_sizes {tuple(pretrained_window_sizes)}: Swin V2 only, one per stage "
                f"({len(depths)})")
    if img_size[0] % patch_size or img_size[1] % patch_size:
        return f"img_size {tuple(img_size)} is not a multiple of the patch size {patch_size}"
    for i, heads in enumerate(num_heads):
        if heads < 1 or (embed_dim * 2 ** i) % heads:
            return (f"stage {i}: {embed_dim * 2 ** i} channels (embed_dim {embed_dim} x 2^{i}) are not divisible "
                    f"by num_heads[{i}]={heads}")
    if any(d < 1 for d in depths) or window_size < 1:
        return f"depths {tuple(depths)} and window_size {window_size} must be >= 1"
    return None


def mask_problem(img_size: int, mask_patch_size: int, patch_size: int, mask_ratio: float, prefix: str = "") -> str:
    """Why a mask configuration can't work ("" if it can), naming the keys with `prefix`."""
    if mask_patch_size <= 0 or img_size % mask_patch_size:
        return (f"{prefix}mask_patch_size={mask_patch_size} does not divide the image size {img_size}: use a "
                f"divisor of it (the recipe: 32 at 192)")
    if mask_patch_size % patch_size:
        return (f"{prefix}mask_patch_size={mask_patch_size} is not a multiple of the model's patch size "
                f"{patch_size}: masks are whole patches")
    if not 0 < mask_ratio < 1:
        return f"{prefix}mask_ratio={mask_ratio} must be in (0, 1) (the recipe: 0.6)"
    squares = (img_size // mask_patch_size) ** 2
    if math.ceil(squares * mask_ratio) >= squares:  # MaskGenerator masks ceil(ratio * squares) of them
        return (f"{prefix}mask_ratio={mask_ratio} masks all {squares} squares of {mask_patch_size} px at "
                f"{img_size} px (ceil({mask_ratio} x {squares}) = {squares}): nothing visible is left to "
                f"reconstruct from; lower {prefix}mask_ratio or use smaller {prefix}mask_patch_size")
    return ""
