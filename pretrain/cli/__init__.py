"""The command-line layer every entry point shares (pretraining, fine-tuning, make_shards, export, convert,
the demos): common arguments, the distributed environment resolved first, and one error policy.

    p = cli.parser("python -m pretrain.cli.train", __doc__, config=True)   # --config / --set (/ --resume)
    return cli.run(lambda: job(p.parse_args(argv)))

The policy: a user error (a bad key or value, a missing file, a bad checkpoint or shard, a run dir in use,
a full disk) is one line, `error: ...` naming the file or key and what to do, on rank 0 (or on the one rank
that met it), and exit 2; a broken collective (another rank stopped) is one line and exit 1; SIGTERM outside
the training loop (which checkpoints on it) is one line and exit 143: launchers (torchrun, deepspeed, srun
--kill-on-bad-exit) stop the other ranks with it when one fails; anything else is a bug and keeps its
traceback. The process group is closed on every exit.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, Optional

from ..collective import print0, printer, rank  # noqa: F401  (the entry points' printing)
from ..errors import UserError, spoken


def user_error(e: BaseException) -> Optional[str]:
    """The one line a user error gets (None: a bug, which keeps its traceback)."""
    if isinstance(e, (UserError, FileNotFoundError)):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on the device writing {e.filename or 'a file'} (ENOSPC): free space there, or "
                "point run_dir / checkpoint.dir at a disk with room; resume with --resume auto")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES) and e.filename:
        return f"{e.filename}: {e.strerror}: point run_dir / checkpoint.dir (or the output) at a writable place"
    return None


def common(config: bool = False, resume: bool = False) -> argparse.ArgumentParser:
    """The parent parser: --config/--set for the tools that read a run config, --resume for the trainers,
    and the deepspeed launcher's --local_rank."""
    p = argparse.ArgumentParser(add_help=False)
    if config:
        p.add_argument("--config", help="run config: a JSON file, or a shipped recipe's name (e.g. swin_l_22k)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides, e.g. optim.base_lr=5e-4 (docs/config.md lists every key)")
    if resume:
        p.add_argument("--resume", help="'auto' (newest complete checkpoint of the run) or a checkpoint tag folder")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def parser(prog: str, doc: Optional[str], config: bool = False, resume: bool = False) -> argparse.ArgumentParser:
    """An entry point's parser: its module docstring's first paragraph as the description."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0],
                                   parents=[common(config, resume)])


def run(job: Callable[[], object], show_result: bool = True, spellings: Optional[dict[str, str]] = None) -> int:
    """Run an entry point's job under the one error policy; returns the exit code. The job returns a dict
    (printed by rank 0), an int (the exit code) or None. `spellings`: how this command line spells the library
    options a message may suggest (pretrain.errors.ALLOW_PICKLE -> "--allow-pickle")."""
    from .. import slurm
    import signal
    import threading
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _stopped_by_term) if main else None
    _REPORTED.clear()
    try:
        slurm.init_env_from_slurm()  # first: every later read of the rank agrees, under srun too
        result = job()
    except Exception as e:
        line = user_error(e)
        if line is None:
            from ..compat import peer_stopped
            if peer_stopped(e):  # its own error (printed by the rank that met it) says why
                first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                _REPORTED.append(True)
                print(f"error: rank {rank()}: stopped because another rank did (its error above says why); "
                      f"{type(e).__name__}: {first}", file=sys.stderr, flush=True)
                return 1
            raise
        # Errors every rank meets alike (config, manifest, checkpoint) print once; one met by a single rank
        # (its data, found while reading) prints there.
        _REPORTED.append(True)  # a rank that prints nothing here defers to the one that does
        if rank() == 0 or getattr(e, "rank_local", False):  # set on a UserError instance or class
            print(f"error: {spoken(line, spellings or {})}", file=sys.stderr, flush=True)
        return 2
    finally:
        _close_group()
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if isinstance(result, int):
        return result
    if show_result and isinstance(result, dict) and result and rank() == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0


_REPORTED: list[bool] = []  # this process already printed its error line


def _stopped_by_term(signum, frame) -> None:
    """SIGTERM where the loop's own handler (checkpoint, exit 143) is not installed: before training, or
    while an error unwinds after it. The default action would end the rank silently (-15); this says so in
    one line (none if the rank already printed its error) and exits 143 at once: raising here could land
    in any cleanup code."""
    if not _REPORTED:
        print(f"error: rank {rank()}: stopped by SIGTERM (a launcher stops every rank when one fails: see that "
              "rank's error; or the job was cancelled)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(143)


def _close_group() -> None:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
