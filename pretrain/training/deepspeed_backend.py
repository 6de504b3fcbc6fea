"""DeepSpeed ZeRO 0-3 with bf16/fp16: the engine's checkpoints, universal conversion on a world-size change."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..compat import deepspeed_load_universal, deepspeed_op_compatible, deepspeed_shm_buffer
from ..config import ConfigError, RunConfig
from ..runs import MARKER
from .backend import DTYPES, Backend, free_port
from .optim import SkipNonFinite


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    o = cfg.optim
    ds = {
        "train_batch_size": o.global_batch,
        "train_micro_batch_size_per_gpu": o.micro_batch,
        "gradient_accumulation_steps": cfg.accumulation(world),
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        # DeepSpeed's bf16 overflow check is one isfinite+abs per gradient tensor and a host sync per update
        # (ZeRO 1-2); SkipNonFinite skips such an update on the device from the global norm instead. ZeRO-0
        # and -3 check the norm themselves.
        "bf16": {"enabled": o.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": o.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    return merge(ds, cfg.deepspeed)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def single_process_env(env=os.environ) -> None:
    """`python launch/pretrain.py` with no launcher is rank 0 of 1 on a free local port: without RANK and
    WORLD_SIZE, DeepSpeed would look for an MPI launch instead and stop on a missing mpi4py."""
    launched = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if any(k in env for k in launched):
        return
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def check_precision(precision: str, accelerator) -> None:
    """DeepSpeed's engine refuses a dtype its accelerator lacks only once the model is built, with a traceback
    (on CPU, fp16 needs oneDNN's fp16 kernels: AVX512-FP16 or AMX-FP16); say it first, in one line."""
    supported = {"bf16": accelerator.is_bf16_supported, "fp16": accelerator.is_fp16_supported}
    if precision in supported and not supported[precision]():
        others = [p for p, ok in supported.items() if p != precision and ok()] + ["fp32"]
        raise ConfigError(f"optim.precision {precision}: DeepSpeed's {accelerator.device_name()} accelerator has no "
                          f"{precision} on this machine; --set optim.precision={others[0]}" + (f" (or {', '.join(others[1:])})"
                                                                                  if others[1:] else ""))


def release_shm_names(rank: int, world: int, env=os.environ) -> None:
    """DeepSpeed's CPU all-reduce (its shm comm op, used when all ranks share a host) creates one 32+ MiB buffer
    per rank in /dev/shm and never unlinks it, so every CPU run, finished or killed, leaves its files in RAM
    until a reboot (64 MiB a rank here; a suite of launched tests left 1.6 GiB). Each rank maps all its peers'
    buffers inside `init_distributed`; once every rank is past it (the barrier), the names serve nothing, and
    unlinking them now frees the memory when the last process exits, however it exits."""
    if world > 1:
        dist.barrier()  # on every rank, whatever it finds below, so that no rank waits alone
    try:  # absent with a GPU accelerator, ranks on several hosts, or no shm op built
        os.unlink(deepspeed_shm_buffer(rank, env))
    except FileNotFoundError:
        pass


def prebuild_cpu_ops() -> Optional[str]:
    """Compile DeepSpeed's CPU shm all-reduce now (`make install` calls this), not in a run's first update.

    On a CPU accelerator, DeepSpeed's process-group init JIT-compiles that op (deepspeed.comm.torch.build_shm_op)
    when torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) has no build for
    this environment: ~60 s on 2 cores, inside the first run's first update, while its peers wait. With the
    build cached a load is a no-op ninja check. Returns the build directory; None where DeepSpeed builds
    nothing (a GPU accelerator, or a CPU without the op's instructions)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return None
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed_op_compatible(builder.NAME):
        return None  # what build_shm_op checks: then no run builds it either
    return os.path.dirname(builder.load(verbose=False).__file__)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        check_precision(cfg.optim.precision, get_accelerator())
        single_process_env()
        deepspeed.init_distributed(timeout=timedelta(seconds=cfg.dist_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        release_shm_names(self.rank, self.world)
        self.device = torch.device(get_accelerator().current_device_name())
        self.dtype = DTYPES[cfg.optim.precision]
        self.engine = None

    def prepare(self, model, optimizer, accum: int) -> None:
        import deepspeed
        self.accum = accum
        if optimizer is not None:  # DeepSpeed steps it on its flat fp32 partitions, after computing the norm
            SkipNonFinite(optimizer, self._engine_norm)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(self.cfg, self.world))

    def _engine_norm(self):
        """The global gradient norm DeepSpeed's optimizer wrapper computed for this update (None while the
        engine is being built: its wrappers step once to create the optimizer state)."""
        return getattr(getattr(self.engine, "optimizer", None), "_global_grad_norm", None)

    def own_parameters(self, module: torch.nn.Module):
        """ZeRO-3 gathers a module's parameters in its forward hook; a method other than forward (a probe's
        forward_pooled) runs the submodules' hooks but not the module's own: gather its direct parameters
        (Swin's absolute_pos_embed) for the call."""
        if self.cfg.zero_stage != 3:
            return nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=None)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def compile(self) -> None:
        self.engine.compile()  # the engine's own: module.compile() with the accelerator's backend

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        return self.engine(x.to(self.dtype), *rest).float()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # The engine counts micro-batches itself (it divides the loss by the accumulation steps and reduces
        # on its boundary); the loop counts them too, and the two must agree.
        if self.engine.is_gradient_accumulation_boundary() != boundary:
            raise RuntimeError(f"DeepSpeed's accumulation boundary disagrees with the loop's ({boundary})")
        self.engine.backward(loss)
        if not boundary:
            self.engine.step()

    def step(self) -> Optional[torch.Tensor]:
        before = self.engine.global_steps
        self.engine.step()
        if self.engine.global_steps <= before:
            raise RuntimeError("DeepSpeed did not count an update at the accumulation boundary")
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)

    def save(self, ckpt_dir: str, tag: str) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)

    def load(self, ckpt_dir: str, tag: str, saved_world: int) -> None:
        if saved_world != self.world:
            tag = self._universal(ckpt_dir, tag)
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:  # DeepSpeed only warns
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} in {ckpt_dir}")

    def _universal(self, ckpt_dir: str, tag: str) -> str:
        """Convert `tag` to DeepSpeed's universal format (once, on rank 0) for a different world size."""
        out = f"{tag}.universal"
        if self.rank == 0 and not os.path.exists(os.path.join(ckpt_dir, out, MARKER)):
            print(f"converting {tag} to a universal checkpoint for {self.world} rank(s)", flush=True)
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            os.path.join(ckpt_dir, tag), "--output_folder", os.path.join(ckpt_dir, out),
                            "--inject_missing_state", "--no_strict"], check=True, stdout=subprocess.DEVNULL)
            open(os.path.join(ckpt_dir, out, MARKER), "w").close()
        self.barrier()
        deepspeed_load_universal(self.engine)
        return out
