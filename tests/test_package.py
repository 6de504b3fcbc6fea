"""The package as a user installs it: a wheel (`pip wheel --no-deps .`) installed non-editable into a fresh venv,
its console scripts run from an empty directory; and the shipped recipes, one source of truth with configs/."""
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pretrain.config import RECIPES, ConfigError, load_config, recipe_names, resolve_config

from conftest import REPO


def test_recipes_are_the_checkouts_configs_and_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    """configs/ is pretrain/recipes (the package data): the same files, not copies."""
    assert (REPO / "configs").resolve() == Path(RECIPES).resolve()
    names = recipe_names()
    assert {"swin_l_22k", "simmim_swinv2_b_192", "finetune/swin_b_22kto1k_384", "swin_tiny_cpu"} <= set(names)
    assert len(names) == len(list((REPO / "configs").rglob("*.json")))
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for given in ("swin_l_22k", "swin_l_22k.json", "configs/swin_l_22k.json"):
        assert resolve_config(given) == os.path.join(RECIPES, "swin_l_22k.json")
    assert load_config("finetune/swin_b_22kto1k_384", cls=__import__("finetune.config").config.FinetuneConfig
                       ).model.img_size == 384
    (tmp_path / "swin_l_22k.json").write_text(json.dumps({"seed": 7}))  # a file of that name wins
    assert load_config("swin_l_22k.json").seed == 7
    with pytest.raises(ConfigError, match=r"config swin_x_22k does not exist: give a JSON file, or a shipped "
                                          r"recipe's name \(finetune/simmim_swin_b_224, .*swin_l_22k"):
        resolve_config("swin_x_22k")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, installed without dependencies into a fresh venv that reads the dependencies from this
    environment (a .pth line: their files, not this checkout's editable `pretrain`, whose finder a .pth inside
    an added folder never runs); a venv of its own for torch and DeepSpeed would also rebuild DeepSpeed's CPU
    op against its own paths. Returns the venv's bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    site = subprocess.run([str(root / "venv/bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next((root / "dist").glob("swin_pretrain-*.whl"))
    pip = subprocess.run([str(root / "venv/bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return root / "venv" / "bin"


def test_the_wheel_holds_the_recipes_and_the_slurm_script(installed):
    wheel = next(installed.parent.parent.glob("dist/swin_pretrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(n for n in names if n.startswith("pretrain/recipes/") and n.endswith(".json"))
    assert len(recipes) == len(recipe_names()) and "pretrain/recipes/finetune/swin_b_22kto1k_384.json" in recipes
    assert "pretrain/cli/pretrain.sbatch" in names and "pretrain/data/csrc/jpeg_roi.c" in names
    assert not any(n.startswith(("tests/", "launch/", "configs/", "benchmarks/")) for n in names)


@pytest.mark.demo
@pytest.mark.slow
def test_the_installed_commands_run_from_an_empty_directory(installed, tmp_path):
    """swin-demo (shortened) writes runs/ with its curves in the directory it runs in; swin-finetune
    --eval-only evaluates its export; missing weights or data are named; swin-pretrain finds a recipe by
    name; the sbatch script prints. All with the wheel's `pretrain`, never this checkout's."""
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(installed / cmd[0]), *cmd[1:]], cwd=work, env=env, capture_output=True, text=True,
                           timeout=900)
        assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
        return r
    where = run("python", "-c", "import pretrain; print(pretrain.__file__)").stdout.strip()
    assert where.startswith(str(installed.parent)), where  # the wheel's files, not the checkout
    demo = run("swin-demo", "--pretrain-steps", "4", "--finetune-epochs", "1")
    assert "[5/5] results" in demo.stdout and "fine-tuned   top-1" in demo.stdout, demo.stdout[-2000:]
    assert (work / "runs" / "demo_curves.png").stat().st_size > 10_000
    assert (work / "runs" / "data" / "shards" / "_info.json").exists()
    export = work / "runs" / "swin_tiny_cpu_ft" / "export" / "finetuned.ours.safetensors"
    ev = run("swin-finetune", "--config", "finetune/swin_tiny_cpu", "--res", "96", "--window", "6", "--eval-only",
             "--pretrained", str(export.relative_to(work)), "--data", "runs/data/shards")
    assert "top-1" in ev.stdout and "on 80 images" not in ev.stderr, ev.stdout[-2000:]
    missing_w = run("swin-finetune", "--res", "384", "--pretrained", "nowhere.pth", "--data", "runs/data/shards",
                    ok=False)
    assert missing_w.returncode == 2 and "nowhere.pth" in missing_w.stderr.strip().splitlines()[-1]
    missing_d = run("swin-finetune", "--config", "finetune/swin_tiny_cpu", "--res", "96", "--window", "6",
                    "--pretrained", str(export), "--data", "no_shards", "--output", "runs/ft2", ok=False)
    assert missing_d.returncode == 2 and "no_shards" in missing_d.stderr.strip().splitlines()[-1]
    recipe = run("swin-pretrain", "--config", "swin_l_22k", "--set", "data.train=x/_info.json", "model.window_size=0",
                 ok=False)  # the recipe is read (its key refused), not "does not exist"
    assert recipe.returncode == 2 and "model.window_size must be >= 1" in recipe.stderr, recipe.stderr
    sbatch = run("swin-pretrain", "--print-sbatch").stdout
    assert sbatch.startswith("#!/bin/bash") and "srun" in sbatch and "-m pretrain.cli.train" in sbatch
