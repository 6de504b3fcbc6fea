"""Training step of our Swin against timm's: forward + backward + AdamW step, same weights, batch, dtype.

The two models alternate step by step in one process, so both see the same machine state; we report
median step times and the speedup timm_time / our_time (> 1 means we are faster).

    python benchmarks/model_step.py                       # CPU: swin_tiny 224, fp32 and bf16 autocast
    python benchmarks/model_step.py --device cuda --variants swin_base swin_large --dtypes bf16 \\
        --batch 64 --compile both                         # GPU: eager and torch.compile
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch

from pretrain.models import build_model
from pretrain.models.layers import ATTN_IMPLS

TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_small": "swin_small_patch4_window7_224",
              "swin_base": "swin_base_patch4_window7_224", "swin_large": "swin_large_patch4_window7_224",
              "swinv2_tiny": "swinv2_tiny_window8_256", "swinv2_small": "swinv2_small_window8_256",
              "swinv2_base": "swinv2_base_window8_256", "swinv2_large": "swinv2_large_window12_192"}


def make_pair(variant: str, attn_impl: str, device: str, img: int = 224):
    """Ours and timm's, same weights. V1 at window 7 (the 224 recipe), V2 at window img/32 (256: 8)."""
    size = {} if not variant.startswith("swinv2") else dict(img_size=img, window_size=img // 32)
    ours = build_model(variant, num_classes=1000, drop_path_rate=0.0, attn_impl=attn_impl, **size).to(device)
    theirs = timm.create_model(TIMM_NAMES[variant], num_classes=1000, drop_path_rate=0.0, **size).to(device)
    theirs.load_state_dict(ours.state_dict())  # same weights: same layout by construction
    return ours, theirs


def make_step(model, dtype: str, device: str, compile_model: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    fwd = torch.compile(model) if compile_model else model
    amp = dtype in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16

    def step(x, y):
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, x, y, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    step(x, y)
    sync(device)
    return time.perf_counter() - t0


def peak_memory(step, x, y, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step(x, y)
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def run_case(variant, dtype, batch, img, steps, warmup, device, compile_model, attn_impl) -> dict:
    torch.manual_seed(0)
    ours, theirs = make_pair(variant, attn_impl, device, img)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    s_ours = make_step(ours, dtype, device, compile_model)
    s_timm = make_step(theirs, dtype, device, compile_model)
    for _ in range(warmup):
        s_ours(x, y)
        s_timm(x, y)
    mem = {"ours": peak_memory(s_ours, x, y, device), "timm": peak_memory(s_timm, x, y, device)}
    t_ours, t_timm = [], []
    for i in range(steps):  # alternate, and alternate who goes first
        pair = [(s_ours, t_ours), (s_timm, t_timm)]
        for step, times in (pair if i % 2 == 0 else pair[::-1]):
            times.append(timed(step, x, y, device))
    mo, mt = statistics.median(t_ours), statistics.median(t_timm)
    return dict(variant=variant, dtype=dtype, batch=batch, img=img, compile=compile_model,
                attn_impl=attn_impl, ours_s=mo, timm_s=mt, speedup=mt / mo,
                ours_img_s=batch / mo, timm_img_s=batch / mt,
                ours_peak_gib=mem["ours"], timm_peak_gib=mem["timm"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=["swin_tiny"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    p.add_argument("--attn-impl", nargs="+", default=["auto"], choices=ATTN_IMPLS)
    p.add_argument("--json", help="append results as JSON lines here")
    a = p.parse_args()
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[a.compile]
    machine = (torch.cuda.get_device_name() if a.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# torch {torch.__version__}, timm {timm.__version__}, {machine}")
    print("| variant | dtype | compile | attn | batch | ours s/step | timm s/step | speedup | ours img/s "
          "| timm img/s | ours peak GiB | timm peak GiB |")
    print("|" + "---|" * 12)
    for variant in a.variants:
        for dtype in a.dtypes:
            for comp in compiles:
                for impl in a.attn_impl:
                    r = run_case(variant, dtype, a.batch, a.img, a.steps, a.warmup, a.device, comp, impl)
                    mem = lambda v: "-" if v is None else f"{v:.2f}"
                    print(f"| {variant} | {dtype} | {comp} | {impl} | {a.batch} | {r['ours_s']:.3f} | "
                          f"{r['timm_s']:.3f} | {r['speedup']:.2f}x | {r['ours_img_s']:.1f} | "
                          f"{r['timm_img_s']:.1f} | {mem(r['ours_peak_gib'])} | {mem(r['timm_peak_gib'])} |",
                          flush=True)
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps({**r, "machine": machine}) + "\n")


if __name__ == "__main__":
    main()
