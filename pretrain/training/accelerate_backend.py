"""accelerate (DDP, autocast, GradScaler for fp16): weights as safetensors, optimizer as plain tensors.

Checkpoint files (rank 0 writes them: under DDP every rank holds the same state): model.safetensors,
optimizer.pt and, for fp16, scaler.pt, all readable with torch.load(weights_only=True); accelerate's own
save_state pickles its RNG files, and the loop saves RNG state itself.
"""
from __future__ import annotations

import contextlib
import io
import os
from datetime import timedelta
from typing import Optional

import torch

from ..compat import accelerate_new_state
from ..config import RunConfig
from ..io import write_bytes_atomic
from ..runs import read_state, write_state
from .backend import Backend
from .optim import SkipNonFinite


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class AccelerateBackend(Backend):
    name = "accelerate"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cfg.optim.precision]
        accelerate_new_state()  # this run's precision, whatever an earlier run in this process used
        self.acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                               kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))])
        self.rank, self.world, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device
        self.model = self.optimizer = None
        self._norm: Optional[torch.Tensor] = None  # this update's global gradient norm, set by step()

    def prepare(self, model, optimizer, accum: int) -> None:
        self.accum = accum
        if optimizer is None:
            self.model = self.acc.prepare(model)
        else:
            SkipNonFinite(optimizer, lambda: self._norm)
            self.model, self.optimizer = self.acc.prepare(model, optimizer)

    @property
    def module(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        with self.acc.autocast():
            return self.model(x, *rest).float()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # DDP all-reduces only on the boundary's backward
        sync = contextlib.nullcontext() if boundary or self.world == 1 else self.acc.no_sync(self.model)
        with sync:
            self.acc.backward(loss / self.accum)

    def step(self) -> Optional[torch.Tensor]:
        # foreach norm and clip, fused AdamW: the op count does not grow with the number of parameter tensors;
        # a non-finite norm makes the optimizer skip the update on the device (SkipNonFinite).
        self.acc.unscale_gradients()  # fp16: GradScaler's unscale (a no-op otherwise)
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        clip = self.cfg.optim.clip_grad
        if clip:
            torch.nn.utils.clip_grads_with_norm_(params, clip, self._norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._norm.detach().float()

    def save(self, ckpt_dir: str, tag: str) -> None:
        if self.rank != 0:
            return
        path = os.path.join(ckpt_dir, tag)
        write_state(os.path.join(path, "model.safetensors"), self.module.state_dict())
        write_bytes_atomic(os.path.join(path, "optimizer.pt"), _torch_bytes(self.optimizer.state_dict()))
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None:
            write_bytes_atomic(os.path.join(path, "scaler.pt"), _torch_bytes(scaler.state_dict()))

    def load(self, ckpt_dir: str, tag: str, saved_world: int) -> None:
        path = os.path.join(ckpt_dir, tag)
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"{path} has no model.safetensors: it was not written by the accelerate "
                                    "backend (resume with the backend that wrote it)")
        self.module.load_state_dict(read_state(os.path.join(path, "model.safetensors")))
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                                  weights_only=True))
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and os.path.exists(os.path.join(path, "scaler.pt")):
            scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))
