"""Fine-tuning config: the pretraining sections plus `finetune` (weights to start from, lr decay, EMA)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pretrain.config import RunConfig, in_range, load_config, opt


@dataclass
class FinetuneSection:
    pretrained: str = opt("", (
        "our run/checkpoint dir, an exported .safetensors, an official .pth, timm weights; URL ok"))
    from_scratch: bool = opt(False, (
        "start from random weights with the fine-tune recipe (the baseline a pretrained start is measured "
        "against); finetune.pretrained must then be empty"))
    reset_head: bool = opt(False, "zero-initialize the classifier instead of loading/mapping it")
    allow_pickle: bool = opt(False, "load .pth files holding more than tensors (runs pickle: trusted files only)")
    layer_decay: float = opt(1.0, "< 1: layer-wise lr decay (deeper blocks get larger lr)")
    ema_decay: float = opt(0.0, "> 0: keep an EMA of the weights, evaluated and exported beside the model")


@dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning run: the same loop as pretraining, accelerate (DDP) by default."""
    run_dir: str = opt("runs/finetune", "config.json, metrics.jsonl, tb/, checkpoints/, export/")
    backend: str = opt("accelerate", "accelerate (DDP) | deepspeed (ZeRO, e.g. Swin-L at 384)")
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def checks(self) -> list[tuple[bool, str]]:
        f = self.finetune
        task = (self.task == "classification", f"task={self.task!r}: fine-tuning trains a classifier (task "
                "classification); SimMIM is a pretraining task (python -m pretrain.cli.train with task=simmim), whose "
                "run fine-tunes from --pretrained")
        return [task] + super().checks() + [
            in_range(f.layer_decay, "finetune.layer_decay", 0, 1, lo_open=True),
            in_range(f.ema_decay, "finetune.ema_decay", 0, 1, hi_open=True),
            (not (f.from_scratch and f.pretrained), f"finetune.from_scratch with finetune.pretrained="
             f"{f.pretrained!r}: choose one (drop --pretrained, or --from-scratch)"),
        ]


def load_finetune_config(path: str, overrides: list[str] = ()) -> FinetuneConfig:
    return load_config(path, overrides, cls=FinetuneConfig)


def missing_inputs(cfg: FinetuneConfig, eval_only: bool, resuming: bool) -> list[str]:
    """What the run still needs, phrased as the flag that provides it."""
    out = []
    if not cfg.finetune.pretrained and not cfg.finetune.from_scratch and not resuming:
        out.append("--pretrained PATH_OR_URL (our run dir or export, an official .pth, timm weights), or "
                   "--from-scratch")
    if not eval_only and not (cfg.data.train and cfg.data.val):
        out.append("--data DIR_OR_URL (shards with _info.json or info.json: 'train' and 'validation' splits)")
    elif eval_only and not cfg.data.val:
        out.append("--data DIR_OR_URL (shards with _info.json or info.json; its 'validation' split is evaluated)")
    return out


def with_flags(cfg: FinetuneConfig, res: Optional[int], window: Optional[int], pretrained: Optional[str],
               data: Optional[str], num_classes: Optional[int], epochs: Optional[int], batch_size: Optional[int],
               output: Optional[str]) -> FinetuneConfig:
    """The flags given (None: not given) over the config; a value out of range (--window 0, --epochs 0) is
    refused by `revalidate` naming the key it sets, never replaced by a default."""
    if res is not None:
        cfg.model.img_size = cfg.aug.img_size = res
        cfg.model.window_size = window if window is not None else max(1, res // 32)
    elif window is not None:
        cfg.model.window_size = window
    if pretrained:
        cfg.finetune.pretrained = pretrained
    if data:
        cfg.data.train = cfg.data.val = data  # a manifest, or the folder holding _info.json / info.json
    if num_classes is not None:
        cfg.model.num_classes = num_classes
    if epochs is not None:
        cfg.optim.epochs = epochs
    if batch_size is not None:
        cfg.optim.global_batch = batch_size
        cfg.optim.micro_batch = min(cfg.optim.micro_batch, batch_size)
    if output:
        cfg.run_dir = output
    return cfg


def revalidate(cfg: FinetuneConfig) -> FinetuneConfig:
    """The checks again after the command-line flags changed the config."""
    from pretrain.config import validate
    validate(cfg)
    return cfg


if __name__ == "__main__":
    from pretrain.config import reference_markdown
    print(reference_markdown(extra=((FinetuneSection, "finetune."),)))
