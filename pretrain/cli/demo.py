"""The whole pipeline on an embedded dataset, on this machine (CPU is fine, GPUs are used when present):

    swin-demo [--ranks 2] [--pretrain-steps 0] [--finetune-epochs 0] [--out runs]
    (also `python launch/demo.py` in a checkout, `python -m pretrain.cli.demo`; from any directory: it
    writes --out there and launches the installed package's modules)

1. draws a 10-class image set (real JPEG files in class folders),
2. packs it into WebDataset shards (pretrain.data.shards, as `python -m pretrain.cli.make_shards`; train + validation),
3. pretrains a small Swin with DeepSpeed on --ranks processes (the recipe swin_tiny_cpu, 64 px, window 4;
   `--arch v2`: Swin V2, swinv2_tiny_cpu),
4. fine-tunes it at 96 px with window 6 through finetune.run (the recipe finetune/swin{,v2}_tiny_cpu;
   V2 moves to the new window through its continuous position bias, with the checkpoint's windows),
5. evaluates, prints top-1 and where everything is, and draws the loss/accuracy curves to a PNG.
A second run reuses the images and the shards, skips a run the same command finished, and continues a
finished run whose settings changed (--pretrain-steps, --finetune-epochs, --ranks).

    swin-demo --task simmim [--pretrain-steps 0] [--finetune-epochs 0]

SimMIM instead of supervised pretraining (the recipe simmim_tiny_cpu: masked image modelling, 64 px, window 4,
16 px mask squares; the labels are not read), its validation reconstruction loss per epoch and a picture of
its reconstructions, then two fine-tunes at 96 px / window 6 in the same budget: from the SimMIM weights (bias
tables by the SimMIM geometric spline) and from random init; their top-1 side by side and in the curves PNG.
"""
import glob
import json
import os
import subprocess
import sys

import torch

from pretrain import cli
from pretrain.config import resolve_config
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder
from pretrain.io import write_bytes_atomic
from pretrain.runs import latest_tag
from pretrain.training.backend import free_port  # not the launchers' default 29500: two demos may run at once
from pretrain.weights import export_run

# The launchers as modules of this interpreter (their console scripts may be elsewhere, or not on PATH), and the
# steps as the installed package's modules: the demo runs from any directory, in that directory.
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(cmd: list[str], env: dict) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env)
    if r.returncode:
        raise SystemExit(f"demo step failed ({r.returncode}): {' '.join(cmd)}")


def step_key(cmd: list[str], inputs: str = "") -> str:
    """A launched step's command without its rendezvous port (a new free one each time) or --resume, with
    what it reads that the command doesn't show: its --config file's text, and `inputs` (the pretrained
    run's newest tag)."""
    keep, drop = [], False
    for prev, arg in zip([""] + cmd, cmd):
        if drop:
            drop = False
        elif arg in ("--master_port", "--resume"):
            drop = True
        else:
            keep.append(open(resolve_config(arg)).read() if prev == "--config" else arg)
    return json.dumps({"cmd": keep, "inputs": inputs})


def run_step(cmd: list[str], env: dict, run_dir: str, inputs: str = "") -> None:
    """`cmd` (a launch that trains run_dir), unless the same command already ran it to its end: a launcher
    exits 0 only for a run that finished its schedule, and then this writes run_dir/demo_step.json. A rerun
    with other settings (--pretrain-steps, --ranks, ...), or other `inputs`, launches and continues the run
    (--resume auto)."""
    marker = os.path.join(run_dir, "demo_step.json")
    key = step_key(cmd, inputs)
    if os.path.exists(marker) and open(marker).read() == key:
        print(f"  finished by the same command before ({marker}): not launched again", flush=True)
        return
    run(cmd, env)
    write_bytes_atomic(marker, key.encode())


def records(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def plot_runs(loss_ax, acc_ax, runs: dict[str, str]) -> None:
    """Each run's training loss and validation top-1 (its metrics.jsonl) on two axes, chance marked."""
    for name, d in runs.items():
        recs = records(os.path.join(d, "metrics.jsonl"))
        loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
        acc = {r["step"]: r["val_top1"] for r in recs if "val_top1" in r}
        loss_ax.plot(list(loss), list(loss.values()), label=name)
        acc_ax.plot(list(acc), list(acc.values()), marker="o", label=name)
    acc_ax.axhline(10, color="grey", linestyle=":", label="chance")


def draw(plotter, *args) -> str:
    """The curves PNG's path, or why there is none (matplotlib is the `demo` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'swin-pretrain[demo]')"
    return plotter(*args)


def figure(n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, n, figsize=(5.5 * n, 4))


def save(fig, axes, out: str) -> str:
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_probe(ax, run_dir: str, label: str) -> None:
    """The run's kNN probe top-1 over its updates; update 0 (the initial encoder) drawn as a line too."""
    pts = {r["step"]: r["probe_knn_top1"] for r in records(os.path.join(run_dir, "metrics.jsonl"))
           if "probe_knn_top1" in r}
    ax.plot(list(pts), list(pts.values()), marker="o", label=label)
    if 0 in pts:
        ax.axhline(pts[0], color="tab:red", linestyle="--", label="random-init encoder (update 0)")
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.set(title="kNN probe top-1 (k=20, T=0.07)", xlabel="update", ylabel="%")


def probe_line(run_dir: str) -> str:
    """'kNN probe top-1 A% at update 0 (random init) -> B% at update N', or '' without probe records."""
    pts = [r for r in records(os.path.join(run_dir, "metrics.jsonl")) if "probe_knn_top1" in r]
    if not pts:
        return ""
    first, last = pts[0], pts[-1]
    return (f"kNN probe top-1 {first['probe_knn_top1']:.1f}% at update {first['step']}"
            f"{' (random init)' if first['step'] == 0 else ''} -> {last['probe_knn_top1']:.1f}% at update "
            f"{last['step']} ({last['probe_queries']} images, a bank of {last['probe_bank']})")


def plot(pre_dir: str, ft_dir: str, out: str) -> str:
    fig, axes = figure(3)
    plot_runs(axes[0], axes[1], {"pretrain 64px/w4": pre_dir, "fine-tune 96px/w6": ft_dir})
    axes[0].set(title="training loss", xlabel="update", ylabel="loss")
    axes[1].set(title="validation top-1", xlabel="update", ylabel="%")
    plot_probe(axes[2], pre_dir, "pretraining")
    return save(fig, axes, out)


def main(argv=None) -> int:
    p = cli.parser("swin-demo", __doc__)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=0, help="stop pretraining after N updates (0: config)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs (0: config)")
    p.add_argument("--out", default="runs", help="where data and runs go")
    p.add_argument("--arch", choices=["v1", "v2"], default="v1", help="Swin (v1) or Swin V2")
    p.add_argument("--task", choices=["classification", "simmim"], default="classification",
                   help="supervised pretraining, or SimMIM + a fine-tune against one from random init")
    a = p.parse_args(argv)
    if a.task == "simmim" and a.arch != "v1":
        p.error("--task simmim runs the Swin V1 demo (the recipe simmim_tiny_cpu)")
    return cli.run(lambda: demo(a) if a.task == "classification" else demo_simmim(a), show_result=False)


def prepare_data(out: str, n: int) -> tuple[str, dict]:
    """Steps 1-2 of N: the image set and its shards (reused when there); returns (the manifest, the env)."""
    images, shards = f"{out}/data/images", f"{out}/data/shards"
    print(f"[1/{n}] image set: {make_image_folder(images, num_classes=10, per_class=40, size=(80, 64))}")
    s = write_shards(WriteOptions(images, shards, val_per_class=8, samples_per_shard=40), progress=False)
    print(f"[2/{n}] shards: {shards} {s['samples']} ({s['skipped_shards']} shard(s) were already there)")
    if not torch.cuda.is_available():  # the launched runs and this process's export (DeepSpeed's checkpoint reader)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The steps run this interpreter's `pretrain` from wherever they start (PYTHONSAFEPATH: not a `pretrain`
    # folder in the current directory), as in its activated environment (its bin first on PATH: the ninja
    # that built DeepSpeed's CPU op, so it is not compiled again).
    code = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above pretrain/cli/
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONSAFEPATH="1",
               PYTHONPATH=os.pathsep.join([code, *filter(None, [os.environ.get("PYTHONPATH")])]),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    return f"{shards}/_info.json", env


def pretrain(a, config: str, pre_dir: str, info: str, env: dict, step: str) -> None:
    """DeepSpeed pretraining on --ranks processes (continuing a finished run), then its export (what
    `python -m pretrain.cli.release RUN` does, in this process: one interpreter start less)."""
    sets = [f"run_dir={pre_dir}", f"data.train={info}", f"data.val={info}", "log.progress=false",
            f"probe.data={info}"]  # a kNN probe of the features with each evaluation (and at update 0)
    if a.pretrain_steps:
        sets.append(f"optim.max_steps={a.pretrain_steps}")
    done = os.path.exists(f"{pre_dir}/checkpoints/latest_complete")
    print(f"{step} pretraining on {a.ranks} rank(s){' (a checkpoint is there)' if done else ''}", flush=True)
    run_step([*DEEPSPEED, "--num_accelerators", str(a.ranks), "--master_port", str(free_port()),
              "--module", "pretrain.cli.train", "--config", config,
              *(["--resume", "auto"] if done else []), "--set", *sets], env, pre_dir)
    print(f"  exporting the run's newest checkpoint (as python -m pretrain.cli.release {pre_dir})", flush=True)
    for path in export_run(pre_dir, warn=lambda m: print(f"  {m}")):  # m starts "warning: "
        print(f"  wrote {path}")


def finetune(a, config: str, start: list[str], ft_dir: str, info: str, env: dict, step: str) -> None:
    """finetune.run at 96 px / window 6 under torchrun; `start`: --pretrained DIR or --from-scratch."""
    ft_args = ["--config", config, "--res", "96", "--window", "6", *start, "--output", ft_dir,
               "--set", f"data.train={info}", f"data.val={info}"]
    if a.finetune_epochs:
        ft_args += ["--epochs", str(a.finetune_epochs)]
    ft_done = os.path.exists(f"{ft_dir}/checkpoints/latest_complete")
    print(f"{step} at 96 px, window 6{' (a checkpoint is there)' if ft_done else ''}", flush=True)
    run_step([*TORCHRUN, "--nproc_per_node", str(a.ranks), "--master_port", str(free_port()),
              "-m", "finetune.run", *ft_args, *(["--resume", "auto"] if ft_done else [])], env, ft_dir,
             inputs=(latest_tag(os.path.join(start[1], "checkpoints")) or "") if start[0] == "--pretrained" else "")


def demo(a) -> int:
    out = a.out.rstrip("/")
    name = "swin_tiny_cpu" if a.arch == "v1" else "swinv2_tiny_cpu"
    pre_dir, ft_dir = f"{out}/{name}", f"{out}/{name}_ft"
    info, env = prepare_data(out, 5)
    pretrain(a, name, pre_dir, info, env, "[3/5]")
    finetune(a, f"finetune/{name}", ["--pretrained", pre_dir], ft_dir, info, env, "[4/5] fine-tuning")
    pre = [r for r in records(f"{pre_dir}/metrics.jsonl") if "val_top1" in r]
    ft = [r for r in records(f"{ft_dir}/metrics.jsonl") if "val_top1" in r]
    png = draw(plot, pre_dir, ft_dir, f"{out}/demo_curves.png")
    print("[5/5] results")
    if pre:
        print(f"  pretraining  top-1 {pre[-1]['val_top1']:.1f}% (chance 10%) on {pre[-1]['val_samples']} images")
    probe = probe_line(pre_dir)
    if probe:
        print(f"  pretraining  {probe}")
    if ft:
        print(f"  fine-tuned   top-1 {ft[-1]['val_top1']:.1f}% (chance 10%) on {ft[-1]['val_samples']} images")
    print(f"  runs:        {pre_dir} and {ft_dir} (config.json, metrics.jsonl, checkpoints/, export/)")
    print(f"  curves:      {png}")
    return 0


def plot_simmim(pre_dir: str, runs: dict[str, str], out: str) -> str:
    fig, axes = figure(4)
    recs = records(os.path.join(pre_dir, "metrics.jsonl"))
    for key, label in (("loss", "training"), ("val_loss", "validation (fixed masks)")):
        pts = {r["step"]: r[key] for r in recs if key in r}
        axes[0].plot(list(pts), list(pts.values()), marker="o" if key == "val_loss" else None, label=label)
    axes[0].set(title="SimMIM pretraining 64px/w4: masked L1", xlabel="update", ylabel="loss")
    plot_runs(axes[1], axes[2], runs)
    axes[1].set(title="fine-tune 96px/w6: training loss", xlabel="update", ylabel="loss")
    axes[2].set(title="fine-tune: validation top-1", xlabel="update", ylabel="%")
    plot_probe(axes[3], pre_dir, "SimMIM pretraining")
    return save(fig, axes, out)


def demo_simmim(a) -> int:
    out = a.out.rstrip("/")
    pre_dir, ft_dir, scratch_dir = f"{out}/simmim_tiny_cpu", f"{out}/simmim_tiny_cpu_ft", f"{out}/scratch_tiny_cpu_ft"
    info, env = prepare_data(out, 6)
    pretrain(a, "simmim_tiny_cpu", pre_dir, info, env, "[3/6] SimMIM")
    config = "finetune/simmim_tiny_cpu"
    finetune(a, config, ["--pretrained", pre_dir], ft_dir, info, env, "[4/6] fine-tuning from SimMIM")
    finetune(a, config, ["--from-scratch"], scratch_dir, info, env, "[5/6] fine-tuning from random init")
    evals = [r for r in records(f"{pre_dir}/metrics.jsonl") if "val_loss" in r]
    pictures = sorted(glob.glob(f"{pre_dir}/reconstructions/*.png"))
    png = draw(plot_simmim, pre_dir, {"from SimMIM": ft_dir, "from random init": scratch_dir},
               f"{out}/demo_simmim_curves.png")
    print("[6/6] results")
    if evals:
        print(f"  SimMIM validation reconstruction loss: {evals[0]['val_loss']:.4f} at update {evals[0]['step']} -> "
              f"{evals[-1]['val_loss']:.4f} at update {evals[-1]['step']} ({evals[-1]['val_samples']} images, "
              "fixed masks)")
    probe = probe_line(pre_dir)
    if probe:
        print(f"  SimMIM {probe}")
    tops = {}
    for name, d in (("from SimMIM", ft_dir), ("from random init", scratch_dir)):
        ev = [r for r in records(f"{d}/metrics.jsonl") if "val_top1" in r]
        if ev:
            tops[name] = ev[-1]["val_top1"]
    if tops:
        print("  fine-tuned top-1 (chance 10%, same recipe and budget): " +
              "  |  ".join(f"{k} {v:.1f}%" for k, v in tops.items()))
    print(f"  reconstructions: {pictures[-1] if pictures else '(none)'}")
    print(f"  runs:        {pre_dir}, {ft_dir}, {scratch_dir}")
    print(f"  curves:      {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
