"""Swin V2: the same logits as timm's swinv2 (its window and a transferred one), the official and timm
layouts, pretrained windows read off checkpoints, V1/V2 mix-ups refused, the demo at a larger window."""
import json
import re
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from pretrain.weights import CheckpointError, export, load_pretrained, pretrained_windows_of
from pretrain.models import build_model
from pretrain.training.optim import param_groups

from conftest import REPO, python

ARCH = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10, drop_path_rate=0.0)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values where the init is trivial (post-norms start at 0, logit scales all log 10)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm1." in name or ".norm2." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith(("logit_scale", "q_bias", "v_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (2.0 if name.endswith("logit_scale") else 0.0))
    return model


def v2(img=64, window=4, pretrained=(), **kw):
    torch.manual_seed(0)
    return randomized(build_model("swinv2_tiny", img_size=img, window_size=window, pretrained_window_sizes=pretrained,
                                  **{**ARCH, **kw})).eval()


def timm_v2(img, window, pretrained=(0, 0), **kw):
    return timm.create_model("swinv2_tiny_window8_256", img_size=img, window_size=window,
                             pretrained_window_sizes=pretrained, **{**ARCH, **kw}).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("img,window,pretrained", [(64, 4, ()), (96, 6, (4, 4)), (80, 6, (4, 4))])
def test_logits_equal_timm_at_its_window_and_a_transferred_one(img, window, pretrained, impl):
    ours = v2(img, window, pretrained, attn_impl=impl)  # 80 px: padded windows, a shrunk last stage
    ref = timm_v2(img, window, pretrained or (0, 0))
    ref.load_state_dict(ours.state_dict(), strict=True)  # timm's parameter names, by construction
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-4


def test_non_square_input_equals_timm():
    ours = v2((64, 96), 4)
    ref = timm_v2((64, 96), 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-4


def test_official_layout_round_trips_and_timm_reads_it(tmp_path):
    model = v2()
    path = export(model, str(tmp_path / "official.pth"), layout="official")
    sd = torch.load(path, weights_only=True)["model"]
    assert "layers.0.downsample.reduction.weight" in sd and "head.weight" in sd  # the official key layout
    keys = [k for k in sd if k.startswith("layers.0.blocks.0.attn.")]
    assert keys[:5] == [f"layers.0.blocks.0.attn.{n}" for n in ("logit_scale", "q_bias", "v_bias",
                                                                "relative_coords_table", "relative_position_index")]
    assert "layers.0.blocks.1.attn_mask" in sd and sd["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 7, 7, 2)
    back = build_model("swinv2_tiny", img_size=64, window_size=4, **ARCH).eval()
    report = load_pretrained(back, path)
    assert report.layout == "official" and any("relative_coords_table" in d or "buffers" in d for d in report.dropped)
    ref = timm.create_model("swinv2_tiny_window8_256", img_size=64, window_size=4, pretrained=True,
                            pretrained_cfg_overlay=dict(file=path, num_classes=10), **ARCH).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(back(x), want) and rel_err(ref(x), want) <= 1e-4


def test_timm_weights_load_strictly_with_a_readable_report():
    ref = randomized(timm_v2(64, 4))
    ours = build_model("swinv2_tiny", img_size=64, window_size=4, **ARCH).eval()
    report = load_pretrained(ours, ref.state_dict())
    assert report.layout == "timm"
    assert any("continuous position bias evaluated at window 4" in n for n in report.notes), str(report)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-4


def test_pretrained_windows_are_read_off_checkpoints(tmp_path):
    pre = export(v2(64, 4), str(tmp_path / "pre.pth"), layout="official")
    assert pretrained_windows_of(pre) == (4, 4)  # its own windows: what a fine-tune at another window needs
    moved = export(v2(96, 6, (4, 4)), str(tmp_path / "moved.pth"), layout="official")
    assert pretrained_windows_of(moved) == (4, 4)  # read from the coordinates' normalisation, not the shape
    ours = export(v2(96, 6, (4, 4)), str(tmp_path / "ours.safetensors"), layout="ours")
    assert pretrained_windows_of(ours) == (4, 4)
    assert pretrained_windows_of(export(v2(), str(tmp_path / "t.safetensors"), layout="timm")) is None
    big = build_model("swinv2_tiny", img_size=96, window_size=6, **ARCH)
    report = load_pretrained(big, pre)  # no table to resize: the MLP is evaluated at the new window
    assert not report.resized and any("trained with windows (4, 4)" in n for n in report.notes), str(report)


def test_v1_and_v2_checkpoints_are_never_mixed(tmp_path):
    v1 = build_model("swin_tiny", img_size=64, window_size=4, **ARCH)
    model = build_model("swinv2_tiny", img_size=64, window_size=4, **ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"Swin V1 checkpoint .* the model is a Swin V2"):
        load_pretrained(model, export(v1, str(tmp_path / "v1.pth"), layout="official"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing half-loaded
    with pytest.raises(CheckpointError, match=r"Swin V2 checkpoint .* the model is a Swin V1"):
        load_pretrained(v1, export(model, str(tmp_path / "v2.safetensors"), layout="timm"))


def test_cpb_mlp_and_logit_scales_take_no_weight_decay():
    model = build_model("swinv2_tiny", img_size=64, window_size=4, **ARCH)
    decayed = {id(p) for g in param_groups(model, 0.05) if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert not any("cpb_mlp" in n or "logit_scale" in n for n in names)
    assert "layers.0.blocks.0.attn.qkv.weight" in names and "layers.0.blocks.0.attn.cpb_mlp.0.weight" not in names


def test_shipped_v2_configs_carry_the_official_recipe():
    from finetune.config import load_finetune_config
    from pretrain.config import load_config
    for v in ("b", "l"):
        c = load_config(str(REPO / f"configs/swinv2_{v}_22k.json"))
        assert (c.model.img_size, c.model.window_size, c.optim.weight_decay, c.model.drop_path_rate) == (192, 12, 0.1, 0.2)
        assert "swinv2_" in c.recipe and c.lr == pytest.approx(1e-3)
        f = load_finetune_config(str(REPO / f"configs/finetune/swinv2_{v}_22kto1k_384.json"))
        assert (f.model.window_size, f.model.pretrained_window_sizes, f.aug.eval_crop) == (24, [12, 12, 12, 6], False)


@pytest.mark.demo
def test_demo_v2_pretrained_at_window_4_fine_tunes_at_window_6(tmp_path):
    out = tmp_path / "runs"
    # A shortened demo (30 updates, 2 fine-tune epochs: 27.5% top-1 when written; the full one reaches more)
    r = subprocess.run([sys.executable, "launch/demo.py", "--arch", "v2", "--out", str(out), "--pretrain-steps", "30",
                        "--finetune-epochs", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "model.pretrained_window_sizes = [4, 4] (from" in r.stdout  # derived from the pretraining run
    assert "continuous position bias evaluated at window 6, coordinates normalised by windows (4, 4)" in r.stdout
    m = re.search(r"fine-tuned   top-1 ([\d.]+)%", r.stdout)
    assert m and float(m[1]) >= 20.0, r.stdout[-2000:]  # 10 classes: chance is 10%
    export = out / "swinv2_tiny_cpu_ft" / "export"
    exported = sorted(p.name.split(".")[1] for p in export.glob("finetuned.*"))
    assert exported == ["official", "ours", "timm", "transformers"]  # transformers: a folder
    assert json.loads((export / "finetuned.transformers" / "config.json").read_text())["model_type"] == "swinv2"
    cfg = json.loads((out / "swinv2_tiny_cpu_ft" / "config.json").read_text())
    assert cfg["model"]["pretrained_window_sizes"] == [4, 4]


def test_convert_moves_an_official_v2_checkpoint_to_a_new_window(tmp_path):
    src = export(v2(64, 4), str(tmp_path / "pre.pth"), layout="official")
    dst = str(tmp_path / "w6.safetensors")
    r = python("-m", "pretrain.cli.convert", src, dst, "--layout", "timm", "--img-size", "96", "--window-size", "6")
    assert r.returncode == 0, r.stderr
    ours = build_model("swinv2_tiny", img_size=96, window_size=6, pretrained_window_sizes=(4, 4), **ARCH).eval()
    load_pretrained(ours, src)
    ref = timm_v2(96, 6, (4, 4))
    ref.load_state_dict(load_file(dst))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-4
    timm_file = export(v2(), str(tmp_path / "t.safetensors"), layout="timm")
    r = python("-m", "pretrain.cli.convert", timm_file, str(tmp_path / "o.pth"), "--layout", "official")
    assert r.returncode == 2 and "stores no window size" in r.stderr and "--window-size" in r.stderr
