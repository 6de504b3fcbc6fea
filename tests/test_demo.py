"""The README's main job, `launch/demo.py` (`swin-demo`), at a smaller size, and the docs generated from code."""
import pytest
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.demo
def test_demo_runs_end_to_end_and_reuses_its_outputs(tmp_path):
    """The checkout's `python launch/demo.py`, started in another directory, writes and trains there."""
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "launch" / "demo.py"), "--pretrain-steps", "6", "--finetune-epochs", "1"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for line in ("[5/5] results", "pretraining  top-1", "fine-tuned   top-1", "on 80 images"):
        assert line in first.stdout, first.stdout[-2000:]
    assert (out / "demo_curves.png").stat().st_size > 10_000
    assert len(list((out / "swin_tiny_cpu" / "export").glob("*.safetensors"))) == 3
    assert len(list((out / "swin_tiny_cpu_ft" / "export").glob("finetuned.*.safetensors"))) == 3
    assert (out / "swin_tiny_cpu" / "metrics.jsonl").exists() and (out / "swin_tiny_cpu_ft" / "config.json").exists()
    import json  # the kNN probe (issue 34): at update 0 and with the final evaluation, 2 DeepSpeed ranks
    probe = {r["step"]: r for r in map(json.loads, open(out / "swin_tiny_cpu" / "metrics.jsonl"))
             if "probe_knn_top1" in r}
    assert sorted(probe) == [0, 6] and probe[6]["probe_queries"] == 80 and probe[6]["probe_bank"] == 320
    assert probe[6]["probe_knn_top1"] > 20.0, probe  # chance is 10%
    assert "pretraining  kNN probe top-1" in first.stdout and "at update 0 (random init) -> " in first.stdout
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "10 shard(s) were already there" in second.stdout
    assert second.stdout.count("not launched again") == 2 and "$ " not in second.stdout, second.stdout[-2000:]
    assert "[5/5] results" in second.stdout and "fine-tuned   top-1" in second.stdout


def test_demo_step_launches_again_only_when_its_command_or_inputs_changed(tmp_path):
    """pretrain.cli.demo.run_step (what the demo's rerun skips): a step whose same command (rendezvous port and
    --resume aside), config file and inputs finished is not launched; another setting, an edited config or a
    new pretrained tag launches."""
    from pretrain.cli.demo import run_step
    count = tmp_path / "launches"
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    config = tmp_path / "c.json"
    config.write_text('{"seed": 0}')

    def step(port: int, steps: int, resume: bool = False, tag: str = "step_00000006") -> int:
        cmd = ["sh", "-c", f"echo x >> {count}", "--master_port", str(port), "--config", str(config),
               "--set", f"optim.max_steps={steps}", *(["--resume", "auto"] if resume else [])]
        run_step(cmd, dict(os.environ), str(run_dir), inputs=tag)
        return len(count.read_text().split())

    assert step(1000, 6) == 1
    assert step(2000, 6, resume=True) == 1  # the same step, another port, now continuing: not launched
    assert step(2000, 8, resume=True) == 2  # more updates: launched
    assert step(3000, 8, tag="step_00000008") == 3  # the pretrained run moved on: launched
    assert step(3000, 8, tag="step_00000008") == 3
    config.write_text('{"seed": 1}')
    assert step(3000, 8, tag="step_00000008") == 4  # the config file changed: launched


@pytest.mark.demo
def test_simmim_demo_reconstructs_better_and_both_finetunes_beat_chance(tmp_path):
    """`launch/demo.py --task simmim`: SimMIM pretraining on the generated set (30 updates, an evaluation per
    epoch of 10), then fine-tunes from it and from random init in the same budget: the last validation
    reconstruction loss is at least 10% below the first, both fine-tunes beat chance (10%, 80 images), and the
    side-by-side line, the reconstruction picture and the curves are there."""
    import json
    out = tmp_path / "runs"
    cmd = [sys.executable, "launch/demo.py", "--task", "simmim", "--out", str(out), "--pretrain-steps", "30",
           "--finetune-epochs", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = [json.loads(x) for x in open(out / "simmim_tiny_cpu" / "metrics.jsonl") if "val_loss" in x]
    assert len(evals) >= 2 and evals[-1]["val_loss"] <= 0.9 * evals[0]["val_loss"], evals
    for run in ("simmim_tiny_cpu_ft", "scratch_tiny_cpu_ft"):
        last = [json.loads(x) for x in open(out / run / "metrics.jsonl") if "val_top1" in x][-1]
        assert last["val_samples"] == 80 and last["val_top1"] > 10.0, (run, last)
    assert "fine-tuned top-1 (chance 10%, same recipe and budget): from SimMIM" in r.stdout, r.stdout[-2000:]
    assert "from random init" in r.stdout and "by the SimMIM geometric spline" in r.stdout
    pictures = sorted((out / "simmim_tiny_cpu" / "reconstructions").glob("*.png"))
    assert pictures and f"reconstructions: {pictures[-1]}" in r.stdout
    assert (out / "demo_simmim_curves.png").stat().st_size > 10_000
    probe = [json.loads(x) for x in open(out / "simmim_tiny_cpu" / "metrics.jsonl") if "probe_knn_top1" in x]
    assert probe[0]["step"] == 0 and probe[-1]["step"] == 30 and len(probe) >= 3  # and with each evaluation
    assert all(r["probe_queries"] == 80 and 0 <= r["probe_knn_top1"] <= 100 for r in probe)
    # It sees SimMIM learn (CPU-2c: 25.0% at update 0 -> 48.8% at 30, the same in every run there; 10 points
    # is 8 of the 80 images, a margin for another CPU's bf16 rounding).
    assert probe[-1]["probe_knn_top1"] >= probe[0]["probe_knn_top1"] + 10, probe
    assert "SimMIM kNN probe top-1" in r.stdout
    assert len(list((out / "simmim_tiny_cpu" / "export").glob("*.safetensors"))) == 3


def test_config_reference_is_generated_from_the_schema():
    generated = subprocess.run([sys.executable, "-m", "finetune.config"], cwd=REPO, capture_output=True,
                               text=True).stdout
    assert (REPO / "docs" / "config.md").read_text() == generated, "run `make docs` to regenerate docs/config.md"
    assert ("| `optim.zero_stage` | Optional[int] | `null` | backend deepspeed | DeepSpeed ZeRO stage 0..3 "
            "(default 1); only with backend \"deepspeed\" |") in generated
    assert "| `finetune.ema_decay` | float | `0.0` | fine-tuning |" in generated
    assert "`finetune.layer_decay`" in generated
