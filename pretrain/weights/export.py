"""Writing weights: one model in a layout (ours, timm, official; a SimMIM model: ours, official, encoder),
converting a checkpoint between layouts and sizes, and exporting a run's checkpoint."""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .. import runs
from ..errors import CheckpointError
from ..io import write_bytes_atomic, write_safetensors
from ..models.simmim import SimMIM
from ..models.simmim import to_official as simmim_to_official
from ..models.swin import SwinTransformer, to_official
from . import hub
from .load import LoadReport, load_pretrained
from .read import OURS_FORMAT, SIMMIM_MARK, Source, config_from_checkpoint, pretrained_windows_of

LAYOUTS = ("ours", "timm", "official", "transformers")
SIMMIM_LAYOUTS = ("ours", "official", "encoder", "transformers")  # a SimMIM model's


def model_layouts(model: Union[SwinTransformer, SimMIM]) -> tuple[str, ...]:
    """The layouts a model exports to."""
    return SIMMIM_LAYOUTS if isinstance(model, SimMIM) else LAYOUTS


def _to_cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def export(model: Union[SwinTransformer, SimMIM], path: str, layout: str = "ours",
           extra_meta: Optional[dict[str, str]] = None) -> str:
    """Write the model's weights to `path` (local or fsspec URL) in `layout`, atomically.

    `.safetensors` paths get safetensors; anything else a torch.save file (`{'model': sd}` for the
    official layout, as the release). The timm layout loads with
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`.
    A SimMIM model exports as "ours" (with its settings), "official" (the official SimMIM state dict) or
    "encoder" (the encoder alone in timm's layout: a backbone for fine-tuning or timm).
    "transformers": `path` is a folder (config.json, model.safetensors in the hub's keys, the image processor's
    preprocessor_config.json) that transformers' `from_pretrained` loads: Swin(v2)ForImageClassification, or
    Swin(v2)Model without a classifier, or Swin(v2)ForMaskedImageModeling for SimMIM; the class names of a model
    loaded from such a folder (`id2label`) are written back.
    """
    if layout == "transformers":
        return _export_hub(model, path)
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
    return _write(path, sd, layout, model.cfg.to_dict(), extra_meta)


def _export_simmim(model: SimMIM, path: str, layout: str) -> str:
    if layout not in SIMMIM_LAYOUTS:
        raise ValueError(f"a SimMIM model exports as one of {SIMMIM_LAYOUTS}, got {layout!r}")
    if layout == "encoder":  # timm's layout, marked: a fine-tune treats it as the SimMIM checkpoint it came from
        return export(model.encoder, path, "timm", {SIMMIM_MARK: "simmim"})
    try:
        sd = _to_cpu(simmim_to_official(model) if layout == "official" else model.state_dict())
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return _write(path, sd, layout, model.config_dict())


def _export_hub(model: Union[SwinTransformer, SimMIM], folder: str) -> str:
    mim = isinstance(model, SimMIM)
    encoder = model.encoder if mim else model
    c = encoder.cfg
    if c.version == 2 and c.ape:
        raise CheckpointError("transformers' Swin V2 with absolute position embeddings stores one position more "
                              "than the patches: export this model with layout='ours' or 'official'")
    family = "Swinv2" if c.version == 2 else "Swin"
    arch = (f"{family}ForMaskedImageModeling" if mim else f"{family}ForImageClassification" if c.num_classes
            else f"{family}Model")
    try:
        sd = _to_cpu(simmim_to_official(model) if mim else to_official(model))
    except ValueError as e:  # a non-square window
        raise CheckpointError(str(e)) from None
    stride = c.patch_size * 2 ** (len(c.depths) - 1)  # the SimMIM decoder's (and transformers' encoder_stride)
    config = hub.hub_config(c.to_dict(), arch, getattr(encoder, "id2label", None), encoder_stride=stride)
    return hub.write_folder(str(folder), hub.to_hub(sd, c.version), config, c.img_size[0])


def _write(path: str, sd: dict, layout: str, config: dict, extra_meta: Optional[dict[str, str]] = None) -> str:
    as_safetensors = str(path).endswith(".safetensors")
    if layout == "ours":
        meta = {"format": OURS_FORMAT, "config": json.dumps(config)}
        obj: dict = {"model": sd, **meta}
    else:
        meta = {"format": "pt", **(extra_meta or {})}
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
    """`stem.<layout>.safetensors` for each layout the model has (timm's Swin has no ape), `stem.transformers/`
    (a folder) for the transformers layout (not for a Swin V2 with ape)."""
    c = (model.encoder if isinstance(model, SimMIM) else model).cfg
    skip = {"timm", "encoder"} if c.ape else set()
    skip |= {"transformers"} if c.ape and c.version == 2 else set()
    if layouts and skip & set(layouts):  # asked for by name: refused, not silently left out
        raise CheckpointError(f"--layouts {' '.join(sorted(skip & set(layouts)))}: this model has absolute position "
                              "embeddings (model.ape), which that layout can't hold; use ours or official")
    return [export(model, f"{stem}.{layout}" + ("" if layout == "transformers" else ".safetensors"), layout=layout)
            for layout in layouts or model_layouts(model) if layout not in skip]


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
    (default: all the model has; a SimMIM run: ours, official, encoder). The model is the saved task's.
    Only the checkpoint's model section is read: a run with keys this version does not know still exports."""
    from ..tasks import task_class  # imported on use: the tasks bring the data transforms (timm, torchvision)
    ckpt_dir, tag = runs.resolve_tag(path, tag)
    saved = runs.read_saved_config(os.path.join(ckpt_dir, tag), warn=warn)
    task = task_class(saved.task)
    model = task.build_model(saved.model, saved.task_settings)
    model.load_state_dict(runs.load_run_weights(ckpt_dir, tag), strict=True)
    out_dir = out_dir or os.path.join(os.path.dirname(ckpt_dir.rstrip("/")), "export")
    c = model.cfg
    stem = f"{saved.model.variant}_{c.img_size[0]}_w{c.window_size}_{task.export_name(model)}_{tag}"
    other = [x for x in layouts or () if x not in task.export_layouts]
    if other:  # every layout asked for is written, or the run says no (never another layout instead)
        raise CheckpointError(f"--layouts {' '.join(other)}: a {saved.task} run exports "
                              f"{', '.join(task.export_layouts)}; ask for those")
    return export_layouts(model, os.path.join(out_dir, stem), layouts or task.export_layouts)
