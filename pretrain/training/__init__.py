"""The training core: one loop (loop.Trainer) for pretraining and fine-tuning, for any task, behind a
backend seam (DeepSpeed ZeRO or accelerate), with its parts: CheckpointManager, Evaluator, Preemption,
StepStats/MetricsWriter, and the Faults tests hand in."""
from .build import loader_config
from .evaluator import Evaluator, evaluate_weights
from .faults import Faults
from .loop import NonFiniteLossError, Stage, Trainer
from .preemption import Preempted
from .task import Classification, Task

__all__ = ["Classification", "Evaluator", "Faults", "NonFiniteLossError", "Preempted", "Stage", "Task", "Trainer",
           "evaluate_weights", "loader_config"]
