"""The per-epoch plan of a training split: which samples each rank and each of its worker roles reads, and
how many batches every rank yields. A pure function of (shards, seed, epoch, world, roles, batch size), so a
resumed run plans exactly what the interrupted one did.

1. The shards are shuffled by (seed, epoch) and dealt to ranks by sample count, largest first to the rank
   with the fewest samples (a heap: O(shards * log(ranks))).
2. Every rank yields Q = samples // (ranks * batch) batches. A rank whose shards hold fewer samples than
   Q batches takes the head of a shard from the rank with the most to spare, which skips those samples
   (a heap again). Role r of W yields Q // W batches, +1 for the first Q % W roles (the DataLoader's
   in-order round robin turns them into batches 0..Q-1).
3. Within a rank the pieces are dealt to the roles the same way, and a short role takes heads likewise.
So an epoch leaves less than one batch per rank unread, whatever the shard sizes and however few shards a
role has, and reads no sample twice; the price is that a split shard's head is streamed past once more.

Every rank computes the rank-level deal (cheap: O(shards * log(ranks))); the role deal is its own alone.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Optional

from ..seeding import mix_seed

Piece = tuple[str, int, Optional[int]]  # (url, first sample, end sample or None: the whole shard)


def deal(weights: list[int], bins: int) -> list[list[int]]:
    """Indices of `weights` per bin: the largest first to the lightest bin (ties: lower index), order-stable."""
    out: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0, b) for b in range(bins)]  # sorted, so already a heap
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + weights[i], b))
    return out


@dataclass(frozen=True)
class EpochPlan:
    batches: int  # Q: batches every rank yields this epoch
    pieces: list[list[Piece]]  # this rank's pieces per role
    quotas: list[int]  # batches per role of this rank
    used: int  # samples the epoch uses, all ranks together
    total: int  # samples in the split

    @property
    def share(self) -> float:
        return self.used / self.total if self.total else 0.0


def train_plan(shards: list[tuple[str, int]], seed: int, epoch: int, rank: int, world: int, roles: int,
               batch: int) -> EpochPlan:
    order = list(range(len(shards)))
    random.Random(mix_seed(seed, epoch, "shards")).shuffle(order)
    sizes = [shards[i][1] for i in order]
    total = sum(sizes)
    Q = total // (world * batch)
    by_rank = [[[shards[order[j]][0], 0, sizes[j]] for j in b] for b in deal(sizes, world)]
    rebalance(by_rank, [Q * batch] * world)
    quotas = [Q // roles + (r < Q % roles) for r in range(roles)]
    mine = by_rank[rank]
    by_role = sorted(([mine[i] for i in idx] for idx in deal([b - a for _, a, b in mine], roles)),
                     key=lambda p: -sum(b - a for _, a, b in p))  # the first roles need the most
    rebalance(by_role, [q * batch for q in quotas])
    return EpochPlan(Q, [[(u, a, b) for u, a, b in p if b > a] for p in by_role], quotas, Q * batch * world, total)


def rebalance(pieces: list[list[list]], need: list[int]) -> None:
    """In place: each bin short of its `need` samples takes piece heads [a, a + t) from the bin with the most
    to spare (a heap), which then starts that piece at a + t. Bins keep what they hold beyond their need."""
    spare = [sum(b - a for _, a, b in p) - want for p, want in zip(pieces, need)]
    donors = [(-s, j) for j, s in enumerate(spare) if s > 0]
    heapq.heapify(donors)
    for r in range(len(need)):
        while spare[r] < 0:
            _, d = heapq.heappop(donors)
            p = max(pieces[d], key=lambda p: p[2] - p[1])  # the donor's largest piece
            t = min(-spare[r], spare[d], p[2] - p[1])
            pieces[r].append([p[0], p[1], p[1] + t])
            p[1] += t
            spare[r] += t
            spare[d] -= t
            if spare[d] > 0:
                heapq.heappush(donors, (-spare[d], d))
