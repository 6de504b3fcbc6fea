"""Seeds derived from values: the same (seed, epoch, micro-batch, rank) gives the same random draws in any
process, so data order and augmentation are reproducible and a resumed run continues an uninterrupted one."""
from __future__ import annotations

import hashlib


def mix_seed(*parts) -> int:
    """A stable 63-bit seed from any values (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
