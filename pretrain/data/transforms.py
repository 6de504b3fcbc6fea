"""Image transforms: timm's augmentation on the CPU side, uint8 out; normalization, random erasing and
Mixup/CutMix on the batch, on the training device.

Keeping float conversion and normalization off the loader workers saves CPU per image and sends 4x fewer
bytes to the GPU.
"""
from __future__ import annotations

import io
import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode
from timm.data.transforms_factory import transforms_imagenet_train
from torchvision import transforms as T
from torchvision.transforms.functional import pil_modes_mapping

from ..compat import replace_timm_augment_ops
from ..config import AugConfig
from .jpeg import RoiDecoder, roi_decoder


def _posterize_keep_zero_bits(img, bits_to_keep, **__):
    """Posterize that accepts 0 bits (a black image), as Pillow < 13 did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    """timm's 'inc1' RandAugment (the Swin recipe) asks for 0-bit posterize at magnitude 10, which
    Pillow >= 13 rejects (ValueError mid-epoch). Keep the old meaning instead, only where Pillow needs it."""
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        replace_timm_augment_ops(_posterize_keep_zero_bits, ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"))


_patch_timm_posterize()

__all__ = ["AugConfig", "BatchAugment", "train_transform", "eval_transform"]


def decode(data: bytes, min_side: int = 0) -> Image.Image:
    """JPEG bytes -> RGB image, decoded at a reduced size when `min_side` allows (Pillow's draft)."""
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))  # picks the largest 1/2^k scale keeping both sides >= min_side
    return img.convert("RGB")


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8, no float conversion."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# torch's uint8 antialiased kernels (AVX2) compute PIL's bicubic/bilinear filters to within 1 grey level,
# several times faster than Pillow; other PIL filters stay with Pillow.
_TORCH_RESIZE = (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR)


def resize(pixels: np.ndarray, size: tuple[int, int], interp: T.InterpolationMode) -> Image.Image:
    """(h, w, 3) uint8 -> PIL RGB image of `size` (w, h), with PIL's filter `interp`."""
    if interp not in _TORCH_RESIZE:
        return Image.fromarray(np.ascontiguousarray(pixels)).resize(size, pil_modes_mapping[interp])
    # NHWC memory (channels_last) in and out: the kernel's fast layout, and the output is already the
    # HWC array PIL copies from.
    x = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size[1], size[0]), mode=interp.value, antialias=True)
    return Image.fromarray(x[0].permute(1, 2, 0).numpy())


def dct_scale(w: int, h: int, out_w: int, out_h: int) -> int:
    """The largest 1/k DCT scale (k in 1, 2, 4, 8) that keeps a w x h region at least out_w x out_h."""
    k = 1
    while k < 8 and w // (2 * k) >= out_w and h // (2 * k) >= out_h:
        k *= 2
    return k


def _decode_whole(img: Image.Image, k: int) -> np.ndarray:
    """The whole image as (H, W, 3) uint8, JPEGs at DCT scale 1/k (Pillow's draft mode); Pillow raises on
    corrupt data."""
    if k > 1:  # Pillow picks the scale from floor(size / requested): ask for floor(size / k)
        img.draft("RGB", (img.size[0] // k, img.size[1] // k))
    return np.array(img.convert("RGB"))  # writable, for torch.from_numpy


class DecodeRandomResizedCrop:
    """timm's RandomResizedCrop fused with decoding: image bytes -> cropped and resized PIL image.

    The crop box is drawn first, by timm's own `get_params` on the header's size (the same random draws
    as timm's transform), then only what the crop needs is decoded:
    - scale (`draft`): a JPEG is decoded at the smallest 1/2^k DCT scale that keeps the crop region at
      least as large as the output in both dimensions; the pixels skipped are the ones the downscale
      would average away. At k > 1 the box is rounded to whole decoded pixels (k/2 source pixels at most).
    - region (`roi`, pretrain.data.jpeg): libjpeg-turbo decodes only the crop's rows and columns, with the
      same pixels as a whole-image decode. Without it, or for anything else, the whole image is decoded.
    Then one resize with torch's uint8 antialiased kernels (PIL's bicubic/bilinear to within 1 grey level).
    """

    def __init__(self, rrc, draft: bool = True, roi: Optional[RoiDecoder] = None):
        self.rrc, self.draft, self.roi = rrc, draft, roi

    def __call__(self, data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        W, H = img.size
        i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        interp = self.rrc.interpolation
        interp = random.choice(interp) if isinstance(interp, (tuple, list)) else interp
        out_h, out_w = self.rrc.size
        jpeg = img.format == "JPEG"
        k = dct_scale(w, h, out_w, out_h) if jpeg and self.draft else 1
        x0, y0 = round(j / k), round(i / k)
        x1 = max(x0 + 1, min(round((j + w) / k), -(-W // k)))
        y1 = max(y0 + 1, min(round((i + h) / k), -(-H // k)))
        pixels = None
        if self.roi is not None and jpeg and img.mode in ("RGB", "L"):
            pixels = self.roi.decode(data, k, x0, y0, x1 - x0, y1 - y0)  # None: corrupt, let Pillow judge
        if pixels is None:
            pixels = _decode_whole(img, k)[y0:y1, x0:x1]
        return resize(pixels, (out_w, out_h), interp)


def train_transform(cfg: AugConfig) -> Callable[[bytes], torch.Tensor]:
    """Image bytes -> augmented uint8 (3, S, S): timm's recipe, decoding only what the random crop needs."""
    primary, secondary, _final = transforms_imagenet_train(
        cfg.img_size, auto_augment=cfg.auto_augment, color_jitter=cfg.jitter,
        interpolation=cfg.interpolation, hflip=cfg.hflip, separate=True)
    first, *rest = primary.transforms
    crop = DecodeRandomResizedCrop(first, draft=cfg.draft_decode, roi=roi_decoder(cfg.jpeg_roi))
    return T.Compose([crop, *rest, *secondary.transforms, to_uint8_tensor])


def eval_transform(cfg: AugConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (and center-crop) with aug.interpolation, as the official build_transform evaluates ('random', a
    training-only choice, evaluates bicubic as timm's eval transform does)."""
    interp = str_to_interp_mode("bicubic" if cfg.interpolation == "random" else cfg.interpolation)
    if cfg.eval_crop:
        size = int(cfg.img_size / cfg.crop_pct)
        return T.Compose([T.Resize(size, interpolation=interp), T.CenterCrop(cfg.img_size), to_uint8_tensor])
    return T.Compose([T.Resize((cfg.img_size, cfg.img_size), interpolation=interp), to_uint8_tensor])


def eval_decode_min_side(cfg: AugConfig) -> int:
    if not cfg.draft_decode:
        return 0
    return int(cfg.img_size / cfg.crop_pct) if cfg.eval_crop else cfg.img_size


def seeded(seed: int, fn: Callable, *args):
    """Run fn with Python's and torch's RNG seeded for one sample, restoring the caller's RNG after."""
    # The CPU generator only: torch.manual_seed would also queue lazy CUDA seeding, which records a
    # Python traceback per call (a third of the per-image cost on a loader worker).
    gen = torch.default_generator
    py_state, torch_state = random.getstate(), gen.get_state()
    random.seed(seed)
    gen.manual_seed(seed)
    try:
        return fn(*args)
    finally:
        random.setstate(py_state)
        gen.set_state(torch_state)


class BatchAugment:
    """On-device: uint8 (B,3,H,W) -> normalized float, random erasing, Mixup/CutMix with label smoothing.

    `step_seed` makes the random choices a function of the training step (for exact resume).
    """

    def __init__(self, cfg: AugConfig, num_classes: int, device: torch.device | str, training: bool = True):
        self.device = torch.device(device)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1) * 255
        self.training = training
        self.erase = RandomErasing(cfg.re_prob, mode="pixel", device=self.device) if training and cfg.re_prob else None
        active = training and (cfg.mixup > 0 or cfg.cutmix > 0)
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                           num_classes=num_classes) if active else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step_seed: Optional[int] = None):
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        y = labels.to(self.device, non_blocking=True)
        if not self.training:
            return x, y
        np_state = np.random.get_state() if step_seed is not None else None
        if step_seed is not None:
            np.random.seed(step_seed % 2**32)  # timm's Mixup draws from numpy's global RNG
        try:
            if self.erase is not None:
                x = seeded(step_seed, self.erase, x) if step_seed is not None else self.erase(x)
            if self.mixup is not None and x.shape[0] % 2 == 0:
                x, y = self.mixup(x, y)
        finally:
            if np_state is not None:
                np.random.set_state(np_state)
        return x, y
