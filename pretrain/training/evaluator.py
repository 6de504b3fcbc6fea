"""Evaluation over exactly one split's samples, on every rank, for any task.

    Evaluator(backend, loader, task, source=cfg.data.val)(forward=None, prefix="val_") -> metrics

Every rank reads its share of the validation shards once (padded batches carry a `valid` mask), the task's
counts are summed over ranks, and a split that yields fewer samples than its manifest lists is reported
with a warning (short or corrupt shards), never silently.
"""
from __future__ import annotations

import io
import logging
import os
from typing import Callable, Optional

import torch
from PIL import Image

from ..collective import printer
from ..config import RunConfig
from ..data.loader import ShardLoader
from ..io import write_bytes_atomic
from ..models import model_from_section
from ..tasks import Classification, Forward, Task
from .backend import Backend
from .data import val_loader
from .distributed import join

log = logging.getLogger("pretrain")


class Evaluator:
    def __init__(self, backend: Backend, loader: ShardLoader, task: Task, source: str = "",
                 print0: Callable[[str], None] = print, out_dir: str = "", every_steps: int = 0):
        """`out_dir`: where the task's pictures go (`<out_dir>/reconstructions/`); "": none are written.
        `every_steps` (log.eval_every_steps): evaluate every N updates; 0: at each epoch's end."""
        self.backend, self.loader, self.task, self.source, self.print0 = backend, loader, task, source, print0
        self.out_dir, self.every_steps = out_dir, every_steps

    def should_run(self, step: int, epoch_end: bool = False) -> bool:
        """Is an evaluation due after update `step` (`epoch_end`: the update that ended an epoch)?"""
        return step % self.every_steps == 0 if self.every_steps else epoch_end

    @torch.no_grad()
    def __call__(self, forward: Optional[Forward] = None, prefix: str = "val_") -> dict:
        self.backend.train(False)
        forward = forward or self.backend.forward
        sums: Optional[torch.Tensor] = None
        for batch in self.loader:
            counts = self.task.eval_counts(forward, batch)
            sums = counts if sums is None else sums + counts
        if sums is None:
            raise RuntimeError(f"{self.source}: the validation loader yielded no batch")
        metrics = self.task.eval_metrics(self.backend.all_reduce(sums), prefix)
        self._check_count(metrics, prefix)
        return metrics

    def report(self, step: int, ema=None) -> dict:
        """The weights' metrics (and the EMA copy's, `val_ema_*`), printed as one line on rank 0."""
        m = self(prefix="val_")
        self._picture(step)
        line = f"eval at update {step}: {self.task.describe(m, 'val_')}  ({m['val_samples']} images)"
        if ema is not None:
            m.update(self(ema.forward_in(self.backend.autocast), prefix="val_ema_"))
            line += f"  EMA {self.task.describe(m, 'val_ema_')}"
        self.print0(line)
        return m

    @torch.no_grad()
    def _picture(self, step: int) -> None:
        """The task's picture of this evaluation (every rank draws: the forward may be collective; rank 0
        writes it, atomically)."""
        image = self.task.picture(self.backend.forward)
        if image is None or not self.out_dir or self.backend.rank != 0:
            return
        path = os.path.join(self.out_dir, "reconstructions", f"step{step:08d}.png")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        write_bytes_atomic(path, buf.getvalue())
        self.print0(f"reconstructions (original | masked | reconstructed): {path}")

    def _check_count(self, metrics: dict, prefix: str) -> None:
        seen, expected = metrics.get(prefix + "samples"), self.loader.num_samples
        if seen is None or seen == expected:
            return
        metrics[prefix + "expected"] = expected
        msg = (f"WARNING: evaluated {seen} of the {expected} validation images the manifest lists ({self.source}): "
               "some shards are short or corrupt (python -m pretrain.cli.make_shards verify); the metrics are over "
               "the images read")
        log.warning(msg)
        self.print0(msg)

    def close(self) -> None:
        self.loader.close()


def evaluate_weights(cfg: RunConfig, init_weights: Callable[[torch.nn.Module], None], name: str = "evaluation"):
    """Evaluation alone: the backend (no optimizer), the model with `init_weights` applied, the validation
    split; no Trainer, no run dir written."""
    backend = join(cfg, name)
    model = model_from_section(cfg.model)
    init_weights(model)
    backend.prepare(model, None, 1)
    evaluator = Evaluator(backend, val_loader(cfg, backend), Classification(cfg, backend.device, training=False),
                          cfg.data.val, printer(backend.rank))
    try:
        return evaluator(prefix="val_")
    finally:
        evaluator.close()
