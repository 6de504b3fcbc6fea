"""What a run reports: FLOPs and MFU, and the records written to metrics.jsonl,
TensorBoard and the progress bar (rank 0 only)."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import torch

from ..compat import dispatch_mode
from ..io import write_bytes_atomic

log = logging.getLogger("pretrain")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "L40S": 362.0}  # bf16 dense


def forward_flops(model: torch.nn.Module, img_size: int) -> float:
    """FLOPs of one forward pass on one image (torch's FLOP counter on the CPU model). Counted with the math
    attention kernel: the same arithmetic as sdpa's and flex's, and the only one the counter can trace (flex
    is a compiled higher-order op it cannot enter)."""
    from torch.utils.flop_counter import FlopCounterMode
    attention = [m for m in model.modules() if isinstance(getattr(m, "impl", None), str)]
    kept = [m.impl for m in attention]
    for m in attention:
        m.impl = "math"
    counter = FlopCounterMode(display=False)
    inputs = model.example_inputs() if hasattr(model, "example_inputs") else (torch.zeros(1, 3, img_size, img_size),)
    try:
        with counter, torch.no_grad():
            model(*inputs)
    finally:
        for m, impl in zip(attention, kept):
            m.impl = impl
    return float(counter.get_total_flops())


class OpCounter(dispatch_mode()):
    """Counts the aten ops that reach the dispatcher inside `with OpCounter() as c:` (c.ops: name -> count;
    a foreach or fused op over N tensors counts once): what an optimizer update launches, per kind."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def keep_history_until(path: str, step: int) -> int:
    """Drop the records after `step` from a metrics file (a resumed run rewrites what came after its
    checkpoint); returns how many were dropped. One history per run, so plots and tools read it right."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_bytes_atomic(path, "".join(x + "\n" for x in kept).encode())
    return len(lines) - len(kept)


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard, + a progress bar) on rank 0; every other rank writes nothing."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, progress: bool, total: int, initial: int,
                 every_steps: int = 1):
        self.enabled, self.run_dir, self.every_steps = enabled, run_dir, every_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = self._tb = self._bar = None
        self._tensorboard, self._progress, self._total, self._initial = tensorboard, progress, total, initial
        self._notes: dict[str, str] = {}

    def should_log(self, step: int) -> bool:
        """Is update `step` one to log (every `every_steps`, log.every_steps, and the last)?"""
        return step % self.every_steps == 0 or step == self._total

    def start(self, resumed_step: Optional[int]) -> None:
        """Open the history: continued after `resumed_step`, or new for a fresh run (None)."""
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        if resumed_step is None and os.path.exists(self.path):
            os.unlink(self.path)  # a fresh run's history starts empty
        elif resumed_step is not None:
            dropped = keep_history_until(self.path, resumed_step)
            if dropped:
                log.info("metrics.jsonl: dropped %d record(s) after update %d (re-run after the resume)",
                         dropped, resumed_step)
        self._file = open(self.path, "a")
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"))
            except ImportError:
                log.warning("tensorboard is not installed: TensorBoard logging off (pip install "
                            "'swin-pretrain[tensorboard]', or --set log.tensorboard=false)")
        if self._progress:
            from tqdm import tqdm
            self._bar = tqdm(total=self._total, initial=self._initial, unit="step", dynamic_ncols=True)

    def write(self, rec: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, rec["step"])

    def first_update(self, step: int, seconds: float, compiled: bool, epoch_share: float, print0) -> None:
        """How long a (re)start took to its first update, and the share of the split an epoch trains on."""
        self.write({"step": step, "time_to_first_step_s": seconds, "compiled": compiled, "epoch_share": epoch_share})
        print0(f"first update after {seconds:.1f} s (process group, engine, data, "
               f"{'compilation, ' if compiled else ''}forward/backward)")

    def log_step(self, rec: dict, total: int, global_batch: int) -> None:
        """A training record: into the history, and onto the progress bar with the time left."""
        self.write(rec)
        left = (total - rec["step"]) * global_batch / max(rec["img_s"], 1e-9)
        self.progress(rec["step"], loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_s']:.0f}",
                      eta=f"{left / 3600:.1f}h", **self._notes)

    def note(self, **postfix: str) -> None:
        """Values the progress line keeps showing until the next note (the last kNN probe)."""
        self._notes.update(postfix)

    def progress(self, step: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**postfix)
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        for h in (self._bar, self._file, self._tb):
            if h is not None:
                h.close()
        self._file = self._tb = self._bar = None


class StepStats:
    """What the loop accumulates between two log records, on the device (no host sync per micro-batch):
    the sum and count of finite losses, and the images seen. `record` all-reduces and resets them."""

    def __init__(self, device: torch.device, flops_per_image: float):
        self.device, self.flops_per_image = device, flops_per_image
        self.loss_sum = torch.zeros((), device=device)
        self.loss_n = torch.zeros((), device=device)
        self.images = 0
        self.t_last = time.time()

    def add(self, loss: torch.Tensor, images: int) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)  # the logged mean is over finite losses
        self.loss_n += finite
        self.images += images

    def record(self, all_reduce, world: int) -> dict:
        """loss (mean over every micro-batch of every rank), img/s, TFLOP/s per rank, MFU (CUDA)."""
        sums = all_reduce(torch.stack([self.loss_sum.float(), self.loss_n.float()]))
        mean_loss = (sums[0] / sums[1].clamp(min=1)).item()
        self.loss_sum.zero_()
        self.loss_n.zero_()
        img_s_rank = self.images / max(time.time() - self.t_last, 1e-9)
        self.t_last, self.images = time.time(), 0
        tflops = 3 * self.flops_per_image * img_s_rank / 1e12  # forward + backward ~ 3x forward
        rec = {"loss": mean_loss, "img_s_per_rank": img_s_rank, "img_s": img_s_rank * world,
               "tflops_per_rank": tflops}
        peak = peak_tflops(self.device)
        if peak:
            rec["mfu"] = tflops / peak
        return rec
