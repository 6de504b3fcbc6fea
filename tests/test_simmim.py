"""SimMIM: the model against the official code, checkpoints in and out, masks, configuration errors.

Reference numbers: tests/fixtures/simmim_v{1,2}.pth, made by tests/fixtures/make_simmim_reference.py with the
official code (microsoft/Swin-Transformer @ f82860b: models/simmim.py, data/data_simmim_pt.py MaskGenerator,
utils_simmim.load_pretrained with SciPy 1.13's interp2d) on a small Swin with perturbed weights.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from pretrain.data.masks import MaskGenerator
from pretrain.models import build_model, build_simmim
from pretrain.models.simmim import norm_targets, to_official
from pretrain.weights import (CheckpointMismatchError, export, geometric_positions, load_pretrained,
                              read_checkpoint, spline_matrix)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ARCH = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
PRETRAIN = {1: dict(variant="swin_tiny", window_size=6), 2: dict(variant="swinv2_tiny", window_size=12,
                                                                   norm_target_patch=47)}
FINETUNE = {1: dict(variant="swin_tiny", window_size=7), 2: dict(variant="swinv2_tiny", window_size=14,
                                                                   pretrained_window_sizes=(12, 12, 12, 6))}


def reference(version: int) -> dict:
    return torch.load(os.path.join(FIXTURES, f"simmim_v{version}.pth"), weights_only=True)


def simmim(version: int):
    p = dict(PRETRAIN[version])
    return build_simmim(p.pop("variant"), img_size=192, **p, **ARCH).eval()


@pytest.mark.parametrize("version", [1, 2])
def test_loss_and_reconstruction_equal_the_official_code(version):
    """Official SimMIM weights (V2 with the older `rpe_mlp` name) load strictly; on the same input and mask
    our loss and reconstruction equal the official ones to 1e-4 (V2: normalized targets, patch 47)."""
    ref = reference(version)
    model = simmim(version)
    report = load_pretrained(model, {"model": ref["model"]})
    assert report.layout.startswith("SimMIM (official")
    x, mask = ref["x"].float(), ref["mask"]
    with torch.no_grad():
        loss = model(x, mask)
        x_rec = model.reconstruct(x, mask)
    torch.testing.assert_close(x_rec, ref["x_rec"], atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, ref["loss"], atol=1e-4, rtol=0)
    # any integer or bool mask dtype gives the same loss
    with torch.no_grad():
        assert abs(model(x, mask.bool()).item() - loss.item()) < 1e-6
        assert abs(model(x, mask.long()).item() - loss.item()) < 1e-6


@pytest.mark.parametrize("version", [1, 2])
def test_finetune_load_equals_the_official_simmim_finetune(version):
    """A SimMIM checkpoint into a classifier at 224 (V1: window 6 -> 7, bias tables by the geometric spline;
    V2: window 14 with pretrained windows 12,12,12,6): pooled features equal the official fine-tune's
    (utils_simmim.load_pretrained) to 1e-4; the mask token and decoder are reported as dropped."""
    ref = reference(version)
    p = dict(FINETUNE[version])
    clf = build_model(p.pop("variant"), img_size=224, num_classes=10, **p, **ARCH).eval()
    report = load_pretrained(clf, {"model": ref["model"]})
    assert any("mask_token" in d and "decoder" in d for d in report.dropped), report
    assert any("head.fc" in r for r in report.reinitialized), report
    if version == 1:
        assert any("geometric" in r for r in report.resized), report
    with torch.no_grad():
        feat = clf.forward_features(ref["x_ft"].float())
    torch.testing.assert_close(feat, ref["feat_ft"], atol=1e-4, rtol=0)


def test_geometric_spline_matches_a_not_a_knot_cubic_spline():
    """The spline is SciPy's interp2d(kind='cubic') on a grid: FITPACK's s=0 cubic, i.e. the not-a-knot spline.
    Checked here against numpy's exact cubic fit where the spline must be exact: data from a cubic polynomial
    is reproduced to 1e-9, and a table resized to its own size is unchanged."""
    x, t = geometric_positions(11, 13)
    assert len(x) == 11 and len(t) == 13 and abs(x[-1] - 6) < 1e-4  # the progression reaches the new half-width
    cubic = np.poly1d([0.3, -0.2, 1.5, 0.7])
    np.testing.assert_allclose(spline_matrix(x, t) @ cubic(np.array(x)), cubic(np.clip(t, x[0], x[-1])), atol=1e-9)
    same = spline_matrix(list(range(-5, 6)), np.arange(-5, 6.0))
    np.testing.assert_allclose(same, np.eye(11), atol=1e-12)


def test_our_simmim_exports_in_our_official_and_encoder_layouts(tmp_path):
    """Export -> load round trips: ours (with the SimMIM settings), the official SimMIM layout (its keys as the
    official state dict names them) and the plain encoder (loads into a classifier, and into timm's layout)."""
    ref = reference(2)
    model = simmim(2)
    load_pretrained(model, {"model": ref["model"]})
    official = to_official(model)
    want = {k.replace("rpe_mlp", "cpb_mlp") for k in ref["model"]}
    assert set(official) == want
    x, mask = ref["x"].float(), ref["mask"]
    with torch.no_grad():
        loss = model(x, mask)
    for layout in ("ours", "official"):
        path = export(model, str(tmp_path / f"m.{layout}.safetensors"), layout=layout)
        again = simmim(2)
        load_pretrained(again, path)
        with torch.no_grad():
            assert abs(again(x, mask).item() - loss.item()) < 1e-6, layout
    _, meta = read_checkpoint(str(tmp_path / "m.ours.safetensors"))
    assert meta["simmim"] == {"norm_target_patch": 47}
    path = export(model, str(tmp_path / "m.encoder.safetensors"), layout="encoder")
    sd, _ = read_checkpoint(path)
    assert not any(k.startswith(("encoder.", "decoder.", "mask_token")) for k in sd)
    clf = build_model("swinv2_tiny", img_size=192, window_size=12, num_classes=0, **ARCH).eval()
    load_pretrained(clf, path)
    torch.testing.assert_close(clf.forward_tokens(x, mask, model.mask_token), model.encoder.forward_tokens(
        x, mask, model.mask_token), atol=0, rtol=0)
    # Issue 35: the encoder export, documented for any fine-tune, loads into a classifier as the SimMIM
    # checkpoint it came from does (the head kept at its init), not as a checkpoint missing head.fc.*
    head = build_model("swinv2_tiny", img_size=192, window_size=12, num_classes=10, **ARCH)
    init = head.head.fc.weight.detach().clone()
    report = load_pretrained(head, path)
    assert report.layout.startswith("SimMIM (") and "head.fc: kept the model's init" in str(report)
    assert torch.equal(head.head.fc.weight, init)
    torch.testing.assert_close(head.forward_features(x), clf.forward_features(x), atol=0, rtol=0)


def test_a_plain_swin_checkpoint_into_simmim_needs_strict_false():
    swin = build_model("swin_tiny", img_size=192, window_size=6, num_classes=0, **ARCH)
    model = simmim(1)
    with pytest.raises(CheckpointMismatchError, match="mask_token"):
        load_pretrained(model, swin.state_dict())
    report = load_pretrained(model, swin.state_dict(), strict=False)
    assert any("decoder.0.weight" in r for r in report.reinitialized)


def test_mask_generator_is_the_official_one_and_seeded():
    """MaskGenerator(192, 32, 4, 0.6): ceil(0.6*36) = 22 of the 6x6 mask patches, each 8x8 tokens (official);
    the same seed gives the same mask."""
    gen = MaskGenerator(192, 32, 4, 0.6)
    m = gen(np.random.default_rng(3))
    assert m.shape == (48, 48) and m.dtype == np.uint8
    assert m.sum() == 22 * 64
    assert (m.reshape(6, 8, 6, 8) == m.reshape(6, 8, 6, 8)[:, :1, :, :1]).all()  # constant per 8x8 block
    np.testing.assert_array_equal(gen(np.random.default_rng(3)), m)


@pytest.mark.parametrize("kw, key", [
    (dict(img_size=200), "mask_patch_size=32 does not divide the image size 200"),
    (dict(mask_patch_size=30), "mask_patch_size=30 does not divide"),
    (dict(img_size=192, mask_patch_size=6), "mask_patch_size=6 is not a multiple of the model's patch size 4"),
    (dict(mask_ratio=1.0), "mask_ratio=1.0 must be in"),
    (dict(mask_ratio=0.0), "mask_ratio=0.0 must be in"),
])
def test_a_bad_mask_configuration_is_refused_naming_the_key(kw, key):
    args = dict(img_size=192, mask_patch_size=32, mask_ratio=0.6) | kw
    with pytest.raises(ValueError, match=key):
        MaskGenerator(args["img_size"], args["mask_patch_size"], 4, args["mask_ratio"])


def test_norm_targets_zero_mean_unit_variance_inside():
    """Away from the borders a pixel's normalized value is (x - local mean) / local std (unbiased)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 15, 15)
    y = norm_targets(x, 5)
    win = x[0, 0, 5:10, 5:10]
    want = (x[0, 0, 7, 7] - win.mean()) / (win.var(unbiased=True) + 1e-6) ** 0.5
    assert abs(y[0, 0, 7, 7].item() - want.item()) < 1e-5


# ---------------------------------------------------------------------------------- training, in one process
def test_simmim_trains_resumes_evaluates_and_exports_in_one_process(unlabelled_shards, tmp_path):
    """An unlabelled set trains with task simmim through the one Trainer: a run resumed at update 2 gives the
    same losses for updates 3-6 (to 1e-6: masks and crops are seeded per sample); evaluation reports the masked
    reconstruction loss over all 16 validation images and writes the picture; the run exports in the SimMIM
    layouts and its encoder loads into a classifier."""
    import json
    from PIL import Image
    from pretrain.config import load_config
    from pretrain.training import Trainer
    from pretrain.weights import export_run
    from conftest import simmim_config

    def config(run: str):
        cfg = simmim_config(unlabelled_shards, tmp_path / run, optim={"max_steps": 6, "zero_stage": None,
                                                                      "precision": "fp32"},
                            checkpoint={"every_steps": 2, "keep": 5})
        return load_config(cfg["_path"], ["backend=accelerate", f"data.val={unlabelled_shards}", "data.workers=0"])

    first = Trainer(config("a"))
    assert first.task.name == "simmim"
    result = first.fit()
    losses = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 5 for v in losses.values())
    assert result["val_samples"] == 16 and 0 < result["val_loss"] < 5
    png = sorted((tmp_path / "a" / "reconstructions").glob("*.png"))
    assert png and Image.open(png[-1]).size == (3 * 32, 4 * 32)  # original | masked | reconstruction, 4 rows
    again = config("a")
    resumed = Trainer(again, resume=str(tmp_path / "a" / "checkpoints" / "step00000002"))
    resumed.fit()
    after = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in r}
    for step in (3, 4, 5, 6):
        assert after[step] == pytest.approx(losses[step], abs=1e-6), (step, after[step], losses[step])
    paths = export_run(str(tmp_path / "a"), layouts=None)
    layouts = sorted(p.rsplit(".", 2)[1] if p.endswith(".safetensors") else p.rsplit(".", 1)[1] for p in paths)
    assert layouts == ["encoder", "official", "ours", "transformers"]  # transformers: a folder
    encoder = next(p for p in paths if ".encoder." in p)
    clf = build_model("swin_tiny", img_size=32, window_size=4, num_classes=8, embed_dim=16, depths=(1, 1),
                      num_heads=(1, 2))
    report = load_pretrained(clf, encoder, reset_head=True)
    assert report.reinitialized and not report.dropped
    ours = next(p for p in paths if ".ours." in p)
    _, meta = read_checkpoint(ours)
    assert meta["simmim"] == {"norm_target_patch": None}


def test_unlabelled_shards_are_refused_for_classification_naming_the_fix(unlabelled_shards):
    from pretrain.data.loader import LoaderConfig, ShardLoader
    from pretrain.data.manifest import DataError
    with pytest.raises(DataError, match="unlabelled .* task=simmim"):
        ShardLoader(LoaderConfig(unlabelled_shards, batch_size=8, workers=1))


def test_an_official_v2_simmim_file_says_its_windows_and_architecture(tmp_path):
    """The windows the fine-tune needs come off the official SimMIM file's coordinate tables (the issue's
    `invalid literal for int() ... 'layers'` was this read); its architecture reads off its encoder."""
    from pretrain.weights import config_from_checkpoint, pretrained_windows_of
    path = tmp_path / "simmim_v2_official.pth"
    torch.save({"model": reference(2)["model"]}, path)
    assert pretrained_windows_of(str(path)) == (12, 12, 12, 6)
    cfg = config_from_checkpoint(str(path))
    assert (cfg.version, cfg.embed_dim, cfg.depths, cfg.window_size, cfg.num_classes) == (2, 8, (2, 2, 2, 2), 12, 0)


# ------------------------------------------------------------------------------------------ configuration
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_simmim_configs_carry_the_official_recipes():
    """configs/simmim_*.json against microsoft/Swin-Transformer configs/simmim/*.yaml (and config.py's defaults
    for what the yaml leaves out: clip 5, weight decay 0.05, the lr scaled per 512 images)."""
    from finetune.config import load_finetune_config
    from pretrain.config import load_config
    v1 = load_config(os.path.join(REPO, "configs/simmim_swin_b_192.json"))
    v2 = load_config(os.path.join(REPO, "configs/simmim_swinv2_b_192.json"))
    for c, window in ((v1, 6), (v2, 12)):
        o = c.optim
        assert c.task == "simmim" and c.model.img_size == 192 and c.model.window_size == window
        assert (o.epochs, o.warmup_epochs, o.base_lr, o.warmup_lr, o.weight_decay, o.clip_grad) == (
            800, 10, 1e-4, 5e-7, 0.05, 5.0)
        assert (o.schedule, o.decay_epochs, o.decay_rate, o.lr_scale_batch) == ("multistep", [700], 0.1, 512)
        assert (c.simmim.mask_patch_size, c.simmim.mask_ratio) == (32, 0.6)
        assert tuple(c.simmim.crop_scale) == (0.67, 1.0) and c.aug.interpolation == "bilinear"
    assert (v1.model.drop_path_rate, v1.simmim.norm_target_patch) == (0.0, 0)
    assert (v2.model.drop_path_rate, v2.simmim.norm_target_patch) == (0.1, 47)
    f1 = load_finetune_config(os.path.join(REPO, "configs/finetune/simmim_swin_b_224.json"))
    f2 = load_finetune_config(os.path.join(REPO, "configs/finetune/simmim_swinv2_b_224.json"))
    for f, window, ld in ((f1, 7, 0.8), (f2, 14, 0.75)):
        o = f.optim
        assert (f.model.img_size, f.model.window_size, f.finetune.layer_decay) == (224, window, ld)
        assert (o.epochs, o.warmup_epochs, o.base_lr, o.warmup_lr, o.min_lr) == (100, 20, 1.25e-3, 2.5e-7, 2.5e-7)
    assert f2.model.pretrained_window_sizes == [12, 12, 12, 6]


def test_multistep_schedule_is_the_official_one():
    """The official MultiStepLRScheduler (lr_scheduler.py): t < warmup: warmup_lr + t * (lr - warmup_lr) / warmup;
    after: lr * gamma ** (number of milestones <= t), milestones = epochs * updates per epoch."""
    import bisect
    from pretrain.config import load_config
    from pretrain.training.optim import build_scheduler
    cfg = load_config(None, ["task=simmim", "model.img_size=192", "optim.schedule=multistep", "optim.epochs=8",
                             "optim.decay_epochs=[5, 7]", "optim.warmup_epochs=1", "optim.global_batch=512"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg.optim, updates_per_epoch=10)
    base, warm = cfg.lr, cfg.optim.warmup_lr
    for t in range(80):
        sched.step_update(t)
        want = warm + t * (base - warm) / 10 if t < 10 else base * 0.1 ** bisect.bisect_right([50, 70], t)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), t


@pytest.mark.parametrize("override, message", [
    ("simmim.mask_patch_size=40", "simmim.mask_patch_size=40 does not divide the image size 192"),
    ("simmim.mask_patch_size=6", "simmim.mask_patch_size=6 is not a multiple of the model's patch size 4"),
    ("simmim.mask_ratio=1.2", "simmim.mask_ratio=1.2 must be in (0, 1)"),
    ("simmim.norm_target_patch=46", "simmim.norm_target_patch=46 must be 0 (off) or an odd window"),
    ("aug.mixup=0", "aug.mixup act(s) nowhere with task=simmim"),
    ("model.num_classes=10", "model.num_classes=10 acts nowhere with task=simmim"),
])
def test_a_bad_simmim_config_is_one_line_naming_the_key(capsys, override, message):
    from pretrain.cli import train
    rc = train.main(["--config", os.path.join(REPO, "configs/simmim_swin_b_192.json"), "--set", override])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines


def test_simmim_keys_in_a_classification_run_and_simmim_fine_tuning_are_refused():
    from finetune.config import load_finetune_config
    from pretrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="simmim.mask_ratio act.* only with task=simmim"):
        load_config(os.path.join(REPO, "configs/swin_tiny_cpu.json"), ["simmim.mask_ratio=0.5"])
    with pytest.raises(ConfigError, match="fine-tuning trains a classifier"):
        load_finetune_config(os.path.join(REPO, "configs/finetune/swin_tiny_cpu.json"), ["task=simmim"])


def test_make_shards_no_labels_writes_and_verifies_an_unlabelled_folder(capsys, tmp_path):
    """`make_shards write --no-labels` over nested folders and loose files: jpg + json samples, no cls, a manifest
    that says so, and `verify` passes; without the flag a folder of loose images names --no-labels."""
    import json
    from PIL import Image
    from pretrain.cli import make_shards
    src = tmp_path / "photos"
    (src / "a" / "b").mkdir(parents=True)
    for i, d in enumerate([src, src / "a", src / "a" / "b"] * 3):
        Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(d / f"img{i}.jpg")
    assert make_shards.main(["write", str(src), str(tmp_path / "out"), "--no-labels", "--samples-per-shard", "4",
                             "--val-per-class", "1", "--no-progress"]) == 0
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["labelled"] is False and info["num_classes"] == 0
    assert info["splits"]["train"]["num_samples"] == 8 and info["splits"]["validation"]["num_samples"] == 1
    from pretrain.data.loader import iter_samples
    with open(tmp_path / "out" / info["splits"]["train"]["filenames"][0], "rb") as f:
        members = {k for _, sample in iter_samples(f) for k in sample}
    assert members == {"jpg", "json"}
    assert make_shards.main(["verify", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert make_shards.main(["write", str(src), str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "outside the class folders (e.g. img0.jpg): for an unlabelled set (SimMIM) pass --no-labels" in capsys.readouterr().err


def test_the_picture_of_a_normalized_target_model_and_a_loader_mask_error():
    """The evaluation picture (rows: images; columns: original | masked | reconstruction) with normalized
    targets (V2 recipe) is drawn back in pixel space; the task's loader targets with a bad mask are a DataError
    naming the key."""
    from pretrain.config import load_config
    from pretrain.data.manifest import DataError
    from pretrain.tasks import MaskedImageModeling
    cfg = load_config(None, ["task=simmim", "model.img_size=32", "simmim.mask_patch_size=8",
                             "simmim.norm_target_patch=5"])
    task = MaskedImageModeling(cfg, torch.device("cpu"))
    model = build_simmim("swinv2_tiny", img_size=32, window_size=4, mask_patch_size=8, norm_target_patch=5,
                         embed_dim=8, depths=(1, 1), num_heads=(1, 2)).eval()
    gen = MaskGenerator(32, 8, 4, 0.6)
    masks = torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(3)]))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        counts = task.eval_counts(model, (images, masks, torch.ones(3, dtype=torch.bool)))
        picture = task.picture(model)
    assert counts[2] == 3 and counts[1] == masks.sum() * 16  # masked pixels: 16 per masked token
    assert picture.shape == (3 * 32, 3 * 32, 3) and picture.dtype == np.uint8
    visible = (masks[0].repeat_interleave(4, 0).repeat_interleave(4, 1) == 0).numpy()
    np.testing.assert_array_equal(picture[:32, 64:][visible], picture[:32, :32][visible])  # input where visible
    with pytest.raises(DataError, match=r"simmim.mask_patch_size=12 does not divide the image size 32"):
        MaskedImageModeling.targets(replace(cfg, simmim=replace(cfg.simmim, mask_patch_size=12)))
