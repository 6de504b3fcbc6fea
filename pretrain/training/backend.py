"""The seam between the training loop and whatever runs the model on many ranks.

A backend owns the process group, the wrapped model and optimizer, mixed precision, gradient accumulation
and its own checkpoint files; the loop (pretrain.training.loop) owns everything else. Two exist:
"deepspeed" (ZeRO 0-3, pretraining's default) and "accelerate" (DDP, fine-tuning's default); either runs
either stage (`backend` in the config).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from ..config import RunConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def free_port() -> int:
    """A TCP port free now on this host, for one job's rendezvous: two jobs at once (a demo and a test, two
    single-process runs) must never meet on one port."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """Per-rank handle. Call order: __init__ (joins the process group) -> prepare(model, optimizer) ->
    per micro-batch forward / backward(loss, boundary) -> step() on each accumulation boundary."""

    name = ""
    rank: int
    world: int
    device: torch.device

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.accum = 1

    def prepare(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], accum: int) -> None:
        raise NotImplementedError

    @property
    def module(self) -> torch.nn.Module:
        """The model without wrappers (evaluation, EMA, export)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        raise NotImplementedError

    def compile(self) -> None:
        """torch.compile the model in place: parameter names (and so checkpoints) stay as they are."""
        self.module.compile()

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        """float32 normalized images (B, 3, H, W) (and the task's other inputs, e.g. SimMIM's mask) -> the
        model's output (logits, a loss) as float32, computed in the run's precision."""
        raise NotImplementedError

    def own_parameters(self, module: torch.nn.Module):
        """A context in which `module`'s own (not its submodules') parameters are whole, for a call other than
        its forward (ZeRO-3 partitions them; everywhere else they already are)."""
        return nullcontext()

    def autocast(self):
        """The precision context for a module outside the backend (the EMA copy)."""
        dtype = DTYPES[self.cfg.optim.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Accumulate this micro-batch's gradients; `boundary`: the last micro-batch of an update."""
        raise NotImplementedError

    def step(self) -> Optional[torch.Tensor]:
        """Clip, update, zero the gradients; returns the global gradient norm before clipping (or None)."""
        raise NotImplementedError

    def save(self, ckpt_dir: str, tag: str) -> None:
        """Write model and optimizer state under ckpt_dir/tag (every rank calls it)."""
        raise NotImplementedError

    def load(self, ckpt_dir: str, tag: str, saved_world: int) -> None:
        """Restore what save() wrote, also when saved_world differs from this run's world size."""
        raise NotImplementedError

    # collectives that also work in a single process without a process group
    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            dist.barrier()

