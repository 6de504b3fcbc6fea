"""Load and export Swin weights in three layouts: the official release, timm, and ours.

- official: `{'model': sd}` .pth; patch merging at the END of stage i (`layers.i.downsample`), classifier
  `head.*`, stored `relative_position_index` / `attn_mask` buffers.
- timm: patch merging at the START of stage i+1, classifier `head.fc.*`, no buffers; .safetensors/.pth/.bin.
- ours: timm's key layout plus the model config in the file's metadata (`format: swin-pretrain/1`).

Loading is strict: everything is converted and checked first, and only a checkpoint that fits is copied
into the model, so a failed load leaves the model untouched.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from .classes import NUM_22K, map22k_to_1k
from .io import read_bytes, write_bytes_atomic, write_safetensors
from .models.layers import coords_reference, log_spaced_coords
from .models.simmim import SimMIM, is_simmim_state, split_state, to_official as simmim_to_official
from .models.swin import BUFFER_SUFFIXES, VARIANTS, SwinConfig, SwinTransformer, from_official, to_official

OURS_FORMAT = "swin-pretrain/1"
LAYOUTS = ("ours", "timm", "official")
SIMMIM_LAYOUTS = ("ours", "official", "encoder")  # a SimMIM model's
HEAD_W, HEAD_B = "head.fc.weight", "head.fc.bias"

Source = Union[str, "os.PathLike[str]", Mapping]


class CheckpointError(ValueError):
    """A checkpoint file that can't be read or isn't a Swin checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that doesn't fit the model: missing, unexpected or mis-shaped keys."""


@dataclass
class LoadReport:
    source: str
    layout: str
    converted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} (layout: {self.layout})"]
        for title, items in (("converted", self.converted), ("resized", self.resized),
                             ("re-initialized", self.reinitialized), ("dropped", self.dropped),
                             ("note", self.notes)):
            lines += [f"  {title}: {item}" for item in items]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading

def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def read_checkpoint(source: Source, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state dict, metadata) from a path, an fsspec URL or an in-memory state dict.

    `.pth`/`.bin` files load with `torch.load(weights_only=True)`; `allow_pickle=True` lifts that for
    files you trust (arbitrary code can run while unpickling).
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    meta: dict[str, Any] = {}
    if isinstance(source, Mapping):
        obj: Any = source
    else:
        try:
            data = read_bytes(name)
        except ImportError as e:  # fsspec's protocol needs a package that is not installed
            raise CheckpointError(f"{name}: reading {name.split('://')[0]}:// URLs needs the package "
                                  f"{e.name or e}: pip install 'fsspec[{name.split('://')[0].rstrip('s')}]'") from None
        if _is_safetensors(data):
            try:
                obj = safetensors.torch.load(data)
                meta = _safetensors_metadata(data)
            except Exception as e:
                raise CheckpointError(f"{name}: unreadable safetensors file ({e}); it may be truncated") from None
        else:
            try:
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not allow_pickle)
            except pickle.UnpicklingError as e:
                # Only a refused class or function (a GLOBAL) is a readable file that needs trust; random or
                # truncated bytes fail the same way and must not steer anyone to unpickling them.
                if allow_pickle or "Unsupported global" not in str(e):
                    raise CheckpointError(
                        f"{name}: not a readable checkpoint (neither safetensors nor a torch.save file: "
                        f"{_reason(e)}); it may be truncated or corrupt, download or copy it again") from None
                raise CheckpointError(
                    f"{name}: holds objects other than tensors and plain containers, refused by "
                    f"torch.load(weights_only=True) ({_reason(e)}). If you trust the file, "
                    "pass allow_pickle=True (--allow-pickle), or convert it to safetensors") from None
            except Exception as e:
                raise CheckpointError(
                    f"{name}: not a readable checkpoint ({type(e).__name__}: {e}); "
                    "the file may be truncated or corrupt, download or copy it again") from None
    if isinstance(obj, Mapping):
        for k in ("format", "config"):
            if isinstance(obj.get(k), (str, dict)):
                meta.setdefault(k, obj[k])
        for key in ("model", "state_dict", "module", "model_ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state dict, found {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{name}: entry {k!r} is a {type(v).__name__}, not a tensor")
        k = k[len("module."):] if k.startswith("module.") else k
        sd[k.replace(".rpe_mlp.", ".cpb_mlp.")] = v  # the V2 CPB MLP's older name, read as the official loaders do
    if not any(".blocks." in k for k in sd):
        raise CheckpointError(f"{name}: no 'layers.*.blocks.*' keys: not a Swin checkpoint "
                              f"(first keys: {list(sd)[:5]})")
    return sd, _our_config(meta, name)


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


def _reason(e: Exception) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return next((x for x in lines if "Unsupported" in x), lines[0])[:200]


def _our_config(meta: dict, name: str) -> dict:
    """Keep `config` only where it is ours (format swin-pretrain/*, a JSON SwinConfig); other tools'
    metadata (the official code stores its yacs config, others free text) never breaks loading."""
    cfg = meta.get("config")
    if cfg is None:
        return meta
    if meta.get("format") != OURS_FORMAT:
        return {k: v for k, v in meta.items() if k != "config"}
    out = dict(meta)
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{name}: its '{OURS_FORMAT}' config metadata is not valid JSON ({e}); the "
                                  "file is damaged: export it again") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{name}: its '{OURS_FORMAT}' config metadata is not an object")
    cfg = dict(cfg)
    if "simmim" in cfg:  # a SimMIM model's settings beside its encoder's SwinConfig
        out["simmim"] = cfg.pop("simmim")
    return {**out, "config": cfg}


def detect_layout(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> str:
    if (meta or {}).get("format") == OURS_FORMAT:
        return "ours"
    if ("layers.0.downsample.reduction.weight" in sd or "head.weight" in sd
            or any(k.endswith(BUFFER_SUFFIXES) for k in sd)):
        return "official"
    return "timm"


# ------------------------------------------------------------------------------------------ conversion

def resize_bias_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """((2M-1)^2, heads) -> ((2M'-1)^2, heads), exactly as the official `load_pretrained`:
    per head, the table as a (2M-1)x(2M-1) image, torch bicubic, align_corners=False."""
    L1, heads = table.shape
    S1, S2 = math.isqrt(L1), math.isqrt(new_len)
    if S1 * S1 != L1 or S2 * S2 != new_len:
        raise CheckpointError(f"bias table of {L1} rows -> {new_len}: only square windows can be resized")
    img = table.float().permute(1, 0).reshape(1, heads, S1, S1)
    out = F.interpolate(img, size=(S2, S2), mode="bicubic")
    return out.reshape(heads, new_len).permute(1, 0).contiguous().to(table.dtype)


def geometric_positions(src_size: int, dst_size: int) -> tuple[list[float], "np.ndarray"]:
    """The official SimMIM fine-tune's sample positions (`utils_simmim.remap_pretrained_keys_swin`): the
    pretrained table's offsets spaced by a geometric progression whose sum reaches the new half-width,
    and the new table's integer offsets."""
    def gp(a: float, r: float, n: int) -> float:
        return a * (1.0 - r ** n) / (1.0 - r)
    left, right = 1.01, 1.5
    while right - left > 1e-6:  # the same bisection as the official, float for float
        q = (left + right) / 2.0
        if gp(1, q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = [-d for d in reversed(dis)] + [0.0] + dis
    t = dst_size // 2.0
    return x, np.arange(-t, t + 0.1, 1.0)


def spline_matrix(x: Sequence[float], t: "np.ndarray") -> "np.ndarray":
    """(len(t), len(x)) float64: the cubic interpolating spline through (x, y) with not-a-knot ends, evaluated
    at t (clamped to [x0, xn]), as a linear map of y. This is FITPACK's s=0, k=3 spline, which SciPy's removed
    `interp2d(kind='cubic')` fitted on a grid; on a grid the 2-D spline is this map along each axis."""
    x = np.asarray(x, dtype=np.float64)
    n, h = len(x), np.diff(x)
    if n < 4:
        raise ValueError(f"a not-a-knot cubic spline needs at least 4 points, got {n}")
    A, R = np.zeros((n, n)), np.zeros((n, n))  # A @ M = R @ y for the second derivatives M
    A[0, :3] = -h[1], h[0] + h[1], -h[0]  # third derivative continuous at x1 ...
    A[-1, -3:] = -h[-1], h[-2] + h[-1], -h[-2]  # ... and at x_{n-2}
    for i in range(1, n - 1):
        A[i, i - 1:i + 2] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        R[i, i - 1:i + 2] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    M = np.linalg.solve(A, R)
    t = np.clip(np.asarray(t, dtype=np.float64), x[0], x[-1])
    out = np.zeros((len(t), n))
    for r, v in enumerate(t):
        i = int(min(max(np.searchsorted(x, v, side="right") - 1, 0), n - 2))
        hi, a, b = h[i], x[i + 1] - v, v - x[i]
        out[r] = M[i] * (a ** 3 / (6 * hi) - hi * a / 6) + M[i + 1] * (b ** 3 / (6 * hi) - hi * b / 6)
        out[r, i] += a / hi
        out[r, i + 1] += b / hi
    return out


def resize_bias_table_geometric(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """((2M-1)^2, heads) -> ((2M'-1)^2, heads) as the official SimMIM fine-tune: per head, the table sampled
    at geometrically spaced offsets and re-sampled at the new integer offsets by a bicubic spline."""
    L1, heads = table.shape
    S1, S2 = math.isqrt(L1), math.isqrt(new_len)
    if S1 * S1 != L1 or S2 * S2 != new_len:
        raise CheckpointError(f"bias table of {L1} rows -> {new_len}: only square windows can be resized")
    if S1 < 4:  # too small a table for the spline: the plain bicubic resize
        return resize_bias_table(table, new_len)
    x, t = geometric_positions(S1, S2)
    a = torch.from_numpy(spline_matrix(x, t))
    z = table.double().t().reshape(heads, S1, S1)
    out = a @ z @ a.t()  # rows (y) and columns (x) share the positions
    return out.reshape(heads, new_len).t().contiguous().float().to(table.dtype)


def resize_abs_pos_embed(pe: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, S*S, C) -> (1, gh*gw, C), bicubic as the official `load_pretrained`."""
    _, L1, C = pe.shape
    S1 = math.isqrt(L1)
    if S1 * S1 != L1:
        raise CheckpointError(f"absolute_pos_embed of {L1} positions is not a square grid")
    img = pe.float().reshape(1, S1, S1, C).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=grid, mode="bicubic")
    return out.permute(0, 2, 3, 1).flatten(1, 2).contiguous().to(pe.dtype)


def table_window(rows: int) -> int:
    """The window M of a ((2M-1)^2, heads) relative-position bias table (0 if the rows are no such square)."""
    side = math.isqrt(rows)
    return (side + 1) // 2 if side * side == rows and side % 2 else 0


def checkpoint_window(sd: Mapping[str, torch.Tensor]) -> int:
    """The checkpoint's attention window, judged from all its bias tables (the most common size), so one
    damaged table can't redefine it."""
    sizes = Counter(v.shape[0] for k, v in sd.items() if k.endswith("relative_position_bias_table"))
    if not sizes:
        raise CheckpointError("no relative_position_bias_table in the checkpoint: not a Swin (V1) checkpoint")
    return table_window(sizes.most_common(1)[0][0])


def _v2_window(windows: dict[int, tuple[int, int]]) -> Optional[int]:
    return Counter(w for w, _ in windows.values()).most_common(1)[0][0] if windows else None


def infer_config(sd: Mapping[str, torch.Tensor], windows_from: Optional[Mapping] = None) -> dict[str, Any]:
    """Architecture read off a state dict in our layout: the fields of SwinConfig it determines.
    `windows_from`: the state dict before conversion (a V2 window lives in the official buffers only);
    a V2 checkpoint without them leaves window_size None."""
    proj = sd["patch_embed.proj.weight"]
    depths, heads = [], []
    version = family(sd)
    i = 0
    while any(k.startswith(f"layers.{i}.blocks.") for k in sd):
        depths.append(1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{i}.blocks.")))
        heads.append(sd[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0] if version == 2 else
                     sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
        i += 1
    windows = v2_windows(windows_from or sd) if version == 2 else {}
    cfg: dict[str, Any] = dict(
        embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2],
        depths=tuple(depths), num_heads=tuple(heads),
        window_size=checkpoint_window(sd) if version == 1 else _v2_window(windows),
        num_classes=sd[HEAD_W].shape[0] if HEAD_W in sd else 0,
        mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0],
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


def _describe(cfg: Mapping[str, Any]) -> str:
    return (f"{variant_name(cfg)} (embed_dim {cfg['embed_dim']}, depths {tuple(cfg['depths'])}, "
            f"heads {tuple(cfg['num_heads'])}), window {cfg['window_size']}, {cfg['num_classes']} classes")


# -------------------------------------------------------------------------------------------- loading

def _fit_head(sd: dict, target: Mapping, model: SwinTransformer, reset_head: bool, report: LoadReport) -> None:
    nc = model.num_classes
    if nc == 0:
        for k in (HEAD_W, HEAD_B):
            if sd.pop(k, None) is not None:
                report.dropped.append(f"{k} (the model has no classifier, num_classes=0)")
        return
    if HEAD_W not in sd and not reset_head:
        return  # reported as missing by the strict check: the caller must ask for a new head
    src = sd[HEAD_W].shape if HEAD_W in sd else None
    if src is not None and src[1] != target[HEAD_W].shape[1]:
        return  # another width: a shape mismatch for the strict check, not a head to re-initialize
    if not reset_head and src is not None and src[0] == nc:
        return
    if not reset_head and src is not None and src[0] == NUM_22K and nc == 1000:
        rows = torch.tensor(map22k_to_1k())
        sd[HEAD_W], sd[HEAD_B] = sd[HEAD_W][rows], sd[HEAD_B][rows]
        report.converted.append("head: 21841 ImageNet-22K rows -> 1000 ImageNet-1K rows (official mapping)")
        return
    # The official fine-tuning code zero-initializes a head whose class count changed.
    sd[HEAD_W] = torch.zeros_like(target[HEAD_W])
    sd[HEAD_B] = torch.zeros_like(target[HEAD_B])
    why = "asked (reset_head=True)" if reset_head else (
        f"checkpoint has {src[0] if src is not None else 'no'} classes, model has {nc}")
    report.reinitialized.append(f"head.fc: zero-initialized ({why})")


def _check_tables(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any], name: str) -> list[str]:
    """Bias tables that don't fit the checkpoint's own window, judged from the whole checkpoint: a table
    fits at the checkpoint's window, or at one smaller window shared by its whole stage (a stage smaller
    than the window; later stages no larger). Returns the damaged ones with why; they are never resized."""
    tables = {k: v for k, v in sd.items() if k.endswith("relative_position_bias_table")}
    if not tables:
        return []
    window = int(meta["config"]["window_size"]) if "config" in meta else checkpoint_window(sd)
    per_stage: dict[int, set] = {}
    for k, v in tables.items():
        per_stage.setdefault(int(k.split(".")[1]), set()).add(table_window(v.shape[0]))
    damaged = []
    for k, v in tables.items():
        i, w = int(k.split(".")[1]), table_window(v.shape[0])
        later = [x for j, ws in per_stage.items() if j > i for x in ws]
        if w == window or (0 < w < window and per_stage[i] == {w} and all(0 < x <= w for x in later)):
            continue
        damaged.append(f"{k} {tuple(v.shape)} (window {w or '?'})")
    if damaged:
        return [f"{name}: bias table(s) that don't fit the checkpoint's window {window} (judged from its "
                f"{len(tables)} tables): " + ", ".join(sorted(damaged, key=_natural_key)[:8])
                + ". Such a tensor is damaged or from another model and is not resized; fix or re-export "
                "the checkpoint"]
    return []


def _fit_positions(sd: dict, target: Mapping, model: SwinTransformer, report: LoadReport,
                   geometric: bool = False) -> None:
    """`geometric`: bias tables by the SimMIM fine-tune's spline (a SimMIM checkpoint), else bicubic."""
    resized = []
    for k, v in list(sd.items()):
        t = target.get(k)
        if t is None or v.shape == t.shape:
            continue
        if k.endswith("relative_position_bias_table") and v.shape[1] == t.shape[1]:
            sd[k] = (resize_bias_table_geometric if geometric else resize_bias_table)(v, t.shape[0])
            resized.append((k, tuple(v.shape), tuple(t.shape)))
        elif k == "absolute_pos_embed" and v.shape[2] == t.shape[2]:
            sd[k] = resize_abs_pos_embed(v, model.patch_embed.grid_size)
            resized.append((k, tuple(v.shape), tuple(t.shape)))
    if resized:
        tables = [r for r in resized if r[0] != "absolute_pos_embed"]
        if tables:
            how = "by the SimMIM geometric spline" if geometric else "bicubic"
            report.resized.append(f"{len(tables)} relative_position_bias_table(s) {how}, e.g. "
                                  f"{tables[0][1]} -> {tables[0][2]}")
        report.resized += [f"absolute_pos_embed {a} -> {b} bicubic" for k, a, b in resized
                           if k == "absolute_pos_embed"]


def _note_cpb(report: LoadReport, model: SwinTransformer, sd: Mapping, meta: Mapping) -> None:
    """Say what the V2 position bias will see: the model's windows, its coordinate normalisation, and
    what the checkpoint was trained with where the file says."""
    c = model.cfg
    mine = c.pretrained_window_sizes or stage_windows(c)
    theirs = _trained_windows(sd, meta)
    report.notes.append(f"continuous position bias evaluated at window {c.window_size}, coordinates normalised "
                        f"by windows {tuple(mine)}" + ("" if c.pretrained_window_sizes else " (the model's own)"))
    if theirs and tuple(theirs) != tuple(mine):
        report.notes.append(f"the checkpoint's position bias was trained with windows {tuple(theirs)}: build the "
                            f"model with pretrained_window_sizes={tuple(theirs)} to keep what it learned")


def _natural_key(item: Any) -> list:
    """Sort 'layers.2.blocks.10' after 'layers.2.blocks.9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(item))]


def _mismatch_message(name: str, sd: Mapping, target: Mapping, model: SwinTransformer,
                      missing: list, unexpected: list, mismatched: list) -> str:
    def show(items: list, n: int = 8) -> str:
        items = sorted(items, key=_natural_key)
        return ", ".join(map(str, items[:n])) + (f" ... ({len(items)} in all)" if len(items) > n else "")

    lines = [f"{name} does not fit the model:"]
    if missing:
        lines.append(f"  missing keys: {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {show(unexpected)}")
    if mismatched:
        lines.append("  shape mismatches: " + show([f"{k} {a} vs model {b}" for k, a, b in mismatched]))
    try:
        ck = _describe(infer_config(sd))
    except (KeyError, IndexError, ValueError):
        ck = "unrecognized"
    mine = model.cfg.to_dict()
    if ck == _describe(mine):  # the architecture fits: the tensors named above are what is wrong
        lines.append(f"  hint: the checkpoint's architecture is the model's ({ck}), so only the "
                     f"{len(missing) + len(unexpected) + len(mismatched)} tensor(s) named above disagree: they are "
                     "damaged or from another model; fix or re-export the checkpoint (strict=False loads the rest)")
        return "\n".join(lines)
    lines.append(f"  hint: the checkpoint looks like {ck}; the model is {_describe(mine)}. "
                 "Build the matching variant (build_model(variant, window_size=..., num_classes=...))"
                 + ("; a checkpoint without a classifier loads with reset_head=True"
                    if HEAD_W in missing and len(missing) <= 2 else ""))
    return "\n".join(lines)


def load_pretrained(model: Union[SwinTransformer, SimMIM], source: Source, *, strict: bool = True,
                    reset_head: bool = False, allow_pickle: bool = False) -> LoadReport:
    """Load `source` (path, fsspec URL or state dict; official, timm or our layout; a Swin or a SimMIM
    checkpoint) into `model` (a Swin classifier/encoder, or a SimMIM model).

    Bias tables and absolute position embeddings are resized to the model's window/grid (official
    bicubic recipe; from a SimMIM checkpoint, the SimMIM fine-tune's geometric spline); index and mask
    buffers are rebuilt by the model, never loaded; the older `rpe_mlp` name of the V2 CPB MLP is read as
    `cpb_mlp`; a 21841-class head loads into a 1000-class model through the official 22K->1K mapping; any
    other class-count change zero-initializes the head. A SimMIM checkpoint loads into a classifier without
    its `mask_token` and decoder (reported as dropped). With strict=True any other difference raises
    CheckpointMismatchError and the model is left unchanged.
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    sd, meta = read_checkpoint(source, allow_pickle=allow_pickle)
    from_simmim = is_simmim_state(sd)
    extra: dict[str, torch.Tensor] = {}
    if from_simmim:
        sd, extra = split_state(sd)
    encoder = model.encoder if isinstance(model, SimMIM) else model
    kept_head = from_simmim and encoder.num_classes > 0 and not any(k.startswith("head.") for k in sd)
    report = _load_encoder(encoder, sd, meta, name, strict, reset_head, geometric=from_simmim, keep_head=kept_head)
    if from_simmim:
        report.layout = f"SimMIM ({report.layout} encoder)"
    if kept_head:
        report.reinitialized.append("head.fc: kept the model's init (a SimMIM checkpoint has no classifier)")
    if isinstance(model, SimMIM):
        _load_simmim_parts(model, extra, name, strict, report)
    elif extra:
        report.dropped.append(f"the SimMIM parts {', '.join(sorted(extra, key=_natural_key))} (pretraining only)")
    return report


def _load_simmim_parts(model: SimMIM, extra: dict, name: str, strict: bool, report: LoadReport) -> None:
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    missing = [k for k in target if k not in extra]
    unexpected = [k for k in extra if k not in target]
    mismatched = [f"{k} {tuple(extra[k].shape)} vs model {tuple(target[k].shape)}" for k in target
                  if k in extra and extra[k].shape != target[k].shape]
    if (missing or unexpected or mismatched) and strict:
        raise CheckpointMismatchError(
            f"{name} does not fit the SimMIM model outside its encoder: " + "; ".join(
                [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"shape mismatches {mismatched}" if mismatched else ""]).strip("; ")
            + (" (a plain Swin checkpoint has no mask token or decoder: load it with strict=False to start them "
               "fresh)" if missing and not extra else ""))
    ok = {k: v for k, v in extra.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(ok, strict=False)
    report.reinitialized += [f"{k} (missing, kept the model's init)" for k in missing]
    report.dropped += [f"{k} (not in the model)" for k in unexpected]


def _load_encoder(model: SwinTransformer, sd: dict, meta: dict, name: str, strict: bool, reset_head: bool,
                  geometric: bool, keep_head: bool = False) -> LoadReport:
    """`geometric`: bias tables by the SimMIM spline; `keep_head`: the model's classifier keeps its init (a
    SimMIM checkpoint has none, and the official SimMIM fine-tune leaves it as built)."""
    fam, mine = family(sd), model.cfg.version
    if fam and fam != mine:
        raise CheckpointError(
            f"{name} is a Swin V{fam} checkpoint ({'cpb_mlp and logit_scale' if fam == 2 else 'bias tables'}) but "
            f"the model is a Swin V{mine}: build a {'swinv2_*' if fam == 2 else 'swin_*'} model for it; the two "
            "position biases can't be converted into each other")
    layout = detect_layout(sd, meta)
    report = LoadReport(name, layout)
    if mine == 2:
        _note_cpb(report, model, sd, meta)
    if layout == "official":
        n_buffers = sum(k.endswith(BUFFER_SUFFIXES) for k in sd)
        sd = from_official(sd)
        report.converted.append("official -> our key layout (patch merging moved to the next stage, "
                                "head -> head.fc)")
        if n_buffers:
            report.dropped.append(f"{n_buffers} relative_position_index/attn_mask buffers (rebuilt by the model)")
    else:
        sd = {k: v for k, v in sd.items() if not k.endswith(BUFFER_SUFFIXES)}
    target = model.state_dict()
    if keep_head and not reset_head:
        sd[HEAD_W], sd[HEAD_B] = target[HEAD_W].clone(), target[HEAD_B].clone()
    _fit_head(sd, target, model, reset_head, report)
    damaged = _check_tables(sd, meta, name)
    if damaged:
        raise CheckpointMismatchError(damaged[0])
    original = dict(sd)
    _fit_positions(sd, target, model, report, geometric)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in sd
                  if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        msg = _mismatch_message(name, original, target, model, missing, unexpected, mismatched)
        if strict:
            raise CheckpointMismatchError(msg)
        for k, _, _ in mismatched:
            del sd[k]
        report.dropped += [f"{k} (not in the model)" for k in unexpected]
        report.dropped += [f"{k} (shape mismatch, kept the model's)" for k, _, _ in mismatched]
        report.reinitialized += [f"{k} (missing, kept the model's init)" for k in missing]
        sd = {k: v for k, v in sd.items() if k in target}
    model.load_state_dict(sd, strict=strict)
    return report


# -------------------------------------------------------------------------------------------- export

def _to_cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def export(model: Union[SwinTransformer, SimMIM], path: str, layout: str = "ours") -> str:
    """Write the model's weights to `path` (local or fsspec URL) in `layout`, atomically.

    `.safetensors` paths get safetensors; anything else a torch.save file (`{'model': sd}` for the
    official layout, as the release). The timm layout loads with
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`.
    A SimMIM model exports as "ours" (with its settings), "official" (the official SimMIM state dict) or
    "encoder" (the encoder alone in timm's layout: a backbone for fine-tuning or timm).
    """
    if isinstance(model, SimMIM):
        return _export_simmim(model, path, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "timm" and model.absolute_pos_embed is not None:
        raise CheckpointError("timm's Swin has no absolute position embedding (ape=True): "
                              "export with layout='official' or 'ours'")
    try:
        sd = _to_cpu(to_official(model) if layout == "official" else model.state_dict())
    except ValueError as e:  # what the official layout can't hold (a non-square window)
        raise CheckpointError(str(e)) from None
    return _write(path, sd, layout, model.cfg.to_dict())


def _export_simmim(model: SimMIM, path: str, layout: str) -> str:
    if layout not in SIMMIM_LAYOUTS:
        raise ValueError(f"a SimMIM model exports as one of {SIMMIM_LAYOUTS}, got {layout!r}")
    if layout == "encoder":
        return export(model.encoder, path, "timm")
    try:
        sd = _to_cpu(simmim_to_official(model) if layout == "official" else model.state_dict())
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return _write(path, sd, layout, model.config_dict())


def _write(path: str, sd: dict, layout: str, config: dict) -> str:
    as_safetensors = str(path).endswith(".safetensors")
    if layout == "ours":
        meta = {"format": OURS_FORMAT, "config": json.dumps(config)}
        obj: dict = {"model": sd, **meta}
    else:
        meta = {"format": "pt"}
        obj = {"model": sd} if layout == "official" else sd
    if as_safetensors:
        write_safetensors(str(path), sd, meta)
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)
        write_bytes_atomic(str(path), buf.getvalue())
    return str(path)


def export_layouts(model: Union[SwinTransformer, SimMIM], stem: str, layouts: Optional[tuple[str, ...]] = None
                   ) -> list[str]:
    """`stem.<layout>.safetensors` for each layout the model has (timm's Swin has no ape)."""
    simmim = isinstance(model, SimMIM)
    layouts = layouts or (SIMMIM_LAYOUTS if simmim else LAYOUTS)
    ape = (model.encoder if simmim else model).cfg.ape
    return [export(model, f"{stem}.{layout}.safetensors", layout=layout) for layout in layouts
            if not (layout in ("timm", "encoder") and ape)]


def config_from_checkpoint(source: Source, *, allow_pickle: bool = False,
                           window_size: Optional[int] = None) -> SwinConfig:
    """The architecture stored in (ours) or read off (official, timm) a checkpoint; `window_size` for a
    V2 checkpoint in timm's layout, which does not store it."""
    sd, meta = read_checkpoint(source, allow_pickle=allow_pickle)
    if "config" in meta:  # ours: read_checkpoint keeps only our own, parsed
        return SwinConfig(**meta["config"])
    if is_simmim_state(sd):  # a SimMIM checkpoint: its encoder's architecture
        sd = split_state(sd)[0]
    raw = sd
    if detect_layout(sd, meta) == "official":
        sd = from_official(sd)
    cfg = infer_config(sd, windows_from=raw)
    cfg["window_size"] = cfg["window_size"] or window_size
    if cfg["window_size"] is None:
        raise CheckpointError(f"{source}: a Swin V2 checkpoint in timm's layout stores no window size (timm "
                              "does not save the relative_coords_table buffers): give it (--window-size, and "
                              "--pretrained-window-sizes for a model fine-tuned from another window)")
    try:
        return SwinConfig(**cfg)
    except ValueError as e:  # read off damaged tensors: no architecture fits them
        raise CheckpointError(f"{source}: the architecture read off its tensors does not fit together ({e}); "
                              "a tensor is damaged or from another model: fix or re-export the checkpoint") from None


def pretrained_windows_of(source: Source, *, allow_pickle: bool = False) -> Optional[tuple[int, ...]]:
    """For a Swin V2 checkpoint: per stage, the window its position bias was trained at (what a model
    fine-tuned from it should pass as `pretrained_window_sizes`), from our metadata or the official
    `relative_coords_table` buffers; None where the file doesn't say (timm's layout) or for V1."""
    sd, meta = read_checkpoint(source, allow_pickle=allow_pickle)
    if is_simmim_state(sd):
        sd = split_state(sd)[0]
    return _trained_windows(sd, meta) if family(sd) == 2 else None


def _trained_windows(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Optional[tuple[int, ...]]:
    """Per stage, the windows a V2 state dict's position bias was trained at, where the file says."""
    if "config" in meta:
        c = SwinConfig(**meta["config"])
        return c.pretrained_window_sizes or stage_windows(c)
    windows = v2_windows(sd)
    return tuple(windows[i][1] for i in sorted(windows)) or None


def stage_windows(cfg: SwinConfig) -> tuple[int, ...]:
    """Each stage's window (the window shrinks to a stage smaller than it), square models."""
    grid = cfg.img_size[0] // cfg.patch_size
    return tuple(min(cfg.window_size, -(-grid // 2 ** i)) for i in range(len(cfg.depths)))


def convert_checkpoint(src: Source, dst: str, layout: str, *, img_size=None, window_size: Optional[int] = None,
                       num_classes: Optional[int] = None, pretrained_window_sizes: Optional[Sequence[int]] = None,
                       reset_head: bool = False, allow_pickle: bool = False) -> tuple[SwinTransformer, LoadReport]:
    """Any layout of a Swin or Swin V2 checkpoint -> `dst` in `layout`, optionally at a new size, window or
    class count (V1 bias tables resized; V2 keeps its CPB MLP, with the checkpoint's pretrained windows)."""
    cfg = config_from_checkpoint(src, allow_pickle=allow_pickle, window_size=window_size)
    changes: dict[str, Any] = {}
    if cfg.version == 2:
        windows = pretrained_window_sizes or pretrained_windows_of(src, allow_pickle=allow_pickle)
        if windows:
            changes["pretrained_window_sizes"] = tuple(windows)
    if img_size:
        changes["img_size"] = tuple(img_size) if len(img_size) == 2 else img_size[0]
    if window_size:
        changes["window_size"] = window_size
    if num_classes is not None:
        changes["num_classes"] = num_classes
    model = SwinTransformer(dataclasses.replace(cfg, **changes))
    report = load_pretrained(model, src, reset_head=reset_head, allow_pickle=allow_pickle)
    export(model, dst, layout=layout)
    return model, report


def export_run(path: str, out_dir: Optional[str] = None, tag: Optional[str] = None,
               layouts: Optional[tuple[str, ...]] = None, warn=print) -> list[str]:
    """Consolidated fp32 weights of one of our run checkpoints (newest complete, or `tag`) in each layout
    (default: all the model has; a SimMIM run: ours, official, encoder).
    Only the checkpoint's model section is read: a run with keys this version does not know still exports."""
    from .models import model_from_section, simmim_from_section
    from .training.checkpointing import load_run_weights, resolve_tag, saved_model_section, saved_simmim
    ckpt_dir, tag = resolve_tag(path, tag)
    section = saved_model_section(ckpt_dir, tag, warn=warn)
    norm_target = saved_simmim(ckpt_dir, tag)
    model = model_from_section(section) if norm_target is None else simmim_from_section(section, norm_target)
    model.load_state_dict(load_run_weights(ckpt_dir, tag), strict=True)
    out_dir = out_dir or os.path.join(os.path.dirname(ckpt_dir.rstrip("/")), "export")
    c = model.cfg
    what = "simmim" if norm_target is not None else f"{c.num_classes}cls"
    stem = f"{section.variant}_{c.img_size[0]}_w{c.window_size}_{what}_{tag}"
    if norm_target is not None and layouts is not None:
        layouts = tuple(x for x in layouts if x in SIMMIM_LAYOUTS) or None
    return export_layouts(model, os.path.join(out_dir, stem), layouts)
