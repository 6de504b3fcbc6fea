"""Engine step time against a plain DDP loop, and bytes held per rank for ZeRO stages 0-3.

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/engine_step.py speed --shards DIR/_info.json
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/engine_step.py memory --variants swin_base swin_large

speed: the same model (swin_tiny at 64 px unless --variant/--img), the same shards through the same loader and
batch augmentation, bf16; (a) our Trainer (DeepSpeed engine, ZeRO --stage), (b) torch DDP with bf16
autocast and torch AdamW. Alternating rounds; median seconds per optimizer update after warm-up.
memory: for each stage, one bf16 micro-batch step of the engine, then every tensor the engine's module and
optimizer hold on this rank, summed by kind (read from the engine, not estimated).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from pretrain.config import TrainConfig, from_dict, validate
from pretrain.models import model_from_section
from pretrain.seeding import mix_seed
from pretrain.training import Trainer
from pretrain.training.optim import param_groups


def tiny_config(shards: str, variant: str, img: int, stage: int, micro: int, precision: str,
                backend: str) -> TrainConfig:
    cfg = from_dict(TrainConfig, {
        "run_dir": "/tmp/engine_bench", "backend": backend, "model": {"variant": variant, "img_size": img, "window_size": img // 32 or 2,
                                                   "num_classes": 10, "drop_path_rate": 0.1},
        "data": {"train": shards, "workers": 1, "shuffle_buffer": 64},
        "aug": {"auto_augment": None, "mixup": 0.8, "cutmix": 1.0, "re_prob": 0.25},
        "optim": {"global_batch": micro * int(os.environ.get("WORLD_SIZE", 1)), "micro_batch": micro,
                  "epochs": 1000, "warmup_epochs": 0, "precision": precision,
                  "zero_stage": stage if backend == "deepspeed" else None},
        "checkpoint": {"every_steps": 10**9}, "log": {"every_steps": 10**9, "tensorboard": False, "progress": False}})
    validate(cfg)
    return cfg


def forever(loader):
    while True:
        yield from loader


def time_engine(trainer: Trainer, it, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        images, labels = next(it)
        trainer._micro_step(images, labels, 0, i + 1)
        times.append(time.perf_counter() - t0)
    return times


def time_ddp(trainer: Trainer, model, opt, it, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        images, labels = next(it)
        x, y = trainer.augment(images, labels, step_seed=mix_seed(0, 0, i + 1, trainer.rank))
        with torch.autocast(device_type=trainer.device.type, dtype=torch.bfloat16,
                            enabled=trainer.cfg.optim.precision == "bf16"):
            out = model(x)
        loss = trainer.criterion(out.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def speed(a) -> None:
    cfg = tiny_config(a.shards, a.variant, a.img, a.stage, a.micro, a.precision, a.backend)
    cfg.deepspeed = json.loads(a.ds)
    trainer = Trainer(cfg)
    torch.manual_seed(0)
    base = model_from_section(trainer.cfg.model).to(trainer.device)
    ddp = torch.nn.parallel.DistributedDataParallel(base)
    opt = torch.optim.AdamW(param_groups(base, 0.05), lr=1e-4, fused=trainer.device.type == "cuda")
    eng, plain = [], []
    it = forever(trainer.train_loader)
    for r in range(a.rounds):
        e = time_engine(trainer, it, a.steps)
        p = time_ddp(trainer, ddp, opt, it, a.steps)
        eng += e[a.warmup:]
        plain += p[a.warmup:]
    if trainer.rank == 0:
        me, mp_ = statistics.median(eng), statistics.median(plain)
        print(json.dumps({"backend": a.backend, "variant": a.variant, "img": a.img, "micro_batch": a.micro,
                          "zero_stage": a.stage,
                          "precision": a.precision, "ds": json.loads(a.ds),
                          "world": trainer.world, "engine_s": me, "ddp_s": mp_, "engine_over_ddp": me / mp_}))


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


def memory(a) -> None:
    import deepspeed
    from pretrain.config import ModelSection
    from pretrain.training.deepspeed_backend import deepspeed_config
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for variant in a.variants:
        for stage in a.stages:
            cfg = TrainConfig(model=ModelSection(variant=variant, num_classes=21841))
            cfg.optim.global_batch, cfg.optim.micro_batch, cfg.optim.zero_stage = world, 1, stage
            model = model_from_section(cfg.model)
            n = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
            x = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16, device=engine.device)
            loss = engine(x).float().logsumexp(1).mean()
            engine.backward(loss)
            engine.step()
            held = held_bytes(engine)
            if rank == 0:
                print(json.dumps({"variant": variant, "params": n, "zero_stage": stage, "world": world,
                                  **{k: v / 2**30 for k, v in held.items()},
                                  "total_gib": sum(held.values()) / 2**30}), flush=True)
            del engine, model, opt
            dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["speed", "memory"])
    p.add_argument("--shards", help="speed: training shards' _info.json")
    p.add_argument("--variant", default="swin_tiny")
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--backend", default="deepspeed", choices=["deepspeed", "accelerate"],
                   help="speed: the training loop's backend (accelerate: DDP; run it under torchrun)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--ds", default="{}", help="speed: JSON merged into the DeepSpeed config")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["swin_base", "swin_large"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], help="memory: ZeRO stages")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    speed(a) if a.mode == "speed" else memory(a)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
