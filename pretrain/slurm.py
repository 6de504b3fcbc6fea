"""Slurm: node lists, rank mapping from srun's variables, and preemption signals.

Under `srun` (one task per GPU) every task gets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS; the master is the
first host of SLURM_JOB_NODELIST, expanded here without `scontrol` or ssh.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import UserError


class SlurmEnvError(UserError, RuntimeError):
    pass


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"cannot parse node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise SlurmEnvError(f"cannot parse node list {s!r}: unbalanced '['")
    parts.append(cur)
    return [p for p in parts if p]


def _expand(host: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", host)
    if not m:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
            raise SlurmEnvError(f"cannot parse host {host!r} in the node list")
        return [host]
    head, tail = host[: m.start()], host[m.end():]
    out = []
    for rng in m[1].split(","):
        if re.fullmatch(r"\d+", rng):
            values = [rng]
        elif re.fullmatch(r"\d+-\d+", rng):
            lo, hi = rng.split("-")
            if int(hi) < int(lo):
                raise SlurmEnvError(f"cannot parse range {rng!r} in {host!r}")
            values = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            raise SlurmEnvError(f"cannot parse range {rng!r} in {host!r}")
        for v in values:
            out += _expand(head + v + tail)  # several bracket groups: 'r[1-2]n[1-2]'
    return out


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compact node list: 'node[01-04,07],gpu5' -> node01..node04, node07, gpu5."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise SlurmEnvError("empty node list")
    return [h for part in _split_top(nodelist) for h in _expand(part)]


@dataclass
class Placement:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def placement(env: Mapping[str, str] = os.environ) -> Placement:
    """This task's place in the job, from srun's variables; clear errors when they are missing or wrong."""
    need = ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"]
    missing = [k for k in need if not env.get(k)]
    if missing:
        raise SlurmEnvError(f"missing Slurm variable(s) {', '.join(missing)}: run the tasks with srun inside "
                            "an allocation (sbatch/salloc), one task per GPU")
    try:
        rank, local, world = (int(env[k]) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
    except ValueError:
        raise SlurmEnvError("SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS must be integers") from None
    nodes = parse_nodelist(env["SLURM_JOB_NODELIST"])
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside 0..SLURM_NTASKS-1={world - 1}")
    nnodes = int(env.get("SLURM_NNODES", len(nodes)))
    if nnodes != len(nodes):
        raise SlurmEnvError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST lists {len(nodes)} hosts")
    port = int(env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return Placement(rank, local, world, env.get("MASTER_ADDR") or nodes[0], port)


def init_env_from_slurm(env=os.environ) -> Optional[Placement]:
    """Under srun (and not already set by a launcher), export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for env://."""
    under_srun = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if "RANK" in env or "SLURM_PROCID" not in env or not under_srun:
        return None
    p = placement(env)
    env.update(RANK=str(p.rank), LOCAL_RANK=str(p.local_rank), WORLD_SIZE=str(p.world_size),
               MASTER_ADDR=p.master_addr, MASTER_PORT=str(p.master_port))
    return p


def requeue() -> bool:
    """Ask Slurm to requeue this job (it is killed and queued again, same job id)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if r.returncode:
        raise SlurmEnvError(f"scontrol requeue {job} failed: {r.stderr.strip()} (submit with --requeue)")
    return True


def ignore_signals_in_worker(_worker_id: int = 0) -> None:
    """DataLoader workers: Slurm signals every process of the step; only the trainer acts on them.

    A worker killed by TERM would make PyTorch raise in the trainer at once, before it can checkpoint.
    Workers ignoring TERM must be shut down through the DataLoader (`ShardLoader.close()`), which the
    trainers do on every exit path; multiprocessing's exit-time terminate() would wait for them forever."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
