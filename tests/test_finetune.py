"""Fine-tuning at a new resolution/window with accelerate, 2 processes on CPU (torchrun, gloo)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from pretrain.checkpoint import export, load_pretrained
from pretrain.models import build_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_engine import shards  # noqa: E402,F401  (the shards fixture: 8 classes, 112 train / 16 val)

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=8)
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("swin_tiny", img_size=32, window_size=4, **TINY)
    return export(model, str(tmp_path_factory.mktemp("pre") / "tiny_official.pth"), layout="official")


def config(tmp_path: Path, shards: str, pretrained: str, epochs: int) -> str:
    cfg = json.loads((REPO / "configs/finetune/swin_tiny_cpu.json").read_text())
    cfg["run_dir"] = str(tmp_path / "ft")
    cfg["model"] = {"variant": "swin_tiny", "img_size": 48, "window_size": 6, "drop_path_rate": 0.0,
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}}
    cfg["data"] = {"train": shards, "val": shards, "workers": 1, "shuffle_buffer": 32}
    cfg["aug"] = {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0, "eval_crop": False}
    cfg["optim"].update(global_batch=16, micro_batch=8, epochs=epochs, warmup_epochs=0.5, base_lr=3e-3,
                        lr_scale_batch=16, min_lr=1e-4, warmup_lr=1e-5)
    cfg["log"] = {"every_steps": 1}
    cfg["finetune"]["pretrained"] = pretrained
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run(cfg: str, *args, env=(), wait=True):
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200), "finetune/run.py",
           "--config", cfg, *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **dict(env)}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)


def records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_finetune_new_resolution_and_window_learns_and_exports(shards, official_ckpt, tmp_path):
    cfg = config(tmp_path, shards, official_ckpt, epochs=8)
    r = run(cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resized: 2 relative_position_bias_table(s) bicubic, e.g. (49, 1) -> (121, 1)" in r.stdout
    final = [x for x in records(str(tmp_path / "ft")) if "val_top1" in x][-1]
    assert final["val_samples"] == 16
    assert final["val_top1"] >= 40.0, final  # 8 classes: chance is 12.5%
    exported = tmp_path / "ft" / "export" / "finetuned.official.safetensors"
    model = build_model("swin_tiny", img_size=48, window_size=6, **TINY)
    assert load_pretrained(model, str(exported)).layout == "official"
    ev = run(cfg, "--eval-only", "--pretrained", str(tmp_path / "ft" / "export" / "finetuned.ours.safetensors"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"top-1 {final['val_top1']:.2f}%" in ev.stdout  # the exported weights score what training reported


def test_resume_after_kill_continues_where_it_stopped(shards, official_ckpt, tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = config(ref_dir, shards, official_ckpt, epochs=3)
    assert run(ref).returncode == 0
    want = {x["step"]: x["loss"] for x in records(str(ref_dir / "ft")) if "loss" in x}
    cfg = config(tmp_path, shards, official_ckpt, epochs=3)
    proc = run(cfg, wait=False, env={"PRETRAIN_INJECT_SLEEP_S": "0.3"})
    pointer = tmp_path / "ft" / "checkpoints" / "latest_complete"
    deadline = time.time() + 300
    while time.time() < deadline and not pointer.exists():
        time.sleep(0.05)
    assert pointer.exists(), proc.communicate()[0][-3000:]
    ranks = subprocess.run(["pgrep", "-f", f"finetune/run.py --config {cfg}"], capture_output=True, text=True)
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
    got = {x["step"]: x["loss"] for x in records(str(tmp_path / "ft")) if "loss" in x}
    assert sorted(got) == sorted(want)
    for step in range(stopped_at + 1, max(want) + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * want[step], (step, got[step], want[step])


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
    r = subprocess.run([sys.executable, "finetune/run.py", "--res", "384"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "swin_b_22kto1k_384.json (res 384, window 12) still needs" in r.stderr
    assert "--pretrained" in r.stderr and "--data" in r.stderr
