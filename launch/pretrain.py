"""Swin pretraining on DeepSpeed ZeRO.

    deepspeed launch/pretrain.py --config configs/swin_l_22k.json [--set optim.zero_stage=2 ...] [--resume auto]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/pretrain.py --config configs/swin_tiny_cpu.json
"""
import _syspath  # noqa: F401  (must come first: see launch/_syspath.py)
import argparse
import os
import sys

import torch.distributed as dist

from pretrain.config import ConfigError, load_config
from pretrain.engine import Trainer


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
