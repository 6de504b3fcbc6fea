"""The training core's pieces in one process: parameter groups (timm's helpers), the schedule with layer
decay, config checks (the import structure: test_layering.py)."""

import pytest
import torch

from pretrain.config import ConfigError, TrainConfig, load_config
from pretrain.models import build_model
from pretrain.training.metrics import OpCounter
from pretrain.training.optim import build_scheduler, param_groups

from conftest import REPO


def groups_before(model, weight_decay: float, layer_decay: float) -> list[dict]:
    """The hand-written groups this project used before timm's helpers (2f7e9c4: pretrain/engine.py and
    finetune/trainer.py), kept here as the reference."""
    depths = list(model.cfg.depths)
    top = sum(depths) + 1
    skip = model.no_weight_decay()

    def layer_id(name: str) -> int:
        if name.startswith(("patch_embed", "absolute_pos_embed")):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            return sum(depths[:int(parts[1])]) + 1 + (int(parts[3]) if parts[2] == "blocks" else 0)
        return top

    groups: dict = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name) if layer_decay < 1 else top
        g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr_scale": layer_decay ** (top - lid)})
        g["params"].append(p)
    return list(groups.values())


def as_sets(groups: list[dict]) -> set:
    return {(frozenset(id(p) for p in g["params"]), g["weight_decay"], round(g.get("lr_scale", 1.0), 12))
            for g in groups}


@pytest.mark.parametrize("ape", [False, True])
@pytest.mark.parametrize("layer_decay", [1.0, 0.9])
def test_timm_param_groups_equal_the_hand_written_ones(ape, layer_decay):
    model = build_model("swin_tiny", embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), img_size=64,
                        window_size=4, num_classes=10, ape=ape)
    got, want = param_groups(model, 0.05, layer_decay), groups_before(model, 0.05, layer_decay)
    assert as_sets(got) == as_sets(want)
    assert sum(len(g["params"]) for g in got) == len(list(model.parameters()))
    if layer_decay < 1:
        assert len(got) == 2 * (sum((2, 2, 2)) + 2)  # stem, 6 blocks, norm + head; decay / no decay each


def test_layer_decay_scales_each_group_once_through_the_schedule():
    cfg = load_config(overrides=["optim.warmup_epochs=0", "optim.epochs=10", "optim.global_batch=512",
                                 "optim.micro_batch=64"])
    model = build_model("swin_tiny", embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4)
    opt = torch.optim.AdamW(param_groups(model, 0.05, 0.5), lr=cfg.lr)
    sched = build_scheduler(opt, cfg.optim, updates_per_epoch=100)
    sched.step_update(0)
    for g in opt.param_groups:  # at the start of the cosine: base lr x lr_scale, not x lr_scale^2
        assert g["lr"] == pytest.approx(cfg.lr * g["lr_scale"], rel=1e-9)
    assert {g["lr_scale"] for g in opt.param_groups} == {0.5 ** k for k in range(4)}


@pytest.mark.parametrize("override,key", [
    ("optim.warmup_lr=-0.01", "optim.warmup_lr"), ("optim.max_steps=-5", "optim.max_steps"),
    ("optim.base_lr=-5e-4", "optim.base_lr"), ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("log.every_steps=0", "log.every_steps"), ("data.on_bad_shard=skp", "data.on_bad_shard"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate"), ("aug.re_prob=2", "aug.re_prob"),
    ("optim.betas=[0.9,1.5]", "optim.betas"), ("backend=horovod", "backend"),
    ("data.start_method=thread", "data.start_method"), ("optim.warmup_epochs=200", "optim.warmup_epochs"),
    ("model.compile=yes", "model.compile"), ("model.compile=1", "model.compile"),
    ("model.attn_impl=xformers", "model.attn_impl"),
])
def test_out_of_range_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(REPO / "configs/swin_tiny_cpu.json"), [override])


def test_model_compile_takes_true_false_or_auto():
    path = str(REPO / "configs/swin_tiny_cpu.json")
    assert [load_config(path, [f"model.compile={v}"]).model.compile for v in ("true", "false", "auto")] == \
        [True, False, "auto"]
    assert load_config(path).model.compile == "auto"


def test_finetune_configs_are_validated_and_backend_keys_checked():
    from finetune.config import load_finetune_config
    path = str(REPO / "configs/finetune/swin_tiny_cpu.json")
    with pytest.raises(ConfigError, match="data.on_bad_shard"):
        load_finetune_config(path, ["data.on_bad_shard=skp"])
    with pytest.raises(ConfigError, match="finetune.layer_decay"):
        load_finetune_config(path, ["finetune.layer_decay=0"])
    with pytest.raises(ConfigError, match='optim.zero_stage=2 needs backend "deepspeed"'):
        load_finetune_config(path, ["optim.zero_stage=2"])
    cfg = load_finetune_config(path, ["backend=deepspeed", "optim.zero_stage=3"])
    assert cfg.zero_stage == 3 and load_finetune_config(path).backend == "accelerate"
    assert load_config(str(REPO / "configs/swin_tiny_cpu.json")).zero_stage == 1
    assert TrainConfig().backend == "deepspeed"


def test_keys_that_act_nowhere_are_refused_with_the_fix():
    """timm's transforms_imagenet_train drops color_jitter under RandAugment; the crop percentage acts only with
    the center crop; aug.img_size is model.img_size's. Every shipped config loads (none carries such a key)."""
    import glob
    from finetune.config import load_finetune_config
    path = str(REPO / "configs/swin_tiny_cpu.json")
    with pytest.raises(ConfigError, match=r"aug.color_jitter=0.4 acts nowhere with aug.auto_augment='rand-m9.*"
                                          r"remove aug.color_jitter, or --set aug.auto_augment=null"):
        load_config(path, ['aug.auto_augment="rand-m9-mstd0.5-inc1"', "aug.color_jitter=0.4"])
    assert load_config(path, ["aug.color_jitter=0.2"]).aug.jitter == 0.2  # RandAugment off: it acts
    assert load_config(path).aug.jitter == 0.0 and TrainConfig().aug.jitter == 0.4  # not given: the official 0.4
    with pytest.raises(ConfigError, match=r"aug.eval_crop_pct=0.9 acts nowhere with aug.eval_crop=false"):
        load_config(path, ["aug.eval_crop=false", "aug.eval_crop_pct=0.9"])
    with pytest.raises(ConfigError, match=r"aug.img_size is set from model.img_size: remove aug.img_size"):
        load_config(path, ["aug.img_size=64"])
    cfg = load_config(path, ["model.img_size=96", "model.window_size=3"])
    assert cfg.aug.img_size == 96 and "img_size" not in cfg.to_dict()["aug"]
    for f in sorted(glob.glob(str(REPO / "configs" / "**" / "*.json"), recursive=True)):
        (load_finetune_config if "/finetune/" in f else load_config)(f)


def test_the_config_lists_the_models_variants_and_attention_kernels():
    # pretrain.config can't import the models (no torch there): its copies must stay equal
    import pretrain.config as config
    from pretrain.models import VARIANTS
    from pretrain.models.layers import ATTN_IMPLS
    assert config.VARIANTS == tuple(VARIANTS) and config.ATTN_IMPLS == ATTN_IMPLS


def update_ops(depths: tuple, nan: bool = False) -> tuple[int, dict, torch.nn.Module]:
    """Aten ops of one steady-state optimizer update (norm, non-finite check, clip, fused AdamW) of the
    accelerate backend: the second one (the first also creates the optimizer state, per tensor)."""
    from pretrain.training.accelerate_backend import AccelerateBackend
    from pretrain.training.optim import build_optimizer
    cfg = load_config(None, ["backend=accelerate", "optim.precision=fp32", "model.variant=swin_tiny",
                             "model.img_size=32", "model.window_size=4", "model.num_classes=4",
                             f"model.depths={list(depths)}", "model.num_heads=[1,1,2,2]", "model.embed_dim=8",
                             "optim.global_batch=2", "optim.micro_batch=2"])
    torch.manual_seed(0)
    model = build_model("swin_tiny", img_size=32, window_size=4, num_classes=4, embed_dim=8, depths=depths,
                        num_heads=(1, 1, 2, 2))
    backend = AccelerateBackend(cfg)
    backend.prepare(model, build_optimizer(model, cfg.optim, 1.0), accum=1)
    backend.backward(backend.forward(torch.randn(2, 3, 32, 32)).sum(), boundary=True)
    backend.step()
    loss = backend.forward(torch.randn(2, 3, 32, 32)).sum()
    backend.backward(loss * float("nan") if nan else loss, boundary=True)
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    with OpCounter() as counter:
        backend.step()
    return counter.total, counter.ops, before, backend.module


def test_one_update_costs_the_same_ops_whatever_the_number_of_parameter_tensors():
    small, small_ops, _, m_small = update_ops((2, 2, 2, 2))
    big, big_ops, _, m_big = update_ops((2, 2, 18, 2))
    n_small, n_big = len(list(m_small.parameters())), len(list(m_big.parameters()))
    assert n_big - n_small >= 100, (n_small, n_big)
    # foreach norm + clip, fused AdamW, one non-finite flag: no per-tensor op (seen: equal counts)
    assert abs(big - small) <= 4, (small, big, {k: (small_ops.get(k), v) for k, v in big_ops.items()
                                                if small_ops.get(k) != v})
    assert big < 60, big_ops


def test_a_non_finite_update_changes_nothing_on_the_device():
    _, ops, before, model = update_ops((2, 2, 2, 2), nan=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("item" in k or "_local_scalar_dense" in k for k in ops), ops  # no host read to decide


def test_flex_attention_in_a_compiled_model_on_cpu_is_refused_with_the_way_out():
    from types import SimpleNamespace

    from pretrain.training.distributed import compile_model
    for compiled in ("true", "false"):  # eager: a 100-line traceback at the first backward, before (issue 35)
        cfg = load_config(str(REPO / "configs/swin_tiny_cpu.json"), ["model.attn_impl=flex", f"model.compile={compiled}"])
        with pytest.raises(ConfigError, match=r"model.attn_impl=flex trains on CUDA only: torch's CPU FlexAttention "
                                              r"has no backward.*; on CPU use --set model.attn_impl=math"):
            compile_model(SimpleNamespace(device=torch.device("cpu")), cfg, print)


def test_flops_of_a_flex_model_are_counted_as_the_math_kernels():
    """forward_flops (MFU) traces the model: FlexAttention is a compiled op the counter can't enter, so the
    count runs the math kernel (the same arithmetic), and the model keeps its kernel afterwards."""
    from pretrain.training.metrics import forward_flops
    kw = dict(img_size=32, window_size=4, num_classes=3, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    flex, math = build_model("swin_tiny", attn_impl="flex", **kw), build_model("swin_tiny", attn_impl="math", **kw)
    assert forward_flops(flex, 32) == forward_flops(math, 32) > 0
    assert {m.impl for m in flex.modules() if hasattr(m, "impl")} == {"flex"}
