"""Swin pretraining (DeepSpeed ZeRO by default; `backend` in the config).

    deepspeed launch/pretrain.py --config configs/swin_l_22k.json [--set optim.zero_stage=2 ...] [--resume auto]
    deepspeed --module pretrain.cli.train --config swin_l_22k ...   (the same, from any directory; `swin-pretrain`
                                                                   under torchrun or srun)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/pretrain.py --config configs/swin_tiny_cpu.json
    swin-pretrain --print-sbatch > pretrain.sbatch               (the Slurm script: sbatch pretrain.sbatch CONFIG)

--config: a JSON file, or a shipped recipe's name (swin_{t,s,b,l}_22k, swinv2_{b,l}_22k, simmim_swin_b_192, ...).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from .. import cli

SBATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.sbatch")


def main(argv: Optional[list[str]] = None, faults=None) -> int:
    """`faults`: a pretrain.training.Faults, for tests (tests/faulty_train.py)."""
    p = cli.parser("swin-pretrain", __doc__, config=True, resume=True)
    p.add_argument("--print-sbatch", action="store_true",
                   help="print the Slurm batch script (preemption and requeue handled) and exit")
    a = p.parse_args(argv)
    if a.print_sbatch:
        with open(SBATCH) as f:
            sys.stdout.write(f.read())
        return 0

    def job() -> dict:
        from ..config import load_config
        from ..training import Trainer, compile_cache_env
        cfg = load_config(a.config, a.set)
        os.environ.update(compile_cache_env(cfg))  # inductor reads its cache folders from the environment
        return Trainer(cfg, resume=a.resume, faults=faults).fit()
    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
