"""Optimizer pieces shared by every stage: timm's parameter groups (weight decay, layer-wise lr decay), the
cosine schedule, the loss, and an fp32 weight EMA."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from ..compat import foreach_lerp_
from ..config import OptimSection


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """The official recipe's groups through timm's helpers: no weight decay on 1-D params (norms), biases and
    `model.no_weight_decay()` (bias tables, ape); with layer_decay < 1, lr scaled by
    layer_decay^(depth - layer) over the layers of `model.group_matcher()` (`lr_scale`, which timm's
    schedulers apply)."""
    skip = sorted(model.no_weight_decay())
    if layer_decay < 1:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def build_optimizer(model: torch.nn.Module, o: OptimSection, layer_decay: float):
    """torch's fused AdamW (CUDA and CPU): a handful of kernels per update whatever the number of parameter
    tensors, and it can skip an update on the device (`found_inf`, see SkipNonFinite)."""
    return torch.optim.AdamW(param_groups(model, o.weight_decay, layer_decay), lr=o.lr, betas=tuple(o.betas),
                             eps=o.eps, fused=True)


def nonfinite(norm: torch.Tensor) -> torch.Tensor:
    """1.0 where a global gradient norm is inf/NaN (or DeepSpeed's -1 sentinel for one), else 0.0; stays on
    the norm's device."""
    return (~torch.isfinite(norm) | (norm < 0)).float()


class SkipNonFinite:
    """Make a fused torch optimizer skip, on the device, an update whose global gradient norm is non-finite.

    Fused AdamW reads `optimizer.found_inf` (the protocol GradScaler uses): when it is 1 the kernel leaves
    weights, moments and step counts as they were. No host sync, no per-tensor check. `norm()` returns the
    norm the backend computed for clipping, on every rank the same (it is all-reduced), or None before
    there is one."""

    def __init__(self, optimizer: torch.optim.Optimizer, norm: Callable[[], torch.Tensor]):
        if not optimizer.defaults.get("fused"):
            raise ValueError("SkipNonFinite needs a fused optimizer (torch.optim.AdamW(..., fused=True))")
        self.norm = norm
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:  # a checkpoint from an unfused optimizer restores fused=None
            group["fused"], group["foreach"] = True, None
        norm = self.norm()  # None: no norm yet (a wrapper's state-initializing step before training)
        # ZeRO-3 may step a group with no parameters on this rank
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), None)
        if norm is not None and device is not None and getattr(optimizer, "found_inf", None) is None:
            optimizer.found_inf = nonfinite(torch.as_tensor(norm, dtype=torch.float32)).to(device)
            optimizer._skip_nonfinite_set = True

    def _post(self, optimizer, args, kwargs) -> None:
        if optimizer.__dict__.pop("_skip_nonfinite_set", False):
            del optimizer.found_inf


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimSection, updates_per_epoch: int) -> Scheduler:
    """Linear warm-up from warmup_lr, then cosine to min_lr (or, `multistep`, x decay_rate at each of
    decay_epochs: SimMIM's pretraining), stepped per update; the lrs scaled by global_batch / lr_scale_batch
    (official recipe)."""
    warmup = int(o.warmup_epochs * updates_per_epoch)
    scale = o.global_batch / o.lr_scale_batch
    if o.schedule == "multistep":
        # The official SimMIM schedule decays at update t == milestone; timm's at t + 1 == milestone (its
        # documented convention), and with warmup_prefix=False both count t from the first update.
        milestones = [int(e * updates_per_epoch) + 1 for e in o.decay_epochs]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=o.decay_rate, warmup_t=warmup,
                                    warmup_lr_init=o.warmup_lr * scale, warmup_prefix=False, t_in_epochs=False)
    return CosineLRScheduler(optimizer, t_initial=max(1, o.epochs * updates_per_epoch - warmup),
                             lr_min=o.min_lr * scale, warmup_lr_init=o.warmup_lr * scale, warmup_t=warmup,
                             warmup_prefix=True, cycle_limit=1, t_in_epochs=False)


class WeightEma:
    """Exponential moving average of a module's floating-point state, kept in fp32.

    timm's ModelEmaV3 lerps in the model's dtype; under DeepSpeed bf16 the module itself is bf16, where an
    update of (1 - decay) ~ 1e-4 of the weight rounds away. On an fp32 module the two compute the same."""

    def __init__(self, module: torch.nn.Module, decay: float, device: torch.device):
        self.decay = decay
        self.module = copy.deepcopy(module).float().to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        ema, src = [], []
        for e, m in zip(self.module.state_dict().values(), module.state_dict().values()):
            if e.is_floating_point():
                ema.append(e)
                src.append(m.detach().float())
            else:
                e.copy_(m)
        foreach_lerp_(ema, src, 1.0 - self.decay)

    def forward_in(self, autocast: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        """The EMA weights' forward in the run's precision (`autocast`: the backend's), float32 out."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return self.module(x).float()
        return forward

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
