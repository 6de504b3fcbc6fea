"""The architecture read off a Swin state dict in our layout, the inverse of the model's constructor; kept beside
the model as timm keeps `checkpoint_filter_fn` beside each of its models. Reading checkpoints, resizing and
loading them is pretrain.weights'."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Optional

import torch

from ..errors import CheckpointError
from .layers import coords_reference, log_spaced_coords
from .swin import VARIANTS, SwinConfig

HEAD_W, HEAD_B = "head.fc.weight", "head.fc.bias"


def family(sd: Mapping[str, torch.Tensor]) -> int:
    """2 for a Swin V2 state dict (CPB MLP, logit scales), 1 for V1 (bias tables), 0 if neither."""
    if any(k.endswith(("cpb_mlp.0.weight", "attn.logit_scale")) for k in sd):
        return 2
    return 1 if any(k.endswith("relative_position_bias_table") for k in sd) else 0


def v2_windows(sd: Mapping[str, torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Per stage of a V2 checkpoint that stores its `relative_coords_table` buffers (the official layout):
    (window, the window its coordinates were normalised by). timm's and our files don't store them."""
    out: dict[int, tuple[int, int]] = {}
    for k, v in sd.items():
        if not k.endswith("attn.relative_coords_table"):
            continue
        M = (v.shape[1] + 1) // 2 if v.ndim == 4 else 0
        if v.ndim != 4 or tuple(v.shape) != (1, 2 * M - 1, 2 * M - 1, 2):
            raise CheckpointError(f"{k}: shape {tuple(v.shape)} is not a square window's (1, 2M-1, 2M-1, 2): the "
                                  "checkpoint is damaged; set model.pretrained_window_sizes yourself")
        found = (M, coords_reference(v))
        # The table is a function of (window, reference window): one that is not exactly it is damaged,
        # and would set the wrong pretrained windows without a word.
        want = log_spaced_coords((M, M), (found[1], found[1]))
        if found[1] < 1 or not torch.allclose(v.float(), want, atol=1e-4):
            raise CheckpointError(f"{k}: not the log-spaced coordinates of any reference window (read as {found[1]}"
                                  f" for window {M}): the checkpoint is damaged; set model.pretrained_window_sizes "
                                  "yourself (the V2 fine-tune recipe: 12,12,12,6)")
        stage = int(k.split(".")[1])
        if out.setdefault(stage, found) != found:
            raise CheckpointError(f"{k}: window {found} differs from the stage's other blocks ({out[stage]}): "
                                  "the checkpoint is damaged; set model.pretrained_window_sizes yourself")
    return out


def table_window(rows: int) -> int:
    """The window M of a ((2M-1)^2, heads) relative-position bias table (0 if the rows are no such square)."""
    side = math.isqrt(rows)
    return (side + 1) // 2 if side * side == rows and side % 2 else 0


def checkpoint_window(sd: Mapping[str, torch.Tensor]) -> int:
    """The checkpoint's attention window, judged from all its bias tables and, where the file has them (the
    official layout), its relative_position_index buffers ((M^2, M^2) each): the most common window, so one
    damaged table can't redefine it, even in a checkpoint with two tables."""
    tables = [table_window(v.shape[0]) for k, v in sd.items() if k.endswith("relative_position_bias_table")]
    if not tables:
        raise CheckpointError("no relative_position_bias_table in the checkpoint: not a Swin (V1) checkpoint")
    index = [math.isqrt(v.shape[0]) for k, v in sd.items() if k.endswith("relative_position_index") and v.dim() == 2]
    votes = [w for w in tables + index if w > 0]
    return _vote(votes) if votes else 0


def _vote(values: list) -> Any:
    """The most common of `values` (the first seen on a tie): one damaged tensor can't redefine a setting
    that every block of the checkpoint repeats."""
    return Counter(values).most_common(1)[0][0]


def _v2_window(windows: dict[int, tuple[int, int]]) -> Optional[int]:
    return _vote([w for w, _ in windows.values()]) if windows else None


def infer_config(sd: Mapping[str, torch.Tensor], windows_from: Optional[Mapping] = None) -> dict[str, Any]:
    """Architecture read off a state dict in our layout: the fields of SwinConfig it determines.
    `windows_from`: the state dict before conversion (a V2 window lives in the official buffers only, and
    a V1 one's index buffers settle a vote between tables); a V2 checkpoint without them leaves window_size
    None."""
    proj = sd["patch_embed.proj.weight"]
    depths, heads = [], []
    version = family(sd)
    # A tensor with one row (V2) or column (V1) per head, in every block: the heads are the blocks' vote.
    per_head, dim = ("logit_scale", 0) if version == 2 else ("relative_position_bias_table", 1)
    i = 0
    while any(k.startswith(f"layers.{i}.blocks.") for k in sd):
        depths.append(1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{i}.blocks.")))
        heads.append(_vote([sd[k].shape[dim] for b in range(depths[-1])
                            if (k := f"layers.{i}.blocks.{b}.attn.{per_head}") in sd]))
        i += 1
    windows = v2_windows(windows_from or sd) if version == 2 else {}
    cfg: dict[str, Any] = dict(
        embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2],
        depths=tuple(depths), num_heads=tuple(heads),
        window_size=checkpoint_window(windows_from or sd) if version == 1 else _v2_window(windows),
        num_classes=sd[HEAD_W].shape[0] if HEAD_W in sd else 0,
        mlp_ratio=_vote([v.shape[0] / v.shape[1] for k, v in sd.items() if k.endswith(".mlp.fc1.weight")]),
        qkv_bias=f"layers.0.blocks.0.attn.{'q_bias' if version == 2 else 'qkv.bias'}" in sd,
        ape="absolute_pos_embed" in sd, patch_norm="patch_embed.norm.weight" in sd, version=version)
    if version == 2 and windows and any(w != ref for w, ref in windows.values()):
        cfg["pretrained_window_sizes"] = tuple(windows[j][1] if j in windows else 0 for j in range(len(depths)))
    if cfg["ape"]:
        cfg["img_size"] = math.isqrt(sd["absolute_pos_embed"].shape[1]) * cfg["patch_size"]
    return cfg


def variant_name(cfg: Mapping[str, Any]) -> str:
    for name, arch in VARIANTS.items():
        arch = {"version": 1, **arch}  # V1 variants leave it out
        if all(tuple(cfg[k]) == tuple(v) if isinstance(v, tuple) else cfg[k] == v for k, v in arch.items()):
            return name
    return "custom"


def describe(cfg: Mapping[str, Any]) -> str:
    return (f"{variant_name(cfg)} (embed_dim {cfg['embed_dim']}, depths {tuple(cfg['depths'])}, "
            f"heads {tuple(cfg['num_heads'])}), window {cfg['window_size']}, {cfg['num_classes']} classes")


def stage_windows(cfg: SwinConfig) -> tuple[int, ...]:
    """Each stage's window (the window shrinks to a stage smaller than it), square models."""
    grid = cfg.img_size[0] // cfg.patch_size
    return tuple(min(cfg.window_size, -(-grid // 2 ** i)) for i in range(len(cfg.depths)))


def trained_windows(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Optional[tuple[int, ...]]:
    """Per stage, the windows a V2 state dict's position bias was trained at, where the file says."""
    if "config" in meta:
        c = SwinConfig(**meta["config"])
        return c.pretrained_window_sizes or stage_windows(c)
    windows = v2_windows(sd)
    return tuple(windows[i][1] for i in sorted(windows)) or None
