"""A run on disk, whatever the backend wrote: the one module that names its files. Training writes through it;
weights, export and fine-tuning read through it (it imports nothing of training, models or weights).

Layout of `<run dir>`: config.json (the run's whole config, `write_config`), metrics.jsonl, tb/, .run.lock
(`RunLock`), and `<checkpoint dir>` (checkpoint.dir, default `<run dir>/checkpoints`):
    step00001000/            the backend's files for that tag (DeepSpeed's, or model.safetensors +
                             optimizer.pt) + rng_rank{r}.pt + client_state.json + config.json + COMPLETE
    latest_complete          the tag of the newest checkpoint every rank finished writing

DeepSpeed writes its own `latest` before its final barrier, so a crash mid-save can leave it pointing at
a half-written tag; we never read it. `latest_complete` is replaced atomically after all ranks are done,
and only tags older than the K newest complete ones are deleted, never the one it points to.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from .config import ConfigError, ModelSection, from_dict
from .errors import UserError
from .io import write_bytes_atomic, write_safetensors

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


CONFIG = "config.json"


def write_config(folder: str, config: dict | str) -> str:
    """A run's (or a tag's) config.json, written atomically: the one writer of what `read_saved_config` reads."""
    text = config if isinstance(config, str) else json.dumps(config, indent=1)
    path = os.path.join(folder, CONFIG)
    write_bytes_atomic(path, text.encode())
    return path


@dataclass
class SavedConfig:
    """A saved config.json, read once: what every reader of a run needs from it."""
    path: str
    model: Optional[ModelSection]  # None only where read with require_model=False
    task: str = "classification"
    task_settings: dict[str, Any] = field(default_factory=dict)  # the section named after the task, if any
    checkpoint_dir: Optional[str] = None  # its checkpoint.dir if set, else checkpoints/ beside the config.json
    raw: dict[str, Any] = field(default_factory=dict)


def read_saved_config(path: str, warn: Callable[[str], None] = print,
                      require_model: bool = True) -> SavedConfig:
    """`path`: a config.json, or the folder (run dir or tag) holding one. Model keys this version does not
    know (a newer or older run) are left out with a warning naming them, so such a run still exports.
    `require_model=False`: a config without a model section reads too (model None), for its other keys."""
    if not path.endswith(".json"):
        path = os.path.join(path, CONFIG)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(f"{path} can't be read ({e}): the checkpoint's config is damaged") from None
    if not isinstance(raw, dict):
        raise DamagedCheckpointError(f"{path} is not a JSON object: it was not written by this project")
    model = raw.get("model")
    if not isinstance(model, dict) and require_model:
        raise DamagedCheckpointError(f"{path} has no model section: it was not written by this project")
    section = None
    if isinstance(model, dict):
        known = {f.name for f in dataclasses.fields(ModelSection)}
        extra = sorted(set(model) - known)
        if extra:
            warn(f"warning: {path}: ignoring model key(s) this version does not know: "
                 f"{', '.join('model.' + k for k in extra)}")
        section = from_dict(ModelSection, {k: v for k, v in model.items() if k in known}, "model.")
    task = raw.get("task") or "classification"
    settings = raw.get(task)
    ckpt = raw.get("checkpoint") if isinstance(raw.get("checkpoint"), dict) else {}
    # A run dir is what it holds: a copy (cp -a) keeps the original's run_dir in its config.json, so only an
    # explicit checkpoint.dir is taken from there.
    return SavedConfig(path, section, task, settings if isinstance(settings, dict) else {},
                       ckpt.get("dir") or os.path.join(os.path.dirname(path), "checkpoints"), raw)


def mark_complete(ckpt_dir: str, tag: str, config_json: str) -> None:
    """Rank 0, after every rank finished writing `tag`: config, marker, then the pointer (last). The marker
    lists every file of the tag with its size (every rank's: the checkpoint dir is shared), so a resume can
    tell a tag that lost or truncated one rank's file from a whole one."""
    path = os.path.join(ckpt_dir, tag)
    write_config(path, config_json)
    rels = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names
                  if not f.startswith("."))
    files = {rel: os.path.getsize(os.path.join(path, rel)) for rel in rels}
    crcs = {rel: crc32_of(os.path.join(path, rel)) for rel in rels}  # bit rot keeps the size
    write_bytes_atomic(os.path.join(path, MARKER), json.dumps({"files": files, "crc32": crcs}, sort_keys=True).encode())
    write_bytes_atomic(os.path.join(ckpt_dir, POINTER), tag.encode())


def _marker(path: str) -> dict:
    """A tag folder's COMPLETE marker ({} for the empty markers of older checkpoints)."""
    raw = open(os.path.join(path, MARKER), "rb").read()
    return json.loads(raw) if raw.strip() else {}


def crc32_of(path: str) -> str:
    """A file's CRC-32 (zlib, in 16 MiB reads): enough to tell a changed byte, at disk read speed."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def check_contents(ckpt_dir: str, tag: str) -> None:
    """Every file the tag's marker lists still has the CRC-32 it was written with (markers written before
    checksums list none: nothing to check). Reads the whole tag: one process does it (rank 0 on a resume)."""
    path = os.path.join(ckpt_dir, tag)
    listed = _marker(path).get("crc32", {})
    for rel, crc in sorted(listed.items()):
        f = os.path.join(path, rel)
        have = crc32_of(f)
        if have != crc:
            raise DamagedCheckpointError(
                f"{f}: its bytes changed since it was written (CRC-32 {have}, written as {crc}): checkpoint {path} "
                f"is damaged; resume from another complete tag ({_others(ckpt_dir, tag)})")


def _others(ckpt_dir: str, tag: str) -> str:
    """The complete tag to offer instead of `tag`: the newest one before it, else the newest."""
    others = [t for t in complete_tags(ckpt_dir) if t != tag]
    before = [t for t in others if t < tag]  # zero-padded step numbers sort as numbers
    pick = (before or others or [None])[-1]
    return f"--resume {os.path.join(ckpt_dir, pick)}" if pick else "none left"


def check_files(ckpt_dir: str, tag: str) -> None:
    """Every file the tag's marker lists is there with the size it was written with (markers of older
    checkpoints list none: nothing to check)."""
    path = os.path.join(ckpt_dir, tag)
    listed = _marker(path).get("files", {})
    for rel, size in sorted(listed.items()):
        f = os.path.join(path, rel)
        have = os.path.getsize(f) if os.path.exists(f) else None
        if have != size:
            state = "is missing" if have is None else f"has {have} bytes, written with {size}"
            raise DamagedCheckpointError(
                f"{f} {state}: checkpoint {path} is damaged; resume from another complete tag "
                f"({_others(ckpt_dir, tag)})")


class DamagedCheckpointError(UserError, RuntimeError):
    """A complete checkpoint that lost or truncated one of its files since it was written."""


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The newest complete tag: the one `latest_complete` names, or, where that pointer is gone (deleted, a
    partial copy), the newest tag marked COMPLETE (rank 0 writes a marker only after every rank finished its
    tag, and before it moves the pointer)."""
    path = os.path.join(ckpt_dir, POINTER)
    if not os.path.exists(path):
        done = complete_tags(ckpt_dir)
        return done[-1] if done else None
    tag = open(path).read().strip()
    if not os.path.exists(os.path.join(ckpt_dir, tag, MARKER)):
        done = complete_tags(ckpt_dir)
        raise IncompleteCheckpointError(
            f"{path} points to {tag}, which is not marked complete: the checkpoint folder was modified by hand "
            f"(or by another run); write a complete tag into it" + (f", e.g. {done[-1]}" if done else ""))
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


class RunExistsError(UserError, ValueError):
    """A fresh run was started where a run already has checkpoints."""


def refuse_existing_run(run_dir: str, ckpt_dir: str) -> None:
    """A fresh start must not write into another run's files: its checkpoints (their tags would collide),
    nor, when that run kept its checkpoints elsewhere (checkpoint.dir), its metrics.jsonl and config.json."""
    dirs = [ckpt_dir]
    saved = os.path.join(run_dir, CONFIG)
    if os.path.exists(saved):
        try:
            dirs.append(read_saved_config(saved, warn=lambda _: None, require_model=False).checkpoint_dir)
        except (DamagedCheckpointError, ConfigError):
            pass  # unreadable: the checkpoint dir check below still holds
    for d in dict.fromkeys(dirs):
        tag = latest_tag(d) if os.path.isdir(d) else None
        if tag is not None:
            inside = os.path.abspath(d).startswith(os.path.abspath(run_dir).rstrip("/") + "/")
            raise RunExistsError(
                f"{run_dir} already holds a run (checkpoints in {d}, newest {tag}): continue it with "
                f"--resume auto, start elsewhere with another run_dir (--set run_dir=... or --output), or "
                + (f"delete {run_dir} to start over" if inside else
                   f"move its config.json away to start over (the checkpoints it names, {d}, are another folder's)"))


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the run dir."""


class RunLock:
    """<run_dir>/.run.lock, flock'd by rank 0 for the whole run: one run at a time in a run dir. The kernel
    drops the lock when its process dies, so a crashed or requeued job's lock is never stale; the file names
    the holder (host, pid, Slurm job) for the refusal. On NFS, Linux clients map flock to POSIX locks."""

    NAME = ".run.lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl
        import socket
        import time
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockedError(f"run_dir {os.path.dirname(self.path)} can't be written ({e.strerror}): point "
                                 "run_dir at a writable place") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another run ({holder}): wait for it "
                                 "to end, or give this run another run_dir") from None
        job = os.environ.get("SLURM_JOB_ID")
        holder = (f"host {socket.gethostname()}, pid {os.getpid()}" + (f", Slurm job {job}" if job else "")
                  + f", since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def claim_run_dir(lock: RunLock, ckpt_dir: str) -> None:
    """Rank 0, before anything is built or written: the run dir's lock (refused naming the holder), and a
    checkpoint dir that can be written."""
    lock.acquire()
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        probe = os.path.join(ckpt_dir, f".write_test.{os.getpid()}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"checkpoint dir {ckpt_dir} can't be written ({e.strerror}): set checkpoint.dir (or "
                          "run_dir) to a writable place") from None


ARCHITECTURE_KEYS = ("variant", "img_size", "window_size", "num_classes", "embed_dim", "depths", "num_heads",
                     "ape", "pretrained_window_sizes")


def check_same_architecture(config: dict, saved_config: str) -> None:
    """A resume continues the saved run: its model must be the same shape (the state dict would not fit, in
    30 lines of mismatches); name what changed instead. `config`: the resuming run's config (as saved)."""
    if not os.path.exists(saved_config):
        return
    saved = read_saved_config(saved_config, warn=lambda _: None)
    task = config["task"]  # the resuming run's, as saved (to_dict)
    if saved.task != task:
        raise ConfigError(f"--resume {os.path.dirname(saved_config)}: the run was saved with task "
                          f"{saved.task!r}, this config says task={task!r}: resume with the saved task; to "
                          "fine-tune a run of another task, export it (python -m pretrain.cli.release) and give it to "
                          "finetune/run.py --pretrained")
    was, now = saved.raw.get("model", {}), config["model"]
    changed = {k: (was.get(k), now.get(k)) for k in ARCHITECTURE_KEYS if k in was and was[k] != now[k]}
    if changed:
        shown = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume {os.path.dirname(saved_config)}: the architecture changed since it was saved "
                          f"({shown}); resume with the saved values, or start a new run (fine-tuning moves "
                          "weights to a new size: finetune/run.py --pretrained)")


# The lr schedule's inputs: a resume that changes one follows another schedule from the saved update on.
SCHEDULE_KEYS = ("epochs", "warmup_epochs", "schedule", "decay_epochs", "decay_rate", "base_lr", "warmup_lr",
                 "min_lr", "lr_scale_batch")


def check_same_recipe(config: dict, saved_config: str, mid_epoch: bool, print0: Callable[[str], None]) -> None:
    """A resume continues the saved run's schedule. optim.global_batch is what an update means (the saved
    update count, the epoch position and the lr scale all count in it): refused. The schedule's other inputs
    are refused mid-epoch and said at an epoch boundary (extending a run's epochs is routine there)."""
    if not os.path.exists(saved_config):
        return
    was, now = read_saved_config(saved_config, warn=lambda _: None).raw.get("optim", {}), config["optim"]
    where = f"--resume {os.path.dirname(saved_config)}"
    if "global_batch" in was and was["global_batch"] != now["global_batch"]:
        raise ConfigError(f"{where}: optim.global_batch {was['global_batch']} -> {now['global_batch']}: the saved "
                          f"updates, epoch position and lr schedule count updates of {was['global_batch']} images; "
                          f"resume with --set optim.global_batch={was['global_batch']} (another world size or "
                          "micro_batch keeps it), or start a new run from these weights")
    changed = {k: (was[k], now[k]) for k in SCHEDULE_KEYS if k in was and was[k] != now[k]}
    if not changed:
        return
    shown = ", ".join(f"optim.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if mid_epoch:
        first = next(iter(changed))
        raise ConfigError(f"{where}: cannot resume mid-epoch with a changed schedule ({shown}): the lr would jump "
                          f"at the next update; resume with --set optim.{first}={json.dumps(changed[first][0])}, "
                          "or from a tag saved at an epoch boundary")
    print0(f"resuming with a changed schedule ({shown}): the lr follows the new schedule from the saved update on")


def write_state(path: str, state: dict[str, torch.Tensor]) -> None:
    write_safetensors(path, state)


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
    """The fp32 model weights of one checkpoint, whichever backend wrote it; its files checked first."""
    path = os.path.join(ckpt_dir, tag)
    if os.path.exists(os.path.join(path, MARKER)):
        check_files(ckpt_dir, tag)
        check_contents(ckpt_dir, tag)
    if os.path.exists(os.path.join(path, "model.safetensors")):  # accelerate backend
        return read_state(os.path.join(path, "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


def complete_tags(ckpt_dir: str) -> list[str]:
    """The tags of `ckpt_dir` marked complete, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((t for t in os.listdir(ckpt_dir) if step_of(t) >= 0 and os.path.exists(
        os.path.join(ckpt_dir, t, MARKER))), key=step_of)


def require_complete(ckpt_dir: str, tag: str) -> None:
    """A tag folder must exist and be marked complete; the error names the newest complete one instead."""
    path = os.path.join(ckpt_dir, tag)
    if os.path.exists(os.path.join(path, MARKER)):
        return
    done = complete_tags(ckpt_dir)
    offer = f"; the newest complete one is {os.path.join(ckpt_dir, done[-1])}" if done else ""
    why = "is not marked complete (a save that did not finish)" if os.path.isdir(path) else "does not exist"
    raise IncompleteCheckpointError(f"{path} {why}: it can't be loaded{offer}")


class IncompleteCheckpointError(UserError, FileNotFoundError):
    """A checkpoint asked for by name that is missing or was never marked complete."""


def is_run_folder(path: str) -> bool:
    """A run dir, a checkpoint dir or a tag folder of ours (what resolve_tag reads), not another tool's model
    folder (a transformers one also holds a config.json)."""
    path = path.rstrip("/")
    return os.path.isdir(path) and (step_of(os.path.basename(path)) >= 0 or any(
        os.path.exists(os.path.join(path, p)) for p in (POINTER, MARKER, "checkpoints")))


def resolve_tag(path: str, tag: Optional[str] = None) -> tuple[str, str]:
    """(checkpoint dir, complete tag) from a run dir, a checkpoint dir or a tag folder; `tag` names one in
    the checkpoint dir found from `path` (a run dir's checkpoints/ first)."""
    path = path.rstrip("/")
    if tag:
        for ckpt_dir in (os.path.join(path, "checkpoints"), path):
            if os.path.isdir(os.path.join(ckpt_dir, tag)):
                require_complete(ckpt_dir, tag)
                return ckpt_dir, tag
        ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        require_complete(ckpt_dir, tag)
    if os.path.exists(os.path.join(path, MARKER)):
        return os.path.split(path)
    if step_of(os.path.basename(path)) >= 0 and os.path.isdir(path):
        require_complete(*os.path.split(path))
    for ckpt_dir in (path, os.path.join(path, "checkpoints")):
        found = latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
        if found is not None:
            return ckpt_dir, found
    raise FileNotFoundError(f"{path}: no complete checkpoint (no {POINTER} here or in {path}/checkpoints)")
