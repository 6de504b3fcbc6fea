"""Nothing lost, nothing silent, round two (issue 22): run identity, incomplete or damaged checkpoints, config
values checked at load, labels against the model, short shards, and the writer's output inside its source.
Real files, real shards, real processes for the lock."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.weights import CheckpointError, v2_windows
from pretrain.config import ConfigError, load_config
from pretrain.data.loader import DataError, LoaderConfig, build_loader
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder
from pretrain.data.targets import Labels
from pretrain.data.transforms import AugConfig
from pretrain.models.layers import log_spaced_coords
from pretrain import runs as ckpt

from conftest import REPO, base_config, launch, losses, need, python

AUG = AugConfig(img_size=32, auto_augment=None)
CPU_CONFIG = str(REPO / "configs/swin_tiny_cpu.json")


@pytest.fixture(scope="module")
def rel_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel")
    make_image_folder(str(root / "imgs"), num_classes=4, per_class=8, size=(48, 40))
    write_shards(WriteOptions(str(root / "imgs"), str(root / "s"), val_per_class=2, samples_per_shard=8),
                 progress=False)
    return root / "s"


# ---------------------------------------------------------------------------------------- config at load

@pytest.mark.parametrize("override,message", [
    (["model.depths=[2,2]", "model.num_heads=[1,2,3]"], r"depths \(2, 2\) and num_heads \(1, 2, 3\) differ"),
    (["model.embed_dim=16", "model.depths=[1,1]", "model.num_heads=[3,3]"], r"not divisible by num_heads\[0\]=3"),
    (["model.img_size=30"], r"img_size \(30, 30\) is not a multiple of the patch size 4"),
    (["model.variant=swinv2_tiny", "model.pretrained_window_sizes=[8,8,8]"], r"pretrained_window_sizes .* one per"),
    (["aug.mean=[0.5,0.5]"], r"aug.mean must be 3 numbers"),
    (["aug.std=[0.2,0,0.2]"], r"aug.std must be 3 numbers > 0"),
    (["aug.interpolation=cubic"], r"aug.interpolation must be one of"),
    (["optim.base_lr=Infinity"], r"optim.base_lr: must be a finite number"),
    (["model.num_classes=0"], r"model.num_classes must be >= 1"),
    (['deepspeed={"zero_optimization": {"stage": 3}}'], r"deepspeed.zero_optimization.stage=3 contradicts "
                                                         r"optim.zero_stage"),
    (['deepspeed={"bf16": {"enabled": false}}'], r"deepspeed.bf16.enabled=False contradicts optim.precision"),
    (['deepspeed={"optimizer": {"type": "Adam"}}'], r"deepspeed.optimizer: the optimizer is built from"),
])
def test_values_that_would_fail_later_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CPU_CONFIG, override)


def test_an_unknown_randaugment_spec_is_refused_naming_the_key():
    from pretrain.data.aug_checks import auto_augment_check
    ok, msg = auto_augment_check("rand-x9")
    assert not ok and "aug.auto_augment='rand-x9' is not a timm augmentation spec" in msg
    assert auto_augment_check("rand-m9-mstd0.5-inc1") == (True, "") and auto_augment_check(None)[0]


# ------------------------------------------------------------------------------------------- run identity

HOLD = ("import sys, time; from pretrain.runs import RunLock; "
        "l = RunLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)")


def test_a_run_dir_holds_one_run_and_a_dead_holders_lock_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(ckpt.RunLockedError, match=rf"is in use by another run \(host .*, pid {holder.pid}"):
            ckpt.RunLock(str(tmp_path)).acquire()
        assert time.time() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
    lock = ckpt.RunLock(str(tmp_path))  # the holder died (as a requeued or crashed job): its lock went with it
    lock.acquire()
    assert f"pid {__import__('os').getpid()}" in (tmp_path / ".run.lock").read_text()
    lock.release()


def test_a_fresh_run_with_another_checkpoint_dir_is_refused_where_a_run_finished(tmp_path):
    old_ckpt = tmp_path / "elsewhere"
    (old_ckpt / "step00000004").mkdir(parents=True)
    ckpt.mark_complete(str(old_ckpt), "step00000004", "{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"run_dir": str(tmp_path / "run"),
                                                              "checkpoint": {"dir": str(old_ckpt)}}))
    with pytest.raises(ckpt.RunExistsError, match=r"already holds a run \(checkpoints in .*elsewhere"):
        ckpt.refuse_existing_run(str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints"))


# ------------------------------------------------------------------------------------------- checkpoints

def _tags(ckpt_dir: Path) -> None:
    for step in (2, 4):
        tag = ckpt.tag_for(step)
        (ckpt_dir / tag).mkdir(parents=True)
        (ckpt_dir / tag / "zero_pp_rank_1_optim_states.pt").write_bytes(b"x" * 100)
        (ckpt_dir / tag / "rng_rank1.pt").write_bytes(b"r" * 10)
        ckpt.mark_complete(str(ckpt_dir), tag, "{}")
    (ckpt_dir / "step00000006").mkdir()  # a save that never finished


def test_incomplete_missing_or_damaged_tags_are_refused_naming_the_file(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    _tags(d)
    with pytest.raises(ckpt.IncompleteCheckpointError, match=r"step00000006 is not marked complete.*newest complete "
                                                             r"one is .*step00000004"):
        ckpt.require_complete(str(d), "step00000006")
    ckpt.check_files(str(d), "step00000004")  # whole
    (d / "step00000004" / "rng_rank1.pt").unlink()
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"rng_rank1.pt is missing"):
        ckpt.check_files(str(d), "step00000004")
    (d / "step00000002" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"x" * 40)  # truncated
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"zero_pp_rank_1_optim_states.pt has 40 bytes, written "
                                                          r"with 100"):
        ckpt.check_files(str(d), "step00000002")
    # The documented export command names a tag of a run dir: found in its checkpoints/, complete or refused.
    assert ckpt.resolve_tag(str(tmp_path / "run"), "step00000004") == (str(d), "step00000004")
    with pytest.raises(ckpt.IncompleteCheckpointError, match="step00000006 is not marked complete"):
        ckpt.resolve_tag(str(tmp_path / "run"), "step00000006")
    r = python("-m", "pretrain.cli.release", str(tmp_path / "run"), "--tag", "step00000009")
    assert r.returncode == 2 and "step00000009 does not exist" in r.stderr and "Traceback" not in r.stderr


def test_a_damaged_v2_coordinates_table_is_refused_not_read_as_a_window():
    good = {"layers.0.blocks.0.attn.relative_coords_table": log_spaced_coords((8, 8), (12, 12))}
    assert v2_windows(good) == {0: (8, 12)}
    damaged = good["layers.0.blocks.0.attn.relative_coords_table"].clone()
    damaged[0, 3, 5, 1] += 0.3
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.relative_coords_table: not the log-spaced coordinates"):
        v2_windows({"layers.0.blocks.0.attn.relative_coords_table": damaged})


# ------------------------------------------------------------------------------------------------ data

def cfg(source, **kw):
    return LoaderConfig(str(source), **{"batch_size": 4, "workers": 0, "aug": AUG, "retries": 1,
                                        "retry_backoff_s": 0.01, **kw})


def test_labels_outside_the_model_are_refused_naming_shard_and_key(rel_shards):
    with pytest.raises(DataError, match=r"its manifest says 4 classes, more than the model's 3"):
        build_loader(cfg(rel_shards / "_info.json", targets=Labels(3)))
    info = json.loads((rel_shards / "_info.json").read_text())
    bare = rel_shards.parent / "bare"
    bare.mkdir()
    for f in info["splits"]["train"]["filenames"]:
        (bare / f).symlink_to(rel_shards / f)
    del info["num_classes"]
    (bare / "_info.json").write_text(json.dumps(info))  # foreign shards: no class count to compare with
    loader = build_loader(cfg(bare / "_info.json", targets=Labels(3), workers=2), 0, 1)
    with pytest.raises(DataError) as e:
        list(loader)
    msg = str(e.value)
    assert msg.startswith("rank 0: ") and "Traceback" not in msg and "\n" not in msg  # one line, from a worker
    assert "train-00000" in msg and "has label 3, outside the model's 3 classes" in msg


def test_a_shard_shorter_than_its_count_stops_training_when_read(rel_shards, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    info = json.loads((rel_shards / "_info.json").read_text())
    for f in info["splits"]["train"]["filenames"]:
        (out / f).symlink_to(rel_shards / f)
    info["splits"]["train"]["shard_lengths"] = [n * 2 for n in info["splits"]["train"]["shard_lengths"]]
    info["splits"]["train"]["num_samples"] *= 2
    (out / "_info.json").write_text(json.dumps(info))  # inflated x2, no _index.parquet: the sizes still allow it
    with pytest.raises(DataError, match=r"train-00000\d.tar: 8 samples, but .* lists 16 for it"):
        list(build_loader(cfg(out / "_info.json"), 0, 1))
    skip = build_loader(cfg(out / "_info.json", on_bad_shard="skip"), 0, 1)
    assert len(list(skip)) == 12  # 2 x 24 listed: said, then re-read


def test_a_count_below_the_shards_real_size_is_refused_not_a_fixed_subset(rel_shards, caplog):
    """`PATTERN|COUNT` with COUNT under the real total (probe: |50 for 112) used to cut every shard at its
    estimate, always at the same samples. A piece ending at a shard's count reads one sample on."""
    files = json.loads((rel_shards / "_info.json").read_text())["splits"]["train"]["filenames"]
    assert len(files) == 3  # 24 samples, 8 each
    pattern = str(rel_shards / files[0]).replace("000000.tar", "{000000..000002}.tar")
    with pytest.raises(DataError, match=r"train-00000\d.tar: more than the 4 samples .*\|12 counts for it, so "
                                        r"the rest would never be read; give the split's real total after '\|'"):
        list(build_loader(cfg(pattern + "|12"), 0, 1))
    skip = build_loader(cfg(pattern + "|12", on_bad_shard="skip", return_keys=True), 0, 1)
    assert len({k for b in skip for k in b[-1]}) == 12  # trains on the counted samples, and says so
    assert "only its first 4 samples are read" in caplog.text
    whole = build_loader(cfg(pattern + "|24", return_keys=True, batch_size=8), 0, 1)
    assert len({k for b in whole for k in b[-1]}) == 24  # the real total: every sample, no error


def test_the_writer_refuses_an_output_inside_its_source(rel_shards):
    src = str(rel_shards.parent / "imgs")
    with pytest.raises(DataError, match="is inside the source"):
        write_shards(WriteOptions(src, src + "/shards"), progress=False)
    assert not (rel_shards.parent / "imgs" / "shards").exists()


def test_convert_of_one_damaged_tensor_names_it_alone(tmp_path):
    """One tensor of a good checkpoint with a wrong shape: the error names that one and says the
    architecture fits (not a hint that describes checkpoint and model in the same words)."""
    import safetensors.torch as st
    from pretrain.models import build_model
    sd = build_model("swin_tiny", img_size=64, window_size=4, num_classes=5, embed_dim=32, depths=(2, 2),
                     num_heads=(2, 4)).state_dict()
    sd["layers.1.blocks.0.attn.qkv.weight"] = torch.zeros(195, 64)
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    r = python("-m", "pretrain.cli.convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "out.safetensors"),
               "--layout", "timm")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "shape mismatches: layers.1.blocks.0.attn.qkv.weight (195, 64) vs model (192, 64)\n" in r.stderr
    assert "only the 1 tensor(s) named above disagree" in r.stderr and "Build the matching variant" not in r.stderr
    sd["patch_embed.proj.weight"] = torch.zeros(35, 3, 4, 4)  # read as embed_dim 35: no architecture fits
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    r = python("-m", "pretrain.cli.convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "out.safetensors"),
               "--layout", "timm")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not fit together" in r.stderr


@pytest.mark.dist
@pytest.mark.launcher
def test_two_runs_started_in_one_run_dir_one_runs_the_other_is_refused(shards, tmp_path):
    """The real DeepSpeed launcher, 2 ranks each: the second run in the same run dir is refused naming the
    holder, and the first finishes with its checkpoints and metrics intact."""
    cfg = base_config(shards, tmp_path / "run", optim={"max_steps": 6}, checkpoint={"every_steps": 2, "keep": 5})
    go = tmp_path / "go"  # the first run waits after its first update until this exists
    first = launch(cfg, faults={"pause_until": str(go)}, wait=False)
    try:
        for line in first.stdout:  # wait until it trains
            if "first update after" in line:
                break
        second = launch(cfg)
        assert first.poll() is None, "the first run ended before the second started: nothing was tested"
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert "is in use by another run (host " in second.stderr and "Traceback" not in second.stderr
        assert second.stderr.count("error: ") == 1  # one line, from one rank
        go.touch()
        rest, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, rest[-3000:]
    assert sorted(losses(cfg["run_dir"])) == [1, 2, 3, 4, 5, 6]
    ckpts = Path(cfg["run_dir"], "checkpoints")
    assert sorted(t.name for t in ckpts.glob("step*")) == [f"step{s:08d}" for s in (2, 4, 6)]
    assert all((t / "COMPLETE").exists() for t in ckpts.glob("step*"))


def test_eval_only_refuses_weights_without_a_head_for_the_model(rel_shards, tmp_path):
    from pretrain.weights import export
    from pretrain.models import build_model
    w = export(build_model("swin_tiny", img_size=64, window_size=4, num_classes=10, embed_dim=32, depths=(2, 2),
                           num_heads=(2, 4)), str(tmp_path / "w.safetensors"))
    run = lambda *extra: python(  # noqa: E731
        "finetune/run.py", "--config", "configs/finetune/swin_tiny_cpu.json", "--eval-only", "--res", "64",
        "--window", "4", "--pretrained", w, "--data", str(rel_shards), "--set", "data.workers=0",
        "model.num_classes=6", *extra, timeout=300)
    r = run()
    assert r.returncode == 2 and "has no trained head for this model" in r.stderr and "Traceback" not in r.stderr
    assert "--allow-random-head" in r.stderr
    assert run("--allow-random-head").returncode == 0


def test_resuming_with_a_changed_architecture_names_the_keys(tmp_path):
    saved = load_config(CPU_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    now = load_config(CPU_CONFIG, ["model.window_size=3", "model.drop_path_rate=0.0"])
    with pytest.raises(ConfigError, match=r"architecture changed since it was saved \(model.window_size: "):
        ckpt.check_same_architecture(now.to_dict(), str(tmp_path / "config.json"))
    ckpt.check_same_architecture(load_config(CPU_CONFIG, ["model.drop_path_rate=0.0"]).to_dict(),
                                str(tmp_path / "config.json"))


@pytest.fixture
def mounted(tmp_path):
    """A read-only bind mount and a 64 KiB tmpfs (real filesystems that refuse writes), as root (CI is)."""
    need(os.geteuid() == 0, "root, to mount a read-only bind and a tiny tmpfs")
    ro, full = tmp_path / "ro", tmp_path / "full"
    (tmp_path / "src").mkdir()
    ro.mkdir()
    full.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    yield ro, full
    subprocess.run(["umount", str(ro)], check=False)
    subprocess.run(["umount", str(full)], check=False)


@pytest.mark.root
def test_read_only_run_dir_and_full_disk_are_one_line_errors(mounted):
    from pretrain.io import write_bytes_atomic
    from pretrain.cli import user_error
    ro, full = mounted
    with pytest.raises(ckpt.RunLockedError, match=r"run_dir .*ro/run can't be written \(Read-only file system\)"):
        ckpt.RunLock(str(ro / "run")).acquire()
    with pytest.raises(OSError) as e:
        write_bytes_atomic(str(full / "ckpt.bin"), b"x" * 200_000)
    line = user_error(e.value)
    assert line is not None and "no space left on the device" in line and "ENOSPC" in line
    assert not (full / "ckpt.bin").exists()  # nothing written half: the temp file never became the name
    # torch.save (DeepSpeed's checkpoint writer) says only "PytorchStreamWriter failed writing file": on a
    # full disk it becomes the same line.
    from pretrain.io import save_failure
    with pytest.raises(RuntimeError) as e:
        torch.save({"w": torch.zeros(100_000)}, str(full / "mp_rank_00_model_states.pt"))
    line = user_error(save_failure(e.value, str(full / "step00000004")))
    assert line is not None and "no space left on the device" in line and "step00000004" in line
    del e  # its traceback holds torch's open writer: the tmpfs can't be unmounted while it lives
    import gc
    gc.collect()


# ------------------------------------------------------------ issue 35 (the third probe): requests honoured or refused

def _one_line(capsys, rc: int, needle: str) -> None:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_a_flag_out_of_range_is_refused_not_replaced_by_a_default(capsys):
    """`--window 0` used to become res/32 without a word; `--epochs 0` the config's epochs."""
    from finetune.run import main
    _one_line(capsys, main(["--res", "96", "--window", "0"]), "model.window_size must be >= 1, got 0")
    _one_line(capsys, main(["--res", "96", "--epochs", "0"]), "optim.epochs must be >= 1, got 0")


@pytest.mark.parametrize("size,square,ratio", [(32, 32, 0.6), (32, 16, 0.9)])
def test_a_mask_ratio_that_masks_every_square_is_refused(size, square, ratio):
    """ceil(ratio x squares) = every square: the model would reconstruct from nothing."""
    with pytest.raises(ConfigError, match=rf"simmim.mask_ratio={ratio} masks all \d+ squares of {square} px"):
        load_config(None, ["task=simmim", f"model.img_size={size}", f"simmim.mask_patch_size={square}",
                           f"simmim.mask_ratio={ratio}"])
    assert load_config(None, ["task=simmim", "model.img_size=32", "simmim.mask_patch_size=16",
                              "simmim.mask_ratio=0.7"]).simmim.mask_ratio == 0.7  # 3 of 4 squares: fine


def _run_of(tmp_path: Path, name: str, cfg, model: torch.nn.Module) -> Path:
    """A run dir with one complete tag holding `model`'s weights, as the accelerate backend writes it."""
    tag = tmp_path / name / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    ckpt.write_state(str(tag / "model.safetensors"), model.state_dict())
    ckpt.mark_complete(str(tag.parent), tag.name, json.dumps(cfg.to_dict()))
    return tmp_path / name


def test_an_export_layout_the_run_cannot_write_is_refused_in_one_line(capsys, tmp_path):
    """A SimMIM run asked for timm's layout used to write its other three; a classifier asked for `encoder`
    raised a traceback; an ape model asked for timm's wrote nothing. All exit 0 before."""
    from pretrain.cli import release
    from pretrain.tasks import task_class
    sets = ["backend=accelerate", "optim.zero_stage=null"]
    mim = load_config(str(REPO / "configs/simmim_tiny_cpu.json"), sets)
    clf = load_config(CPU_CONFIG, sets)
    ape = load_config(CPU_CONFIG, [*sets, "model.ape=true"])
    runs = {n: _run_of(tmp_path, n, c, task_class(c.task).model_for(c)) for n, c in
            (("mim", mim), ("clf", clf), ("ape", ape))}
    _one_line(capsys, release.main([str(runs["mim"]), "--layouts", "timm"]),
              "--layouts timm: a simmim run exports ours, official, encoder, transformers")
    _one_line(capsys, release.main([str(runs["clf"]), "--layouts", "encoder", "ours"]),
              "--layouts encoder: a classification run exports ours, timm, official, transformers")
    _one_line(capsys, release.main([str(runs["ape"]), "--layouts", "timm"]),
              "--layouts timm: this model has absolute position embeddings")
    assert not any(p.name == "export" for r in runs.values() for p in r.iterdir())  # nothing written half
    assert release.main([str(runs["mim"]), "--layouts", "encoder"]) == 0


def test_verify_takes_the_manifest_itself(tmp_path, capsys):
    """`make_shards verify DIR/_info.json` used to raise NotADirectoryError; it checks DIR's shards."""
    from pretrain.cli import make_shards
    make_image_folder(str(tmp_path / "imgs"), num_classes=2, per_class=4, size=(32, 32))
    write_shards(WriteOptions(str(tmp_path / "imgs"), str(tmp_path / "s"), val_per_class=1, samples_per_shard=3),
                 progress=False)
    assert make_shards.main(["verify", str(tmp_path / "s" / "_info.json")]) == 0
    assert json.loads(capsys.readouterr().out)["bad_shards"] == []


def test_hints_name_the_flags_of_the_command_line_that_printed_them(rel_shards, tmp_path, capsys):
    """finetune/run.py used to advise `--allow-pickle` (a flag it rejects) and `reset_head=True` (a Python
    argument); each command line now names its own spelling, the library its Python one."""
    from finetune.run import main
    from pretrain.cli import convert
    from pretrain.weights import export
    from pretrain.models import build_model
    arch = {"img_size": 96, "window_size": 6, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4)}
    headless = export(build_model("swin_tiny", num_classes=0, **arch), str(tmp_path / "backbone.safetensors"), "timm")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": dict(build_model("swin_tiny", num_classes=4, **arch).state_dict()), "args": Path(".")},
               pickled)

    def finetune(weights) -> int:
        return main(["--config", "finetune/swin_tiny_cpu", "--data", str(rel_shards), "--num-classes", "4",
                     "--pretrained", str(weights), "--output", str(tmp_path / "ft"), "--epochs", "1",
                     "--set", "backend=accelerate", "data.workers=0"])
    _one_line(capsys, finetune(headless), "backbone.safetensors has no classifier (head.fc.bias, head.fc.weight): "
              "a backbone, else the model's 4-class head would be random; load it with --set "
              "finetune.reset_head=true for a new zero-initialized head")
    _one_line(capsys, finetune(pickled), "If you trust the file, pass --set finetune.allow_pickle=true, or convert")
    _one_line(capsys, convert.main([str(pickled), str(tmp_path / "out.safetensors"), "--layout", "ours"]),
              "If you trust the file, pass --allow-pickle, or convert")
    with pytest.raises(CheckpointError, match=r"load it with reset_head=True for a new"):
        from pretrain.weights import load_pretrained
        load_pretrained(build_model("swin_tiny", num_classes=4, **arch), headless)


@pytest.mark.dist
@pytest.mark.launcher
@pytest.mark.parametrize("launcher", ["deepspeed", "prelaunch"])
def test_a_rank_that_fails_alone_prints_its_cause_and_the_other_one_line(shards, tmp_path, launcher):
    """Issue 35: the peer of a rank that stopped printed 45-80 lines of gloo traceback (the useful line buried
    above it). Rank 1 meets a user error alone before update 3; rank 0, waiting in the gradient all-reduce,
    prints one line: another rank stopped (the broken collective), or it was stopped by SIGTERM (our test
    server, like torchrun, signals the survivors at once: before this, that could end rank 0 silently).
    Each rank: at most 3 lines after the cause, no traceback."""
    cfg = base_config(shards, tmp_path / "run", optim={"max_steps": 6})
    if launcher == "deepspeed":
        p = launch(cfg, ranks=2, faults={"fail": [3, 1]}, launcher="deepspeed", wait=False)
        out, _ = p.communicate(timeout=300)
        code = p.returncode
    else:
        r = launch(cfg, ranks=2, faults={"fail": [3, 1]})
        out, code = r.stdout + r.stderr, r.returncode
    lines = out.splitlines()
    assert code != 0 and "Traceback" not in out, out[-3000:]
    cause = next(i for i, x in enumerate(lines) if x == "error: rank 1: injected failure before update 3 (Faults.fail)")
    ours = [x for x in out.splitlines() if x.startswith("error: rank 0: ")]
    assert len(ours) == 1 and all(x.startswith(("error: rank 0: stopped because another rank did",
                                                      "error: rank 0: stopped by SIGTERM")) for x in ours), out[-3000:]
    after = [x for x in lines[cause + 1:] if x.strip() and "[launch.py:" not in x]  # the launcher's own lines
    assert len(after) <= 3 * 2, after


def test_a_missing_filesystem_package_and_a_refused_connection_are_one_line_naming_the_url(tmp_path):
    """`s3://` without s3fs was a raw ImportError; a refused HTTP connection read as "no such file"
    (fsspec raises FileNotFoundError for it). oci:// stands for any protocol whose package is absent (ocifs
    is in no extra of ours). A 404 from a real local HTTP server is still a missing file."""
    import http.server
    import threading
    from pretrain.cli import user_error
    from pretrain.data.manifest import resolve_split
    from pretrain.io import MissingPackageError, UnreadableError, read_bytes
    with pytest.raises(MissingPackageError) as e:
        resolve_split("oci://bucket/in22k", "train")
    line = user_error(e.value)
    assert line.startswith("oci://bucket/in22k") and "needs the optional package ocifs (pip install ocifs)" in line
    with pytest.raises(DataError, match=r"rank 0: oci://b/t-1.tar: reading oci:// needs the optional package ocifs"):
        list(build_loader(cfg("oci://b/t-{0..1}.tar|8", workers=1), 0, 1))
    with pytest.raises(UnreadableError, match=r"http://127.0.0.1:9/x.json: can't be read \(ClientConnectorError"):
        read_bytes("http://127.0.0.1:9/x.json")  # the discard port: nothing listens
    srv = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FileNotFoundError, match=r"nothing.json: no such file"):
            read_bytes(f"http://127.0.0.1:{srv.server_port}/nothing.json")
    finally:
        srv.shutdown()


def test_one_damaged_tensor_loses_the_vote_to_the_blocks_that_repeat_its_setting():
    """Issue 35: a bad fc1 in the first block redefined mlp_ratio, so the five good fc1/fc2 tensors were named
    as damaged; in a checkpoint with two bias tables a damaged one could win the window vote (the official
    relative_position_index buffers now settle it). Either way only the damaged tensor is named."""
    from pretrain.models import build_model
    from pretrain.models.swin import to_official
    from pretrain.weights import load_pretrained
    from pretrain.errors import CheckpointMismatchError
    arch = {"img_size": 64, "window_size": 4, "num_classes": 5, "embed_dim": 32, "num_heads": (2, 4)}
    sd = build_model("swin_tiny", depths=(2, 2), **arch).state_dict()
    sd["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(100, 32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_pretrained(build_model("swin_tiny", depths=(2, 2), **arch), sd)
    assert "shape mismatches: layers.0.blocks.0.mlp.fc1.weight (100, 32) vs model (128, 32)\n" in str(e.value)
    assert "only the 1 tensor(s) named above disagree" in str(e.value)
    off = to_official(build_model("swin_tiny", depths=(1, 1), **arch))
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    off[table] = torch.zeros(81, 2)  # window 5, the first of two tables
    with pytest.raises(CheckpointError, match=rf"don't fit the checkpoint's window 4 .*{table} \(81, 2\) \(window 5\)"):
        load_pretrained(build_model("swin_tiny", depths=(1, 1), **arch), off)
