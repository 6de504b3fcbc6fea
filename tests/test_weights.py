"""Checkpoint layouts, conversions, resizing and the errors on bad input."""
import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from pretrain.weights import (CheckpointError, CheckpointMismatchError, export, load_pretrained,
                                 read_checkpoint)
from pretrain.classes import map22k_to_1k
from pretrain.models import build_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # sources: tests/fixtures/README.md
from conftest import python


def official_fixture(name: str) -> dict:
    path = FIXTURES / f"official_swin_{name}_patch4_window7_224_22k.keys.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: tests/fixtures/ is part of the checkout")
    return json.loads(path.read_text())


def official_map22kto1k() -> list[int]:
    return [int(x) for x in (FIXTURES / "map22kto1k.txt").read_text().split()]


def tiny(**kw):
    """A small Swin (2 stages) so conversions are checked on every key kind quickly."""
    kw = {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "img_size": 64, "window_size": 4,
          "drop_path_rate": 0.0, **kw}
    return build_model("swin_tiny", **kw)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_map22kto1k_matches_the_official_file():
    assert list(map22k_to_1k()) == official_map22kto1k()


@pytest.mark.parametrize("variant,name", [("swin_base", "base"), ("swin_large", "large")])
def test_official_export_has_the_release_keys_and_shapes(tmp_path, variant, name):
    expected = official_fixture(name)
    path = export(build_model(variant, num_classes=21841), str(tmp_path / "x.pth"), layout="official")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["model"]
    sd = raw["model"]
    assert list(sd) == list(expected)  # same keys, in the release's order
    assert {k: list(v.shape) for k, v in sd.items()} == expected


def test_round_trip_ours_timm_ours_is_exact(tmp_path):
    torch.manual_seed(0)
    ours = build_model("swin_tiny", num_classes=10).eval()
    path = export(ours, str(tmp_path / "t.safetensors"), layout="timm")
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert ((ours(x) - ref(x)).abs().max() / ours(x).abs().max()).item() <= 1e-4
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    back = build_model("swin_tiny", num_classes=10)
    report = load_pretrained(back, str(tmp_path / "timm.pth"))
    assert report.layout == "timm" and not report.reinitialized and not report.resized
    assert same_state(ours, back)


def test_round_trip_ours_official_ours_is_exact(tmp_path):
    torch.manual_seed(0)
    ours = tiny(num_classes=7, ape=True)
    path = export(ours, str(tmp_path / "o.pth"), layout="official")
    sd = torch.load(path, weights_only=True)["model"]
    assert "layers.0.downsample.reduction.weight" in sd and "head.weight" in sd
    assert "layers.0.blocks.1.attn_mask" in sd and "layers.0.blocks.0.attn.relative_position_index" in sd
    back = tiny(num_classes=7, ape=True)
    report = load_pretrained(back, path)
    assert report.layout == "official"
    assert same_state(ours, back)


def test_ours_layout_keeps_config_and_loads_from_fsspec_url():
    torch.manual_seed(0)
    ours = tiny(num_classes=5)
    url = "memory://ckpt/ours.safetensors"
    export(ours, url, layout="ours")
    back = tiny(num_classes=5)
    assert load_pretrained(back, url).layout == "ours"
    assert same_state(ours, back)
    _, meta = read_checkpoint(url)
    assert meta["config"]["embed_dim"] == 32 and meta["config"]["depths"] == [2, 2]


def official_resize_reference(sd: dict, target: dict) -> dict:
    """The official `load_pretrained` (microsoft/Swin-Transformer utils.py), restated for the test."""
    out = {}
    for k, v in sd.items():
        if "relative_position_bias_table" in k:
            L1, nH1 = v.size()
            L2, nH2 = target[k].size()
            S1, S2 = int(L1 ** 0.5), int(L2 ** 0.5)
            v = F.interpolate(v.permute(1, 0).view(1, nH1, S1, S1), size=(S2, S2), mode="bicubic")
            v = v.view(nH2, L2).permute(1, 0)
        out[k] = v
    return out


def test_22k_checkpoint_at_384_window12_with_1k_head_matches_official_recipe(tmp_path):
    torch.manual_seed(0)
    src = build_model("swin_tiny", num_classes=21841)
    path = export(src, str(tmp_path / "swin_t_22k.pth"), layout="official")
    official = torch.load(path, weights_only=True)["model"]
    dst = build_model("swin_tiny", img_size=384, window_size=12, num_classes=1000)
    report = load_pretrained(dst, path)
    assert any("21841" in c for c in report.converted)
    assert any("relative_position_bias_table" in r for r in report.resized)
    got = dst.state_dict()
    tables = {k: v for k, v in official.items() if "relative_position_bias_table" in k}
    # stage resolutions at 384: 96, 48, 24, 12 -> every window is 12, a 23x23 table
    targets = {k: torch.empty(23 ** 2, v.shape[1]) for k, v in tables.items()}
    expected = official_resize_reference(tables, targets)
    assert len(expected) == 12
    for k, v in expected.items():
        assert torch.equal(got[k], v.contiguous()), k
    rows = official_map22kto1k()
    assert torch.equal(got["head.fc.weight"], official["head.weight"][rows])
    assert torch.equal(got["head.fc.bias"], official["head.bias"][rows])


def test_absolute_pos_embed_resized_like_official(tmp_path):
    torch.manual_seed(0)
    src = tiny(ape=True)
    path = export(src, str(tmp_path / "a.pth"), layout="official")
    dst = tiny(ape=True, img_size=96, window_size=6)
    report = load_pretrained(dst, path)
    pe = src.absolute_pos_embed.detach()  # official: (1, L, C) -> (1, C, S, S) -> bicubic -> (1, L', C)
    ref = F.interpolate(pe.reshape(-1, 16, 16, 32).permute(0, 3, 1, 2), size=(24, 24), mode="bicubic")
    ref = ref.permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.equal(dst.absolute_pos_embed.detach(), ref)
    assert any("absolute_pos_embed" in r for r in report.resized)


def test_other_class_count_zero_inits_head_and_says_so(tmp_path):
    src = tiny(num_classes=21841)
    path = export(src, str(tmp_path / "x.safetensors"), layout="timm")
    dst = tiny(num_classes=10)
    report = load_pretrained(dst, path)
    assert report.reinitialized == ["head.fc: zero-initialized (checkpoint has 21841 classes, model has 10)"]
    assert dst.head.fc.weight.abs().sum().item() == 0.0
    headless = tiny(num_classes=0)
    report = load_pretrained(headless, path)
    assert any("head.fc.weight" in d for d in report.dropped)


def test_missing_head_needs_reset_head(tmp_path):
    path = export(tiny(num_classes=0), str(tmp_path / "features.safetensors"), layout="ours")
    dst = tiny(num_classes=10)
    with pytest.raises(CheckpointMismatchError, match="reset_head=True"):
        load_pretrained(dst, path)
    report = load_pretrained(dst, path, reset_head=True)
    assert report.reinitialized and dst.head.fc.weight.abs().sum().item() == 0.0


def test_truncated_file_is_an_error_naming_it_and_loads_nothing(tmp_path):
    src = tiny(num_classes=10)
    for name in ("x.pth", "x.safetensors"):
        path = tmp_path / name
        export(src, str(path), layout="ours")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        dst = tiny(num_classes=10)
        before = {k: v.clone() for k, v in dst.state_dict().items()}
        with pytest.raises(CheckpointError, match=name):
            load_pretrained(dst, str(path))
        assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_another_variant_lists_keys_and_hints(tmp_path):
    path = export(build_model("swin_small", num_classes=10), str(tmp_path / "s.safetensors"), layout="timm")
    dst = build_model("swin_tiny", num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_pretrained(dst, path)
    msg = str(e.value)
    assert "unexpected keys: layers.2.blocks.6." in msg and "swin_small" in msg and "s.safetensors" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    wide = export(build_model("swin_base", num_classes=10), str(tmp_path / "b.safetensors"), layout="timm")
    with pytest.raises(CheckpointMismatchError,
                       match=r"shape mismatches: head.fc.weight \(10, 1024\) vs model \(10, 768\)(.|\n)*swin_base"):
        load_pretrained(dst, wide)


def test_missing_key_is_named():
    sd = tiny(num_classes=10).state_dict()
    del sd["layers.1.blocks.0.mlp.fc2.bias"]
    dst = tiny(num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: layers.1.blocks.0.mlp.fc2.bias"):
        load_pretrained(dst, sd)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_pickled_objects_refused_unless_allowed(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": tiny(num_classes=3).state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_pretrained(tiny(num_classes=3), str(path))
    assert load_pretrained(tiny(num_classes=3), str(path), allow_pickle=True).layout == "timm"


def test_not_a_swin_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a Swin checkpoint"):
        load_pretrained(tiny(), str(path))


@pytest.mark.slow
def test_convert_cli_official_to_timm_at_new_resolution(tmp_path):
    torch.manual_seed(0)
    src = build_model("swin_tiny", num_classes=21841)
    official = export(src, str(tmp_path / "swin_t_22k.pth"), layout="official")
    dst = tmp_path / "swin_t_384.safetensors"
    out = python("-m", "pretrain.cli.convert", official, str(dst), "--layout", "timm", "--img-size", "384",
                 "--window-size", "12", "--num-classes", "1000")
    assert out.returncode == 0, out.stderr
    assert "21841 ImageNet-22K rows -> 1000" in out.stdout
    ours = build_model("swin_tiny", img_size=384, window_size=12, num_classes=1000).eval()
    load_pretrained(ours, official)
    ref = timm.create_model("swin_tiny_patch4_window7_224", img_size=384, window_size=12, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(dst), num_classes=1000)).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
    bad = python("-m", "pretrain.cli.convert", str(tmp_path / "nope.pth"), str(dst), "--layout", "ours")
    assert bad.returncode == 2 and "nope.pth" in bad.stderr
