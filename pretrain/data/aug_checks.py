"""The augmentation keys' rules, the transforms' own (pretrain.data.transforms): ranges, the keys that act only
together, and timm's parse of the RandAugment spec. Torch-free (config.validate runs `aug_checks` on every
config read); `auto_augment_check` imports timm and runs at a run's start, before any process group."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from ..checks import Check, in_range, one_of

if TYPE_CHECKING:
    from ..config import AugConfig

# timm's interpolation names (timm.data.transforms str_to_interp_mode, + "random": bilinear or bicubic per image)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random")


def aug_checks(a: "AugConfig") -> list[Check]:
    return [
        one_of(a.jpeg_roi, "aug.jpeg_roi", ("auto", "on", "off")),
        in_range(a.jitter, "aug.color_jitter", 0),
        (a.color_jitter is None or a.auto_augment is None,
         f"aug.color_jitter={a.color_jitter} acts nowhere with aug.auto_augment={a.auto_augment!r} (timm applies "
         "ColorJitter only without RandAugment): remove aug.color_jitter, or --set aug.auto_augment=null"),
        in_range(a.hflip, "aug.hflip", 0, 1),
        in_range(a.re_prob, "aug.re_prob", 0, 1),
        in_range(a.mixup, "aug.mixup", 0),
        in_range(a.cutmix, "aug.cutmix", 0),
        in_range(a.mixup_prob, "aug.mixup_prob", 0, 1),
        in_range(a.mixup_switch_prob, "aug.mixup_switch_prob", 0, 1),
        in_range(a.label_smoothing, "aug.label_smoothing", 0, 1, hi_open=True),
        in_range(a.crop_pct, "aug.eval_crop_pct", 0, 1, lo_open=True),
        (a.eval_crop_pct is None or a.eval_crop,
         f"aug.eval_crop_pct={a.eval_crop_pct} acts nowhere with aug.eval_crop=false (the evaluation resizes "
         "straight to img_size): remove aug.eval_crop_pct, or --set aug.eval_crop=true"),
        one_of(a.interpolation, "aug.interpolation", INTERPOLATIONS),
        (len(a.mean) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in a.mean),
         f"aug.mean must be 3 numbers (R, G, B), got {list(a.mean)}"),
        (len(a.std) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in a.std),
         f"aug.std must be 3 numbers > 0 (R, G, B), got {list(a.std)}"),
    ]


def auto_augment_check(spec: Optional[str]) -> tuple[bool, str]:
    """timm parses the spec when the transform is built (on the workers): the Trainer parses it first, before
    any process group (here it would import timm and torch into every config read)."""
    if spec is None:
        return True, ""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    build = (rand_augment_transform if spec.startswith("rand") else augment_and_mix_transform
             if spec.startswith("augmix") else auto_augment_transform)
    try:
        build(spec, hparams)
        return True, ""
    except Exception as e:  # timm raises AssertionError/KeyError/ValueError for an unknown spec
        return False, (f"aug.auto_augment={spec!r} is not a timm augmentation spec ({type(e).__name__}: {e}); "
                       "e.g. 'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w4-d2', 'original', or null for none")
