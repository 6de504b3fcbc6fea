"""The kNN probe's cost against the training between two probes (issue 34).

Measured in one process, same model, same machine: (1) a training step (forward + backward + AdamW) and an
evaluation forward of the probe, per image; (2) the vote's matmul + top-k for `--queries` queries against one
rank's bank share (`--bank / --ranks` images, `--dim` channels). Then, at a recipe's settings, the probe's
share of the time between probes:

    probe  = (bank + queries) / ranks / probe_img_s  +  vote_s
    train  = updates between probes * global_batch / ranks / train_img_s
    share  = probe / (probe + train)

    python benchmarks/knn_probe.py                                  # CPU: swin_tiny 224, the swin_l_22k cadence
    python benchmarks/knn_probe.py --device cuda --variant swin_large --batch 64 --ranks 8
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.training.probe import local_topk, merge_topk, vote


def per_image(fn, batch: int, steps: int, warmup: int, device: str) -> float:
    """Median seconds per image of `fn()` on a batch."""
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times) / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="swin_tiny")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--recipe", default="swin_l_22k", help="whose global batch and probe cadence (one epoch)")
    p.add_argument("--epoch-images", type=int, default=13_673_551, help="images per epoch (ImageNet-22K)")
    p.add_argument("--bank", type=int, default=100_000, help="probe bank: e.g. 100 images x 1000 classes")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--dim", type=int, default=1536, help="pooled feature channels (Swin-L: 1536)")
    p.add_argument("--k", type=int, default=20)
    a = p.parse_args()
    dev, dtype = a.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    model = build_model(a.variant, num_classes=1000, drop_path_rate=0.0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 3, a.img, a.img, device=dev)
    y = torch.randint(0, 1000, (a.batch,), device=dev)

    def train_step() -> None:
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def probe_forward() -> None:
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            torch.nn.functional.normalize(model.forward_pooled(x).float(), dim=1)

    model.train()
    train_s = per_image(train_step, a.batch, a.steps, a.warmup, dev)
    model.eval()
    probe_s = per_image(probe_forward, a.batch, a.steps, a.warmup, dev)

    g = torch.Generator(device=dev).manual_seed(0)
    share = a.bank // a.ranks
    bank = torch.nn.functional.normalize(torch.randn(share, a.dim, device=dev, generator=g), dim=1)
    labels = torch.randint(0, 1000, (share,), device=dev, generator=g)
    q = torch.nn.functional.normalize(torch.randn(a.queries, a.dim, device=dev, generator=g), dim=1)
    t = time.perf_counter()
    v, lab = local_topk(q, bank, labels, a.k)
    v, lab = merge_topk(v.repeat(1, a.ranks), lab.repeat(1, a.ranks), a.k)  # the merge of `ranks` shares' candidates
    vote(v, lab, 0.07, 1000)
    if dev == "cuda":
        torch.cuda.synchronize()
    vote_s = time.perf_counter() - t

    cfg = load_config(a.recipe, [])
    updates_between = a.epoch_images // cfg.optim.global_batch  # probe.every_steps=0: with each (epoch) evaluation
    train_between = updates_between * cfg.optim.global_batch / a.ranks * train_s
    probe_total = (a.bank + a.queries) / a.ranks * probe_s + vote_s
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {dev}",
        "torch": torch.__version__, "variant": a.variant, "img": a.img, "dtype": a.dtype, "batch": a.batch,
        "train_s_per_image": round(train_s, 5), "probe_forward_s_per_image": round(probe_s, 5),
        "forward_over_train": round(probe_s / train_s, 3),
        "vote": {"queries": a.queries, "bank_share": share, "dim": a.dim, "k": a.k, "seconds": round(vote_s, 3)},
        "at": {"recipe": a.recipe, "ranks": a.ranks, "updates_between_probes": updates_between,
               "bank": a.bank, "queries": a.queries},
        "probe_s_per_rank": round(probe_total, 1), "train_s_between_probes_per_rank": round(train_between, 1),
        "probe_share_of_time": round(probe_total / (probe_total + train_between), 5)}, indent=1))


if __name__ == "__main__":
    main()
