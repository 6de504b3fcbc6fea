"""Fine-tuning at a new resolution/window with accelerate: in one process, and on 2 processes on CPU (torchrun,
gloo) where ranks, a kill or a signal are what is tested."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch

from pretrain.weights import load_pretrained
from pretrain.models import build_model

from conftest import (DEEPSPEED, REPO, TINY, entry, finetune_config as config, free_port, losses, official_checkpoint,
                      python, torchrun)

@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    return official_checkpoint(tmp_path_factory.mktemp("pre") / "tiny_official.pth")


def run(cfg: str, *args, env=(), wait=True, faults: dict | None = None):
    return torchrun([*entry("finetune", faults), "--config", cfg, *args], env=env, wait=wait)


def records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_finetune_new_resolution_and_window_learns_and_exports(shards, official_ckpt, tmp_path, capsys, monkeypatch):
    """In one process (main(argv), as the console script calls it; world 1): what is resized, what is learned,
    what is exported, and that the export scores what training reported. Two ranks: the ZeRO-2, kill/resume
    and Slurm fine-tunes."""
    from finetune.run import main
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # main sets it: undone after
    cfg = config(tmp_path, shards, official_ckpt, epochs=8)
    assert main(["--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "resized: 2 relative_position_bias_table(s) bicubic, e.g. (49, 1) -> (121, 1)" in out
    final = [x for x in records(str(tmp_path / "ft")) if "val_top1" in x][-1]
    assert final["val_samples"] == 16
    assert final["val_top1"] >= 40.0, final  # 8 classes: chance is 12.5%
    exported = tmp_path / "ft" / "export" / "finetuned.official.safetensors"
    model = build_model("swin_tiny", img_size=48, window_size=6, **TINY)
    assert load_pretrained(model, str(exported)).layout == "official"
    assert main(["--config", cfg, "--eval-only", "--pretrained",
                 str(tmp_path / "ft" / "export" / "finetuned.ours.safetensors")]) == 0
    assert f"top-1 {final['val_top1']:.2f}%" in capsys.readouterr().out  # the export scores what training said


# The shipped recipe's randomness on: drop-path, Mixup + CutMix, random erasing, and an EMA.
NOISY = dict(model={"drop_path_rate": 0.2}, aug={"mixup": 0.8, "cutmix": 1.0, "re_prob": 0.25},
             finetune={"ema_decay": 0.9}, checkpoint={"every_steps": 3, "keep": 5})


@pytest.mark.dist
@pytest.mark.launcher
def test_resume_after_kill_is_exact_with_drop_path_mixup_erasing_and_ema(shards, official_ckpt, tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = config(ref_dir, shards, official_ckpt, epochs=3, **NOISY)
    r = run(ref)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = losses(ref_dir / "ft")
    assert sorted(want) == list(range(1, 22))  # 7 updates an epoch
    # checkpoint.every_steps=3 acts (plus the epoch ends at 7 and 14, and the end); keep=5 newest
    kept = sorted(p.name for p in (ref_dir / "ft" / "checkpoints").glob("step*"))
    assert kept == ["step00000012", "step00000014", "step00000015", "step00000018", "step00000021"], kept
    ema = [x for x in records(str(ref_dir / "ft")) if "val_ema_top1" in x]
    assert len(ema) == 3 and (ref_dir / "ft" / "export" / "finetuned_ema.timm.safetensors").exists()
    cfg = config(tmp_path, shards, official_ckpt, epochs=3, **NOISY)
    proc = run(cfg, wait=False, faults={"sleep_s": 0.3})
    pointer = tmp_path / "ft" / "checkpoints" / "latest_complete"
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.exists() and pointer.read_text() >= "step00000009"):
        time.sleep(0.05)
    assert pointer.exists(), proc.communicate()[0][-3000:]
    ranks = subprocess.run(["pgrep", "-f", f"faulty_train.py finetune .*--config {cfg}"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split() if int(p) != proc.pid]
    assert pids, "no worker processes found"
    for pid in pids:  # the processes die mid-run, as on a node failure
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    stopped_at = int(pointer.read_text()[4:])
    assert stopped_at < max(want)
    r = run(cfg, "--resume", "auto")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at update {stopped_at}" in r.stdout
    got = losses(tmp_path / "ft")  # one record per step: the resumed run rewrote the history after its checkpoint
    assert sorted(got) == sorted(want)
    for step in range(stopped_at + 1, max(want) + 1):
        assert abs(got[step] - want[step]) <= 1e-6 * want[step], (step, got[step], want[step])
    final = [x for x in records(str(tmp_path / "ft")) if "val_ema_top1" in x][-1]
    assert final == [x for x in records(str(ref_dir / "ft")) if "val_ema_top1" in x][-1]


def test_official_checkpoint_at_new_resolution_matches_timm_conversion(official_ckpt):
    # Same window, new resolution: timm's own official->timm conversion and ours must agree.
    ours = build_model("swin_tiny", img_size=64, window_size=4, **TINY).eval()
    load_pretrained(ours, official_ckpt)
    ref = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, pretrained=True,
                            embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=8,
                            pretrained_cfg_overlay=dict(file=official_ckpt, num_classes=8)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4


def test_missing_inputs_are_named():
    r = python("finetune/run.py", "--res", "384")
    assert r.returncode == 2
    assert "config finetune/swin_b_22kto1k_384 (res 384, window 12) still needs" in r.stderr  # the recipe by name
    assert "--pretrained" in r.stderr and "--data" in r.stderr


@pytest.mark.dist
@pytest.mark.launcher
def test_finetune_under_deepspeed_zero2_exports_what_it_evaluated(shards, official_ckpt, tmp_path):
    cfg = config(tmp_path, shards, official_ckpt, epochs=2, backend="deepspeed", optim={"zero_stage": 2})
    cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), "finetune/run.py",
           "--config", cfg]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "backend deepspeed (ZeRO-2)" in r.stdout
    assert sorted(losses(tmp_path / "ft")) == list(range(1, 15))
    final = [x for x in records(str(tmp_path / "ft")) if "val_top1" in x][-1]
    exported = tmp_path / "ft" / "export" / "finetuned.ours.safetensors"
    ev = run(cfg, "--eval-only", "--pretrained", str(exported), "--set", "backend=accelerate", "optim.zero_stage=null")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"top-1 {final['val_top1']:.2f}%" in ev.stdout  # the consolidated ZeRO weights are what was trained


@pytest.mark.dist
@pytest.mark.launcher
def test_sigterm_checkpoints_a_finetune_and_a_fresh_start_there_is_refused(shards, official_ckpt, tmp_path):
    cfg = config(tmp_path, shards, official_ckpt, epochs=3, checkpoint={"every_steps": 100})
    proc = run(cfg, wait=False, faults={"sleep_s": 0.4})
    metrics = tmp_path / "ft" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-f", f"faulty_train.py finetune .*--config {cfg}"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split() if int(p) != proc.pid]
    assert pids, "no worker processes found"
    for pid in pids:  # as srun delivers scancel's TERM to every task
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    m = re.search(r"SIGTERM at update (\d+): checkpointing", out)
    assert m and int(m[1]) < 7, out[-3000:]  # before the first epoch-end checkpoint
    pointer = tmp_path / "ft" / "checkpoints" / "latest_complete"
    assert pointer.read_text() == "step%08d" % int(m[1])
    again = run(cfg)  # no --resume: the run's checkpoints must not be overwritten
    assert again.returncode != 0 and "already holds a run" in again.stderr and "--resume auto" in again.stderr
    assert pointer.read_text() == "step%08d" % int(m[1])
