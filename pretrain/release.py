"""Release export: consolidated fp32 weights of a training checkpoint, in our, timm's and the official layout."""
from __future__ import annotations

import json
import os
from typing import Optional

from . import run_checkpoint as rc
from .checkpoint import export
from .config import TrainConfig, from_dict


def resolve_tag(path: str, tag: Optional[str] = None) -> tuple[str, str]:
    """(checkpoint dir, tag) from a run dir, a checkpoint dir or a tag folder."""
    path = path.rstrip("/")
    if tag:
        return path, tag
    if os.path.exists(os.path.join(path, rc.MARKER)):
        return os.path.split(path)
    for ckpt_dir in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(ckpt_dir, rc.POINTER)):
            return ckpt_dir, rc.latest_tag(ckpt_dir)
    raise FileNotFoundError(f"{path}: no complete checkpoint (no {rc.POINTER} here or in {path}/checkpoints)")


def export_release(path: str, out_dir: Optional[str] = None, tag: Optional[str] = None,
                   layouts: tuple[str, ...] = ("ours", "timm", "official")) -> list[str]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .engine import model_from_section

    ckpt_dir, tag = resolve_tag(path, tag)
    with open(os.path.join(ckpt_dir, tag, "config.json")) as f:
        cfg: TrainConfig = from_dict(TrainConfig, json.load(f))
    model = model_from_section(cfg)
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    model.load_state_dict(state, strict=True)
    out_dir = out_dir or os.path.join(os.path.dirname(ckpt_dir.rstrip("/")), "export")
    c = model.cfg
    stem = f"{cfg.model.variant}_{c.img_size[0]}_w{c.window_size}_{c.num_classes}cls_{tag}"
    written = []
    for layout in layouts:
        if layout == "timm" and c.ape:
            continue  # timm's Swin has no absolute position embedding
        written.append(export(model, os.path.join(out_dir, f"{stem}.{layout}.safetensors"), layout=layout))
    return written
