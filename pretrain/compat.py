"""Every reach into another library's private or version-dependent API, in one place, each with a probe.

The rest of the library calls these names instead of the private ones, so a release of torch, DeepSpeed or timm
that moves one breaks here, where `check()` names it, not deep inside a run. `check()` runs once at a run's
start (pretrain.training.distributed.join), before any process group: each probe looks for the thing itself,
and a failure is one line naming what is missing and the versions this project was tested with (TESTED, which
pyproject.toml's floors repeat; tests/test_layering.py checks the two agree).
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Callable, Iterable

import torch

from .errors import UserError

# The versions the test suite ran on (pyproject.toml's floors are these).
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1", "deepspeed": "0.19.8", "timm": "1.0.31",
          "accelerate": "1.16.0", "webdataset": "1.0.2"}


class CompatError(UserError, RuntimeError):
    """An installed library lacks an API this project reaches into."""


def versions() -> str:
    def have(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    return ", ".join(f"{k} {have(k)} (tested {v})" for k, v in TESTED.items())


# ---------------------------------------------------------------------------------------------- torch

def foreach_lerp_(ends: list[torch.Tensor], starts: list[torch.Tensor], weight: float) -> None:
    """ends += weight * (starts - ends), one kernel per dtype/device group (torch._foreach_lerp_: the EMA)."""
    torch._foreach_lerp_(ends, starts, weight)


def dispatch_mode() -> type:
    """torch's TorchDispatchMode (torch.utils._python_dispatch): the op counter of the update benchmarks."""
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


def shutdown_loader_workers(iterator: object) -> None:
    """Stop a DataLoader iterator's worker processes through its queues (torch's `_shutdown_workers`; torch
    calls it itself only when the iterator is garbage-collected)."""
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()


# torch re-raises a worker's exception with the worker's traceback text above its last line (ExceptionWrapper).
WORKER_TRACEBACK_MARK = "Original Traceback"


def worker_error_line(message: str) -> str:
    """The last line of a message torch wrapped in a loader worker's traceback text (else the message)."""
    return message.splitlines()[-1] if WORKER_TRACEBACK_MARK in message else message


# A collective whose peer process died: NCCL raises DistBackendError, gloo a RuntimeError with these words
# (torch 2.14: "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer [...]", "Connection reset by
# peer", "Broken pipe", "Timed out waiting").
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
             "NCCL communicator was aborted", "NCCL error", "Timed out waiting")


def peer_stopped(e: BaseException) -> bool:
    """A collective broke off because another rank stopped (its own error says why)."""
    import torch.distributed as dist
    if isinstance(e, getattr(dist, "DistBackendError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo" in text or "NCCL" in text) and any(p in text for p in PEER_LOST)


def _probe_torch() -> None:
    if not callable(getattr(torch, "_foreach_lerp_", None)):
        raise CompatError("torch._foreach_lerp_ is gone")
    dispatch_mode()
    _probe_fused_found_inf()


def _probe_fused_found_inf() -> None:
    """Fused AdamW skips a step where `optimizer.found_inf` is 1 (GradScaler's protocol; SkipNonFinite)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=1.0, fused=True)
    p.grad = torch.ones(2)
    opt.found_inf = torch.ones(())
    opt.step()
    if not torch.equal(p.detach(), torch.ones(2)):
        raise CompatError("torch's fused AdamW no longer skips a step on `found_inf`")


# ------------------------------------------------------------------------------------------- DeepSpeed

def deepspeed_shm_buffer(rank: int, env=os.environ) -> str:
    """The /dev/shm file DeepSpeed's CPU shm all-reduce maps for `rank` (deepspeed/csrc/cpu/comm/shm.cpp)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank}")


def deepspeed_op_compatible(name: str) -> bool:
    """Whether DeepSpeed builds op `name` on this machine (deepspeed.ops.__compatible_ops__)."""
    import deepspeed.ops
    return bool(deepspeed.ops.__compatible_ops__.get(name, False))


def deepspeed_load_universal(engine: object) -> None:
    """Make the engine's next load_checkpoint read a universal checkpoint (engine._config; the documented way
    is the config's `checkpoint.load_universal`, fixed when the engine is built)."""
    engine._config.load_universal_checkpoint = True


def _probe_deepspeed() -> None:
    import deepspeed.ops
    if not isinstance(getattr(deepspeed.ops, "__compatible_ops__", None), dict):
        raise CompatError("deepspeed.ops.__compatible_ops__ is gone")


# ------------------------------------------------------------------------------------------ accelerate

def accelerate_new_state() -> None:
    """Let the next Accelerator in this process take its own settings (mixed precision): accelerate keeps them in
    a process-wide AcceleratorState and refuses a second, different one (a second run in one process: a
    notebook, the in-process tests). The distributed state (PartialState) is kept."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()


def _probe_accelerate() -> None:
    from accelerate.state import AcceleratorState
    if not callable(getattr(AcceleratorState, "_reset_state", None)):
        raise CompatError("accelerate.state.AcceleratorState._reset_state is gone")


# ------------------------------------------------------------------------------------------------ timm

def timm_info_text(name: str) -> str:
    """A class list timm ships (timm/data/_info/*.txt: the ImageNet synsets and lemmas)."""
    from importlib import resources
    return resources.files("timm.data._info").joinpath(name).read_text()


def replace_timm_augment_ops(replacement: Callable, names: Iterable[str]) -> None:
    """Point timm's RandAugment at `replacement` for the ops `names` (timm.data.auto_augment.NAME_TO_OP)."""
    from timm.data import auto_augment
    for name in names:
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = replacement


def _probe_timm() -> None:
    from timm.data import auto_augment
    if not isinstance(getattr(auto_augment, "NAME_TO_OP", None), dict):
        raise CompatError("timm.data.auto_augment.NAME_TO_OP is gone")
    timm_info_text("imagenet_synsets.txt")


PROBES = {"torch": _probe_torch, "DeepSpeed": _probe_deepspeed, "accelerate": _probe_accelerate, "timm": _probe_timm}
_checked: set[str] = set()  # the backends probed in this process ("": all)


def check(backend: str = "") -> None:
    """Probe every reach once per process (`backend`: only that training backend's, deepspeed or accelerate;
    "": both); one line naming what is missing and the tested versions."""
    if backend in _checked or "" in _checked:
        return
    for name, probe in PROBES.items():
        if backend and name.lower() in ("deepspeed", "accelerate") and name.lower() != backend:
            continue
        try:
            probe()
        except (CompatError, AttributeError, ImportError, FileNotFoundError, TypeError) as e:
            raise CompatError(f"{name}: {e}; this project reaches into it (pretrain/compat.py) and was tested "
                              f"with: {versions()}") from None
    _checked.add(backend)
