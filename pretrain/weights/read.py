"""Reading a checkpoint in any of its formats (safetensors, torch.save; path, fsspec URL, state dict, a
transformers model folder or `hf://ORG/NAME`) and telling its layout: official, timm, ours or transformers, a Swin
or a SimMIM one."""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any, Mapping, Optional, Union

import safetensors.torch
import torch

from ..errors import ALLOW_PICKLE, CheckpointError
from ..io import read_bytes
from ..models.shapes import family, infer_config, trained_windows
from ..models.simmim import is_simmim_state, split_state
from ..models.swin import BUFFER_SUFFIXES, SwinConfig, from_official
from . import hub

OURS_FORMAT = "swin-pretrain/1"
# Metadata of an encoder exported from a SimMIM model (timm's layout): loaded as the SimMIM checkpoint it
# was (its bias tables by the SimMIM spline, the classifier kept at its init).
SIMMIM_MARK = "pretrained_by"


Source = Union[str, "os.PathLike[str]", Mapping]


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
    folder = None if isinstance(source, Mapping) else hub.resolve_source(name)
    if folder is not None:  # a transformers model folder (or a hub id): its weights file, its config.json below
        source = hub.weights_file(folder, allow_pickle)
    if isinstance(source, Mapping):
        obj: Any = source
    else:
        try:
            data = read_bytes(str(source))
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
                    f"pass {ALLOW_PICKLE}, or convert it to safetensors") from None
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
    if hub.is_hub_state(sd) or folder is not None:
        return _from_hub(sd, name, folder or os.path.dirname(str(source)))
    if not any(".blocks." in k for k in sd):
        raise CheckpointError(f"{name}: no 'layers.*.blocks.*' keys: not a Swin checkpoint "
                              f"(first keys: {list(sd)[:5]})")
    return sd, _our_config(meta, name)


def _from_hub(sd: dict[str, torch.Tensor], name: str, folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A transformers checkpoint in the official layout, with its config.json (where the folder has one) as
    our architecture, checked against the tensors; `id2label` kept."""
    official = hub.from_hub(sd)
    meta: dict[str, Any] = {"format": "transformers"}
    if folder and os.path.exists(os.path.join(folder, hub.CONFIG)):
        config = hub.read_hub_config(folder)
        meta["config"] = hub.swin_config(config, os.path.join(folder, hub.CONFIG))
        labels = config.get("id2label") or {}
        if meta["config"]["num_classes"] and labels:
            meta["id2label"] = {int(i): c for i, c in labels.items()}
        _check_against_tensors(official, meta["config"], os.path.join(folder, hub.CONFIG))
    return official, meta


def _check_against_tensors(official: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str) -> None:
    """config.json must describe the tensors: one line naming the key, what config.json says and what the
    tensors hold (a window the bias tables don't hold, a depth, a width, a class count)."""
    encoder = split_state(official)[0] if is_simmim_state(official) else official
    try:
        found = infer_config(from_official(encoder), windows_from=encoder)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: the tensors beside it are not a whole Swin "
                              f"({type(e).__name__}: {e})") from None
    said = {**config, "depths": tuple(config["depths"]), "num_heads": tuple(config["num_heads"])}
    keys = ["embed_dim", "depths", "num_heads", "patch_size", "in_chans", "mlp_ratio", "qkv_bias", "ape", "version"]
    keys += ["num_classes"] if not is_simmim_state(official) else []
    keys += ["window_size"] if found.get("window_size") else []  # V2 tensors hold no window (no buffers)
    for key in keys:
        if key in found and found[key] != said[key]:
            raise CheckpointError(f"{where}: {key} is {said[key]!r} in config.json but {found[key]!r} in the tensors "
                                  "beside it: the folder mixes two models; fix config.json or the weights")


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
    """ours, transformers (read into the official key layout), official or timm."""
    if (meta or {}).get("format") in (OURS_FORMAT, "transformers"):
        return "ours" if meta["format"] == OURS_FORMAT else "transformers"
    if ("layers.0.downsample.reduction.weight" in sd or "head.weight" in sd
            or any(k.endswith(BUFFER_SUFFIXES) for k in sd)):
        return "official"
    return "timm"


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
    if detect_layout(sd, meta) in ("official", "transformers"):
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
    return trained_windows(sd, meta) if family(sd) == 2 else None
