"""Convert a Swin checkpoint between layouts, optionally to a new resolution, window or class count.

    python -m pretrain.convert SRC DST --layout timm|official|ours [--img-size N] [--window-size M]
                                        [--num-classes K] [--reset-head] [--allow-pickle]
                                        [--pretrained-window-sizes W W W W]

SRC is any layout of Swin or Swin V2 (detected); DST's extension picks the file format (.safetensors or
torch.save). V1 bias tables are resized to a new window; a V2 model keeps its CPB MLP, evaluated at the new
window with the checkpoint's pretrained windows (read off it, or --pretrained-window-sizes).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .checkpoint import (LAYOUTS, CheckpointError, config_from_checkpoint, export, load_pretrained,
                         pretrained_windows_of)
from .models import model_from_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n\n")[0])
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
    args = parse_args(argv)
    try:
        cfg = config_from_checkpoint(args.src, allow_pickle=args.allow_pickle, window_size=args.window_size)
        changes = {}
        if cfg.version == 2:
            windows = args.pretrained_window_sizes or pretrained_windows_of(args.src, allow_pickle=args.allow_pickle)
            if windows:
                changes["pretrained_window_sizes"] = tuple(windows)
        if args.img_size:
            changes["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
        if args.window_size:
            changes["window_size"] = args.window_size
        if args.num_classes is not None:
            changes["num_classes"] = args.num_classes
        model = model_from_config(dataclasses.replace(cfg, **changes))
        report = load_pretrained(model, args.src, reset_head=args.reset_head, allow_pickle=args.allow_pickle)
        export(model, args.dst, layout=args.layout)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.dst} (layout: {args.layout}; img_size {model.cfg.img_size}, "
          f"window {model.cfg.window_size}, {model.cfg.num_classes} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
