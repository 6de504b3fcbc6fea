"""Our Swin against timm's (the installed reference) with the same random weights."""
import pytest
import timm
import torch

import pretrain.models.layers as layers
import pretrain.models.swin as swin
from pretrain.models import build_model

TIMM = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_base": "swin_base_patch4_window7_224"}


def pair(variant, attn_impl="auto", **kw):
    torch.manual_seed(0)
    ours = build_model(variant, drop_path_rate=0.0, attn_impl=attn_impl, **kw).eval()
    ref = timm.create_model(TIMM[variant], drop_path_rate=0.0, **kw).eval()
    ref.load_state_dict(ours.state_dict())  # strict: proves the key layouts are identical
    return ours, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference in units of the reference's scale (max |b|)."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant,img,window", [
    ("swin_tiny", 224, 7), ("swin_tiny", 384, 12), pytest.param("swin_base", 224, 7, marks=pytest.mark.slow),
    pytest.param("swin_base", 384, 12, marks=pytest.mark.slow),
    ("swin_tiny", (224, 160), 7),  # non-square
    ("swin_tiny", 256, 7),  # window doesn't divide 64/32/16/8: padded
])
@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_logits_match_timm(variant, img, window, impl):
    ours, ref = pair(variant, img_size=img, window_size=window, attn_impl=impl)
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 1000)
    assert rel_err(a, b) <= 1e-4


@pytest.mark.slow
def test_gradients_match_timm():
    ours, ref = pair("swin_tiny", img_size=(160, 224), num_classes=10)
    ours.train(), ref.train()
    x = torch.randn(2, 3, 160, 224)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    mine = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert rel_err(mine[name].grad, p.grad) <= 1e-4, name


def test_window_clamped_and_unshifted_where_stage_is_small():
    m = build_model("swin_tiny", img_size=192, window_size=12)  # stages 48, 24, 12, 6
    last = m.layers[3].blocks[1]
    assert last.window == (6, 6) and last.shift == (0, 0) and last.attn_mask is None
    third = m.layers[2].blocks[1]  # 12 == window: no shift, as the official code
    assert third.window == (12, 12) and third.shift == (0, 0)
    first = m.layers[0].blocks[1]
    assert first.window == (12, 12) and first.shift == (6, 6) and first.attn_mask.shape == (16, 144, 144)


def test_masks_are_not_rebuilt_per_forward(monkeypatch):
    m = build_model("swin_tiny", num_classes=0).eval()

    def boom(*a, **k):
        raise AssertionError("mask rebuilt during forward")

    for module, name in [(swin, "shifted_window_mask"), (swin, "window_token_order"),
                         (layers, "relative_position_index"), (layers, "window_partition")]:
        monkeypatch.setattr(module, name, boom)
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 768)


def test_forward_features_and_headless():
    m = build_model("swin_tiny", num_classes=0, img_size=(224, 160)).eval()
    x = torch.randn(2, 3, 224, 160)
    with torch.no_grad():
        f = m.forward_features(x)
        assert torch.equal(m(x), f)
        assert f.shape == (2, 768)
        assert m.forward_tokens(x).shape == (2, 7, 5, 768)


def test_wrong_input_size_names_the_expected_size():
    m = build_model("swin_tiny")
    with pytest.raises(ValueError, match=r"img_size=\(224, 224\)"):
        m(torch.randn(1, 3, 256, 256))


def test_unknown_variant_and_override():
    with pytest.raises(ValueError, match="swin_tiny"):
        build_model("swin_huge")
    with pytest.raises(TypeError, match="window"):
        build_model("swin_tiny", windowsize=7)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = build_model("swin_tiny", num_classes=10, drop_path_rate=0.0, img_size=96, window_size=3)
    x = torch.randn(2, 3, 96, 96)
    m(x).sum().backward()
    g0 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for a, b in zip(g0, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_bf16_autocast_close_to_fp32(impl):
    torch.manual_seed(0)
    m = build_model("swin_tiny", num_classes=10, attn_impl=impl).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert rel_err(low.float(), ref) <= 0.05  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("shift", [False, True])
def test_block_compiles_without_graph_breaks(shift):
    m = build_model("swin_tiny", img_size=112)
    blk = m.layers[0].blocks[int(shift)]
    x = torch.randn(2, 28, 28, 96, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(blk)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_drop_path_only_in_training():
    m = build_model("swin_tiny", num_classes=10, drop_path_rate=0.5, img_size=64, window_size=2)
    x = torch.randn(4, 3, 64, 64)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


@pytest.mark.parametrize("variant", ["swin_tiny", "swinv2_tiny"])
def test_flex_attention_forward_equals_the_math_path(variant):
    """attn_impl="flex": FlexAttention compiled by inductor (its CPU forward kernel), shifted windows with
    their mask, a padded resolution (40 px: 10x10 tokens in 4x4 windows). One stage of two blocks (unshifted,
    shifted): a second stage would only add another compilation (most of this test's time) of the same path."""
    torch.manual_seed(0)
    kw = dict(img_size=40, window_size=4, num_classes=5, embed_dim=16, depths=(2,), num_heads=(2,),
              drop_path_rate=0.0)
    math_model = build_model(variant, attn_impl="math", **kw).eval()
    flex_model = build_model(variant, attn_impl="flex", **kw).eval()
    flex_model.load_state_dict(math_model.state_dict())
    for block in flex_model.modules():  # a non-zero relative-position bias, so the score_mod matters
        if hasattr(block, "relative_position_bias_table"):
            torch.nn.init.normal_(block.relative_position_bias_table, std=0.5)
    math_model.load_state_dict(flex_model.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want, got = math_model(x), flex_model(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()
    with pytest.raises(RuntimeError, match="no CPU backward"):
        flex_model.train()(x.requires_grad_())
