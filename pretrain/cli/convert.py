"""Convert a Swin checkpoint between layouts, optionally to a new resolution, window or class count.

    python -m pretrain.cli.convert SRC DST --layout timm|official|ours|transformers [--img-size N] [--window-size M]
                                        [--num-classes K] [--reset-head] [--allow-pickle]
                                        [--pretrained-window-sizes W W W W]

SRC is any layout of Swin or Swin V2 (detected: a file, URL, transformers folder or hf://ORG/NAME); DST's
extension picks the file format (.safetensors or torch.save), a folder for --layout transformers. V1 bias
tables are resized to a new window; a V2 model keeps its CPB MLP, evaluated at the new
window with the checkpoint's pretrained windows (read off it, or --pretrained-window-sizes).
"""
from __future__ import annotations

import sys

from .. import cli
from ..errors import ALLOW_PICKLE, RESET_HEAD
from ..weights import LAYOUTS, convert_checkpoint


def parse_args(argv: list[str] | None = None):
    p = cli.parser("python -m pretrain.cli.convert", __doc__)
    p.add_argument("src", help="checkpoint path or fsspec URL (official .pth, timm, ours)")
    p.add_argument("dst", help="output path or fsspec URL; .safetensors or .pth")
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--img-size", type=int, nargs="+", help="new input size: N or H W")
    p.add_argument("--window-size", type=int, help="new attention window (V1: bias tables are resized)")
    p.add_argument("--pretrained-window-sizes", type=int, nargs="+", metavar="W",
                   help="V2: per stage, the windows the position bias was trained at (default: read off SRC)")
    p.add_argument("--num-classes", type=int, help="21841->1000 uses the official mapping; others re-init")
    p.add_argument("--reset-head", action="store_true", help="zero-initialize the classifier")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .pth files that hold more than tensors (runs pickle: trusted files only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def job() -> None:
        model, report = convert_checkpoint(a.src, a.dst, a.layout, img_size=a.img_size, window_size=a.window_size,
                                           num_classes=a.num_classes, pretrained_window_sizes=a.pretrained_window_sizes,
                                           reset_head=a.reset_head, allow_pickle=a.allow_pickle)
        print(report)
        print(f"wrote {a.dst} (layout: {a.layout}; img_size {model.cfg.img_size}, window {model.cfg.window_size}, "
              f"{model.cfg.num_classes} classes)")
    return cli.run(job, spellings={ALLOW_PICKLE: "--allow-pickle", RESET_HEAD: "--reset-head"})


if __name__ == "__main__":
    sys.exit(main())
