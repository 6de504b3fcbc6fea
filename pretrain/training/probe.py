"""What pretraining has learned so far, while it runs: a weighted kNN probe of the encoder's features on a
labelled set (DINO's evaluation: Caron et al., 2021, `eval_knn.py`), for either task.

    probe = KnnProbe(backend, cfg, task, print0); probe.should_run(step, evaluated) -> probe() -> metrics

Features: the encoder's pooled output (the final norm, then the average pool: what the classifier head
sees; `probe.stage`: a stage's pooled output), L2-normalised, from the evaluation transform at the model's
resolution, in eval mode, under the run's precision; SimMIM's encoder without its mask token.
The vote: each query's k most similar bank images (cosine) each add exp(cosine / T) to their class; the
class with the largest sum is the prediction (top-5: the five largest).

Distributed without gathering the bank: each rank embeds its share of the bank and of the queries (the
evaluation loader's exactly-once split); the queries (small) are gathered on every rank; each rank takes the
top-k of every query against its own bank share; an all-to-all sends each rank the candidates of its own
queries ((ranks, queries per rank, k) values and labels), which it merges to the global top-k and votes on.
The bank never leaves its rank; what a rank receives is k candidates per rank per query it owns.
Both loaders are evaluation loaders (fixed order, no augmentation), so the same weights give the same probe:
a resumed run's next probe equals the uninterrupted run's.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import RunConfig
from ..data.loader import LoaderConfig, ShardLoader
from ..data.manifest import DataError, Split
from ..data.targets import Labels
from ..data.transforms import BatchAugment
from .backend import Backend

CHUNK = 4096  # queries per similarity matmul: (CHUNK, bank share) floats at a time


class ProbeLabels(Labels):
    """The probe's labels: any class count (the bank's labels define it); unlabelled shards are refused."""

    def check(self, split: Split, source: str, split_name: str) -> None:
        if not split.labelled:
            raise DataError(f"probe.data={source}: split {split_name!r} is unlabelled (written with make_shards "
                            "--no-labels): the kNN probe votes with labels; point probe.data at labelled shards")


# ------------------------------------------------------------------------------------------ the vote

def local_topk(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) cosine similarities and labels of each query's k nearest in this bank share, padded with -inf
    and label -1 where the share holds fewer than k."""
    q = queries.shape[0]
    vals = torch.full((q, k), float("-inf"), device=queries.device)
    labels = torch.full((q, k), -1, dtype=torch.long, device=queries.device)
    n = min(k, bank.shape[0])
    for i in range(0, q, CHUNK):  # bounded memory: (CHUNK, bank share) similarities at a time
        if n == 0:
            break
        v, idx = (queries[i:i + CHUNK] @ bank.T).topk(n, dim=1)
        vals[i:i + CHUNK, :n], labels[i:i + CHUNK, :n] = v, bank_labels[idx]
    return vals, labels


def merge_topk(vals: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (..., Q, c) from any number of bank shares, along dim -1 -> the global top-k (Q, k)."""
    v, idx = vals.topk(min(k, vals.shape[-1]), dim=-1)
    return v, labels.gather(-1, idx)


def vote(vals: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """(Q, C) class scores: each neighbour adds exp(cosine / T) to its class (DINO's weighted vote)."""
    weights = (vals / temperature).exp() * (labels >= 0)  # -inf padding weighs 0
    return torch.zeros(vals.shape[0], num_classes, device=vals.device).scatter_add_(1, labels.clamp(min=0), weights)


def knn_counts(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits, queries] (float64, summed over ranks)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices.eq(labels.view(-1, 1))
    return torch.stack([top[:, 0].sum(), top.any(1).sum(), torch.tensor(labels.numel())]).double()


# ------------------------------------------------------------------------------------ across ranks

def _gather_rows(t: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """Every rank's rows (rank order), each padded to the largest count: (world * m, ...) and m."""
    n = torch.tensor([t.shape[0]], device=t.device)
    if world == 1:
        return t, t.shape[0]
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    m = int(n.item())
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat(out), m


def distributed_knn(queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor,
                    bank_labels: torch.Tensor, k: int, temperature: float, num_classes: int, world: int
                    ) -> torch.Tensor:
    """This rank's [top-1 hits, top-5 hits, queries] for its own queries against every rank's bank share;
    sum over ranks for the probe's counts."""
    everyone, m = _gather_rows(queries, world)  # (world * m, D): the queries are small, the bank is not
    vals, labels = local_topk(everyone, bank, bank_labels, k)
    if world > 1:  # rank r receives, from every rank, the candidates of r's own m (padded) queries
        got_v, got_l = torch.empty_like(vals), torch.empty_like(labels)
        dist.all_to_all_single(got_v, vals)
        dist.all_to_all_single(got_l, labels)
        vals = got_v.view(world, m, k).permute(1, 0, 2).reshape(m, world * k)[:queries.shape[0]]
        labels = got_l.view(world, m, k).permute(1, 0, 2).reshape(m, world * k)[:queries.shape[0]]
    vals, labels = merge_topk(vals, labels, k)
    return knn_counts(vote(vals, labels, temperature, num_classes), query_labels)


def cap_per_class(labels: torch.Tensor, cap: int, world: int, rank: int) -> torch.Tensor:
    """A mask keeping at most `cap` bank images per class over all ranks: rank 0's first, then rank 1's, ...
    (each in its reading order). Per-class counts are all-gathered: (ranks, classes) integers."""
    classes = int(labels.max().item()) + 1 if labels.numel() else 0
    c = torch.tensor([classes], device=labels.device)
    if world > 1:
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
    counts = torch.bincount(labels, minlength=int(c.item()))
    every = _gather_rows(counts.unsqueeze(0), world)[0] if world > 1 else counts.unsqueeze(0)
    before = every[:rank].sum(0)  # this class's images kept by lower ranks
    room = (cap - before).clamp(min=0)
    order = torch.zeros_like(labels)  # each image's rank among this rank's images of its class
    for cls in labels.unique():
        where = (labels == cls).nonzero().squeeze(1)
        order[where] = torch.arange(where.numel(), device=labels.device)
    return order < room[labels]


# --------------------------------------------------------------------------------------------- probe

class KnnProbe:
    """The probe of one run: its two loaders, its cadence (probe.every_steps; 0: with each evaluation) and
    its metrics (probe_knn_top1, probe_knn_top5, probe_bank, probe_queries, probe_s)."""

    def __init__(self, backend: Backend, cfg: RunConfig, task, print0: Callable[[str], None]):
        self.backend, self.p, self.task, self.print0 = backend, cfg.probe, task, print0
        self.augment = BatchAugment(cfg.aug, 1, backend.device, training=False)  # normalization only
        self.bank = self._loader(cfg, "bank_split")
        self.queries = self._loader(cfg, "query_split")
        listed = self.bank.num_samples
        if listed and self.p.k > listed:
            raise DataError(f"probe.k={self.p.k} is larger than the bank: {cfg.probe.data} split "
                            f"{self.p.bank_split!r} lists {listed} images; lower probe.k or use a larger split")

    def _loader(self, cfg: RunConfig, key: str) -> ShardLoader:
        split = getattr(cfg.probe, key)
        lc = LoaderConfig.from_section(cfg.data, cfg.probe.data, split, batch_size=cfg.optim.micro_batch,
                                       seed=cfg.seed, aug=cfg.aug, targets=ProbeLabels())
        try:
            return ShardLoader(lc, self.backend.rank, self.backend.world, training=False)
        except DataError as e:
            if str(e).startswith("probe."):
                raise
            raise DataError(f"probe.{key}={split!r}: {e}") from None

    def should_run(self, step: int, evaluated: bool) -> bool:
        """Due after update `step`? `evaluated`: an evaluation just ran at this update."""
        return step % self.p.every_steps == 0 if self.p.every_steps else evaluated

    @torch.no_grad()
    def _embed(self, loader: ShardLoader, encoder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        for images, y, valid in loader:
            x, y = self.augment(images, y)
            with self.backend.own_parameters(encoder), self.backend.autocast():
                f = encoder.forward_pooled(x, self.p.stage)
            keep = valid.to(x.device)
            feats.append(F.normalize(f.float(), dim=1)[keep])
            labels.append(y[keep])
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def __call__(self) -> dict:
        t0 = time.time()
        b, p = self.backend, self.p
        b.train(False)
        encoder = self.task.encoder(b.module)
        bank, bank_labels = self._embed(self.bank, encoder)
        if p.max_per_class:
            keep = cap_per_class(bank_labels, p.max_per_class, b.world, b.rank)
            bank, bank_labels = bank[keep], bank_labels[keep]
        queries, query_labels = self._embed(self.queries, encoder)
        sizes = torch.tensor([bank.shape[0], queries.shape[0],
                              max(int(bank_labels.max().item()) if bank_labels.numel() else -1,
                                  int(query_labels.max().item()) if query_labels.numel() else -1) + 1],
                             device=bank.device)
        n_bank, n_queries = b.all_reduce(sizes[:2].clone()).tolist()
        classes = int(b.all_reduce(sizes[2:].clone(), op=dist.ReduceOp.MAX).item())
        if n_bank < p.k:
            raise DataError(f"probe.k={p.k} is larger than the bank: {n_bank} images of split {p.bank_split!r} "
                            f"(probe.max_per_class={p.max_per_class}); lower probe.k or raise the cap")
        counts = b.all_reduce(distributed_knn(queries, query_labels, bank, bank_labels, p.k, p.temperature, classes,
                                              b.world))
        b.train(True)
        n = max(counts[2].item(), 1.0)
        return {"probe_knn_top1": 100 * counts[0].item() / n, "probe_knn_top5": 100 * counts[1].item() / n,
                "probe_bank": int(n_bank), "probe_queries": int(counts[2].item()),
                "probe_s": round(time.time() - t0, 3)}

    def report(self, step: int) -> dict:
        m = self()
        self.print0(f"kNN probe at update {step}: top-1 {m['probe_knn_top1']:.2f}%  top-5 {m['probe_knn_top5']:.2f}%"
                    f"  (k={self.p.k}, {m['probe_bank']} bank / {m['probe_queries']} query images, "
                    f"{m['probe_s']:.1f} s)")
        return m

    def close(self) -> None:
        self.bank.close()
        self.queries.close()


def knn_reference(queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                  k: int, temperature: float, num_classes: Optional[int] = None) -> torch.Tensor:
    """DINO's vote in one piece (its eval_knn.knn_classifier without the chunking): the predicted classes,
    best first (Q, C). For tests: the distributed path must give the same."""
    sims = queries @ bank.T
    v, idx = sims.topk(k, dim=1)
    c = num_classes or int(max(bank_labels.max(), query_labels.max()).item()) + 1
    one_hot = torch.zeros(queries.shape[0] * k, c).scatter_(1, bank_labels[idx].view(-1, 1), 1)
    scores = (one_hot.view(queries.shape[0], k, c) * (v / temperature).exp().unsqueeze(-1)).sum(1)
    return scores.argsort(dim=1, descending=True)
