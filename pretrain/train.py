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

import errno

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data.jpeg import JpegBuildError
from .data.loader import DataError
from .training.checkpointing import DamagedCheckpointError, RunExistsError, RunLockedError

# What a user can fix: one line and exit 2, not a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, DataError, CheckpointError, RunExistsError, JpegBuildError,
               DamagedCheckpointError, RunLockedError)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def user_error(e: BaseException) -> str | None:
    """The one line a user error gets (None: a bug, which keeps its traceback)."""
    from .training.loop import NonFiniteLossError
    if isinstance(e, USER_ERRORS + (NonFiniteLossError,)):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on the device writing {e.filename or 'a file'} (ENOSPC): free space there, or "
                "point run_dir / checkpoint.dir at a disk with room; resume with --resume auto")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES) and e.filename:
        return f"{e.filename}: {e.strerror}: point run_dir / checkpoint.dir at a writable place"
    return None


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
    except Exception as e:
        line = user_error(e)
        if line is None:
            import torch.distributed as dist
            if isinstance(e, dist.DistBackendError):  # a peer stopped (its own error says why)
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                print(f"error: rank {_rank()}: a collective broke off, another rank stopped (see its error): "
                      f"{first}", file=sys.stderr)
                return 1
            raise
        # Errors every rank meets alike (config, manifest, checkpoint) print once; one met by a single rank
        # (its data, found while reading) prints there.
        if _rank() == 0 or getattr(e, "rank_local", False):
            print(f"error: {line}", file=sys.stderr)
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
