"""What a sample becomes besides its image, chosen by the task (pretrain.tasks): the loader reads, shuffles and
decodes, and asks its `Targets` for the image transform, each sample's target, how targets batch, and what a
padding sample carries. Classification's `Labels` are here; SimMIM's `Masks` in pretrain.data.masks.

A Targets object is copied into every loader worker process: plain attributes only, built in the parent."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import AugConfig
from .manifest import DataError, Split
from .transforms import eval_transform, train_transform


class Targets:
    labelled = True  # reads each sample's class (`cls`, or the split's alt_label)

    def check(self, split: Split, source: str, split_name: str) -> None:
        """Refuse a split this target can't be made from (before any sample is read)."""

    def transform(self, aug: AugConfig, training: bool) -> Callable:
        """Training: encoded bytes -> uint8 (3, H, W) (crop-first decoding); evaluation: a decoded image -> same."""
        return train_transform(aug) if training else eval_transform(aug)

    def target(self, label: Optional[int], key: str, url: str, seed: Optional[tuple[int, int]]):
        """One sample's target; `seed` is (run seed, epoch) in training, None in evaluation."""
        raise NotImplementedError

    def collate(self, targets: list) -> torch.Tensor:
        return torch.tensor(targets, dtype=torch.long)

    def padding(self, img_size: int) -> torch.Tensor:
        """The target of a one-sample padding batch (evaluation pads ranks to equal batch counts)."""
        return torch.zeros(1, dtype=torch.long)


class Labels(Targets):
    """Class labels (classification). `num_classes`: the model's; a label outside [0, num_classes) stops the
    run naming it (0: unchecked)."""

    def __init__(self, num_classes: int = 0):
        self.num_classes = num_classes

    def check(self, split: Split, source: str, split_name: str) -> None:
        if not split.labelled:
            raise DataError(f"{source}: split {split_name!r} is unlabelled (written with make_shards --no-labels): "
                            "classification needs labels; train it with task=simmim, or shard a labelled source")
        if self.num_classes and split.num_classes and split.num_classes > self.num_classes:
            raise DataError(f"{source}: its manifest says {split.num_classes} classes, more than the model's "
                            f"{self.num_classes} (model.num_classes): --set model.num_classes={split.num_classes}, "
                            "or point data.train/val at shards of the model's classes")

    def target(self, label: Optional[int], key: str, url: str, seed: Optional[tuple[int, int]]) -> int:
        if self.num_classes and not 0 <= label < self.num_classes:
            raise DataError(f"{url}: sample {key} has label {label}, outside the model's {self.num_classes} "
                            "classes (model.num_classes): the shards are labelled for another class set; "
                            "set model.num_classes to theirs or point data.train/val at matching shards")
        return label
