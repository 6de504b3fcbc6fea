"""Loading a checkpoint into a model: the policy (convert, resize, fit the head, refuse what doesn't fit) and
the report of what was done.

Loading is strict: everything is converted and checked first, and only a checkpoint that fits is copied
into the model, so a failed load leaves the model untouched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch

from ..classes import NUM_22K, map22k_to_1k
from ..errors import RESET_HEAD, CheckpointError, CheckpointMismatchError
from ..models.shapes import (
    HEAD_B,
    HEAD_W,
    checkpoint_window,
    describe,
    family,
    infer_config,
    stage_windows,
    table_window,
    trained_windows,
)
from ..models.simmim import SimMIM, is_simmim_state, split_state
from ..models.swin import BUFFER_SUFFIXES, SwinTransformer, from_official
from .read import SIMMIM_MARK, Source, detect_layout, read_checkpoint
from .resize import resize_abs_pos_embed, resize_bias_table, resize_bias_table_geometric


@dataclass
class LoadReport:
    source: str
    layout: str
    converted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} (layout: {self.layout})"]
        for title, items in (("converted", self.converted), ("resized", self.resized),
                             ("re-initialized", self.reinitialized), ("dropped", self.dropped),
                             ("note", self.notes)):
            lines += [f"  {title}: {item}" for item in items]
        return "\n".join(lines)


def _fit_head(sd: dict, target: Mapping, model: SwinTransformer, reset_head: bool, report: LoadReport) -> None:
    nc = model.num_classes
    if nc == 0:
        for k in (HEAD_W, HEAD_B):
            if sd.pop(k, None) is not None:
                report.dropped.append(f"{k} (the model has no classifier, num_classes=0)")
        return
    if HEAD_W not in sd and not reset_head:
        return  # reported as missing by the strict check: the caller must ask for a new head
    src = sd[HEAD_W].shape if HEAD_W in sd else None
    if src is not None and src[1] != target[HEAD_W].shape[1]:
        return  # another width: a shape mismatch for the strict check, not a head to re-initialize
    if not reset_head and src is not None and src[0] == nc:
        return
    if not reset_head and src is not None and src[0] == NUM_22K and nc == 1000:
        rows = torch.tensor(map22k_to_1k())
        sd[HEAD_W], sd[HEAD_B] = sd[HEAD_W][rows], sd[HEAD_B][rows]
        report.converted.append("head: 21841 ImageNet-22K rows -> 1000 ImageNet-1K rows (official mapping)")
        return
    # The official fine-tuning code zero-initializes a head whose class count changed.
    sd[HEAD_W] = torch.zeros_like(target[HEAD_W])
    sd[HEAD_B] = torch.zeros_like(target[HEAD_B])
    why = "asked (reset_head=True)" if reset_head else (
        f"checkpoint has {src[0] if src is not None else 'no'} classes, model has {nc}")
    report.reinitialized.append(f"head.fc: zero-initialized ({why})")


def _check_tables(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any], name: str,
                  raw: Optional[Mapping[str, torch.Tensor]] = None) -> list[str]:
    """Bias tables that don't fit the checkpoint's own window, judged from the whole checkpoint: a table
    fits at the checkpoint's window, or at one smaller window shared by its whole stage (a stage smaller
    than the window; later stages no larger). Returns the damaged ones with why; they are never resized."""
    tables = {k: v for k, v in sd.items() if k.endswith("relative_position_bias_table")}
    if not tables:
        return []
    window = int(meta["config"]["window_size"]) if "config" in meta else checkpoint_window(raw or sd)
    per_stage: dict[int, set] = {}
    for k, v in tables.items():
        per_stage.setdefault(int(k.split(".")[1]), set()).add(table_window(v.shape[0]))
    damaged = []
    for k, v in tables.items():
        i, w = int(k.split(".")[1]), table_window(v.shape[0])
        later = [x for j, ws in per_stage.items() if j > i for x in ws]
        if w == window or (0 < w < window and per_stage[i] == {w} and all(0 < x <= w for x in later)):
            continue
        damaged.append(f"{k} {tuple(v.shape)} (window {w or '?'})")
    if damaged:
        return [f"{name}: bias table(s) that don't fit the checkpoint's window {window} (judged from its "
                f"{len(tables)} tables): " + ", ".join(sorted(damaged, key=_natural_key)[:8])
                + ". Such a tensor is damaged or from another model and is not resized; fix or re-export "
                "the checkpoint"]
    return []


def _fit_positions(sd: dict, target: Mapping, model: SwinTransformer, report: LoadReport,
                   geometric: bool = False) -> None:
    """`geometric`: bias tables by the SimMIM fine-tune's spline (a SimMIM checkpoint), else bicubic."""
    resized = []
    for k, v in list(sd.items()):
        t = target.get(k)
        if t is None or v.shape == t.shape:
            continue
        if k.endswith("relative_position_bias_table") and v.shape[1] == t.shape[1]:
            sd[k] = (resize_bias_table_geometric if geometric else resize_bias_table)(v, t.shape[0])
            resized.append((k, tuple(v.shape), tuple(t.shape)))
        elif k == "absolute_pos_embed" and v.shape[2] == t.shape[2]:
            sd[k] = resize_abs_pos_embed(v, model.patch_embed.grid_size)
            resized.append((k, tuple(v.shape), tuple(t.shape)))
    if resized:
        tables = [r for r in resized if r[0] != "absolute_pos_embed"]
        if tables:
            how = "by the SimMIM geometric spline" if geometric else "bicubic"
            report.resized.append(f"{len(tables)} relative_position_bias_table(s) {how}, e.g. "
                                  f"{tables[0][1]} -> {tables[0][2]}")
        report.resized += [f"absolute_pos_embed {a} -> {b} bicubic" for k, a, b in resized
                           if k == "absolute_pos_embed"]


def _note_cpb(report: LoadReport, model: SwinTransformer, sd: Mapping, meta: Mapping) -> None:
    """Say what the V2 position bias will see: the model's windows, its coordinate normalisation, and
    what the checkpoint was trained with where the file says."""
    c = model.cfg
    mine = c.pretrained_window_sizes or stage_windows(c)
    theirs = trained_windows(sd, meta)
    report.notes.append(f"continuous position bias evaluated at window {c.window_size}, coordinates normalised "
                        f"by windows {tuple(mine)}" + ("" if c.pretrained_window_sizes else " (the model's own)"))
    if theirs and tuple(theirs) != tuple(mine):
        report.notes.append(f"the checkpoint's position bias was trained with windows {tuple(theirs)}: build the "
                            f"model with pretrained_window_sizes={tuple(theirs)} to keep what it learned")


def _natural_key(item: Any) -> list:
    """Sort 'layers.2.blocks.10' after 'layers.2.blocks.9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(item))]


def _mismatch_message(name: str, sd: Mapping, target: Mapping, model: SwinTransformer,
                      missing: list, unexpected: list, mismatched: list) -> str:
    def show(items: list, n: int = 8) -> str:
        items = sorted(items, key=_natural_key)
        return ", ".join(map(str, items[:n])) + (f" ... ({len(items)} in all)" if len(items) > n else "")

    if set(missing) <= {HEAD_W, HEAD_B} and missing and not unexpected and not mismatched:
        return (f"{name} has no classifier ({', '.join(sorted(missing))}): a backbone, else the model's "
                f"{model.num_classes}-class head would be random; load it with {RESET_HEAD} for a new "
                "zero-initialized head (the official fine-tuning recipe)")
    lines = [f"{name} does not fit the model:"]
    if missing:
        lines.append(f"  missing keys: {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {show(unexpected)}")
    if mismatched:
        lines.append("  shape mismatches: " + show([f"{k} {a} vs model {b}" for k, a, b in mismatched]))
    try:
        ck = describe(infer_config(sd))
    except (KeyError, IndexError, ValueError):
        ck = "unrecognized"
    mine = model.cfg.to_dict()
    if ck == describe(mine):  # the architecture fits: the tensors named above are what is wrong
        lines.append(f"  hint: the checkpoint's architecture is the model's ({ck}), so only the "
                     f"{len(missing) + len(unexpected) + len(mismatched)} tensor(s) named above disagree: they are "
                     "damaged or from another model; fix or re-export the checkpoint (strict=False loads the rest)")
        return "\n".join(lines)
    lines.append(f"  hint: the checkpoint looks like {ck}; the model is {describe(mine)}. "
                 "Build the matching variant (build_model(variant, window_size=..., num_classes=...))"
                 + (f"; a checkpoint without a classifier loads with {RESET_HEAD}"
                    if HEAD_W in missing and len(missing) <= 2 else ""))
    return "\n".join(lines)


def load_pretrained(model: Union[SwinTransformer, SimMIM], source: Source, *, strict: bool = True,
                    reset_head: bool = False, allow_pickle: bool = False) -> LoadReport:
    """Load `source` (path, fsspec URL or state dict; official, timm or our layout; a Swin or a SimMIM
    checkpoint) into `model` (a Swin classifier/encoder, or a SimMIM model).

    Bias tables and absolute position embeddings are resized to the model's window/grid (official
    bicubic recipe; from a SimMIM checkpoint, the SimMIM fine-tune's geometric spline); index and mask
    buffers are rebuilt by the model, never loaded; the older `rpe_mlp` name of the V2 CPB MLP is read as
    `cpb_mlp`; a 21841-class head loads into a 1000-class model through the official 22K->1K mapping; any
    other class-count change zero-initializes the head. A SimMIM checkpoint loads into a classifier without
    its `mask_token` and decoder (reported as dropped). With strict=True any other difference raises
    CheckpointMismatchError and the model is left unchanged.
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    sd, meta = read_checkpoint(source, allow_pickle=allow_pickle)
    from_simmim = is_simmim_state(sd)
    extra: dict[str, torch.Tensor] = {}
    if from_simmim:
        sd, extra = split_state(sd)
    from_simmim = from_simmim or meta.get(SIMMIM_MARK) == "simmim"  # a SimMIM run's encoder export
    encoder = model.encoder if isinstance(model, SimMIM) else model
    kept_head = from_simmim and encoder.num_classes > 0 and not any(k.startswith("head.") for k in sd)
    report = _load_encoder(encoder, sd, meta, name, strict, reset_head, geometric=from_simmim, keep_head=kept_head)
    if from_simmim:
        report.layout = f"SimMIM ({report.layout} encoder)"
    if kept_head:
        report.reinitialized.append("head.fc: kept the model's init (a SimMIM checkpoint has no classifier)")
    if isinstance(model, SimMIM):
        _load_simmim_parts(model, extra, name, strict, report)
    elif extra:
        report.dropped.append(f"the SimMIM parts {', '.join(sorted(extra, key=_natural_key))} (pretraining only)")
    labels = meta.get("id2label")
    if labels and len(labels) == encoder.num_classes and not any(x.startswith("head.fc") for x in report.reinitialized):
        encoder.id2label = dict(labels)  # the class names travel on (export layout="transformers" writes them)
        report.notes.append(f"id2label: {len(labels)} class names kept (e.g. {labels[min(labels)]!r})")
    return report


def _load_simmim_parts(model: SimMIM, extra: dict, name: str, strict: bool, report: LoadReport) -> None:
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    missing = [k for k in target if k not in extra]
    unexpected = [k for k in extra if k not in target]
    mismatched = [f"{k} {tuple(extra[k].shape)} vs model {tuple(target[k].shape)}" for k in target
                  if k in extra and extra[k].shape != target[k].shape]
    if (missing or unexpected or mismatched) and strict:
        raise CheckpointMismatchError(
            f"{name} does not fit the SimMIM model outside its encoder: " + "; ".join(
                [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"shape mismatches {mismatched}" if mismatched else ""]).strip("; ")
            + (" (a plain Swin checkpoint has no mask token or decoder: load it with strict=False to start them "
               "fresh)" if missing and not extra else ""))
    ok = {k: v for k, v in extra.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(ok, strict=False)
    report.reinitialized += [f"{k} (missing, kept the model's init)" for k in missing]
    report.dropped += [f"{k} (not in the model)" for k in unexpected]


def _load_encoder(model: SwinTransformer, sd: dict, meta: dict, name: str, strict: bool, reset_head: bool,
                  geometric: bool, keep_head: bool = False) -> LoadReport:
    """`geometric`: bias tables by the SimMIM spline; `keep_head`: the model's classifier keeps its init (a
    SimMIM checkpoint has none, and the official SimMIM fine-tune leaves it as built)."""
    fam, mine = family(sd), model.cfg.version
    if fam and fam != mine:
        raise CheckpointError(
            f"{name} is a Swin V{fam} checkpoint ({'cpb_mlp and logit_scale' if fam == 2 else 'bias tables'}) but "
            f"the model is a Swin V{mine}: build a {'swinv2_*' if fam == 2 else 'swin_*'} model for it; the two "
            "position biases can't be converted into each other")
    layout = detect_layout(sd, meta)
    report = LoadReport(name, layout)
    if mine == 2:
        _note_cpb(report, model, sd, meta)
    raw = sd  # with the official index buffers, which vote on the window
    if layout in ("official", "transformers"):  # a transformers checkpoint was read into the official keys
        n_buffers = sum(k.endswith(BUFFER_SUFFIXES) for k in sd)
        sd = from_official(sd)
        report.converted.append(f"{layout} -> our key layout (patch merging moved to the next stage, "
                                f"{'q/k/v joined, classifier' if layout == 'transformers' else 'head'} -> head.fc)")
        if n_buffers:
            report.dropped.append(f"{n_buffers} relative_position_index/attn_mask buffers (rebuilt by the model)")
    else:
        sd = {k: v for k, v in sd.items() if not k.endswith(BUFFER_SUFFIXES)}
    target = model.state_dict()
    if keep_head and not reset_head:
        sd[HEAD_W], sd[HEAD_B] = target[HEAD_W].clone(), target[HEAD_B].clone()
    _fit_head(sd, target, model, reset_head, report)
    damaged = _check_tables(sd, meta, name, raw)
    if damaged:
        raise CheckpointMismatchError(damaged[0])
    original = dict(sd)
    _fit_positions(sd, target, model, report, geometric)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in sd
                  if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        msg = _mismatch_message(name, original, target, model, missing, unexpected, mismatched)
        if strict:
            raise CheckpointMismatchError(msg)
        for k, _, _ in mismatched:
            del sd[k]
        report.dropped += [f"{k} (not in the model)" for k in unexpected]
        report.dropped += [f"{k} (shape mismatch, kept the model's)" for k, _, _ in mismatched]
        report.reinitialized += [f"{k} (missing, kept the model's init)" for k in missing]
        sd = {k: v for k, v in sd.items() if k in target}
    model.load_state_dict(sd, strict=strict)
    return report
