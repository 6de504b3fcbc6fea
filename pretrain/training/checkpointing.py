"""Training checkpoints, whatever the backend: our own `latest` pointer, written last, and retention.

Layout of `<checkpoint dir>`:
    step00001000/            the backend's files for that tag (DeepSpeed's, or model.safetensors +
                             optimizer.pt) + rng_rank{r}.pt + client_state.json + config.json + COMPLETE
    latest_complete          the tag of the newest checkpoint every rank finished writing

DeepSpeed writes its own `latest` before its final barrier, so a crash mid-save can leave it pointing at
a half-written tag; we never read it. `latest_complete` is replaced atomically after all ranks are done,
and only tags older than the K newest complete ones are deleted, never the one it points to.
"""
from __future__ import annotations

import io
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from ..io import write_bytes_atomic

POINTER = "latest_complete"
MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = re.fullmatch(r"step(\d+)", tag)
    return int(m[1]) if m else -1


def rng_state() -> dict:
    """Every generator a training step draws from (drop-path on the GPU uses the CUDA one)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_rng(ckpt_dir: str, tag: str, rank: int) -> None:
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    write_bytes_atomic(os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"), buf.getvalue())


def load_rng(ckpt_dir: str, tag: str, rank: int) -> bool:
    path = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if not os.path.exists(path):
        return False  # e.g. resuming on more ranks than saved: fresh streams for the new ranks
    set_rng_state(torch.load(path, weights_only=True))
    return True


def mark_complete(ckpt_dir: str, tag: str, config_json: str) -> None:
    """Rank 0, after every rank finished writing `tag`: config, marker, then the pointer (last)."""
    write_bytes_atomic(os.path.join(ckpt_dir, tag, "config.json"), config_json.encode())
    write_bytes_atomic(os.path.join(ckpt_dir, tag, MARKER), b"")
    write_bytes_atomic(os.path.join(ckpt_dir, POINTER), tag.encode())


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, POINTER)
    if not os.path.exists(path):
        return None
    tag = open(path).read().strip()
    if not os.path.exists(os.path.join(ckpt_dir, tag, MARKER)):
        raise RuntimeError(f"{path} points to {tag}, which is not marked complete: the checkpoint folder was "
                           "modified by hand; point it at a complete tag")
    return tag


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest complete tags, and incomplete tags older than the newest."""
    current = latest_tag(ckpt_dir)
    tags = sorted((t for t in os.listdir(ckpt_dir) if step_of(t) >= 0), key=step_of)
    complete = [t for t in tags if os.path.exists(os.path.join(ckpt_dir, t, MARKER))]
    keep_set = set(complete[-keep:]) | ({current} if current else set())
    newest = step_of(current) if current else -1
    removed = []
    for t in tags:
        if t in keep_set or (t not in complete and step_of(t) > newest):
            continue  # an incomplete tag newer than the pointer may be being written right now
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
        removed.append(t)
    return removed


class RunExistsError(ValueError):
    """A fresh run was started where a run already has checkpoints."""


def refuse_existing_run(run_dir: str, ckpt_dir: str) -> None:
    """A fresh start must not write into another run's checkpoints (their tags would collide)."""
    tag = latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if tag is not None:
        raise RunExistsError(
            f"{run_dir} already holds a run (checkpoints in {ckpt_dir}, newest {tag}): continue it with "
            f"--resume auto, start elsewhere with another run_dir (--set run_dir=... or --output), or delete "
            f"{ckpt_dir} to start over")


def write_state(path: str, state: dict[str, torch.Tensor]) -> None:
    """A state dict as a safetensors file (CPU, contiguous), written atomically."""
    from safetensors.torch import save
    write_bytes_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def read_state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


def latest_or_fail(ckpt_dir: str) -> str:
    """The newest complete tag, for --resume auto; an error naming the folder when there is none."""
    tag = latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if tag is None:
        raise FileNotFoundError(f"--resume auto: no complete checkpoint in {ckpt_dir}; start without "
                                "--resume for a fresh run")
    return tag


def load_run_weights(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 model weights of one checkpoint, whichever backend wrote it."""
    path = os.path.join(ckpt_dir, tag)
    if os.path.exists(os.path.join(path, "model.safetensors")):  # accelerate backend
        return read_state(os.path.join(path, "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


def resolve_tag(path: str, tag: Optional[str] = None) -> tuple[str, str]:
    """(checkpoint dir, tag) from a run dir, a checkpoint dir or a tag folder."""
    path = path.rstrip("/")
    if tag:
        return path, tag
    if os.path.exists(os.path.join(path, MARKER)):
        return os.path.split(path)
    for ckpt_dir in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(ckpt_dir, POINTER)):
            return ckpt_dir, latest_tag(ckpt_dir)
    raise FileNotFoundError(f"{path}: no complete checkpoint (no {POINTER} here or in {path}/checkpoints)")
