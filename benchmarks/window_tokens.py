"""Window bookkeeping: our one-gather permutation (permute_tokens) vs the official cyclic shift + pad +
window partition (torch.roll, F.pad, view/permute copies), forward + backward, per call.

    python benchmarks/window_tokens.py [--shape 8 56 56 96] [--window 7] [--shift 3] [--steps 50]

Both give the same windowed tokens (checked before timing); the median of --steps calls after warm-up.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pretrain.models.layers import permute_tokens, window_partition, window_token_order


def official(x: torch.Tensor, H: int, W: int, window: int, shift: int) -> torch.Tensor:
    B, _, C = x.shape
    img = torch.roll(x.view(B, H, W, C), shifts=(-shift, -shift), dims=(1, 2))
    pad_h, pad_w = (-H) % window, (-W) % window
    img = F.pad(img, (0, 0, 0, pad_w, 0, pad_h))
    return window_partition(img, (window, window)).reshape(B, -1, C)


def timed(fn, steps: int, warmup: int = 5) -> float:
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=[8, 56, 56, 96], metavar=("B", "H", "W", "C"))
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--shift", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    B, H, W, C = a.shape
    part, merge = window_token_order((H, W), (a.window, a.window), (a.shift, a.shift))
    x = torch.randn(B, H * W, C, requires_grad=True)
    ours, ref = permute_tokens(x, part, merge), official(x, H, W, a.window, a.shift)
    assert torch.equal(ours.view(B, -1, C), ref.view(B, -1, C)), "the two orders differ"
    g = torch.randn_like(ours)

    def step(f):
        return lambda: torch.autograd.grad(f(), x, g)
    row = {"shape": a.shape, "window": a.window, "shift": a.shift, "dtype": "fp32",
           "ours_ms": 1e3 * timed(step(lambda: permute_tokens(x, part, merge)), a.steps),
           "official_ms": 1e3 * timed(step(lambda: official(x, H, W, a.window, a.shift).view(B, -1, C)), a.steps)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
