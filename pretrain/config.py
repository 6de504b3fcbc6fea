"""One typed config for a pretraining run: dataclasses loaded from JSON, overridden from the command line,
checked on load (unknown keys, wrong types, inconsistent batch sizes are errors naming the key). This module
holds the schema, the loader and each key's range; the rules of how keys act together are their owners'
(the transforms', the DeepSpeed backend's, the tasks', fine-tuning's), run here at load.

    cfg = load_config("configs/swin_b_22k.json", ["optim.lr=5e-4", "data.workers=8"])
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

# No torch, timm or torchvision here, nor in the owners' rules it runs: the sbatch script and tools read configs
# without loading them (tests/test_layering.py checks).
from .architecture import VARIANTS as VARIANT_SHAPES
from .architecture import architecture_problem
from .checks import Check, ConfigError, in_range, one_of, raise_failed, set_keys  # noqa: F401  (ConfigError: its home)
from .data.aug_checks import aug_checks
from .tasks.checks import CLASSIFICATION_ONLY, task_checks
from .training.deepspeed_checks import deepspeed_checks

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)  # = timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)  # = timm.data.IMAGENET_DEFAULT_STD


def opt(default: Any, help: str) -> Any:
    """A config key: its default and its help, which docs/config.md is generated from."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def derived(default: Any, source: str) -> Any:
    """A field set from another key (`source`), never from a config file: naming it there is an error."""
    return field(default=default, metadata={"derived": source})


@dataclass
class AugConfig:
    """Official Swin recipe defaults."""
    img_size: int = derived(224, "model.img_size")
    auto_augment: Optional[str] = opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec; null: off")
    color_jitter: Optional[float] = opt(None, (
        "ColorJitter strength, only with auto_augment null (timm applies it only without RandAugment); "
        "null: 0.4, the official value"))
    interpolation: str = opt("bicubic", "resize interpolation (timm names), in training and evaluation ('random': "
                                        "training only, bicubic in evaluation)")
    hflip: float = opt(0.5, "horizontal flip probability")
    re_prob: float = opt(0.25, "random erasing probability (on the device)")
    mixup: float = opt(0.8, "Mixup alpha; 0 with cutmix 0 turns mixing off")
    cutmix: float = opt(1.0, "CutMix alpha")
    mixup_prob: float = opt(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = opt(0.5, "probability of CutMix instead of Mixup when both are on")
    label_smoothing: float = opt(0.1, "on the (mixed) targets")
    eval_crop: bool = opt(True, "False: resize straight to img_size (the official 384 fine-tune evaluation)")
    eval_crop_pct: Optional[float] = opt(None, (
        "with eval_crop true only: resize to img_size / crop_pct, then center crop; null: 0.875"))
    draft_decode: bool = opt(True, (
        "decode JPEGs at a reduced DCT scale where the result stays >= the output size (per sample: from the "
        "random crop in training, from the resize in evaluation)"))
    jpeg_roi: str = opt("auto", "training: decode only the crop (libjpeg-turbo): auto, on (required) or off")
    mean: tuple = opt(IMAGENET_DEFAULT_MEAN, "normalization, on the device")
    std: tuple = opt(IMAGENET_DEFAULT_STD, "normalization, on the device")

    @property
    def jitter(self) -> float:
        return 0.4 if self.color_jitter is None else self.color_jitter

    @property
    def crop_pct(self) -> float:
        return 0.875 if self.eval_crop_pct is None else self.eval_crop_pct


ATTN_IMPLS = ("auto", "sdpa", "flex", "math")  # = pretrain.models.layers.ATTN_IMPLS (tested)
VARIANTS = tuple(VARIANT_SHAPES)


@dataclass
class ModelSection:
    variant: str = opt("swin_base", "swin_tiny | swin_small | swin_base | swin_large | swinv2_tiny ... swinv2_large")
    img_size: int = opt(224, "input resolution (square)")
    window_size: int = opt(7, "attention window; shrinks to a stage's resolution where that is smaller")
    num_classes: int = opt(21841, "classifier outputs; 0 builds a feature extractor")
    drop_path_rate: float = opt(0.2, "stochastic depth at the last block (linear from 0)")
    ape: bool = opt(False, "absolute position embedding (off in all released Swin models)")
    grad_checkpointing: bool = opt(False, "recompute each block in backward (less memory, ~30% more compute)")
    attn_impl: str = opt("auto", "auto (sdpa on CUDA, math elsewhere) | sdpa | flex (FlexAttention, CUDA) | math")
    compile: Union[bool, str] = opt("auto", (
        "torch.compile the model in the engine: auto (on for CUDA, off on CPU) | true | false"))
    compile_cache: str = opt("", (
        "persistent inductor/Triton cache, so a requeued job compiles fast; \"\": <run_dir>/compile_cache"))
    embed_dim: Optional[int] = opt(None, "with depths and num_heads: a custom architecture instead of the variant's")
    depths: Optional[list[int]] = opt(None, "blocks per stage, e.g. [2, 2, 18, 2]")
    num_heads: Optional[list[int]] = opt(None, "attention heads per stage, e.g. [4, 8, 16, 32]")
    pretrained_window_sizes: Optional[list[int]] = opt(None, (
        "Swin V2: per stage, the window its position bias was trained at (0: none); fine-tuning derives it from "
        "the checkpoint when not given"))


@dataclass
class DataSection:
    train: str = opt("", "training shards: their _info.json/info.json, its folder, or 'PATTERN|COUNT' (fsspec URLs)")
    val: str = opt("", "the validation shards, as data.train; empty: no evaluation")
    train_split: str = opt("train", "split name in the manifest (train_12k: its alt_label), or 'PATTERN|COUNT'")
    val_split: str = opt("validation", "split name in the manifest, or 'PATTERN|COUNT'")
    workers: int = opt(8, "DataLoader worker processes per rank")
    shuffle_buffer: int = opt(2000, "samples per worker shuffle buffer")
    allow_pipe: bool = opt(False, "allow 'pipe:' shard URLs (they run a shell command)")
    max_corrupt: int = opt(100, "corrupt samples per rank and epoch before the run fails")
    on_bad_shard: str = opt("fatal", "fatal | skip: an unreadable shard after the retries")
    retries: int = opt(3, "attempts to read a shard, with exponential backoff")
    start_method: str = opt("auto", "DataLoader workers: auto (the platform's default) | fork | spawn | forkserver")


@dataclass
class OptimSection:
    global_batch: int = opt(4096, "images per optimizer update, all ranks together")
    micro_batch: int = opt(64, "images per rank per forward/backward")
    epochs: int = opt(90, "training length")
    warmup_epochs: float = opt(5.0, "linear warm-up from warmup_lr, then the schedule")
    schedule: str = opt("cosine", "after the warm-up: cosine (to min_lr) | multistep (x decay_rate at each of "
                                  "decay_epochs, SimMIM's pretraining)")
    decay_epochs: list[float] = opt([], "schedule multistep: the epochs where the lr is multiplied by decay_rate")
    decay_rate: float = opt(0.1, "schedule multistep: the factor at each of decay_epochs")
    max_steps: int = opt(0, "stop after this many optimizer updates (0: run all epochs)")
    base_lr: float = opt(1.25e-4, "per lr_scale_batch images; scaled linearly with global_batch")
    warmup_lr: float = opt(1.25e-7, "per lr_scale_batch images, scaled like base_lr")
    min_lr: float = opt(1.25e-6, "per lr_scale_batch images, scaled like base_lr")
    lr_scale_batch: int = opt(512, "the batch size base_lr, warmup_lr and min_lr are given for")
    weight_decay: float = opt(0.05, "AdamW; not on norms, biases, position tables")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    eps: float = opt(1e-8, "AdamW epsilon")
    clip_grad: float = opt(5.0, "set explicitly: DeepSpeed >= 0.19.3 defaults to 1.0")
    precision: str = opt("bf16", "bf16 | fp16 | fp32")
    zero_stage: Optional[int] = opt(None, "DeepSpeed ZeRO stage 0..3 (default 1); only with backend \"deepspeed\"")
    max_nonfinite: int = opt(10, "this many non-finite losses in a row stop the run")

    @property
    def lr(self) -> float:
        """base_lr scaled by global_batch / lr_scale_batch (the official recipe)."""
        return self.base_lr * self.global_batch / self.lr_scale_batch


@dataclass
class CheckpointSection:
    dir: str = opt("", "default: <run_dir>/checkpoints (any local path)")
    every_steps: int = opt(1000, "checkpoint every N updates (and at every epoch end)")
    keep: int = opt(3, "complete checkpoints kept")
    term_save_budget_s: float = opt(20.0, "on SIGTERM, save only if the last save took less (Slurm KillWait: 30 s)")


@dataclass
class LogSection:
    every_steps: int = opt(10, "metrics every N updates (metrics.jsonl, TensorBoard, progress bar)")
    eval_every_steps: int = opt(0, "0: at the end of every epoch")
    tensorboard: bool = opt(True, "also write <run_dir>/tb")
    progress: bool = opt(True, "progress bar on rank 0")


@dataclass
class SimMIMSection:
    """Masked image modelling (task simmim): the official SimMIM recipe's defaults."""
    mask_patch_size: int = opt(32, "side of a masked square in pixels: divides model.img_size, a multiple of the "
                                   "patch size (4)")
    mask_ratio: float = opt(0.6, "share of the mask squares masked, in (0, 1): ceil(ratio * squares) per image, "
                                 "fewer than all of them")
    norm_target_patch: int = opt(0, "reconstruct pixels normalized by their local mean and std over this odd "
                                    "window (the V2 recipe: 47); 0: raw normalized pixels (the V1 recipe)")
    crop_scale: list[float] = opt([0.67, 1.0], "RandomResizedCrop area range (the SimMIM transform: crop, flip)")
    crop_ratio: list[float] = opt([0.75, 1.3333333333333333], "RandomResizedCrop aspect-ratio range")


@dataclass
class ProbeSection:
    """A weighted kNN probe of the encoder's features while a run trains (DINO's vote), for either task."""
    data: str = opt("", "labelled shards (as data.val): bank_split is the memory bank, query_split the images it "
                        "classifies; empty: no probe")
    bank_split: str = opt("train", "the split whose features vote (at most max_per_class images of each class)")
    query_split: str = opt("validation", "the split the vote classifies (probe_knn_top1/top5)")
    max_per_class: int = opt(0, "bank images kept per class, the first read (by rank, then order); 0: all")
    every_steps: int = opt(0, "probe every N updates; 0: with each evaluation (log.eval_every_steps)")
    k: int = opt(20, "neighbours that vote (DINO: 20)")
    temperature: float = opt(0.07, "a neighbour's vote is exp(cosine / temperature) (DINO: 0.07)")
    stage: int = opt(-1, "features: -1 the final norm's pooled output (what the classifier sees); 0..S-1 that "
                         "stage's pooled output (for masked image modelling a middle stage often probes better)")


BACKENDS = ("deepspeed", "accelerate")
TASKS = ("classification", "simmim")  # = pretrain.tasks.TASKS (tested)


@dataclass
class RunConfig:
    """The sections a pretraining and a fine-tuning run share (one training loop runs both)."""
    run_dir: str = opt("runs/pretrain", "config.json, metrics.jsonl, tb/, checkpoints/, export/")
    seed: int = opt(0, "data order, augmentation and initialization")
    recipe: str = opt("", "where the values come from (e.g. the official config file); recorded, not used")
    task: str = opt("classification", "the objective: classification (labels) | simmim (masked image modelling, "
                                      "no labels needed; settings in the simmim section)")
    backend: str = opt("deepspeed", "deepspeed (ZeRO; pretraining's default) | accelerate (DDP; fine-tuning's default)")
    dist_timeout_s: int = opt(600, "a collective waiting longer (a dead rank) fails the job instead of hanging")
    deepspeed: dict = field(default_factory=dict, metadata={"help": (
        "merged into the generated DeepSpeed config (backend deepspeed)")})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    simmim: SimMIMSection = field(default_factory=SimMIMSection)
    probe: ProbeSection = field(default_factory=ProbeSection)

    def to_dict(self) -> dict:
        """Every key a config file may hold (derived fields, set from another key, are left out)."""
        d = dataclasses.asdict(self)
        d["aug"].pop("img_size")
        return d

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
        return self.optim.lr

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage in force: optim.zero_stage, 1 by default under DeepSpeed, 0 (plain DDP) otherwise."""
        if self.optim.zero_stage is not None:
            return self.optim.zero_stage
        return 1 if self.backend == "deepspeed" else 0

    def checks(self) -> list[tuple[bool, str]]:
        """(condition, message) pairs this config must satisfy; subclasses add their sections'."""
        return run_checks(self)


@dataclass
class TrainConfig(RunConfig):
    """A pretraining run."""


# ------------------------------------------------------------------------------------------ loading

def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:  # Union[bool, str]: the first type the value has
            try:
                return _check_type(value, a, key)
            except ConfigError:
                pass
        return _check_type(value, options[-1], key)
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
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
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
        if "derived" in fields[k].metadata:
            raise ConfigError(f"{prefix}{k} is set from {fields[k].metadata['derived']}: remove {prefix}{k} and set "
                              f"{fields[k].metadata['derived']}")
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


# The shipped recipes: package data (pretrain/recipes/*.json, finetune/*.json), which a checkout's configs/ is.
RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_names() -> list[str]:
    """The shipped recipes by name: `swin_l_22k`, `finetune/swin_b_22kto1k_384`, ..."""
    return sorted(os.path.relpath(os.path.join(d, f), RECIPES)[:-len(".json")]
                  for d, _, files in os.walk(RECIPES) for f in files if f.endswith(".json"))


def resolve_config(path: str) -> str:
    """`--config`'s file: the path itself where it is a file (relative to the current directory), else the
    shipped recipe it names: `swin_l_22k`, `finetune/swin_b_22kto1k_384` (with or without .json, or as a
    checkout's `configs/NAME.json`), so an installed package runs its recipes from any directory."""
    if os.path.isfile(path):
        return path
    name = path[len("configs/"):] if path.startswith("configs/") else path
    recipe = os.path.join(RECIPES, name if name.endswith(".json") else name + ".json")
    if os.path.isfile(recipe):
        return recipe
    raise ConfigError(f"config {path} does not exist: give a JSON file, or a shipped recipe's name "
                      f"({', '.join(recipe_names())})")


def read_config(cls: type, path: Optional[str] = None, overrides: list[str] = ()) -> Any:
    """A config of dataclass `cls` from a JSON file or a shipped recipe's name (`resolve_config`; None: the
    defaults) with `key=value` overrides applied; unknown keys and wrong types are errors. Checks beyond types
    are the caller's."""
    data: dict = {}
    if path:
        path = resolve_config(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    for o in overrides:
        apply_override(data, o)
    return from_dict(cls, data)


def load_config(path: Optional[str] = None, overrides: list[str] = (), cls: type = TrainConfig) -> Any:
    """Read, override and validate a run config (`cls`: TrainConfig, or fine-tuning's FinetuneConfig)."""
    cfg = read_config(cls, path, overrides)
    validate(cfg)
    return cfg


def run_checks(cfg: RunConfig) -> list[Check]:
    """(condition, message) pairs every run config (pretraining and fine-tuning) must satisfy: every
    numeric key's range and every choice, named by its key."""
    o, m, d, a, c, lg = cfg.optim, cfg.model, cfg.data, cfg.aug, cfg.checkpoint, cfg.log
    checks = [
        one_of(cfg.backend, "backend", BACKENDS),
        one_of(cfg.task, "task", TASKS),
        in_range(cfg.seed, "seed", 0),
        in_range(cfg.dist_timeout_s, "dist_timeout_s", 0, lo_open=True),
        in_range(m.img_size, "model.img_size", 1),
        in_range(m.window_size, "model.window_size", 1),
        in_range(m.num_classes, "model.num_classes", 1),  # every training stage classifies (0: no head)
        in_range(m.drop_path_rate, "model.drop_path_rate", 0, 1, hi_open=True),
        one_of(m.attn_impl, "model.attn_impl", ATTN_IMPLS),
        one_of(m.compile, "model.compile", (True, False, "auto")),
        one_of(m.variant, "model.variant", VARIANTS),
        (m.pretrained_window_sizes is None or (m.variant.startswith("swinv2") and all(w >= 0 for w in
                                                m.pretrained_window_sizes)),
         f"model.pretrained_window_sizes={m.pretrained_window_sizes}: Swin V2 only (model.variant swinv2_*), "
         "one window >= 0 per stage"),
        in_range(d.workers, "data.workers", 0),
        in_range(d.shuffle_buffer, "data.shuffle_buffer", 1),
        in_range(d.max_corrupt, "data.max_corrupt", 0),
        in_range(d.retries, "data.retries", 1),
        one_of(d.on_bad_shard, "data.on_bad_shard", ("fatal", "skip")),
        one_of(d.start_method, "data.start_method", ("auto", "fork", "spawn", "forkserver")),
        in_range(o.global_batch, "optim.global_batch", 1),
        in_range(o.micro_batch, "optim.micro_batch", 1),
        (o.global_batch % max(o.micro_batch, 1) == 0,
         f"optim.global_batch={o.global_batch} is not a multiple of optim.micro_batch={o.micro_batch}"),
        in_range(o.epochs, "optim.epochs", 1),
        in_range(o.warmup_epochs, "optim.warmup_epochs", 0, o.epochs),
        in_range(o.max_steps, "optim.max_steps", 0),
        in_range(o.base_lr, "optim.base_lr", 0, lo_open=True),
        in_range(o.warmup_lr, "optim.warmup_lr", 0),
        in_range(o.min_lr, "optim.min_lr", 0),
        in_range(o.lr_scale_batch, "optim.lr_scale_batch", 1),
        in_range(o.weight_decay, "optim.weight_decay", 0),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         f"optim.betas must be two values in [0, 1), got {o.betas}"),
        in_range(o.eps, "optim.eps", 0, lo_open=True),
        in_range(o.clip_grad, "optim.clip_grad", 0),
        one_of(o.precision, "optim.precision", ("bf16", "fp16", "fp32")),
        in_range(o.max_nonfinite, "optim.max_nonfinite", 1),
        in_range(c.every_steps, "checkpoint.every_steps", 1),
        in_range(c.keep, "checkpoint.keep", 1),
        in_range(c.term_save_budget_s, "checkpoint.term_save_budget_s", 0),
        in_range(lg.every_steps, "log.every_steps", 1),
        in_range(lg.eval_every_steps, "log.eval_every_steps", 0),
    ]
    if m.embed_dim is not None:
        checks.append(in_range(m.embed_dim, "model.embed_dim", 1))
    checks += schedule_checks(o) + aug_checks(a) + deepspeed_checks(cfg) + task_checks(cfg) + probe_checks(cfg)
    return checks


def probe_checks(cfg: RunConfig) -> list[Check]:
    p = cfg.probe
    if not p.data:
        changed = set_keys(p, "probe")
        return [(not changed, f"{', '.join(changed)} act(s) only with probe.data set (labelled shards): set it, or "
                              "remove them")]
    stages = len(cfg.model.depths or VARIANT_SHAPES.get(cfg.model.variant, {}).get("depths", (0,) * 4))
    return [in_range(p.k, "probe.k", 1), in_range(p.temperature, "probe.temperature", 0, lo_open=True),
            in_range(p.every_steps, "probe.every_steps", 0), in_range(p.max_per_class, "probe.max_per_class", 0),
            in_range(p.stage, "probe.stage", -1, stages - 1),
            (p.every_steps > 0 or bool(cfg.data.val),
             "probe.every_steps=0 probes with each evaluation, but data.val is empty (no evaluation): set "
             "probe.every_steps")]


def schedule_checks(o: OptimSection) -> list[Check]:
    checks = [one_of(o.schedule, "optim.schedule", ("cosine", "multistep")),
              in_range(o.decay_rate, "optim.decay_rate", 0, 1, lo_open=True)]
    if o.schedule == "multistep":
        checks += [(bool(o.decay_epochs), "optim.schedule=multistep needs optim.decay_epochs (e.g. [700])"),
                   (all(o.warmup_epochs <= e <= o.epochs for e in o.decay_epochs),
                    f"optim.decay_epochs={o.decay_epochs} must lie between optim.warmup_epochs={o.warmup_epochs} "
                    f"and optim.epochs={o.epochs}"),
                   (o.min_lr == OptimSection.min_lr, f"optim.min_lr={o.min_lr} acts nowhere with "
                    "optim.schedule=multistep (the lr only steps down by decay_rate): remove it")]
    else:
        checks.append((not o.decay_epochs and o.decay_rate == OptimSection.decay_rate,
                       "optim.decay_epochs / optim.decay_rate act only with optim.schedule=multistep: remove them, "
                       "or --set optim.schedule=multistep"))
    return checks


def validate(cfg: RunConfig) -> None:
    """Every check of `cfg.checks()`, the architecture the model section describes, then derived values
    (aug.img_size follows model.img_size). All at load, before any process group or engine."""
    raise_failed(cfg.checks())
    m = cfg.model
    arch = {**VARIANT_SHAPES[m.variant], **{k: getattr(m, k) for k in ("embed_dim", "depths", "num_heads")
                                             if getattr(m, k) is not None}}
    problem = architecture_problem((m.img_size, m.img_size), 4, arch["embed_dim"], arch["depths"],
                                   arch["num_heads"], m.window_size, arch.get("version", 1),
                                   m.pretrained_window_sizes)
    if problem:
        raise ConfigError(f"model: {problem}; fix model.img_size/embed_dim/depths/num_heads/pretrained_window_sizes "
                          "so they fit together")
    cfg.aug.img_size = cfg.model.img_size  # one source of truth


# ------------------------------------------------------------------------------------ reference docs

# Keys that act only in some runs (the "applies to" column of docs/config.md); every other key acts in both
# stages, on either backend. A key that would act nowhere in a run is an error there (run_checks).
APPLIES = {"optim.zero_stage": "backend deepspeed", "deepspeed": "backend deepspeed",
           "finetune.": "fine-tuning", "simmim.": "task simmim (pretraining)", "task": "pretraining (fine-tuning: "
           "classification only)", "optim.decay_epochs": "optim.schedule multistep",
           "optim.decay_rate": "optim.schedule multistep", "optim.min_lr": "optim.schedule cosine",
           "model.num_classes": "task classification", "probe.": "both stages and tasks, with probe.data set",
           "probe.data": "both stages and tasks", **{f"aug.{k}": "task classification" for k in CLASSIFICATION_ONLY}}


def reference_markdown(extra: tuple = ()) -> str:
    """The config reference (docs/config.md), generated from the schema so it can't drift.
    `extra`: more (dataclass, prefix) sections, e.g. fine-tuning's."""
    lines = ["# Config reference", "",
             "Generated by `python -m finetune.config > docs/config.md` from `pretrain/config.py` (pretraining) and",
             "`finetune/config.py` (fine-tuning adds the `finetune` section). Every key, its type, its default,",
             "and where it acts: pretraining and fine-tuning run the same loop, so almost every key acts in both.",
             "Fine-tuning's defaults differ in two keys: `backend` is `\"accelerate\"` and `run_dir` is",
             "`\"runs/finetune\"`. Every key is checked on load (type, range, choices); a key that would act nowhere",
             "in a run (e.g. `optim.zero_stage` with backend accelerate) is an error there.",
             "Override any key with `--set section.key=value`.", ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) or "derived" in f.metadata:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = str(tp).replace("typing.", "") if typing.get_origin(tp) else tp.__name__
            key = f"{prefix}{f.name}"
            applies = APPLIES.get(key) or APPLIES.get(prefix) or "both stages"
            meaning = f.metadata.get("help", "").replace("|", "\\|")  # a table cell
            rows.append(f"| `{key}` | {tname} | `{json.dumps(default)}` | {applies} | {meaning} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "",
                          "| key | type | default | applies to | meaning |", "|---|---|---|---|---|", *rows, ""])
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                section(hints[f.name], f"{prefix}{f.name}.")

    section(TrainConfig, "")
    for cls, prefix in extra:
        section(cls, prefix)
    return "\n".join(lines)
