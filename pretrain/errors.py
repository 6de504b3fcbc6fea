"""The one base of every error a user can fix. It lives at the bottom of the library (it imports nothing of
ours), so every module can raise one and the command-line layer can report any of them without knowing the
module that raised it: `isinstance(e, UserError)` is its whole catalogue."""
from __future__ import annotations


class UserError(Exception):
    """A bad key or value, a missing or damaged file, a run dir in use, data that can't be read: one line
    `error: <message>` and exit 2 from every entry point (pretrain.cli). The message names the file, key or
    shape and says what to do."""

    # Met by one rank alone (its own data, found while reading): printed on that rank. Otherwise every rank
    # meets it alike (config, manifest, checkpoint) and rank 0 alone prints it.
    rank_local: bool = False


# How the library names the options its messages suggest; each command line gives its own spelling of them
# (cli.run(spellings=...)), so a hint names a real flag there and a Python argument to a library caller.
ALLOW_PICKLE, RESET_HEAD = "allow_pickle=True", "reset_head=True"


def spoken(message: str, spellings: dict[str, str]) -> str:
    """`message` with each library option named as the caller's command line spells it."""
    for option, flag in spellings.items():
        message = message.replace(option, flag)
    return message


class CheckpointError(UserError, ValueError):
    """A checkpoint file that can't be read or isn't a Swin checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that doesn't fit the model: missing, unexpected or mis-shaped keys."""
