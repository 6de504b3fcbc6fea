"""Swin pretraining (DeepSpeed ZeRO by default; `backend` in the config).

    deepspeed launch/pretrain.py --config configs/swin_l_22k.json [--set optim.zero_stage=2 ...] [--resume auto]
    deepspeed --module pretrain.train --config ...          (the same; also `swin-pretrain` under torchrun/srun)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/pretrain.py --config configs/swin_tiny_cpu.json
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from . import cli


def main(argv: Optional[list[str]] = None, faults=None) -> int:
    """`faults`: a pretrain.training.Faults, for tests (tests/faulty_train.py)."""
    a = cli.parser("python -m pretrain.train", __doc__, config=True, resume=True).parse_args(argv)

    def job() -> dict:
        from .config import load_config
        from .training import Trainer, compile_cache_env
        cfg = load_config(a.config, a.set)
        os.environ.update(compile_cache_env(cfg))  # inductor reads its cache folders from the environment
        return Trainer(cfg, resume=a.resume, faults=faults).fit()
    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
