"""SimMIM against supervised training of the same encoder: the training step, and the loader per core.

1. Step: forward + backward + AdamW of `build_simmim(variant, 192, window 6)` (masked L1, the official masks:
   60% of 32-px squares) against the same encoder as a 1000-class classifier (cross-entropy), same batch,
   dtype and weights of the encoder; the two alternate step by step in one process, median times. The
   ratio simmim / supervised says what the decoder, the mask token and the pixel loss cost (> 1: slower).
2. Loader: images/s on one core (one process, one thread) of our shard loader over the same JPEG shards at
   192 px with the SimMIM transform (crop + flip + a mask per image) and with the classification transform
   (the official RandAugment recipe: crop, flip, rand-m9-mstd0.5-inc1), both uint8 out.

    python benchmarks/simmim.py [--variant swin_tiny] [--batch 8] [--steps 10] [--dtype fp32 bf16] [--images 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from pretrain.config import SimMIMSection
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.transforms import AugConfig
from pretrain.data.masks import MaskGenerator, Masks
from pretrain.data.targets import Labels
from pretrain.models import build_model, build_simmim

from data_throughput import bench_ours, make_photos


def steps(variant: str, batch: int, dtype: str, n: int, warmup: int) -> tuple[float, float]:
    torch.manual_seed(0)
    mim = build_simmim(variant, img_size=192, window_size=6, drop_path_rate=0.0)
    clf = build_model(variant, img_size=192, window_size=6, num_classes=1000, drop_path_rate=0.0)
    clf.load_state_dict({**mim.encoder.state_dict(), **{k: v for k, v in clf.state_dict().items()
                                                         if k.startswith("head.")}})
    gen = MaskGenerator(192, 32, 4, 0.6)
    rng = np.random.default_rng(0)
    x = torch.randn(batch, 3, 192, 192)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(batch)]))
    y = torch.randint(0, 1000, (batch,))
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (mim, clf)}
    losses = {mim: lambda: mim(x, mask), clf: lambda: torch.nn.functional.cross_entropy(clf(x), y)}
    times: dict = {mim: [], clf: []}
    for i in range(warmup + n):
        for m in (mim, clf):
            t0 = time.perf_counter()
            with torch.autocast(**amp):
                loss = losses[m]()
            loss.backward()
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    return statistics.median(times[mim]), statistics.median(times[clf])


def loader_rate(info: str, n: int, simmim: bool) -> float:
    aug = AugConfig(img_size=192, interpolation="bilinear") if simmim else AugConfig(img_size=192)
    return bench_ours(info, n, aug=aug, targets=Masks(SimMIMSection(), 192) if simmim else Labels())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="swin_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--images", type=int, default=256, help="loader: images per measurement (500x375 JPEGs)")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {a.variant} 192/w6, batch {a.batch}, median of {a.steps} steps")
    print("| dtype | SimMIM step ms | supervised step ms | SimMIM / supervised |")
    print("|---|---|---|---|")
    for dtype in a.dtype:
        s, c = steps(a.variant, a.batch, dtype, a.steps, a.warmup)
        print(f"| {dtype} | {s * 1e3:.0f} | {c * 1e3:.0f} | {s / c:.2f} |", flush=True)
    torch.set_num_threads(1)
    work = a.work or tempfile.mkdtemp(prefix="simmim_bench_")
    src, out = f"{work}/src", f"{work}/shards"
    if not os.path.isdir(src):
        make_photos(src, a.images, (500, 375))
    write_shards(WriteOptions(src, out, samples_per_shard=64), progress=False)
    n = a.images - a.images % 32
    rates = {True: [], False: []}
    for _ in range(2):  # alternating, best of two
        for simmim in (True, False):
            rates[simmim].append(loader_rate(f"{out}/_info.json", n, simmim))
    s, c = max(rates[True]), max(rates[False])
    print(f"\n# loader, one process, 1 thread, {n} images of 500x375 at 192 px")
    print("| SimMIM transform + masks img/s | classification transform (RandAugment) img/s | ratio |")
    print("|---|---|---|")
    print(f"| {s:.0f} | {c:.0f} | {s / c:.2f} |")


if __name__ == "__main__":
    main()
