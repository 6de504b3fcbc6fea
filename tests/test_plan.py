"""The loader's epoch plan and manifest reads at cluster scale, by simulation: a manifest needs no shards to
plan, so 512 ranks x 8 workers are planned here exactly as each rank of a real job plans its own part."""
import json
import os
import random

import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp

from pretrain.data.loader import DataError, LoaderConfig, build_loader
from pretrain.data.plan import deal, train_plan
from pretrain.training.backend import free_port


def naive_deal(weights, bins):
    """The deal as it was first written (a scan of every bin per shard): the reference the heap must equal."""
    out, load = [[] for _ in range(bins)], [0] * bins
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        b = min(range(bins), key=lambda j: (load[j], j))
        out[b].append(i)
        load[b] += weights[i]
    return out


def test_heap_deal_equals_the_scanning_deal():
    rng = random.Random(3)
    for bins, n in ((1, 5), (3, 10), (7, 200), (64, 1000)):
        weights = [rng.choice([5, 6, 7, 100]) if n < 50 else rng.randint(900, 1100) for _ in range(n)]
        assert deal(weights, bins) == naive_deal(weights, bins)


def shards_of(n_shards, total, spread, seed=0):
    rng = random.Random(seed)
    raw = [rng.uniform(1 - spread, 1 + spread) for _ in range(n_shards)]
    lengths = [max(1, int(r * total / sum(raw))) for r in raw]
    return [(f"s3://b/train-{i:06d}.tar", n) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("world,n_shards,spread", [pytest.param(512, 4096, 0.05, marks=pytest.mark.slow),
                                                   (64, 4096, 0.5), (16, 128, 0.9)])
def test_plan_every_rank_equal_batches_no_sample_twice_and_98_percent_used(world, n_shards, spread):
    """Every rank's plan, as each rank computes its own: the same batch count, every role's pieces at least
    its batches' samples (a role keeps its spare: a corrupt sample costs no re-read), no sample in two places,
    and less than one batch per rank left unused."""
    B, W = 128, 8
    shards = shards_of(n_shards, 13_673_551 * n_shards // 4096 // (8 if world < 64 else 1), spread)
    total = sum(n for _, n in shards)
    size = dict(shards)
    taken: dict[str, list[tuple[int, int]]] = {}
    plans = [train_plan(shards, 7, 2, r, world, W, B) for r in range(world)]
    assert len({p.batches for p in plans}) == 1
    Q = plans[0].batches
    for p in plans:
        assert sum(p.quotas) == Q and max(p.quotas) - min(p.quotas) <= 1
        for pieces, q in zip(p.pieces, p.quotas):
            assert sum(b - a for _, a, b in pieces) >= q * B
            for url, a, b in pieces:
                assert 0 <= a < b <= size[url]
                taken.setdefault(url, []).append((a, b))
    for url, ranges in taken.items():  # no overlap within a shard
        ranges.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(ranges, ranges[1:])), url
    assert plans[0].used == Q * B * world and total - plans[0].used < world * B  # < 1 batch per rank unused
    assert plans[0].share >= 0.98


def test_plan_is_a_function_of_seed_and_epoch():
    shards = shards_of(256, 100_000, 0.2)
    a, b = train_plan(shards, 1, 0, 5, 32, 4, 64), train_plan(shards, 1, 0, 5, 32, 4, 64)
    assert a == b
    assert train_plan(shards, 1, 1, 5, 32, 4, 64).pieces != a.pieces  # another epoch
    assert train_plan(shards, 2, 0, 5, 32, 4, 64).pieces != a.pieces  # another seed


def test_cluster_sized_manifest_plans_without_shards(tmp_path):
    """The loader itself on a 4,096-shard manifest at 512 ranks (the shards do not exist): len() and the
    share it reports, for the rank in the middle."""
    shards = shards_of(4096, 13_673_551, 0.05)
    info = {"splits": {"train": {"name": "train", "filenames": [u for u, _ in shards],  # remote: not looked for
                                 "shard_lengths": [n for _, n in shards]}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    loader = build_loader(LoaderConfig(str(tmp_path / "_info.json"), batch_size=128, workers=8), 256, 512)
    assert len(loader) == train_plan(shards, 0, 0, 256, 512, 8, 128).batches
    assert loader.epoch_share() == pytest.approx(len(loader) * 128 * 512 / sum(n for _, n in shards))
    assert loader.epoch_share() >= 0.98


# --------------------------------------------------------------------------- manifest read once per job

def _rank(rank: int, port: int, out: str) -> None:
    import fsspec
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:  # memory:// is per process: only rank 0 can read this manifest
        info = {"splits": {"train": {"name": "train", "filenames": [f"t-{i}.tar" for i in range(8)],
                                     "shard_lengths": [10 + i for i in range(8)]}}}
        with fsspec.open("memory://ds/_info.json", "w") as f:
            json.dump(info, f)
    result = {}
    cfg = LoaderConfig("memory://ds/_info.json", batch_size=4, workers=2)
    result["batches"] = len(build_loader(cfg, rank, 2))
    try:
        build_loader(LoaderConfig("memory://ds/_info.json", split="nope", batch_size=4, workers=2), rank, 2)
    except DataError as e:
        result["error"] = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.dist
def test_manifest_is_read_on_rank_0_and_broadcast(tmp_path):
    """Two real gloo ranks: rank 1 cannot read the manifest at all, yet plans the same epoch, and a refusal
    found on rank 0 reaches rank 1 as the same one-line DataError (no rank left waiting)."""
    tmp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["batches"] == r1["batches"] > 0
    assert "no split 'nope'" in r0["error"] and r1["error"] == r0["error"]
