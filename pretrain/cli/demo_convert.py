"""Offline demo of the checkpoint tools: a Swin-T "22K release" -> 384 px, window 12, 1K head, timm layout.

    python launch/demo_convert.py [--out runs/demo_convert]

Writes an official-layout 22K checkpoint (random weights: no download here), converts it with
`python -m pretrain.cli.convert`, loads the result into timm and checks that timm's logits equal ours.
"""
import os
import sys

import timm
import torch

from pretrain import cli
from pretrain.models import build_model
from pretrain.weights import convert_checkpoint, export, load_pretrained


def main(argv=None) -> int:
    p = cli.parser("python launch/demo_convert.py", __doc__)
    p.add_argument("--out", default="runs/demo_convert")
    out = p.parse_args(argv).out
    return cli.run(lambda: demo(out))


def demo(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    src = export(build_model("swin_tiny", num_classes=21841), f"{out}/swin_tiny_22k_official.pth", "official")
    dst = f"{out}/swin_tiny_384_w12_1k.safetensors"
    print(f"$ python -m pretrain.cli.convert {src} {dst} --layout timm --img-size 384 --window-size 12 "
          "--num-classes 1000")
    _, report = convert_checkpoint(src, dst, "timm", img_size=[384], window_size=12, num_classes=1000)
    print(report)
    ours = build_model("swin_tiny", img_size=384, window_size=12, num_classes=1000).eval()
    load_pretrained(ours, src)
    ref = timm.create_model("swin_tiny_patch4_window7_224", img_size=384, window_size=12, pretrained=True,
                            pretrained_cfg_overlay=dict(file=dst, num_classes=1000)).eval()
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"timm vs ours at 384/window 12: max |diff| = {err:.2e} of the logits' scale "
          f"({'OK' if err <= 1e-4 else 'MISMATCH'})")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
