"""The Hugging Face transformers layout, against transformers' own Swin, Swin V2 and SimMIM models (their random
weights, saved with `save_pretrained`; loaded back with `from_pretrained`): the same logits and reconstructions to
1e-4 both ways, no missing, unexpected or mismatched key; a hub id from a warm cache offline; transformers ->
timm -> transformers; a config.json that disagrees with its tensors refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pretrain.models import SimMIM, SwinTransformer, build_model
from pretrain.weights import config_from_checkpoint, export, load_pretrained

from conftest import REPO, TINY, finetune_config, need

ARCH = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)


@pytest.fixture(scope="module")
def hf():
    try:
        import transformers
    except ImportError:
        need(False, "transformers (pip install '.[test]'): its models are the reference for its layout")
    return transformers


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (inits leave bias tables and norms at constants that would hide a swap)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("version", [1, 2])
def test_a_transformers_classifier_loads_into_ours_and_ours_exports_back(hf, tmp_path, version):
    Config, Model = ((hf.SwinConfig, hf.SwinForImageClassification) if version == 1 else
                     (hf.Swinv2Config, hf.Swinv2ForImageClassification))
    names = {i: f"class {i}" for i in range(5)}
    theirs = randomized(Model(Config(**ARCH, num_labels=5, id2label=names, label2id={v: k for k, v in names.items()})))
    theirs.save_pretrained(tmp_path / "hub")
    ours = SwinTransformer(config_from_checkpoint(str(tmp_path / "hub"))).eval()
    report = load_pretrained(ours, str(tmp_path / "hub"))
    assert report.layout == "transformers" and ours.id2label == names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).logits, atol=1e-4, rtol=0)
    export(ours, str(tmp_path / "back"), layout="transformers")
    back, info = hf.AutoModelForImageClassification.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert type(back) is Model and not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert back.config.id2label == names
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values=x).logits, ours(x), atol=1e-4, rtol=0)
    processor = hf.AutoImageProcessor.from_pretrained(tmp_path / "back")
    from PIL import Image
    pixels = processor(Image.new("RGB", (50, 40), (200, 100, 50)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)  # the model's resolution


@pytest.mark.parametrize("version", [1, 2])
def test_a_bare_transformers_model_loads_into_a_headless_classifier(hf, tmp_path, version):
    """Swin(v2)Model, which transformers saves without its `swin.` prefix: the pooled features are ours."""
    Config, Model = (hf.SwinConfig, hf.SwinModel) if version == 1 else (hf.Swinv2Config, hf.Swinv2Model)
    theirs = randomized(Model(Config(**ARCH)))
    theirs.save_pretrained(tmp_path / "hub")
    ours = SwinTransformer(config_from_checkpoint(str(tmp_path / "hub"))).eval()
    assert ours.num_classes == 0 and load_pretrained(ours, str(tmp_path / "hub")).layout == "transformers"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).pooler_output, atol=1e-4, rtol=0)


def test_our_v1_and_v2_models_of_any_shape_load_in_transformers(hf, tmp_path):
    """Ours -> transformers for models built here (a V2 with pretrained windows, a headless V1)."""
    x = torch.randn(1, 3, 64, 64)
    for name, model in {"v2": build_model("swinv2_tiny", img_size=64, window_size=8, num_classes=7, embed_dim=16,
                                          depths=(1, 2), num_heads=(2, 4), pretrained_window_sizes=(4, 4)),
                        "headless": build_model("swin_tiny", img_size=64, window_size=4, num_classes=0, embed_dim=16,
                                                depths=(2, 1), num_heads=(1, 2))}.items():
        randomized(model)
        export(model, str(tmp_path / name), layout="transformers")
        Auto = hf.AutoModelForImageClassification if model.num_classes else hf.AutoModel
        theirs, info = Auto.from_pretrained(tmp_path / name, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
        with torch.no_grad():
            out = theirs.eval()(pixel_values=x)
            want = model(x)  # headless: the pooled features
            got = out.logits if model.num_classes else out.pooler_output
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_a_transformers_simmim_model_reconstructs_as_ours_and_back(hf, tmp_path, version):
    Config, Model = ((hf.SwinConfig, hf.SwinForMaskedImageModeling) if version == 1 else
                     (hf.Swinv2Config, hf.Swinv2ForMaskedImageModeling))
    theirs = randomized(Model(Config(**ARCH, encoder_stride=8)))
    theirs.save_pretrained(tmp_path / "hub")
    ours = SimMIM(config_from_checkpoint(str(tmp_path / "hub"))).eval()
    assert load_pretrained(ours, str(tmp_path / "hub")).layout == "SimMIM (transformers encoder)"
    torch.manual_seed(1)
    x, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 8, 8) > 0.4).to(torch.uint8)
    with torch.no_grad():
        out = theirs(pixel_values=x, bool_masked_pos=mask.flatten(1).bool())
        torch.testing.assert_close(ours.reconstruct(x, mask), out.reconstruction, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(x, mask), out.loss, atol=1e-4, rtol=0)  # the same masked L1
    export(ours, str(tmp_path / "back"), layout="transformers")
    back, info = Model.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values=x, bool_masked_pos=mask.flatten(1).bool()).reconstruction,
                                   out.reconstruction, atol=1e-4, rtol=0)
    encoder = build_model("swinv2_tiny" if version == 2 else "swin_tiny", img_size=32, window_size=4, num_classes=3,
                          embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    report = load_pretrained(encoder, str(tmp_path / "hub"))  # its encoder into a classifier, as official SimMIM
    assert any("SimMIM parts" in d for d in report.dropped)


def test_transformers_to_timm_to_transformers_keeps_the_logits_and_a_bad_config_is_refused(hf, tmp_path, capsys):
    from pretrain.cli import convert
    theirs = randomized(hf.SwinForImageClassification(hf.SwinConfig(**ARCH, num_labels=3)))
    theirs.save_pretrained(tmp_path / "hub")
    assert convert.main([str(tmp_path / "hub"), str(tmp_path / "t.safetensors"), "--layout", "timm"]) == 0
    assert convert.main([str(tmp_path / "t.safetensors"), str(tmp_path / "again"), "--layout", "transformers"]) == 0
    again = hf.AutoModelForImageClassification.from_pretrained(tmp_path / "again").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).logits, theirs(pixel_values=x).logits, atol=1e-4, rtol=0)
    capsys.readouterr()
    cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**cfg, "window_size": 7}))
    assert convert.main([str(tmp_path / "hub"), str(tmp_path / "x.safetensors"), "--layout", "timm"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "window_size is 7 in config.json but 4 in the tensors" in err[0], err
    from safetensors.torch import load_file  # the older format of the same keys: a pickle
    torch.save(load_file(tmp_path / "hub" / "model.safetensors"), tmp_path / "hub" / "pytorch_model.bin")
    (tmp_path / "hub" / "model.safetensors").unlink()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(cfg))
    assert convert.main([str(tmp_path / "hub"), str(tmp_path / "y.safetensors"), "--layout", "timm"]) == 2
    assert "pytorch_model.bin: a pickle" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "hub"), str(tmp_path / "y.safetensors"), "--layout", "timm",
                         "--allow-pickle"]) == 0


@pytest.mark.slow
def test_a_hub_id_loads_from_a_warm_cache_offline_and_fine_tuning_takes_it(hf, shards, tmp_path):
    """hf://ORG/NAME through huggingface_hub with HF_HUB_OFFLINE=1, from a cache laid out as the hub client
    writes it (models--ORG--NAME/refs/main -> snapshots/COMMIT/): no network. Fresh processes (the client
    reads its settings from the environment at import)."""
    model = randomized(build_model("swin_tiny", img_size=32, window_size=4, **TINY))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--swin-tiny-test"
    export(model, str(repo / "snapshots" / commit), layout="transformers")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    code = ("import torch; from pretrain.weights import load_pretrained, config_from_checkpoint; "
            "from pretrain.models import SwinTransformer; m = SwinTransformer(config_from_checkpoint('hf://acme/swin-tiny-test')); "
            "print(load_pretrained(m, 'hf://acme/swin-tiny-test').layout); torch.save(m.state_dict(), 'sd.pt')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("transformers"), r.stdout + r.stderr
    loaded = torch.load(tmp_path / "sd.pt")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    missing = subprocess.run([sys.executable, "-m", "pretrain.cli.convert", "hf://acme/nothing-here", "o.safetensors",
                              "--layout", "timm"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "hf://acme/nothing-here: not found on the hub or in its cache" in missing.stderr
    cfg = finetune_config(tmp_path, shards, "hf://acme/swin-tiny-test", epochs=1)
    ft = subprocess.run([sys.executable, "-m", "finetune.run", "--config", cfg, "--eval-only"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ft.returncode == 0 and "weights: hf://acme/swin-tiny-test" in ft.stdout, ft.stdout[-2000:] + ft.stderr[-2000:]
    assert "loaded hf://acme/swin-tiny-test (layout: transformers)" in ft.stdout and "top-1" in ft.stdout
