"""The whole pretraining path on an embedded dataset, on this machine (CPU is fine):

    python launch/demo.py [--ranks 2] [--steps 0]

1. draws a 10-class image set (real JPEG files in class folders) into runs/data/images,
2. packs it into WebDataset shards with launch/make_shards.py (train + validation split),
3. pretrains a small Swin with DeepSpeed on --ranks processes (GPUs when present, else CPU/gloo),
4. exports the weights in our, timm's and the official layout.
A second run reuses the images, the shards and the finished checkpoint.
"""
import _syspath  # noqa: F401  (must come first: see launch/_syspath.py)
import argparse
import json
import os
import subprocess
import sys

import torch

from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "configs", "swin_tiny_cpu.json")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="stop after this many updates (0: the config's epochs)")
    a = p.parse_args()
    cfg = json.load(open(CONFIG))
    images, shards = "runs/data/images", os.path.dirname(cfg["data"]["train"])
    print(f"[1/4] image set: {make_image_folder(images, num_classes=10, per_class=40, size=(80, 64))}")
    s = write_shards(WriteOptions(images, shards, val_per_class=8, samples_per_shard=40), progress=False)
    print(f"[2/4] shards: {shards} {s['samples']} ({s['skipped_shards']} shard(s) already there)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    ckpt = os.path.join(cfg["run_dir"], "checkpoints")
    resume = ["--resume", "auto"] if os.path.exists(os.path.join(ckpt, "latest_complete")) else []
    sets = [f"optim.max_steps={a.steps}"] if a.steps else []
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_accelerators", str(a.ranks),
           os.path.join(HERE, "pretrain.py"), "--config", CONFIG, *resume, *(["--set", *sets] if sets else [])]
    print(f"[3/4] pretraining: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env).returncode:
        return 1
    print("[4/4] export:", flush=True)
    r = subprocess.run([sys.executable, os.path.join(HERE, "export.py"), cfg["run_dir"]], env=env,
                       capture_output=True, text=True)
    print(r.stdout.strip() or r.stderr[-2000:])
    metrics = [json.loads(x) for x in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    evals = [m for m in metrics if "val_top1" in m]
    if evals:
        print(f"validation top-1 {evals[-1]['val_top1']:.1f}% (chance: 10%) on {evals[-1]['val_samples']} images")
    print(f"run dir: {cfg['run_dir']} (config.json, metrics.jsonl, tb/, checkpoints/, export/)")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
