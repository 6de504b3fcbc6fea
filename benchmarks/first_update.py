"""Time to the first update of a launched run: eager, compiled with an empty cache, and compiled again with
that cache in a new run dir (as a requeued job finds it), from each run's `time_to_first_step_s` record.

    python benchmarks/first_update.py [--ranks 2] [--out runs/bench_first_update]

The run is the test suite's tiny one (swin_tiny with 2 stages, 32 px, window 4) on a generated set of 8
classes, 2 DeepSpeed ranks (DS_ACCELERATOR=cpu without a GPU), 2 updates each; the time covers the process
group, the engine, the data, compilation where on, and the first forward/backward/step.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(out: str, name: str, shards: str, compile_: bool, cache: str) -> str:
    cfg = {"run_dir": f"{out}/{name}", "seed": 0,
           "model": {"variant": "swin_tiny", "img_size": 32, "window_size": 4, "num_classes": 8, "embed_dim": 16,
                     "depths": [1, 1], "num_heads": [1, 2], "compile": compile_, "compile_cache": cache},
           "data": {"train": shards, "workers": 1, "shuffle_buffer": 32},
           "aug": {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0},
           "optim": {"global_batch": 16, "micro_batch": 8, "epochs": 1, "max_steps": 2, "warmup_epochs": 0},
           "log": {"every_steps": 1, "tensorboard": False, "progress": False}}
    path = f"{out}/{name}.json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def first_update_s(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return next(r["time_to_first_step_s"] for r in map(json.loads, f) if "time_to_first_step_s" in r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default="runs/bench_first_update")
    a = p.parse_args()
    out = os.path.abspath(a.out)
    shutil.rmtree(out, ignore_errors=True)
    make_image_folder(f"{out}/imgs", num_classes=8, per_class=8, size=(40, 40))
    write_shards(WriteOptions(f"{out}/imgs", f"{out}/shards", samples_per_shard=16), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"})}
    cache = f"{out}/compile_cache"
    rows = {}
    # warm_up, not reported: the first run on a fresh machine also builds DeepSpeed's CPU comm op and our
    # JPEG decoder once (cached per user, 20 s here), which no later run pays.
    for name, compile_ in (("warm_up", False), ("eager", False), ("compiled_empty_cache", True),
                           ("compiled_warm_cache", True)):
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_accelerators", str(a.ranks),
               "launch/pretrain.py", "--config", config(out, name, f"{out}/shards/_info.json", compile_, cache)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        rows[name] = round(first_update_s(f"{out}/{name}"), 2)
    rows.pop("warm_up")
    print(json.dumps({"ranks": a.ranks, "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "time_to_first_update_s": rows}))


if __name__ == "__main__":
    main()
