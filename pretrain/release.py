"""Release export: consolidated fp32 weights of a training checkpoint, in our, timm's and the official layout.

    python -m pretrain.release RUN_DIR [--tag step00010000] [--out DIR] [--layouts ours timm official]
    (also `swin-export ...` and `python launch/export.py ...`)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .checkpoint import export
from .config import TrainConfig, from_dict
from .models import model_from_section
from .training.checkpointing import load_run_weights, resolve_tag

LAYOUTS = ("ours", "timm", "official")


def export_release(path: str, out_dir: Optional[str] = None, tag: Optional[str] = None,
                   layouts: tuple[str, ...] = LAYOUTS) -> list[str]:
    ckpt_dir, tag = resolve_tag(path, tag)
    with open(os.path.join(ckpt_dir, tag, "config.json")) as f:
        saved = json.load(f)
    saved.pop("finetune", None)  # a fine-tuning run's checkpoint: the model section is what matters here
    cfg: TrainConfig = from_dict(TrainConfig, saved)
    model = model_from_section(cfg.model)
    model.load_state_dict(load_run_weights(ckpt_dir, tag), strict=True)
    out_dir = out_dir or os.path.join(os.path.dirname(ckpt_dir.rstrip("/")), "export")
    c = model.cfg
    stem = f"{cfg.model.variant}_{c.img_size[0]}_w{c.window_size}_{c.num_classes}cls_{tag}"
    return export_layouts(model, os.path.join(out_dir, stem), layouts)


def export_layouts(model, stem: str, layouts: tuple[str, ...] = LAYOUTS) -> list[str]:
    """`stem.<layout>.safetensors` for each layout the model has (timm's Swin has no ape)."""
    return [export(model, f"{stem}.{layout}.safetensors", layout=layout) for layout in layouts
            if not (layout == "timm" and model.cfg.ape)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.release", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="run dir, its checkpoints/ dir, or one tag folder")
    p.add_argument("--tag", help="default: the newest complete checkpoint")
    p.add_argument("--out", help="default: <run dir>/export")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    a = p.parse_args(argv)
    try:
        for path in export_release(a.path, a.out, a.tag, tuple(a.layouts)):
            print(f"wrote {path}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
