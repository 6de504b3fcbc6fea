"""The training core: one loop (loop.Trainer) for pretraining and fine-tuning, for any task, behind a
backend seam (DeepSpeed ZeRO or accelerate), with its parts: CheckpointManager, Evaluator, Preemption,
StepStats/MetricsWriter, and the Faults tests hand in.

The names below load on first use (PEP 562): `import pretrain.training.deepspeed_checks`, which every config
read runs, must not import torch and DeepSpeed."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Trainer": "loop", "Stage": "loop", "NonFiniteLossError": "loop", "Evaluator": "evaluator",
            "evaluate_weights": "evaluator", "Faults": "faults", "Preempted": "preemption", "loader_config": "data",
            "compile_cache_env": "distributed", "Classification": "..tasks", "Task": "..tasks"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if module.startswith(".") else f".{module}", __name__), name)
