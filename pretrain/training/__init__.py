"""The training core: one loop (loop.Trainer) for pretraining and fine-tuning, behind a backend seam
(DeepSpeed ZeRO or accelerate), with checkpoints, metrics and optimizer helpers every stage shares."""
from .loop import NonFiniteLossError, Preempted, Stage, Trainer, loader_config

__all__ = ["NonFiniteLossError", "Preempted", "Stage", "Trainer", "loader_config"]
