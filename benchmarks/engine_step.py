"""Engine step time against a plain loop and timm's model, and bytes held per rank for ZeRO stages 0-3.

    deepspeed --num_gpus 1 benchmarks/engine_step.py speed --shards DIR/_info.json --variant swin_base \
        --img 224 --micro 128 --compile --workers 14 --timm
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/engine_step.py speed --shards DIR/_info.json
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/engine_step.py memory --variants swin_base swin_large

speed: one run, the same shards through the same loader (--workers) and batch augmentation, the run's
precision; (a) "engine": our Trainer's micro-step (backend --backend, ZeRO --stage, model.compile as
--compile); (b) "plain": our model in a bare loop (DDP when there are several ranks, bf16 autocast,
torch.compile with --compile, fused AdamW, clip); (c) with --timm, "timm": timm's Swin of the same
architecture in that same loop. Alternating rounds; per loop: median s/update after warm-up, img/s (all
ranks), MFU (on known GPUs), peak memory (CUDA), time to first step (compilation included).
memory: for each stage, two bf16 micro-batch steps of the engine: the peak of tensor memory during forward,
backward and step (CUDA's allocator peak; on the CPU every op's outputs counted while alive), and every
tensor the engine's module and optimizer hold after it, by kind (read from the engine, not estimated).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import TrainConfig, from_dict, validate
from pretrain.models import model_from_section
from pretrain.models.layers import ATTN_IMPLS
from pretrain.seeding import mix_seed
from pretrain.training import Trainer
from pretrain.training.metrics import forward_flops, peak_tflops
from pretrain.training.optim import param_groups


def bench_config(a) -> TrainConfig:
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = from_dict(TrainConfig, {
        "run_dir": a.run_dir, "backend": a.backend,
        "model": {"variant": a.variant, "img_size": a.img, "window_size": a.window or max(2, a.img // 32),
                  "num_classes": a.classes, "drop_path_rate": 0.1, "compile": a.compile,
                  "attn_impl": a.attn_impl},
        "data": {"train": a.shards, "workers": a.workers, "shuffle_buffer": 64},
        "aug": {"auto_augment": None if a.no_randaug else "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0,
                "re_prob": 0.25},
        "optim": {"global_batch": a.micro * world, "micro_batch": a.micro, "epochs": 1000, "warmup_epochs": 0,
                  "precision": a.precision, "zero_stage": a.stage if a.backend == "deepspeed" else None},
        "checkpoint": {"every_steps": 10**9}, "log": {"every_steps": 10**9, "tensorboard": False, "progress": False},
        "deepspeed": json.loads(a.ds) if a.backend == "deepspeed" else {}})
    validate(cfg)
    return cfg


def forever(loader):
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineLoop:
    """Our Trainer, one micro-batch per update (global batch = micro-batch x ranks)."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.i = trainer, 0

    def __call__(self, images, labels) -> None:
        self.i += 1  # the public step: forward/backward, and on the boundary the update and its host sync
        self.trainer.train_step((images, labels), mix_seed(0, 0, self.i, self.trainer.rank))


class PlainLoop:
    """The bare step a user would write: autocast, (compiled) model, fused AdamW, clip; DDP over ranks."""

    def __init__(self, trainer: Trainer, model: torch.nn.Module, compile_model: bool):
        self.trainer, self.i = trainer, 0
        model = model.to(trainer.device)
        self.opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=True)
        if compile_model:
            model.compile()
        self.model = (torch.nn.parallel.DistributedDataParallel(model) if trainer.world > 1 else model)
        self.autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16,
                                       enabled=trainer.cfg.optim.precision == "bf16")

    def __call__(self, images, labels) -> None:
        self.i += 1
        t = self.trainer
        x, y = t.task.augment(images, labels, step_seed=mix_seed(0, 0, self.i, t.rank))
        with self.autocast:
            out = self.model(x)
        t.task.criterion(out.float(), y).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.cfg.optim.clip_grad, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timm_twin(cfg: TrainConfig) -> torch.nn.Module:
    """timm's Swin with our model's architecture (same variant, resolution, window, classes)."""
    import timm
    from pretrain.models.swin import config_from_section
    c = config_from_section(cfg.model)
    name = {1: "swin_base_patch4_window7_224", 2: "swinv2_base_window8_256"}[c.version]
    return timm.create_model(name, pretrained=False, img_size=c.img_size, window_size=c.window_size,
                             embed_dim=c.embed_dim, depths=c.depths, num_heads=c.num_heads,
                             num_classes=c.num_classes, drop_path_rate=0.1)


def time_loop(step, it, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(*next(it))
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def speed(a) -> None:
    cfg = bench_config(a)
    trainer = Trainer(cfg)
    dev = trainer.device
    torch.manual_seed(0)
    loops = {"engine": EngineLoop(trainer),
             "plain": PlainLoop(trainer, model_from_section(cfg.model), trainer.compiled or a.compile is True)}
    if a.timm:
        loops["timm"] = PlainLoop(trainer, timm_twin(cfg), trainer.compiled or a.compile is True)
    it = forever(trainer.train_loader)
    first, times, peak = {}, {k: [] for k in loops}, {}
    for name, step in loops.items():  # the first step of each: compilation, lazy state
        t0 = time.perf_counter()
        step(*next(it))
        sync(dev)
        first[name] = time.perf_counter() - t0
    for _ in range(a.rounds):
        for name, step in loops.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times[name] += time_loop(step, it, a.steps, dev)[a.warmup:]
            if dev.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(dev) / 2**30)
    flops = 3 * forward_flops(model_from_section(cfg.model), cfg.model.img_size)
    if trainer.rank == 0:
        peak_tf = peak_tflops(dev)
        row = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "world": trainer.world,
               "backend": a.backend, "zero_stage": a.stage, "variant": a.variant, "img": a.img,
               "micro_batch": a.micro, "precision": a.precision, "compile": trainer.compiled, "attn_impl": a.attn_impl,
               "workers": a.workers, "ds": json.loads(a.ds)}
        for name in loops:
            s = statistics.median(times[name])
            img_s = a.micro * trainer.world / s
            row[name] = {"s_per_update": s, "img_s": img_s, "first_step_s": first[name],
                         "mfu": flops * img_s / trainer.world / (peak_tf * 1e12) if peak_tf else None,
                         "peak_gib": peak.get(name)}
        row["engine_over_plain"] = row["plain"]["s_per_update"] / row["engine"]["s_per_update"]
        if a.timm:
            row["ours_over_timm"] = row["timm"]["s_per_update"] / row["plain"]["s_per_update"]
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    trainer.train_loader.close()


def held_bytes(engine) -> dict:
    """Unique tensors reachable from the engine's module and optimizer on this rank, by kind."""
    seen, out = set(), {"module_params": 0, "optimizer_and_grad_buffers": 0}

    def add(t, kind):
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                out[kind] += t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p, "module_params")

    def walk(obj, depth=0):
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            add(obj, "optimizer_and_grad_buffers")
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and depth < 3 and not isinstance(obj, torch.nn.Module):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(engine.optimizer)
    return out


class PeakTensorBytes(TorchDispatchMode):
    """The peak of tensor bytes alive during the ops inside `with` (on the CPU, where there is no
    max_memory_allocated): every op's new outputs count until their tensor is freed, on top of `base` (what
    the engine holds before). Views and in-place results share a storage already counted: not counted again."""

    def __init__(self, base: int):
        super().__init__()
        self.live = self.peak = base
        self._storages: dict[int, int] = {}
        self.phase = ""  # set by the caller ("micro 2 backward"): where the peak was reached, with its op
        self.peak_at = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if key and key not in self._storages:
                    self._storages[key] = n
                    self.live += n
                    if self.live > self.peak:
                        self.peak, self.peak_at = self.live, f"{self.phase}: {func.__name__}"
                    weakref.finalize(t, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)


def peak_bytes_of_step(engine, x: torch.Tensor, accum: int) -> tuple[int, str]:
    """Peak tensor memory of one update (`accum` micro-batches of forward/backward/step) on this rank: CUDA's
    allocator peak, or on the CPU the live tensors counted op by op (PeakTensorBytes) on top of what the
    engine holds before. With accum 1 every micro-batch is a boundary, where ZeRO-1 too reduces and frees
    the gradients bucket by bucket (DeepSpeed's stage_1_and_2.py): ZeRO-2's saving shows with accumulation.
    Also where the CPU peak was reached: "micro K forward|backward|step: OP" ("" on CUDA)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = sum(held_bytes(engine).values())
    with PeakTensorBytes(base) as counter:
        for k in range(1, accum + 1):
            counter.phase = f"micro {k} forward"
            loss = engine(x).float().logsumexp(1).mean()
            counter.phase = f"micro {k} backward"
            engine.backward(loss)
            counter.phase = f"micro {k} step"  # the optimizer steps on the last micro-batch only
            engine.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), ""
    return counter.peak, counter.peak_at


def memory(a) -> None:
    import deepspeed
    from pretrain.config import ModelSection
    from pretrain.training.deepspeed_backend import deepspeed_config
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for variant in a.variants:
        for stage in a.stages:
            cfg = TrainConfig(model=ModelSection(variant=variant, num_classes=21841))
            cfg.optim.global_batch, cfg.optim.micro_batch, cfg.optim.zero_stage = world * a.accum, 1, stage
            cfg.deepspeed = json.loads(a.ds)
            model = model_from_section(cfg.model)
            n = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
            x = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16, device=engine.device)
            first = peak_bytes_of_step(engine, x, a.accum)  # the first update creates the optimizer states
            second = peak_bytes_of_step(engine, x, a.accum)
            peak, peak_at = max((first[0], f"update 1, {first[1]}"), (second[0], f"update 2, {second[1]}"))
            held = held_bytes(engine)
            if rank == 0:
                print(json.dumps({"variant": variant, "params": n, "zero_stage": stage, "world": world, "accum": a.accum, "ds": a.ds,
                                  **{k: v / 2**30 for k, v in held.items()},
                                  "held_after_step_gib": sum(held.values()) / 2**30,
                                  "peak_during_step_gib": peak / 2**30, "peak_at": peak_at}), flush=True)
            del engine, model, opt
            dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["speed", "memory"])
    p.add_argument("--shards", help="speed: training shards' _info.json")
    p.add_argument("--variant", default="swin_tiny")
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--window", type=int, default=0, help="attention window (default img/32)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--micro", type=int, default=16, help="micro-batch per rank (= the update's batch per rank)")
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--backend", default="deepspeed", choices=["deepspeed", "accelerate"],
                   help="speed: the training loop's backend (accelerate: DDP; run it under torchrun)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", default="auto", type=lambda v: {"true": True, "false": False}.get(v, v),
                   help="model.compile for the engine, and torch.compile for the plain loops: auto|true|false")
    p.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS)
    p.add_argument("--timm", action="store_true", help="speed: also timm's Swin in the plain loop")
    p.add_argument("--workers", type=int, default=1, help="speed: loader workers per rank")
    p.add_argument("--no-randaug", action="store_true", help="speed: no RandAugment in the loader")
    p.add_argument("--run-dir", default="/tmp/engine_bench", help="speed: the engine's run dir (compile cache)")
    p.add_argument("--ds", default="{}", help="speed: JSON merged into the DeepSpeed config")
    p.add_argument("--json", help="speed: append the result row here")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["swin_base", "swin_large"])
    p.add_argument("--accum", type=int, default=2, help="memory: micro-batches per update (accumulation)")
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], help="memory: ZeRO stages")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    speed(a) if a.mode == "speed" else memory(a)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
