"""Slurm: node-list parsing and rank mapping, and a real preempt -> checkpoint -> requeue -> resume cycle
on the one-node Slurm cluster that .ci/slurm_up.sh starts on localhost."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.slurm import SlurmEnvError, parse_nodelist, placement

from conftest import REPO, base_config, losses


def test_nodelist_expansion():
    assert parse_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert parse_nodelist("gpu5,node[9-11],login") == ["gpu5", "node9", "node10", "node11", "login"]
    assert parse_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    for bad in ("node[01-", "node[05-03]", "node[a-b]", "", "no de"):
        with pytest.raises(SlurmEnvError):
            parse_nodelist(bad)


def test_rank_mapping_multi_node():
    env = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "4242"}
    p = placement(env)
    assert (p.rank, p.local_rank, p.world_size, p.node_rank) == (13, 5, 16, 1)
    assert p.master_addr == "node01" and p.master_port == 20000 + 4242 and p.nodes == ["node01", "node02"]
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID, SLURM_LOCALID"):
        placement({"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a", "SLURM_JOB_ID": "1"})
    with pytest.raises(SlurmEnvError, match="SLURM_NNODES=3 but SLURM_JOB_NODELIST lists 2"):
        placement({**env, "SLURM_NNODES": "3"})
    with pytest.raises(SlurmEnvError, match="outside"):
        placement({**env, "SLURM_PROCID": "16"})


def require_slurm() -> None:
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.fail("no Slurm cluster answers here: run `bash .ci/slurm_up.sh` (as root) first")


def submit(cfg: dict, log: Path, env: dict) -> str:
    cmd = ["sbatch", "--parsable", "-J", log.stem, "-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--gpus-per-node=0", "-o", str(log), "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()),
           "launch/slurm/pretrain.sbatch", cfg["_path"], "--set", "log.every_steps=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_done(job: str, log: Path, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = job_state(job)
        if s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return s
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not finish in {timeout} s; log:\n{log.read_text()[-3000:] if log.exists() else ''}")


def test_preempt_checkpoint_requeue_resume_on_real_slurm(shards, tmp_path):
    require_slurm()
    env = {"DS_ACCELERATOR": "cpu", "VENV": sys.prefix, "OMP_NUM_THREADS": "1"}
    ref = base_config(shards, tmp_path / "ref", optim={"max_steps": 12}, checkpoint={"every_steps": 100})
    job = submit(ref, tmp_path / "ref.log", env)
    s = wait_done(job, tmp_path / "ref.log")
    assert s["JobState"] == "COMPLETED", (tmp_path / "ref.log").read_text()[-3000:]
    want = losses(ref["run_dir"])
    assert sorted(want) == list(range(1, 13))

    cfg = base_config(shards, tmp_path / "pre", optim={"max_steps": 12}, checkpoint={"every_steps": 100})
    log = tmp_path / "pre.log"
    job = submit(cfg, log, {**env, "PRETRAIN_INJECT_SLEEP_S": "0.5"})
    metrics = Path(cfg["run_dir"], "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(losses(cfg["run_dir"])) >= 3):
        time.sleep(0.2)
    assert metrics.exists(), log.read_text()[-3000:]
    r = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = wait_done(job, log)
    text = log.read_text()
    assert s["JobState"] == "COMPLETED", text[-3000:]
    assert int(s["Restarts"]) >= 1 and "requeued job" in text and "restart 1:" in text, text[-3000:]
    m = re.search(r"preemption warning \(SIGUSR1\) at update (\d+)", text)
    assert m and 3 <= int(m[1]) < 12, text[-3000:]
    assert f"resumed from {Path(cfg['run_dir']) / 'checkpoints' / ('step%08d' % int(m[1]))}" in text
    got = losses(cfg["run_dir"])
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step] - want[step]) <= 1e-6 * want[step], (step, got[step], want[step])
