"""Window attention kernels: each `attn_impl` against the math path (values and, on CUDA, gradients), and
their time on Swin-B's stage shapes.

    python benchmarks/attention.py                      # CUDA if there is one: check + time, bf16 and fp32
    python benchmarks/attention.py --device cpu --batch 4   # CPU: forward check only (no flex backward)

Per stage of Swin-B at 224 px (window 7, shifted blocks: the bias carries the shift mask, one per window
position): q, k, v of shape (batch * windows, heads, 49, 32). The check is in fp32 (TF32 off): max |diff|
over max |math| for the output and for dq, dk, dv, dbias; the table is the median time of forward +
backward (CUDA) or forward (CPU) per call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pretrain.models.layers import window_attention

SWIN_B = [(56, 4), (28, 8), (14, 16), (7, 32)]  # (tokens per side, heads) per stage at 224 px


def inputs(batch: int, side: int, heads: int, window: int, device, dtype, grad: bool):
    nW = (side // window) ** 2
    q, k, v = (torch.randn(batch * nW, heads, window * window, 32, device=device, dtype=dtype) for _ in range(3))
    bias = torch.randn(nW, heads, window * window, window * window, device=device, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v, bias)]


def run(impl: str, q, k, v, bias, backward: bool):
    """Output and, with backward, d(sum out^2)/d(q, k, v, bias). The math path scales q itself; sdpa and
    flex take scale=None (1/sqrt(d))."""
    out = window_attention(q * 32 ** -0.5 if impl == "math" else q, k, v, bias, impl, 0.0)
    if not backward:
        return out, None
    return out, torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))


def check(impl: str, device, batch: int) -> dict:
    """Max relative difference to the math path per stage, fp32 (TF32 off)."""
    backward = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    worst = {}
    for side, heads in SWIN_B:
        q, k, v, bias = inputs(batch, side, heads, min(7, side), device, torch.float32, backward)
        with torch.set_grad_enabled(backward):
            want, want_g = run("math", q, k, v, bias, backward)
            got, got_g = run(impl, q, k, v, bias, backward)
        worst[f"stage{side}_out"] = ((got - want).abs().max() / want.abs().max()).item()
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), got_g or (), want_g or ()):
            worst[f"stage{side}_{name}"] = ((a - b).abs().max() / b.abs().max()).item()
    return worst


def timing(impl: str, device, batch: int, dtype, steps: int) -> float:
    """Seconds for one attention call per stage, summed over Swin-B's four stage shapes (median of steps)."""
    backward = device.type == "cuda"
    total = 0.0
    for side, heads in SWIN_B:
        q, k, v, bias = inputs(batch, side, heads, min(7, side), device, dtype, backward)
        times = []
        for i in range(steps + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(backward):
                run(impl, q, k, v, bias, backward)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        total += statistics.median(times)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=["sdpa", "flex", "math"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--json", help="append the result rows here")
    a = p.parse_args()
    device = torch.device(a.device)
    rows, failed = [], []
    for impl in a.impls:
        if impl != "math":
            worst = check(impl, device, min(a.batch, 8))
            bad = {k: v for k, v in worst.items() if v > a.tol}
            failed += [f"{impl} {k} {v:.2e}" for k, v in bad.items()]
            rows.append({"impl": impl, "check": "fp32 vs math", "max_rel": max(worst.values()), "ok": not bad})
        for dtype in ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]):
            s = timing(impl, device, a.batch, dtype, a.steps)
            rows.append({"impl": impl, "device": str(device), "dtype": str(dtype).split(".")[-1], "batch": a.batch,
                         "s_per_swin_b_attention_pass": s, "what": "fwd+bwd" if device.type == "cuda" else "fwd"})
    for r in rows:
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    if failed:
        raise SystemExit("differs from the math path beyond --tol: " + "; ".join(failed))


if __name__ == "__main__":
    main()
