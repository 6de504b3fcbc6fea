"""A run's distributed start-up: the backend a config names, the process group joined (and the run dir locked),
the seeds, and torch.compile inside the engine. Slurm's variables are the command-line layer's to read first
(pretrain.cli.run), and the compile cache's folders are set by the app (`compile_cache_env`): nothing here
changes the environment."""
from __future__ import annotations

import logging
import os
import random
from typing import Callable, Optional

import numpy as np
import torch

from .. import compat, runs
from ..checks import raise_failed
from ..collective import on_rank0, printer
from ..config import ConfigError, RunConfig
from ..data.aug_checks import auto_augment_check
from .backend import Backend

log = logging.getLogger("pretrain")


def build_backend(cfg: RunConfig) -> Backend:
    """`backend`: deepspeed | accelerate, imported only when chosen (DeepSpeed's import is slow)."""
    if cfg.backend == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(cfg)
    from .accelerate_backend import AccelerateBackend
    return AccelerateBackend(cfg)


def join(cfg: RunConfig, name: str, ema_decay: float = 0.0, lock: Optional[runs.RunLock] = None) -> Backend:
    """What can be checked without a process group, then the group (the backend), then, for a training run,
    the run dir's lock on rank 0 (refused naming the holder) before anything is built or written."""
    if ema_decay and cfg.zero_stage == 3:
        raise ConfigError("an EMA (finetune.ema_decay) needs whole weights on every rank: use optim.zero_stage "
                          "0-2 with it")
    raise_failed([auto_augment_check(cfg.aug.auto_augment)])  # timm's parse: a typo fails before any group
    compat.check(cfg.backend)  # every private API we reach into is still there
    backend = build_backend(cfg)
    if lock is not None:
        on_rank0(lambda: runs.claim_run_dir(lock, cfg.checkpoint_dir), f"locking {cfg.run_dir}")
    printer(backend.rank)(f"{name} on {backend.world} rank(s), backend {backend.name}" + (
        f" (ZeRO-{cfg.zero_stage})" if backend.name == "deepspeed" else "") + f", {cfg.optim.precision}, device "
        f"{backend.device.type}")
    return backend


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def compile_cache(cfg: RunConfig) -> str:
    """model.compile_cache, default <run_dir>/compile_cache: inductor's and Triton's kernels, kept where a
    requeued or resumed job finds them instead of compiling again."""
    return cfg.model.compile_cache or os.path.join(cfg.run_dir, "compile_cache")


def compile_cache_env(cfg: RunConfig) -> dict[str, str]:
    """The environment that points inductor and Triton at `compile_cache(cfg)`: inductor reads its cache
    folders from the environment when it first compiles (it has no API for them), so the apps set these
    before building a run (pretrain.cli.train, finetune.run); the library never sets them itself."""
    cache = compile_cache(cfg)
    return {"TORCHINDUCTOR_CACHE_DIR": cache,
            "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", os.path.join(cache, "triton"))}


def compile_model(backend: Backend, cfg: RunConfig, print0: Callable[[str], None]) -> bool:
    """model.compile: torch.compile inside the engine (its kernel cache: `compile_cache_env`)."""
    m = cfg.model
    compiled = backend.device.type == "cuda" if m.compile == "auto" else m.compile
    if m.attn_impl == "flex" and backend.device.type == "cpu":  # training: refused before the first update
        raise ConfigError("model.attn_impl=flex trains on CUDA only: torch's CPU FlexAttention has no backward"
                          + (" and, compiled, cannot read a position bias computed inside the graph" if compiled
                             else "") + "; on CPU use --set model.attn_impl=math (or sdpa)")
    if not compiled:
        return False
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    warm = bool(cache) and os.path.isdir(cache) and any(os.scandir(cache))
    backend.compile()
    print0(f"model compiled with torch.compile (cache {cache or 'inductor default'}: {'warm' if warm else 'empty'}); "
           "the first update "
           "includes the compilation")
    return True
