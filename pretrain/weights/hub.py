"""The Hugging Face transformers layout (the hub's `microsoft/swin-*`, `microsoft/swinv2-*` and the SimMIM models
behind `Swin(v2)ForMaskedImageModeling`): a folder of `config.json` + `model.safetensors`, read and written with
safetensors and JSON only (transformers itself is not needed; the tests compare against it).

Hub keys, as `save_pretrained` writes them (transformers 5 keeps other names in memory and maps them):
`swin.` / `swinv2.` + `embeddings.patch_embeddings.projection`, `embeddings.norm`, `embeddings.mask_token`
(SimMIM), `encoder.layers.i.blocks.j.{layernorm_before, attention.self.{query, key, value,
relative_position_bias_table, logit_scale, continuous_position_bias_mlp}, attention.output.dense, layernorm_after,
intermediate.dense, output.dense}`, `encoder.layers.i.downsample` at the END of stage i (as the official code),
`layernorm`; `classifier`; SimMIM's `decoder.0`. They map one to one onto the official layout (q, k and v are
one `qkv` there), which the rest of pretrain.weights already reads and writes; so this module is a rename.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import torch

from ..errors import ALLOW_PICKLE, CheckpointError
from ..io import write_bytes_atomic

CONFIG, WEIGHTS, PICKLED = "config.json", "model.safetensors", "pytorch_model.bin"
PROCESSOR = "preprocessor_config.json"
PREFIXES = {"swin": 1, "swinv2": 2}  # the hub's model prefix (= model_type) -> Swin version
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# official block key <-> hub block key (after `layers.i.blocks.j.`); q, k, v are split apart below
_BLOCK = [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.output.dense."),
          ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
          ("attn.relative_position_index", "attention.self.relative_position_index"),
          ("attn.relative_coords_table", "attention.self.relative_coords_table"),
          ("attn.logit_scale", "attention.self.logit_scale"),
          ("attn.cpb_mlp.", "attention.self.continuous_position_bias_mlp."),
          ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense.")]
_TOP = [("patch_embed.proj.", "embeddings.patch_embeddings.projection."), ("patch_embed.norm.", "embeddings.norm."),
        ("absolute_pos_embed", "embeddings.position_embeddings"), ("norm.", "layernorm.")]


def is_hub_state(sd: Mapping[str, torch.Tensor]) -> bool:
    """Hub keys: under `swin.` / `swinv2.`, or a bare Swin(v2)Model's, which transformers saves unprefixed."""
    return any(k.split(".", 1)[0] in PREFIXES or k.startswith("embeddings.patch_embeddings.") for k in sd)


def _rename(key: str, pairs: list[tuple[str, str]], to_hub: bool) -> Optional[str]:
    for ours, hub in pairs:
        a, b = (ours, hub) if to_hub else (hub, ours)
        if key.startswith(a):
            return b + key[len(a):]
    return None


def from_hub(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub keys -> the official layout (a SimMIM model: `encoder.` + official keys, `encoder.mask_token`,
    `decoder.0.*`), as the official code's checkpoints hold them."""
    prefix = next((k.split(".", 1)[0] + "." for k in sd if k.split(".", 1)[0] in PREFIXES), "")  # "": a bare model
    encoder = "encoder." if any(k.startswith("decoder.") for k in sd) else ""  # a SimMIM model's
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> query/key/value
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = v
            continue
        if k.startswith("decoder."):
            out[k] = v
            continue
        if not k.startswith(prefix):
            raise CheckpointError(f"{k}: neither {prefix}*, classifier.* nor decoder.*: not a transformers Swin "
                                  "checkpoint (or a model this project has no map for)")
        rest = k[len(prefix):]
        m = re.match(r"encoder\.layers\.(\d+)\.(blocks\.\d+\.)?(.*)", rest)
        if rest == "embeddings.mask_token":
            name = "mask_token"
        elif m and m[2]:
            block, tail = f"layers.{m[1]}.{m[2]}", m[3]
            part = re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", tail)
            if part:
                qkv.setdefault((block, part[2]), {})[part[1]] = v
                continue
            name = block + (_rename(tail, _BLOCK, to_hub=False) or tail)
        elif m:
            name = f"layers.{m[1]}.{m[3]}"  # downsample: at the end of stage i, as the official layout
        else:
            name = _rename(rest, _TOP, to_hub=False) or rest
        out[encoder + name] = v
    for (block, what), parts in qkv.items():
        at = encoder + block + "attn."
        if "key" in parts:  # the weight, and V1's one qkv bias
            out[f"{at}qkv.{what}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # V2's biases: q and v, no k
            out[at + "q_bias"], out[at + "v_bias"] = parts["query"], parts["value"]
    return out


def to_hub(sd: Mapping[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """The official layout (a classifier's, or SimMIM's with `encoder.`) -> hub keys; buffers are left out (the
    hub models rebuild them)."""
    prefix = "swin" if version == 1 else "swinv2"
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask", "relative_coords_table")):
            continue
        if k.startswith("head."):
            out["classifier." + k[len("head."):]] = v
            continue
        if k.startswith("decoder."):
            out[k] = v
            continue
        k = k[len("encoder."):] if k.startswith("encoder.") else k
        if k == "mask_token":
            out[f"{prefix}.embeddings.mask_token"] = v.reshape(1, 1, -1)
            continue
        m = re.match(r"(layers\.\d+\.)(blocks\.\d+\.)?(.*)", k)
        if m and m[2]:
            block, tail = f"{prefix}.encoder.{m[1]}{m[2]}", m[3]
            if tail in ("attn.qkv.weight", "attn.qkv.bias"):
                for name, part in zip(("query", "key", "value"), v.chunk(3)):
                    out[f"{block}attention.self.{name}.{tail.rsplit('.', 1)[1]}"] = part
            elif tail in ("attn.q_bias", "attn.v_bias"):
                out[f"{block}attention.self.{'query' if tail == 'attn.q_bias' else 'value'}.bias"] = v
            else:
                out[block + (_rename(tail, _BLOCK, to_hub=True) or tail)] = v
        elif m:
            out[f"{prefix}.encoder.{m[1]}{m[3]}"] = v
        else:
            out[f"{prefix}." + (_rename(k, _TOP, to_hub=True) or k)] = v
    return out


# ------------------------------------------------------------------------------------------ config.json

def swin_config(hub: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A hub config.json -> SwinConfig fields (pretrain.models.swin.SwinConfig)."""
    kind = hub.get("model_type")
    if kind not in PREFIXES:
        raise CheckpointError(f"{name}: model_type {kind!r} is not a Swin (swin, swinv2): this project reads the "
                              "transformers layout of Swin, Swin V2 and their SimMIM models")
    labels = hub.get("id2label") or {}
    archs = hub.get("architectures") or []
    heads = 0 if any(a.endswith(("Model", "ForMaskedImageModeling", "Backbone")) for a in archs) else len(labels)
    cfg = {"img_size": hub.get("image_size", 224), "patch_size": hub.get("patch_size", 4),
           "in_chans": hub.get("num_channels", 3), "num_classes": heads, "embed_dim": hub["embed_dim"],
           "depths": tuple(hub["depths"]), "num_heads": tuple(hub["num_heads"]), "window_size": hub["window_size"],
           "mlp_ratio": hub.get("mlp_ratio", 4.0), "qkv_bias": hub.get("qkv_bias", True),
           "drop_path_rate": hub.get("drop_path_rate", 0.1), "ape": bool(hub.get("use_absolute_embeddings")),
           "version": PREFIXES[kind]}
    if kind == "swinv2":
        if cfg["ape"]:
            raise CheckpointError(f"{name}: a Swin V2 with use_absolute_embeddings (transformers stores one position "
                                  "more than the patches): not supported")
        windows = tuple(hub.get("pretrained_window_sizes") or ())
        cfg["pretrained_window_sizes"] = () if not any(windows) else windows
    return cfg


def hub_config(model_cfg: Mapping[str, Any], architecture: str, id2label: Optional[Mapping[int, str]] = None,
               encoder_stride: int = 32) -> dict[str, Any]:
    """SwinConfig fields -> a hub config.json (what transformers' Swin(v2)Config reads)."""
    v2 = model_cfg["version"] == 2
    n = model_cfg["num_classes"]
    labels = {int(i): str(c) for i, c in (id2label or {}).items()} if id2label else {i: f"LABEL_{i}" for i in range(n)}
    img = model_cfg["img_size"]
    out = {"architectures": [architecture], "model_type": "swinv2" if v2 else "swin",
           "image_size": img[0] if isinstance(img, (list, tuple)) else img, "patch_size": model_cfg["patch_size"],
           "num_channels": model_cfg["in_chans"], "embed_dim": model_cfg["embed_dim"],
           "depths": list(model_cfg["depths"]), "num_heads": list(model_cfg["num_heads"]),
           "window_size": model_cfg["window_size"], "mlp_ratio": model_cfg["mlp_ratio"],
           "qkv_bias": model_cfg["qkv_bias"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "drop_path_rate": model_cfg["drop_path_rate"], "hidden_act": "gelu",
           "use_absolute_embeddings": model_cfg["ape"], "layer_norm_eps": 1e-5, "encoder_stride": encoder_stride,
           "id2label": {str(i): c for i, c in sorted(labels.items())},
           "label2id": {c: i for i, c in sorted(labels.items())}}
    if v2:
        windows = list(model_cfg.get("pretrained_window_sizes") or ())
        out["pretrained_window_sizes"] = windows or [0] * len(model_cfg["depths"])
    return out


def processor_config(img_size: int) -> dict[str, Any]:
    """The image processor for the model's resolution: timm's evaluation (resize the short side to
    img_size / 0.875, bicubic, center crop; at 384 and above no crop, as the official 384 fine-tunes evaluate),
    ImageNet mean and std. transformers' ConvNextImageProcessor does exactly this."""
    return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": img_size},
            "crop_pct": 0.875, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}


def write_folder(folder: str, hub_sd: Mapping[str, torch.Tensor], config: dict, img_size: int) -> str:
    """config.json, model.safetensors, preprocessor_config.json, each written atomically."""
    from ..io import write_safetensors
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS), dict(hub_sd), {"format": "pt"})
    write_bytes_atomic(os.path.join(folder, PROCESSOR), json.dumps(processor_config(img_size), indent=2).encode())
    write_bytes_atomic(os.path.join(folder, CONFIG), json.dumps(config, indent=2).encode())
    return folder


# ------------------------------------------------------------------------------------------ where from

def resolve_source(source: str) -> Optional[str]:
    """The local folder a transformers source names, or None for anything else: a folder holding config.json
    (+ model.safetensors), or `hf://ORG/NAME` (a hub repository: downloaded, or found in the hub cache, which
    HF_HUB_OFFLINE=1 keeps to)."""
    if source.startswith("hf://") and source[len("hf://"):].count("/") == 1:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{source}: hub ids need the package huggingface_hub: pip install "
                                  "'swin-pretrain[hf]'") from None
        try:
            return snapshot_download(source[len("hf://"):], allow_patterns=[CONFIG, WEIGHTS, PICKLED, PROCESSOR])
        except Exception as e:  # offline without the files in the cache, no such repository, no network
            raise CheckpointError(f"{source}: not found on the hub or in its cache ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); with HF_HUB_OFFLINE=1 only the cache "
                                  "(HF_HUB_CACHE) is read") from None
    if "://" not in source and os.path.isdir(source):
        return source
    return None


def weights_file(folder: str, allow_pickle: bool) -> str:
    """The folder's weights: model.safetensors, else pytorch_model.bin (a pickle: only with allow_pickle)."""
    for name in (WEIGHTS, PICKLED):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            if name == PICKLED and not allow_pickle:
                raise CheckpointError(f"{path}: a pickle (torch.save) holds these weights; trust it with "
                                      f"{ALLOW_PICKLE}, or convert it to model.safetensors")
            return path
    if os.path.exists(os.path.join(folder, WEIGHTS + ".index.json")):
        raise CheckpointError(f"{folder}: sharded weights (model.safetensors.index.json) are not read: merge them")
    raise CheckpointError(f"{folder}: no {WEIGHTS} (or {PICKLED}) here: point at a transformers model folder "
                          "(config.json + model.safetensors), a checkpoint file, or one of our run dirs")


def read_hub_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {CONFIG}: a transformers model folder holds config.json and "
                              "model.safetensors") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} can't be read ({e})") from None
