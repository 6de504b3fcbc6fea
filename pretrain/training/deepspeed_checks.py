"""The DeepSpeed backend's config rules (pretrain.training.deepspeed_backend): the ZeRO stage, and the free-form
`deepspeed` section against the typed keys it must not contradict. Torch-free: config.validate runs them on
every config read, so the sbatch script refuses a bad run before it asks for nodes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..checks import Check, one_of

if TYPE_CHECKING:
    from ..config import RunConfig


def deepspeed_checks(cfg: "RunConfig") -> list[Check]:
    o = cfg.optim
    checks: list[Check] = []
    if o.zero_stage is not None:
        checks.append(one_of(o.zero_stage, "optim.zero_stage", (0, 1, 2, 3)))
        checks.append((cfg.backend == "deepspeed" or o.zero_stage == 0,
                       f"optim.zero_stage={o.zero_stage} needs backend \"deepspeed\" (the accelerate backend runs "
                       "plain DDP): set backend=deepspeed, or drop optim.zero_stage"))
    checks.append((cfg.backend == "deepspeed" or not cfg.deepspeed,
                   f"deepspeed settings {sorted(cfg.deepspeed)} need backend \"deepspeed\"; this run's backend is "
                   f"{cfg.backend!r}"))
    reserved = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
    clash = sorted(reserved & set(cfg.deepspeed))
    checks.append((not clash, f"deepspeed.{clash[0] if clash else ''} is derived from optim.global_batch and "
                              "optim.micro_batch: set those instead"))
    checks.extend(deepspeed_contradictions(cfg))
    return checks


# A `deepspeed` entry that sets what a typed key decides: (path in the DeepSpeed config, typed key, its value).
def _deepspeed_typed(cfg: "RunConfig") -> list[tuple[str, str, Any]]:
    o = cfg.optim
    return [("zero_optimization.stage", "optim.zero_stage", cfg.zero_stage),
            ("bf16.enabled", "optim.precision", o.precision == "bf16"),
            ("fp16.enabled", "optim.precision", o.precision == "fp16"),
            ("gradient_clipping", "optim.clip_grad", o.clip_grad)]


def deepspeed_contradictions(cfg: "RunConfig") -> list[tuple[bool, str]]:
    """The `deepspeed` dict against the typed keys: a value that contradicts one would run while the log,
    config.json and the typed key say otherwise, so it is an error; the optimizer and scheduler are built
    from the optim section."""
    out = []
    for path, key, want in _deepspeed_typed(cfg):
        node: Any = cfg.deepspeed
        for part in path.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        out.append((node is _MISSING or node == want,
                    f"deepspeed.{path}={node!r} contradicts {key} (which gives {want!r}): set {key} instead and "
                    f"drop deepspeed.{path}"))
    for section in ("optimizer", "scheduler"):
        out.append((section not in cfg.deepspeed, f"deepspeed.{section}: the {section} is built from the optim "
                                                  "section (AdamW, timm's schedule): set optim.* instead"))
    return out


_MISSING = object()
