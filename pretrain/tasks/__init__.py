"""The objectives a run can train (`task` in the config), one module each: classification (labels) and simmim
(masked image modelling). Each owns its model factory, its per-sample targets for the loader, its loss, its
evaluation and its export naming, and its config rules (checks.py); nothing else in the library branches on
the task.

The names below load on first use (PEP 562): `pretrain.tasks.checks`, which every config read runs, must not
import torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Task": "base", "Forward": "base", "Classification": "classification",
            "MaskedImageModeling": "simmim"}
__all__ = sorted([*_EXPORTS, "TASKS", "task_class"])


def __getattr__(name: str) -> Any:
    if name == "TASKS":
        return {t.name: t for t in (__getattr__("Classification"), __getattr__("MaskedImageModeling"))}
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def task_class(name: str):
    """The task a config (or a saved run) names."""
    return __getattr__("TASKS")[name]
