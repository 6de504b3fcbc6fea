"""The tasks' config rules: a task's own section (`simmim`) acts only with that task, and what it holds must make
a mask; the classification transform's keys act nowhere with SimMIM. Torch-free: config.validate runs
`task_checks` on every config read (the `task` key's choices are the schema's)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..architecture import mask_problem
from ..checks import Check, set_keys

if TYPE_CHECKING:
    from ..config import RunConfig

# aug keys of the classification transform and loss: with task simmim they act nowhere (the SimMIM transform is
# a crop and a flip, the loss pixel L1)
CLASSIFICATION_ONLY = ("auto_augment", "color_jitter", "re_prob", "mixup", "cutmix", "mixup_prob",
                       "mixup_switch_prob", "label_smoothing")


def task_checks(cfg: "RunConfig") -> list[Check]:
    """The simmim section acts only with task simmim; the classification-only keys only without it."""
    s = cfg.simmim
    checks: list[Check] = []
    if cfg.task != "simmim":
        changed = set_keys(s, "simmim")
        checks.append((not changed, f"{', '.join(changed)} act(s) only with task=simmim (this run's task is "
                                    f"{cfg.task!r}): remove them, or set task=simmim"))
        return checks
    problem = mask_problem(cfg.model.img_size, s.mask_patch_size, 4, s.mask_ratio, prefix="simmim.")
    checks.append((not problem, problem))
    checks.append((s.norm_target_patch == 0 or (s.norm_target_patch > 1 and s.norm_target_patch % 2 == 1),
                   f"simmim.norm_target_patch={s.norm_target_patch} must be 0 (off) or an odd window > 1 (the V2 "
                   "recipe: 47)"))
    for key, pair, lo in (("crop_scale", s.crop_scale, 0.0), ("crop_ratio", s.crop_ratio, 0.0)):
        checks.append((len(pair) == 2 and lo < pair[0] <= pair[1] and (key != "crop_scale" or pair[1] <= 1),
                       f"simmim.{key}={pair} must be [low, high] with 0 < low <= high" +
                       (" <= 1" if key == "crop_scale" else "")))
    aug_defaults = type(cfg.aug)()
    changed = [f"aug.{k}" for k in CLASSIFICATION_ONLY if getattr(cfg.aug, k) != getattr(aug_defaults, k)]
    checks.append((not changed, f"{', '.join(changed)} act(s) nowhere with task=simmim (the SimMIM transform is a "
                                "crop and a flip, the loss an L1 on pixels): remove them"))
    checks.append((cfg.model.num_classes == type(cfg.model).num_classes,
                   f"model.num_classes={cfg.model.num_classes} acts nowhere with task=simmim (the encoder has no "
                   "classifier): remove it"))
    return checks
