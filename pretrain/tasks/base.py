"""The objective, as a seam of the loop: what a batch means, its loss, and what evaluation reports; and, end to
end, what else differs between objectives: the model a run trains, what the loader makes of each sample, what
a run exports. A new objective is a new task module registered in pretrain.tasks, not a branch elsewhere.

A task turns a loader batch into a loss (training) and into summable counts (evaluation, all-reduced over
ranks, then turned into metrics). The loop knows nothing else of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ..config import ModelSection, RunConfig
from ..data.targets import Targets

Forward = Callable[..., torch.Tensor]  # the model's forward through the backend: (x, *rest) -> output


class Task:
    name = ""
    export_layouts: tuple[str, ...] = ()  # what a run of this task exports (python -m pretrain.cli.release)

    # ---- what the rest of the library asks of the objective (class-level: no instance, no device needed)
    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, Any]:
        """The task's own config section (named after it), as saved in a run's config.json; {} if none."""
        section = getattr(cfg, cls.name, None)
        return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}

    @classmethod
    def build_model(cls, model: ModelSection, settings: Mapping[str, Any]) -> torch.nn.Module:
        """The model a run of this task trains, from the model section and the task's settings (a config's,
        or a saved run's `SavedConfig.task_settings`)."""
        raise NotImplementedError

    @classmethod
    def model_for(cls, cfg: RunConfig) -> torch.nn.Module:
        """The model a run of this config trains."""
        return cls.build_model(cfg.model, cls.settings(cfg))

    @classmethod
    def targets(cls, cfg: RunConfig) -> Targets:
        """What the loader makes of each sample besides its image (pretrain.data.targets)."""
        raise NotImplementedError

    @classmethod
    def export_name(cls, model: torch.nn.Module) -> str:
        """The part of an exported file's name that says what the weights are (e.g. `1000cls`)."""
        raise NotImplementedError

    def encoder(self, module: torch.nn.Module) -> torch.nn.Module:
        """The Swin encoder inside the model this task trains (its features are what a probe measures)."""
        return module

    # ---- the loop's seam

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


