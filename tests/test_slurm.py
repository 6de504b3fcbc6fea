"""Slurm: node-list parsing and rank mapping, then real jobs: a one-node reference run on the cluster
.ci/slurm_up.sh starts on localhost, and on the two-node cluster of .ci/slurm_2node.sh (two network
namespaces, a slurmd in each, gloo over TCP between them): equal losses, preempt -> checkpoint -> requeue ->
resume, a lost node, and a fine-tune."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.slurm import SlurmEnvError, parse_nodelist, placement

from conftest import (REPO, base_config, finetune_config, losses, need, official_checkpoint, ok, simmim_config,
                      torchrun)


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
    assert (p.rank, p.local_rank, p.world_size) == (13, 5, 16)
    assert p.master_addr == "node01" and p.master_port == 20000 + 4242
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID, SLURM_LOCALID"):
        placement({"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a", "SLURM_JOB_ID": "1"})
    with pytest.raises(SlurmEnvError, match="SLURM_NNODES=3 but SLURM_JOB_NODELIST lists 2"):
        placement({**env, "SLURM_NNODES": "3"})
    with pytest.raises(SlurmEnvError, match="outside"):
        placement({**env, "SLURM_PROCID": "16"})


ONE_NODE = {}  # .ci/slurm_up.sh: the default /etc/slurm/slurm.conf
TWO_NODES = {"SLURM_CONF": "/etc/slurm-2n/slurm.conf"}  # .ci/slurm_2node.sh: hosts n1/n2 in network namespaces
CPU_ENV = {"DS_ACCELERATOR": "cpu", "VENV": sys.prefix, "OMP_NUM_THREADS": "1",
           # gloo would advertise the hostname's address (127.0.0.1 here); the namespaces' interface is eth0
           "GLOO_SOCKET_IFNAME": "eth0"}


def slurm(cluster: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, env={**os.environ, **cluster})


def require(cluster: dict, nodes: int) -> None:
    r = slurm(cluster, "sinfo", "-h", "-N", "-o", "%N %t") if shutil.which("sbatch") else None
    up = [line for line in (r.stdout.splitlines() if r and r.returncode == 0 else [])
          if line.split()[-1] in ("idle", "mix", "alloc")]
    script = ".ci/slurm_up.sh" if nodes == 1 else ".ci/slurm_2node.sh up"
    need(len(up) >= nodes, f"a {nodes}-node Slurm cluster; none answers here "
                           f"({r.stderr.strip() if r else 'no sbatch'}): run `bash {script}` (as root) first")


def submit(cluster: dict, nodes: int, log: Path, env: dict, script: list[str]) -> str:
    per_node = 2 // nodes  # 2 ranks either way: the same global batch on one node or two
    r = slurm(cluster, "sbatch", "--parsable", "-J", log.stem, "-N", str(nodes), f"--ntasks-per-node={per_node}",
              "--cpus-per-task=1", "--gpus-per-node=0", "-o", str(log),
              "--export=ALL," + ",".join(f"{k}={v}" for k, v in {**CPU_ENV, **env}.items()), *script)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def slow(tmp_path: Path) -> dict:
    """The sbatch script starts $PRETRAIN_ENTRY (default -m pretrain.cli.train): here the entry that hands
    slow updates (pretrain.training.Faults) to the trainer, so a signal lands mid-run."""
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"sleep_s": 0.5}))
    return {"PRETRAIN_ENTRY": f"tests/faulty_train.py pretrain --faults @{spec}"}


def submit_pretrain(cluster: dict, nodes: int, cfg: dict, log: Path, env: dict = {}) -> str:
    """The users' command: sbatch [-N 2] launch/slurm/pretrain.sbatch CONFIG --set ..."""
    return submit(cluster, nodes, log, env, ["launch/slurm/pretrain.sbatch", cfg["_path"], "--set",
                                             "log.every_steps=1"])


def job_state(cluster: dict, job: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", slurm(cluster, "scontrol", "show", "job", job).stdout))


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_done(cluster: dict, job: str, log: Path, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = job_state(cluster, job)
        if s.get("JobState") in DONE:
            return s
        time.sleep(1)
    slurm(cluster, "scancel", job)
    pytest.fail(f"job {job} did not finish in {timeout} s; log:\n{tail(log)}")


def release_requeued(cluster: dict, job: str, log: Path) -> None:
    """Slurm holds a requeued job for about two minutes (its BeginTime); start it now instead, as an admin
    could, to keep the suite short. What is tested (requeue, restart count, resume) is unchanged."""
    def requeued() -> bool:
        s = job_state(cluster, job)
        return s.get("JobState") == "PENDING" and int(s.get("Restarts", 0)) >= 1 or s.get("JobState") in DONE
    wait_for(requeued, log, f"job {job} to be requeued")
    # Not within the second of the requeue: slurmd revokes the killed run's credential with a time in whole
    # seconds, and a credential for the same job id made in that second counts as revoked too ("Killing
    # non-startable batch job: Job credential revoked" in slurmctld's log, the job FAILED, nothing in its log).
    time.sleep(2)
    slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")


def tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else f"(no log {log})"


def wait_for(cond, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; log:\n{tail(log)}")


def assert_equal_losses(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


def pretrain_config(shards, run_dir: Path, **sections) -> dict:
    return base_config(shards, run_dir, optim={"max_steps": 12},
                       checkpoint={"every_steps": 100, **sections.pop("checkpoint", {})}, **sections)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[int, float]:
    """An uninterrupted 12-update run on the one-node cluster: 2 ranks on one host."""
    require(ONE_NODE, 1)
    ref = pretrain_config(shards, tmp_path_factory.mktemp("slurm") / "ref")
    log = Path(ref["run_dir"] + ".log")
    s = wait_done(ONE_NODE, submit_pretrain(ONE_NODE, 1, ref, log), log)
    assert s["JobState"] == "COMPLETED", tail(log)
    want = losses(ref["run_dir"])
    assert sorted(want) == list(range(1, 13))
    return want


@pytest.mark.slurm
@pytest.mark.dist
def test_simmim_on_two_nodes_survives_preempt_requeue_resume(unlabelled_shards, tmp_path, simmim_reference):
    """One rank per node, SimMIM on unlabelled shards: USR1 -> checkpoint -> requeue -> resume, and the losses
    equal the uninterrupted 2-rank run's. (The supervised run's "two nodes train as one" is checked by the
    lost-node test against the one-node Slurm reference; the requeue path is the same for either task.)"""
    cfg = simmim_config(unlabelled_shards, tmp_path / "pre", optim={"max_steps": 12}, checkpoint={"every_steps": 100})
    preempt_requeue_resume(cfg, tmp_path, simmim_reference)


def preempt_requeue_resume(cfg: dict, tmp_path: Path, want: dict[int, float]) -> None:
    require(TWO_NODES, 2)
    log = tmp_path / "pre.log"
    job = submit_pretrain(TWO_NODES, 2, cfg, log, slow(tmp_path))
    metrics = Path(cfg["run_dir"], "metrics.jsonl")
    wait_for(lambda: metrics.exists() and len(losses(cfg["run_dir"])) >= 3, log, "3 logged updates")
    r = slurm(TWO_NODES, "scancel", "--signal=USR1", job)  # every task, on both nodes
    assert r.returncode == 0, r.stderr
    release_requeued(TWO_NODES, job, log)
    s = wait_done(TWO_NODES, job, log)
    text = log.read_text()
    assert s["JobState"] == "COMPLETED", text[-3000:]
    assert s["NumNodes"] == "2" and "restart 0: 2 tasks on n[1-2]" in text, text[-3000:]
    assert int(s["Restarts"]) >= 1 and "requeued job" in text and "restart 1: 2 tasks on n[1-2]" in text, text[-3000:]
    m = re.search(r"preemption warning \(SIGUSR1\) at update (\d+)", text)
    assert m and 3 <= int(m[1]) < 12, text[-3000:]
    assert f"resumed from {Path(cfg['run_dir']) / 'checkpoints' / ('step%08d' % int(m[1]))}" in text
    assert_equal_losses(losses(cfg["run_dir"]), want)


def node_pids(netns: str, needle: str) -> list[int]:
    """Pids in a network namespace whose command line has `needle` and whose parent's does not (the rank
    itself, not its DataLoader workers)."""
    def cmdline(pid) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in out if needle in cmdline(p)]
    ppid = {p: int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in pids}
    return [p for p in pids if needle not in cmdline(ppid[p])]


@pytest.mark.slurm
@pytest.mark.dist
def test_lost_node_ends_the_job_within_the_timeout_and_resume_auto_continues(shards, tmp_path, reference):
    require(TWO_NODES, 2)
    timeout_s = 60
    cfg = pretrain_config(shards, tmp_path / "lost", checkpoint={"every_steps": 4}, dist_timeout_s=timeout_s)
    log = tmp_path / "lost.log"
    job = submit_pretrain(TWO_NODES, 2, cfg, log, slow(tmp_path))
    complete = Path(cfg["run_dir"], "checkpoints", "latest_complete")
    wait_for(lambda: complete.exists() and len(losses(cfg["run_dir"])) >= 6, log, "a checkpoint and 6 updates")
    victims = node_pids("ns2", cfg["_path"])  # this job's rank, not another test's
    assert len(victims) == 1, victims  # one rank per node
    os.kill(victims[0], signal.SIGKILL)
    killed = time.time()
    s = wait_done(TWO_NODES, job, log, timeout=timeout_s + 30)
    took = time.time() - killed
    assert s["JobState"] == "FAILED" and took < timeout_s, (s["JobState"], took, tail(log))
    last = complete.read_text().strip()
    assert last in ("step00000004", "step00000008"), last

    # The user resubmits the same command: the run's complete checkpoint makes the script add --resume auto.
    log2 = tmp_path / "lost2.log"
    s = wait_done(TWO_NODES, submit_pretrain(TWO_NODES, 2, cfg, log2), log2)
    text = log2.read_text()
    assert s["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {Path(cfg['run_dir']) / 'checkpoints' / last}" in text, text[-3000:]
    assert_equal_losses(losses(cfg["run_dir"]), reference)


@pytest.mark.slurm
@pytest.mark.dist
def test_finetune_across_two_nodes_equals_one_host(shards, tmp_path):
    require(TWO_NODES, 2)
    ckpt = official_checkpoint(tmp_path / "tiny_official.pth")
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    cfg = finetune_config(tmp_path / "one", shards, ckpt, epochs=1)
    ok(torchrun(["finetune/run.py", "--config", cfg]))  # 2 ranks on this host
    want = losses(tmp_path / "one" / "ft")

    cfg2 = finetune_config(tmp_path / "two", shards, ckpt, epochs=1)
    log = tmp_path / "ft2.log"
    job = submit(TWO_NODES, 2, log, {}, ["--wrap", f"srun --kill-on-bad-exit=1 {sys.executable} "
                                                   f"finetune/run.py --config {cfg2}"])
    s = wait_done(TWO_NODES, job, log)
    assert s["JobState"] == "COMPLETED" and s["NodeList"] == "n[1-2]", (s, tail(log))
    assert_equal_losses(losses(tmp_path / "two" / "ft"), want)
    final = [json.loads(x) for x in (tmp_path / "two" / "ft" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val_samples"] == 16, final  # every validation image once, across both nodes
    assert (tmp_path / "two" / "ft" / "export" / "finetuned.official.safetensors").exists()
