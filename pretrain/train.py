"""Swin pretraining (DeepSpeed ZeRO by default; `backend` in the config).

    deepspeed launch/pretrain.py --config configs/swin_l_22k.json [--set optim.zero_stage=2 ...] [--resume auto]
    deepspeed --module pretrain.train --config ...          (the same; also `swin-pretrain` under torchrun/srun)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/pretrain.py --config configs/swin_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data.jpeg import JpegBuildError
from .data.loader import DataError
from .training.checkpointing import RunExistsError

# What a user can fix: one line and exit 2, not a traceback (on every rank).
USER_ERRORS = (ConfigError, FileNotFoundError, DataError, CheckpointError, RunExistsError, JpegBuildError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="JSON config (configs/*.json)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.base_lr=5e-4")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint of the run) or a checkpoint tag folder")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def run_cli(job: Callable[[], Optional[dict]]) -> int:
    """Run an entry point's job: a user error is one line and exit 2 (on every rank, no traceback); the
    process group is closed on every exit; rank 0 prints the result."""
    try:
        result = job()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    if result and int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0


def main(argv=None) -> int:
    a = parser(__doc__.split("\n\n")[0]).parse_args(argv)

    def job() -> dict:
        from .training import Trainer
        return Trainer(load_config(a.config, a.set), resume=a.resume).fit()
    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
