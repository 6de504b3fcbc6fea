"""Swin pretraining (DeepSpeed ZeRO by default; `backend` in the config).

    deepspeed launch/pretrain.py --config configs/swin_l_22k.json [--set optim.zero_stage=2 ...] [--resume auto]
    deepspeed --module pretrain.train --config ...          (the same; also `swin-pretrain` under torchrun/srun)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/pretrain.py --config configs/swin_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys

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


def report(result: dict) -> None:
    if result and int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})


def main(argv=None) -> int:
    a = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    from .training import Trainer
    try:
        result = Trainer(load_config(a.config, a.set), resume=a.resume).fit()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    report(result)
    return 0


def close_process_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
