"""The vocabulary of config checks, at the bottom of the library (torch-free, it imports nothing of ours but
the error base): a check is a (condition, message naming the key) pair; `raise_failed` turns the first failed
one into a ConfigError. The schema (pretrain.config) checks each key's range and choices; the rules that say
how keys act together live with the part they describe (pretrain.data.aug_checks,
pretrain.training.deepspeed_checks, pretrain.tasks.checks, fine-tuning's config), and config.validate runs
them all at load."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .errors import UserError

Check = tuple[bool, str]


class ConfigError(UserError, ValueError):
    """A bad key or value in a run config (or a flag standing for one)."""


def in_range(value: Any, key: str, lo: Optional[float] = None, hi: Optional[float] = None,
             lo_open: bool = False, hi_open: bool = False) -> tuple[bool, str]:
    """A range check naming the key: `lo <= value <= hi` (or < with *_open); None leaves a side free."""
    ok = ((lo is None or (value > lo if lo_open else value >= lo))
          and (hi is None or (value < hi if hi_open else value <= hi)))
    left = "" if lo is None else f"{'(' if lo_open else '['}{lo}"
    right = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
    want = f"in {left}, {right}" if lo is not None and hi is not None else (
        f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"{'<' if hi_open else '<='} {hi}")
    return ok, f"{key} must be {want}, got {value!r}"


def one_of(value: Any, key: str, choices: tuple) -> tuple[bool, str]:
    return value in choices, f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}"


def set_keys(section: Any, prefix: str) -> list[str]:
    """The keys of a config section (a dataclass) set away from their defaults, as `prefix.name`: what a
    rule refuses where the section acts nowhere."""
    defaults = type(section)()
    return [f"{prefix}.{f.name}" for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(defaults, f.name)]


def raise_failed(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


