"""Training checkpoints on top of DeepSpeed's: our own `latest` pointer, written last, and retention.

Layout of `<checkpoint dir>`:
    step00001000/            DeepSpeed's files for that tag + rng_rank{r}.pt + config.json + COMPLETE
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

from .io import write_bytes_atomic

POINTER = "latest_complete"
MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = re.fullmatch(r"step(\d+)", tag)
    return int(m[1]) if m else -1


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
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
