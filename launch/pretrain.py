"""Swin pretraining on DeepSpeed ZeRO.

    deepspeed launch/pretrain.py --config configs/swin_l_22k.json [--set optim.zero_stage=2 ...] [--resume auto]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/pretrain.py --config configs/swin_tiny_cpu.json
"""
import argparse
import os
import sys

# This file is named like the `pretrain` package: drop its folder from the path so the package imports.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

import torch.distributed as dist  # noqa: E402

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.engine import Trainer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON config (configs/*.json)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.lr=5e-4")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint of the run) or a checkpoint tag folder")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.set)
        result = Trainer(cfg, resume=a.resume).fit()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result and int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
