"""The loader's startup and per-epoch costs at cluster scale, from manifests alone (no shard is read).

For each world size: an `_info.json` of an ImageNet-22K-sized split (13,673,551 samples; 4,096 shards, or
8 per rank where that is more: 32,768 at 4,096 ranks), batch 128 and 8 workers per rank, then for one rank:
- plan: `len(build_loader(cfg, rank, world))`, the per-epoch plan (shards -> ranks -> worker roles and the
  batch count every rank yields), timed cold, once per epoch as the loop and every worker need it;
- share: the fraction of the epoch's samples that the plan uses (batches x batch x ranks / samples).
Two shard-length patterns: `equal` (the public timm/imagenet-22k-wds builder splits samples evenly) and
`varied` (each shard +-5% of the mean, seeded: our writer with --max-shard-bytes, or any set with errors).

Then the manifest check: a 13.7M-row `_index.parquet` in the writer's schema beside a 4,096-shard
`_info.json`; in a fresh process, the time and the peak resident memory (over the process's resident size
after its imports, the kernel's high-water mark reset there) of building a loader, which reads the manifest
and checks it against the index.

    python benchmarks/loader_plan.py [--sizes 8 64 512 4096] [--cache /tmp/loader_plan]
    # the code before a change: git worktree add /tmp/before REV; python benchmarks/loader_plan.py --code /tmp/before
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

SAMPLES = 13_673_551
BATCH, WORKERS = 128, 8


def shard_lengths(n_shards: int, total: int, pattern: str) -> list[int]:
    if pattern == "equal":
        return [total // n_shards + (i < total % n_shards) for i in range(n_shards)]
    rng = random.Random(0)
    raw = [rng.uniform(0.95, 1.05) for _ in range(n_shards)]
    scale = total / sum(raw)
    lengths = [int(r * scale) for r in raw]
    for i in range(total - sum(lengths)):
        lengths[i % n_shards] += 1
    return lengths


def write_info(folder: str, lengths: list[int]) -> str:
    os.makedirs(folder, exist_ok=True)
    # memory:// URLs: shards that are not local, so the startup check does not look for them (none exist)
    names = [f"memory://in22k-sim/train-{i:06d}.tar" for i in range(len(lengths))]
    info = {"name": "in22k-sim", "splits": {"train": {"name": "train", "filenames": names, "shard_lengths": lengths,
                                                       "num_samples": sum(lengths)}}}
    path = os.path.join(folder, "_info.json")
    with open(path, "w") as f:
        json.dump(info, f)
    return path


def loader_cfg(info: str):
    from pretrain.data.loader import LoaderConfig
    return LoaderConfig(info, batch_size=BATCH, workers=WORKERS)


def plan_row(cache: str, world: int, pattern: str) -> dict:
    from pretrain.data.loader import build_loader
    n_shards = max(4096, world * WORKERS)
    info = write_info(os.path.join(cache, f"plan-{pattern}-{n_shards}"), shard_lengths(n_shards, SAMPLES, pattern))
    t0 = time.perf_counter()
    loader = build_loader(loader_cfg(info), rank=world // 2, world=world)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = len(loader)
    plan_s = time.perf_counter() - t0
    return {"ranks": world, "shards": n_shards, "lengths": pattern, "plan_s": round(plan_s, 4),
            "build_s": round(built, 4), "batches_per_rank": batches,
            "share": round(batches * BATCH * world / SAMPLES, 5)}


def write_index(folder: str) -> str:
    """A 13.7M-row _index.parquet in the shard writer's schema (row groups of 1M rows, as pyarrow writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pretrain.data.shards import INDEX_SCHEMA
    path = os.path.join(folder, "_index.parquet")
    lengths = shard_lengths(4096, SAMPLES, "equal")
    info = write_info(folder, lengths)
    if os.path.exists(path):
        return info
    shard_of = [i for i, n in enumerate(lengths) for _ in range(n)]
    chunk = 1 << 20
    with pq.ParquetWriter(path + ".tmp", INDEX_SCHEMA) as w:
        for start in range(0, SAMPLES, chunk):
            rows = range(start, min(SAMPLES, start + chunk))
            wnid = [f"n{(i * 7919) % 21841:08d}" for i in rows]
            w.write_table(pa.table({
                "key": [f"train{i:09d}" for i in rows],
                "shard": [f"train-{shard_of[i]:06d}.tar" for i in rows],  # the index names shards by basename
                "label": pa.array([(i * 7919) % 21841 for i in rows], pa.int32()),
                "class_name": wnid,
                "bytes": pa.array([110_000 + i % 5000 for i in rows], pa.int64()),
                "width": pa.array([500] * len(rows), pa.int32()),
                "height": pa.array([375] * len(rows), pa.int32()),
                "source": [f"/data/fall11_whole/{c}.tar::{c}/{c}_{i}.JPEG" for c, i in zip(wnid, rows)],
            }, schema=INDEX_SCHEMA))
    os.replace(path + ".tmp", path)
    return info


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """The resident size now, with the kernel's high-water mark (VmHWM) reset to it (Linux's clear_refs 5):
    ru_maxrss can't be reset, so memory freed after the imports hid the check's own peak below theirs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")


def check_row(info: str) -> dict:
    """In this (fresh) process: building the loader reads _info.json and checks it against _index.parquet."""
    from pretrain.data.loader import build_loader
    import pyarrow.parquet  # noqa: F401  (an import, not the check: the old code imported it inside)
    base = reset_peak_rss()
    t0 = time.perf_counter()
    build_loader(loader_cfg(info), rank=0, world=1)
    seconds = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    return {"index_rows": SAMPLES, "index_mb": round(os.path.getsize(os.path.join(os.path.dirname(info),
                                                                                    "_index.parquet")) / 2**20, 1),
            "check_s": round(seconds, 3), "peak_mb": round((peak - base) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 512, 4096], help="world sizes")
    ap.add_argument("--lengths", nargs="+", default=["equal", "varied"], choices=["equal", "varied"])
    ap.add_argument("--cache", default="/tmp/loader_plan", help="manifests and the 13.7M-row index (reused)")
    ap.add_argument("--code", default="", help="import `pretrain` from this checkout (e.g. a worktree of an "
                                               "older commit) instead of this one")
    ap.add_argument("--no-check", action="store_true", help="skip the manifest-check row")
    ap.add_argument("--check-only", default="", help=argparse.SUPPRESS)  # the fresh process of the check row
    args = ap.parse_args()
    if args.code:  # another checkout; otherwise the installed (or current directory's) `pretrain`
        sys.path.insert(0, os.path.abspath(args.code))
    import pretrain
    if args.check_only:
        print(json.dumps(check_row(args.check_only)))
        return
    print(json.dumps({"code": os.path.dirname(os.path.abspath(pretrain.__file__))}), flush=True)
    for world in args.sizes:
        for pattern in args.lengths:
            print(json.dumps(plan_row(args.cache, world, pattern)), flush=True)
    if not args.no_check:
        info = write_index(os.path.join(args.cache, "index"))
        cmd = [sys.executable, os.path.abspath(__file__), "--check-only", info, "--code", args.code]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
