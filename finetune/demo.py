"""The whole pipeline on an embedded dataset, on this machine (CPU is fine, GPUs are used when present):

    python launch/demo.py [--ranks 2] [--pretrain-steps 0] [--finetune-epochs 0] [--out runs]

1. draws a 10-class image set (real JPEG files in class folders),
2. packs it into WebDataset shards (pretrain.data.shards, as `python -m pretrain.make_shards`; train + validation),
3. pretrains a small Swin with DeepSpeed on --ranks processes (configs/swin_tiny_cpu.json, 64 px, window 4;
   `--arch v2`: Swin V2, configs/swinv2_tiny_cpu.json),
4. fine-tunes it at 96 px with window 6 through finetune/run.py (configs/finetune/swin{,v2}_tiny_cpu.json;
   V2 moves to the new window through its continuous position bias, with the checkpoint's windows),
5. evaluates, prints top-1 and where everything is, and draws the loss/accuracy curves to a PNG.
A second run reuses the images, the shards and finished checkpoints.
"""
import json
import os
import subprocess
import sys

import torch

from pretrain import cli
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (configs/, launch/)
BIN = os.path.dirname(sys.executable)


def run(cmd: list[str], env: dict) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"demo step failed ({r.returncode}): {' '.join(cmd)}")


def records(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def plot(pre_dir: str, ft_dir: str, out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in (("pretrain 64px/w4", pre_dir), ("fine-tune 96px/w6", ft_dir)):
        recs = records(os.path.join(d, "metrics.jsonl"))
        loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
        acc = {r["step"]: r["val_top1"] for r in recs if "val_top1" in r}
        axes[0].plot(list(loss), list(loss.values()), label=name)
        axes[1].plot(list(acc), list(acc.values()), marker="o", label=name)
    axes[0].set(title="training loss", xlabel="update", ylabel="loss")
    axes[1].set(title="validation top-1", xlabel="update", ylabel="%")
    axes[1].axhline(10, color="grey", linestyle=":", label="chance")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    p = cli.parser("python launch/demo.py", __doc__)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=0, help="stop pretraining after N updates (0: config)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs (0: config)")
    p.add_argument("--out", default="runs", help="where data and runs go")
    p.add_argument("--arch", choices=["v1", "v2"], default="v1", help="Swin (v1) or Swin V2")
    a = p.parse_args(argv)
    return cli.run(lambda: demo(a), show_result=False)


def demo(a) -> int:
    out = a.out.rstrip("/")
    images, shards = f"{out}/data/images", f"{out}/data/shards"
    name = "swin_tiny_cpu" if a.arch == "v1" else "swinv2_tiny_cpu"
    pre_dir, ft_dir = f"{out}/{name}", f"{out}/{name}_ft"
    print(f"[1/5] image set: {make_image_folder(images, num_classes=10, per_class=40, size=(80, 64))}")
    s = write_shards(WriteOptions(images, shards, val_per_class=8, samples_per_shard=40), progress=False)
    print(f"[2/5] shards: {shards} {s['samples']} ({s['skipped_shards']} shard(s) were already there)")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    info = f"{shards}/_info.json"
    sets = [f"run_dir={pre_dir}", f"data.train={info}", f"data.val={info}", "log.progress=false"]
    if a.pretrain_steps:
        sets.append(f"optim.max_steps={a.pretrain_steps}")
    done = os.path.exists(f"{pre_dir}/checkpoints/latest_complete")
    print(f"[3/5] pretraining on {a.ranks} rank(s){' (continuing the finished run)' if done else ''}", flush=True)
    run([f"{BIN}/deepspeed", "--num_accelerators", str(a.ranks), "launch/pretrain.py", "--config",
         f"configs/{name}.json", *(["--resume", "auto"] if done else []), "--set", *sets], env)
    run([sys.executable, "-m", "pretrain.release", pre_dir], env)
    ft_sets = [f"data.train={info}", f"data.val={info}"]
    ft_args = ["--config", f"configs/finetune/{name}.json", "--res", "96", "--window", "6", "--pretrained",
               pre_dir, "--output", ft_dir, "--set", *ft_sets]
    if a.finetune_epochs:
        ft_args += ["--epochs", str(a.finetune_epochs)]
    ft_done = os.path.exists(f"{ft_dir}/checkpoints/latest_complete")
    print(f"[4/5] fine-tuning at 96 px, window 6{' (continuing the finished run)' if ft_done else ''}", flush=True)
    run([f"{BIN}/torchrun", "--nproc_per_node", str(a.ranks), "finetune/run.py", *ft_args,
         *(["--resume", "auto"] if ft_done else [])], env)
    pre = [r for r in records(f"{pre_dir}/metrics.jsonl") if "val_top1" in r]
    ft = [r for r in records(f"{ft_dir}/metrics.jsonl") if "val_top1" in r]
    png = plot(pre_dir, ft_dir, f"{out}/demo_curves.png")
    print("[5/5] results")
    if pre:
        print(f"  pretraining  top-1 {pre[-1]['val_top1']:.1f}% (chance 10%) on {pre[-1]['val_samples']} images")
    if ft:
        print(f"  fine-tuned   top-1 {ft[-1]['val_top1']:.1f}% (chance 10%) on {ft[-1]['val_samples']} images")
    print(f"  runs:        {pre_dir} and {ft_dir} (config.json, metrics.jsonl, checkpoints/, export/)")
    print(f"  curves:      {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
