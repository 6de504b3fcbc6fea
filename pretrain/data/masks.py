"""SimMIM's data side, as the official `data/data_simmim_pt.py` keeps it: the mask generator and the
per-sample transform (a random resized crop and a flip, then a mask), for the loader as `Masks` targets."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torchvision import transforms as T

from ..architecture import mask_problem
from ..config import AugConfig, SimMIMSection
from ..seeding import mix_seed
from .jpeg import roi_decoder
from .manifest import DataError
from .targets import Targets
from .transforms import DecodeRandomResizedCrop, eval_transform, to_uint8_tensor


class MaskGenerator:
    """The official `MaskGenerator`: ceil(ratio * n) of the n mask patches, chosen uniformly, each repeated to
    the model's patch grid: (H/4, W/4) uint8. `rng` makes a mask a function of a seed (per sample)."""

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        problem = mask_problem(input_size, mask_patch_size, model_patch_size, mask_ratio)
        if problem:
            raise ValueError(problem)
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))

    def __call__(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        perm = (rng or np.random.default_rng()).permutation(self.token_count)
        mask = np.zeros(self.token_count, dtype=np.uint8)
        mask[perm[:self.mask_count]] = 1
        mask = mask.reshape(self.rand_size, self.rand_size)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


def simmim_transform(cfg: AugConfig, scale: tuple[float, float], ratio: tuple[float, float]
                     ) -> Callable[[bytes], torch.Tensor]:
    """The official SimMIM transform: RandomResizedCrop (scale, ratio), horizontal flip, nothing else; uint8
    out as the classification transform (normalized on the device), decoding only what the crop needs."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    rrc = RandomResizedCropAndInterpolation(cfg.img_size, scale=tuple(scale), ratio=tuple(ratio),
                                            interpolation=cfg.interpolation)
    crop = DecodeRandomResizedCrop(rrc, draft=cfg.draft_decode, roi=roi_decoder(cfg.jpeg_roi))
    flip = [T.RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else []
    return T.Compose([crop, *flip, to_uint8_tensor])


class Masks(Targets):
    """SimMIM batches: (images, masks (B, H/4, W/4) uint8); labels are not read. Training masks are seeded by
    (seed, epoch, key), as the augmentation; validation masks by the key alone, so every run is scored on the
    same masks."""

    labelled = False

    def __init__(self, section: SimMIMSection, img_size: int, patch_size: int = 4):
        try:
            self.generator = MaskGenerator(img_size, section.mask_patch_size, patch_size, section.mask_ratio)
        except ValueError as e:  # its message names the key
            raise DataError(f"simmim.{e}") from None
        self.crop_scale, self.crop_ratio, self.patch_size = section.crop_scale, section.crop_ratio, patch_size

    def transform(self, aug: AugConfig, training: bool) -> Callable:
        return simmim_transform(aug, self.crop_scale, self.crop_ratio) if training else eval_transform(aug)

    def target(self, label: Optional[int], key: str, url: str, seed: Optional[tuple[int, int]]) -> torch.Tensor:
        rng = np.random.default_rng(mix_seed(*seed, key, "mask") if seed else mix_seed("simmim-validation", key))
        return torch.from_numpy(self.generator(rng))

    def collate(self, targets: list) -> torch.Tensor:
        return torch.stack(targets)

    def padding(self, img_size: int) -> torch.Tensor:
        side = img_size // self.patch_size
        return torch.zeros(1, side, side, dtype=torch.uint8)
