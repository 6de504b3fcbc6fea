"""Fixtures and helpers the test modules share: real shards, run configs, the real launchers, and the tiers.

Tiers (markers, pyproject.toml): `dist` (a run on 2 ranks), `launcher` (a real deepspeed/torchrun launcher, or a
launched job signalled), `slurm`, `root`, `demo`, `slow`. `make test-fast` runs the tests with none of them, in
one process where a behaviour allows; missing infrastructure (the libjpeg-turbo headers, ...) skips there with
the reason. `make test` (what CI runs) runs every test with SWIN_TESTS_STRICT=1: missing infrastructure fails
its test, and a session with any skip fails, so CI never passes by skipping Slurm, a launcher or a demo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder
from pretrain.models import build_model
from pretrain.training.backend import free_port
from pretrain.weights import export

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEEPSPEED = str(BIN / "deepspeed")
TORCHRUN = str(BIN / "torchrun")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """8 classes of real JPEGs in real tar shards: 112 train / 16 validation images, 14 per shard."""
    root = tmp_path_factory.mktemp("engine_data")
    make_image_folder(str(root / "imgs"), num_classes=8, per_class=16, size=(40, 40))
    write_shards(WriteOptions(str(root / "imgs"), str(root / "shards"), val_per_class=2, samples_per_shard=14),
                 progress=False)
    return str(root / "shards" / "_info.json")


@pytest.fixture(scope="session")
def unlabelled_shards(tmp_path_factory) -> str:
    """The same kind of images with no classes (nested folders and loose files, make_shards --no-labels):
    112 train / 16 validation images, 14 per shard, no `cls` members."""
    root = tmp_path_factory.mktemp("unlabelled_data")
    make_image_folder(str(root / "imgs"), num_classes=8, per_class=16, size=(40, 40))
    first = sorted((root / "imgs").iterdir())[0]
    for f in sorted(first.iterdir())[:4]:
        f.rename(root / "imgs" / f"loose_{f.name}")  # images directly in the folder too
    write_shards(WriteOptions(str(root / "imgs"), str(root / "shards"), val_per_class=16, samples_per_shard=14,
                              labelled=False), progress=False)
    return str(root / "shards" / "_info.json")


@pytest.fixture(scope="session")
def simmim_reference(unlabelled_shards, tmp_path_factory) -> dict[int, float]:
    """An uninterrupted SimMIM run of 12 updates on 2 DeepSpeed ranks (ZeRO-1, bf16, two epochs): the losses
    every interrupted SimMIM run (killed, requeued across two Slurm nodes) must reproduce."""
    cfg = simmim_config(unlabelled_shards, tmp_path_factory.mktemp("simmim") / "ref", optim={"max_steps": 12})
    ok(launch(cfg))
    want = losses(cfg["run_dir"])
    assert sorted(want) == list(range(1, 13))
    return want


def simmim_config(shards: str, run_dir: Path, **sections) -> dict:
    """base_config as a SimMIM run: 32 px, mask squares of 8 px, no classification keys."""
    cfg = base_config(shards, run_dir, **sections)
    cfg["task"] = "simmim"
    cfg["simmim"] = {"mask_patch_size": 8, **sections.get("simmim", {})}
    cfg["aug"] = {k: v for k, v in sections.get("aug", {}).items()}
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "num_classes"}
    return write_config(cfg, run_dir)


def base_config(shards: str, run_dir: Path, **sections) -> dict:
    """A tiny pretraining run (2 stages, 32 px, window 4) on the `shards` fixture, written next to run_dir."""
    cfg = {
        "run_dir": str(run_dir), "seed": 0,
        "model": {"variant": "swin_tiny", "img_size": 32, "window_size": 4, "num_classes": 8, "embed_dim": 16,
                  "depths": [1, 1], "num_heads": [1, 2], "drop_path_rate": 0.1},
        "data": {"train": shards, "workers": 1, "shuffle_buffer": 32},
        "aug": {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0, "label_smoothing": 0.1},
        "optim": {"global_batch": 16, "micro_batch": 8, "epochs": 3, "warmup_epochs": 0.5, "base_lr": 0.02,
                  "warmup_lr": 1e-4, "min_lr": 1e-4, "lr_scale_batch": 16, "precision": "bf16", "zero_stage": 1},
        "checkpoint": {"every_steps": 4, "keep": 2},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return write_config(cfg, run_dir)


def in_process_config(shards: str, run_dir: Path, **sections):
    """A run of the `shards` fixture in this process: one rank, the accelerate backend, fp32, 6 updates."""
    sections.setdefault("optim", {})
    sections["optim"] = {"max_steps": 6, "zero_stage": None, "precision": "fp32", **sections["optim"]}
    cfg = base_config(shards, run_dir, **sections)
    return load_config(cfg["_path"], ["backend=accelerate", f"data.val={shards}", "data.workers=0"])


def write_config(cfg: dict, run_dir: Path) -> dict:
    cfg = {k: v for k, v in cfg.items() if k != "_path"}
    path = run_dir.parent / f"{run_dir.name}.json"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return cfg | {"_path": str(path)}


def _env(env) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **dict(env)}


def _run(cmd: list[str], env, wait: bool):
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------- tiers
STRICT = os.environ.get("SWIN_TESTS_STRICT") == "1"
LAUNCHING = ("dist", "launcher", "slurm", "demo")  # the markers whose tests start runs (tests/prelaunch.py)


def need(ok: bool, what: str) -> None:
    """Infrastructure a test needs: without it the test fails under `make test` (SWIN_TESTS_STRICT=1), and
    skips, naming what is missing, in the fast tier."""
    if not ok:
        (pytest.fail if STRICT else pytest.skip)(f"needs {what}")


def pytest_sessionfinish(session, exitstatus) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if STRICT and skipped and exitstatus == 0:
        print(f"\nSWIN_TESTS_STRICT=1: {skipped} test(s) skipped; the whole suite must run (see -ra above)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------- the preloaded launcher (tests/prelaunch.py)
# One per session, ended with it: started once collection shows a test that launches runs (its imports then
# overlap the first tests), else on first use.
_PRELAUNCH: dict = {}


def pytest_collection_finish(session) -> None:
    if any(item.get_closest_marker(m) for item in session.items for m in LAUNCHING):
        _start_prelaunch()


def _start_prelaunch() -> None:
    import tempfile
    folder = tempfile.mkdtemp(prefix="prelaunch")  # short: a Unix socket's path is at most 107 bytes
    log = open(os.path.join(folder, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "prelaunch.py"), f"{folder}/sock"], cwd=REPO,
                            env=_env({}), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _PRELAUNCH.update(proc=proc, sock=f"{folder}/sock", log=log.name, folder=folder)


def pytest_unconfigure(config) -> None:
    import shutil
    import signal
    if proc := _PRELAUNCH.get("proc"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server, and any job left running
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(_PRELAUNCH["folder"], ignore_errors=True)


def _prelaunch_socket() -> str:
    import time
    if "proc" not in _PRELAUNCH:
        _start_prelaunch()
    proc, sock = _PRELAUNCH["proc"], _PRELAUNCH["sock"]
    deadline = time.time() + 300
    while not os.path.exists(sock):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"tests/prelaunch.py did not start: {Path(_PRELAUNCH['log']).read_text()[-3000:]}")
        time.sleep(0.1)
    return sock


def prelaunched(argv: list[str], ranks: int, env=(), dist: bool = True, timeout: float = 600):
    """`argv` (SCRIPT ARGS, -m MODULE ARGS or -c CODE) on `ranks` processes forked from the preloaded server,
    each as torchrun would start it (dist=False: a plain `python ARGV`); a subprocess.CompletedProcess."""
    from prelaunch import request
    job = {"argv": list(argv), "ranks": ranks, "env": _env(env), "cwd": str(REPO), "timeout": timeout,
           "port": free_port(), "dist": dist}
    r = request(_prelaunch_socket(), job)
    return subprocess.CompletedProcess(["prelaunch", "--master_port", str(job["port"]), *argv], r["returncode"],
                                       r["stdout"], r["stderr"])


def python(*args: str, env=(), timeout: float = 600):
    """`python ARGS` (a script, -m MODULE or -c CODE) as one process, with the heavy imports preloaded."""
    return prelaunched(list(args), 1, env, dist=False, timeout=timeout)


def entry(app: str, faults: dict | None) -> list[str]:
    """The script a launcher starts: the documented one, or tests/faulty_train.py with `faults` handed to
    the entry point's main() (pretrain.training.Faults fields: nan, sleep_s, crash_in_save)."""
    if faults is None:
        return ["launch/pretrain.py" if app == "pretrain" else "finetune/run.py"]
    return ["tests/faulty_train.py", app, "--faults", json.dumps(faults, separators=(",", ":"))]


def launch(cfg: dict, *args: str, ranks: int = 2, env: dict = (), wait: bool = True, faults: dict | None = None,
           launcher: str = "prelaunch"):
    """The pretraining command, `launch/pretrain.py --config CFG ARGS`, on `ranks` CPU ranks: forked from the
    preloaded server (the default, a finished CompletedProcess), or launcher="deepspeed": the documented
    `deepspeed launch/pretrain.py ...` (and always with wait=False: a Popen whose ranks can be found and
    signalled by their command line)."""
    script = [*entry("pretrain", faults), "--config", cfg["_path"], *args]
    if wait and launcher == "prelaunch":
        return prelaunched(script, ranks, env)
    assert launcher in ("prelaunch", "deepspeed"), launcher
    need(os.path.exists(DEEPSPEED), f"DeepSpeed's launcher at {DEEPSPEED} (pip install deepspeed)")
    cmd = [DEEPSPEED, "--num_accelerators", str(ranks), "--master_port", str(free_port()), *script]
    return _run(cmd, env, wait)


def torchrun(script_args: list[str], ranks: int = 2, env: dict = (), wait: bool = True, launcher: str = "prelaunch"):
    """SCRIPT_ARGS on `ranks` CPU ranks (gloo): forked from the preloaded server, or launcher="torchrun" (and
    always with wait=False): `torchrun --nproc_per_node RANKS SCRIPT_ARGS`."""
    if wait and launcher == "prelaunch":
        return prelaunched(script_args, ranks, env)
    assert launcher in ("prelaunch", "torchrun"), launcher
    need(os.path.exists(TORCHRUN), f"torchrun at {TORCHRUN}")
    cmd = [TORCHRUN, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *script_args]
    return _run(cmd, env, wait)


def losses(run_dir) -> dict[int, float]:
    """step -> logged loss; each step must appear once (one history per run)."""
    out = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice in {run_dir}/metrics.jsonl"
            out[rec["step"]] = rec["loss"]
    return out


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ------------------------------------------------------------------ fine-tuning (test_finetune, test_slurm)
TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=8)


def official_checkpoint(path: Path) -> str:
    """A seeded tiny Swin at 32 px / window 4, exported in the official layout."""
    torch.manual_seed(0)
    model = build_model("swin_tiny", img_size=32, window_size=4, **TINY)
    return export(model, str(path), layout="official")


def finetune_config(tmp_path: Path, shards: str, pretrained: str, epochs: int, **sections) -> str:
    """A tiny fine-tune (48 px, window 6) of `pretrained` on the `shards` fixture, written to tmp_path/ft.json."""
    cfg = json.loads((REPO / "configs/finetune/swin_tiny_cpu.json").read_text())
    cfg["run_dir"] = str(tmp_path / "ft")
    cfg["model"] = {"variant": "swin_tiny", "img_size": 48, "window_size": 6, "drop_path_rate": 0.0,
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}}
    cfg["data"] = {"train": shards, "val": shards, "workers": 1, "shuffle_buffer": 32}
    cfg["aug"] = {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0, "eval_crop": False}
    cfg["optim"].update(global_batch=16, micro_batch=8, epochs=epochs, warmup_epochs=0.5, base_lr=3e-3,
                        lr_scale_batch=16, min_lr=1e-4, warmup_lr=1e-5)
    cfg["log"] = {"every_steps": 1, "progress": False, "tensorboard": False}
    cfg["finetune"]["pretrained"] = pretrained
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(cfg))
    return str(path)
