"""One typed config for a pretraining run: dataclasses loaded from JSON, overridden from the command line,
checked on load (unknown keys, wrong types, inconsistent batch sizes are errors naming the key).

    cfg = load_config("configs/swin_b_22k.json", ["optim.lr=5e-4", "data.workers=8"])
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .data.transforms import AugConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    variant: str = "swin_base"  # swin_tiny | swin_small | swin_base | swin_large
    img_size: int = 224  # input resolution (square)
    window_size: int = 7  # attention window; shrinks to a stage's resolution where that is smaller
    num_classes: int = 21841  # classifier outputs; 0 builds a feature extractor
    drop_path_rate: float = 0.2  # stochastic depth at the last block (linear from 0)
    ape: bool = False  # absolute position embedding (off in all released Swin models)
    grad_checkpointing: bool = False  # recompute each block in backward (less memory, ~30% more compute)
    attn_impl: str = "auto"  # auto (sdpa on CUDA, math elsewhere) | sdpa | math
    embed_dim: Optional[int] = None  # with depths and num_heads: a custom architecture instead of the variant's
    depths: Optional[list[int]] = None  # blocks per stage, e.g. [2, 2, 18, 2]
    num_heads: Optional[list[int]] = None  # attention heads per stage, e.g. [4, 8, 16, 32]


@dataclass
class DataSection:
    train: str = ""  # the training shards' _info.json (local path or fsspec URL)
    val: str = ""  # validation shards' _info.json; empty: no evaluation
    train_split: str = "train"  # split name in _info.json
    val_split: str = "validation"  # split name in _info.json
    workers: int = 8  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples per worker shuffle buffer
    allow_pipe: bool = False  # allow 'pipe:' shard URLs (they run a shell command)
    max_corrupt: int = 100  # corrupt samples per rank and epoch before the run fails
    on_bad_shard: str = "fatal"  # fatal | skip: an unreadable shard after the retries
    retries: int = 3  # attempts to read a shard, with exponential backoff


@dataclass
class OptimSection:
    global_batch: int = 4096  # images per optimizer update, all ranks together
    micro_batch: int = 64  # images per rank per forward/backward
    epochs: int = 90  # training length
    warmup_epochs: float = 5.0  # linear warm-up from warmup_lr, then cosine to min_lr
    max_steps: int = 0  # stop after this many optimizer updates (0: run all epochs)
    base_lr: float = 1.25e-4  # per lr_scale_batch images; scaled linearly with global_batch
    warmup_lr: float = 1.25e-7  # per lr_scale_batch images, scaled like base_lr
    min_lr: float = 1.25e-6  # per lr_scale_batch images, scaled like base_lr
    lr_scale_batch: int = 512  # the batch size base_lr, warmup_lr and min_lr are given for
    weight_decay: float = 0.05  # AdamW; not on norms, biases, position tables
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 5.0  # set explicitly: DeepSpeed >= 0.19.3 defaults to 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0..3
    max_nonfinite: int = 10  # this many non-finite losses in a row stop the run


@dataclass
class CheckpointSection:
    dir: str = ""  # default: <run_dir>/checkpoints (any local path)
    every_steps: int = 1000  # checkpoint every N updates (and at every epoch end)
    keep: int = 3  # complete checkpoints kept
    term_save_budget_s: float = 20.0  # on SIGTERM, save only if the last save took less (Slurm KillWait: 30 s)


@dataclass
class LogSection:
    every_steps: int = 10  # metrics every N updates (metrics.jsonl, TensorBoard, progress bar)
    eval_every_steps: int = 0  # 0: at the end of every epoch
    tensorboard: bool = True  # also write <run_dir>/tb
    progress: bool = True  # progress bar on rank 0


@dataclass
class RunConfig:
    """The sections a pretraining and a fine-tuning run share."""
    run_dir: str = "runs/pretrain"  # config.json, metrics.jsonl, tb/, checkpoints/, export/
    seed: int = 0  # data order, augmentation and initialization
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir.rstrip('/')}/checkpoints"

    def accumulation(self, world: int) -> int:
        o = self.optim
        per_update = o.micro_batch * world
        if o.global_batch % per_update:
            raise ConfigError(f"optim.global_batch={o.global_batch} is not a multiple of optim.micro_batch "
                              f"({o.micro_batch}) x world size ({world}) = {per_update}; change one of them")
        return o.global_batch // per_update

    @property
    def lr(self) -> float:
        return self.optim.base_lr * self.optim.global_batch / self.optim.lr_scale_batch


@dataclass
class TrainConfig(RunConfig):
    dist_timeout_s: int = 600  # a collective waiting longer (a dead rank) fails the job instead of hanging
    deepspeed: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config


# ------------------------------------------------------------------------------------------ loading

def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool, dict) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, recursively; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _check_type(v, tp, prefix + k)
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """'optim.lr=5e-4' -> data['optim']['lr'] = 5e-4 (the value parsed as JSON, else kept as a string)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not KEY=VALUE")
    key, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def read_config(cls: type, path: Optional[str] = None, overrides: list[str] = ()) -> Any:
    """A config of dataclass `cls` from a JSON file (or the defaults) with `key=value` overrides applied;
    unknown keys and wrong types are errors. Checks beyond types are the caller's."""
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    for o in overrides:
        apply_override(data, o)
    return from_dict(cls, data)


def load_config(path: Optional[str] = None, overrides: list[str] = ()) -> TrainConfig:
    cfg = read_config(TrainConfig, path, overrides)
    validate(cfg)
    return cfg


def run_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """(condition, message) pairs every run config (pretraining and fine-tuning) must satisfy."""
    return [
        (cfg.optim.precision in ("bf16", "fp16", "fp32"),
         f"optim.precision must be bf16, fp16 or fp32, got {cfg.optim.precision!r}"),
        (cfg.aug.jpeg_roi in ("auto", "on", "off"), f"aug.jpeg_roi must be auto, on or off, got {cfg.aug.jpeg_roi!r}"),
    ]


def raise_failed(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    o, m = cfg.optim, cfg.model
    checks = run_checks(cfg) + [
        (o.zero_stage in (0, 1, 2, 3), f"optim.zero_stage must be 0..3, got {o.zero_stage}"),
        (o.micro_batch > 0 and o.global_batch > 0, "optim.micro_batch and optim.global_batch must be > 0"),
        (o.global_batch % o.micro_batch == 0,
         f"optim.global_batch={o.global_batch} is not a multiple of optim.micro_batch={o.micro_batch}"),
        (cfg.data.on_bad_shard in ("fatal", "skip"), "data.on_bad_shard must be 'fatal' or 'skip'"),
        (cfg.aug.img_size in (224, m.img_size), f"aug.img_size={cfg.aug.img_size} differs from "
                                                f"model.img_size={m.img_size}: set model.img_size only"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
        (len(o.betas) == 2, "optim.betas must have two values"),
    ]
    raise_failed(checks)
    cfg.aug.img_size = m.img_size  # one source of truth
    reserved = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
    clash = reserved & set(cfg.deepspeed)
    if clash:
        raise ConfigError(f"deepspeed.{sorted(clash)[0]} is derived from optim.global_batch and "
                          "optim.micro_batch: set those instead")


# ------------------------------------------------------------------------------------ reference docs

def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source: the comment is the key's help."""
    import inspect
    import re
    out = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+): [^=]+(?:= .*?)?\s+# (.*)$", line)
            if m:
                out[m[1]] = m[2].strip()
    return out


def reference_markdown(extra: tuple = ()) -> str:
    """The config reference (docs/config.md), generated from the schema so it can't drift.
    `extra`: more (dataclass, prefix) sections, e.g. fine-tuning's."""
    lines = ["# Config reference", "",
             "Generated by `python -m finetune.config > docs/config.md` from `pretrain/config.py` (pretraining) and",
             "`finetune/config.py` (fine-tuning adds the `finetune` section). Every key, its type, its default.",
             "Override any of them with `--set section.key=value`.", ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = str(tp).replace("typing.", "") if typing.get_origin(tp) else tp.__name__
            rows.append(f"| `{prefix}{f.name}` | {tname} | `{json.dumps(default)}` | {comments.get(f.name, '')} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", "| key | type | default | meaning |",
                          "|---|---|---|---|", *rows, ""])
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                section(hints[f.name], f"{prefix}{f.name}.")

    section(TrainConfig, "")
    for cls, prefix in extra:
        section(cls, prefix)
    return "\n".join(lines)
