"""Aten ops one optimizer update launches, as the number of parameter tensors grows.

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/update_ops.py --backend deepspeed --stage 1
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 benchmarks/update_ops.py --backend deepspeed \\
        --ds '{"bf16": {"check_grad_overflow": true}}'      # DeepSpeed's default overflow check, for comparison
    torchrun --nproc_per_node 2 benchmarks/update_ops.py --backend accelerate

A small Swin (embed 8, 32 px) at depths 2,2,2,2 and 2,2,18,2 (121 and 329 parameter tensors): two updates
through the backend (Backend.step(): norm, non-finite flag, clip, optimizer, ZeRO gather), the second one
counted with pretrain.training.metrics.OpCounter. On a GPU each op is at least one kernel launch.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.training.distributed import build_backend
from pretrain.training.metrics import OpCounter
from pretrain.training.optim import build_optimizer


def count(a, depths: tuple, backend=None) -> tuple[int, dict, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(None, [f"backend={a.backend}", f"optim.precision={a.precision}", "model.variant=swin_tiny",
                             "model.img_size=32", "model.window_size=4", "model.num_classes=4",
                             f"model.depths={list(depths)}", "model.num_heads=[1,1,2,2]", "model.embed_dim=8",
                             f"optim.global_batch={2 * world}", "optim.micro_batch=2"]
                      + ([f"optim.zero_stage={a.stage}", f"deepspeed={a.ds}"] if a.backend == "deepspeed" else []))
    torch.manual_seed(0)
    model = build_model("swin_tiny", img_size=32, window_size=4, num_classes=4, embed_dim=8, depths=depths,
                        num_heads=(1, 1, 2, 2))
    backend = backend or build_backend(cfg)
    backend.cfg = cfg
    backend.prepare(model, build_optimizer(model, cfg.optim, 1.0), accum=1)
    x = torch.randn(2, 3, 32, 32, device=backend.device)
    for i in range(2):
        backend.backward(backend.forward(x).sum(), boundary=True)
        with OpCounter() as c:
            backend.step()
    return c.total, c.ops, len(list(model.parameters())), backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="deepspeed", choices=["deepspeed", "accelerate"])
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--ds", default="{}", help="JSON merged into the DeepSpeed config")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    small, small_ops, n_small, backend = count(a, (2, 2, 2, 2))
    big, big_ops, n_big, _ = count(a, (2, 2, 18, 2), backend)
    if backend.rank == 0:
        grew = {k: (small_ops.get(k, 0), v) for k, v in big_ops.items() if v != small_ops.get(k, 0)}
        print(json.dumps({"backend": a.backend, "zero_stage": a.stage if a.backend == "deepspeed" else None,
                          "precision": a.precision, "ds": json.loads(a.ds), "tensors": [n_small, n_big],
                          "ops": [small, big], "per_extra_tensor": (big - small) / (n_big - n_small),
                          "grew": dict(sorted(grew.items(), key=lambda kv: kv[1][0] - kv[1][1])[:8])}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
