"""What a split is: its shards with their sample counts and its label field, read from a manifest
(`_info.json` or `info.json`, timm's format), a brace pattern or a list, and checked once per job.

Accepted as a data source, as timm's WebDataset reader accepts them:
- a manifest URL: `s3://b/in22k/_info.json`, `.../info.json`;
- a dataset root: `s3://b/in22k` (its `_info.json`, else its `info.json`);
- shards: a brace pattern or a comma list, with `|N` for the total sample count: `s3://b/t-{0000..4095}.tar|1367`.
The split is a manifest split name (`train`, `train_12k`, ...) or, beside a root or manifest, a brace pattern
relative to it with `|N` (`imagenet22k-train-{0000..4095}.tar|13673551`). A split with `alt_label` takes its
labels from that field of each sample's json and leaves out the samples where it is < 0 (the public
ImageNet-22K set's `train_12k`/`validation_12k`); its `shard_lengths` count only the samples it keeps.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

import fsspec.utils
from braceexpand import braceexpand

from ..errors import UserError
from ..io import filesystem, open_url

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("_info.json", "info.json")  # timm's reader tries them in this order
MIN_SAMPLE_BYTES = 1024  # a sample is >= 2 tar members (jpg, cls) of >= 512 header + 512 data bytes
Shard = tuple[str, Optional[int]]  # (url, samples in the split, or None when unknown)


class DataError(UserError, RuntimeError):
    """Data that can't be used as configured: named shards, counts, or a refused resume."""


@dataclass
class Split:
    shards: list[Shard]
    alt_label: Optional[str] = None  # json field holding the label; samples where it is < 0 are left out
    num_classes: Optional[int] = None  # the manifest's (our writer's `num_classes`), when it says
    labelled: bool = True  # False: our writer's shards of an unlabelled folder (no `cls` members)

    @property
    def num_samples(self) -> int:
        return sum(n or 0 for _, n in self.shards)


def _is_shard_list(source: str) -> bool:
    return source.startswith("pipe:") or any(c in source for c in "{,|") or source.rstrip("/").endswith(".tar")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/" if "/" in url else ""


def find_manifest(root: str) -> Optional[str]:
    """The manifest of a dataset root: its `_info.json`, else its `info.json`; None if it has neither."""
    for name in MANIFEST_NAMES:
        url = root.rstrip("/") + "/" + name
        fs, path = filesystem(url)
        if fs.exists(path):
            return url
    return None


def read_manifest(source: str) -> dict:
    """A manifest (timm's format), its structure checked; DataError naming the file otherwise."""
    try:
        with open_url(source, "r") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{source}: no such manifest; point data.train/data.val at the shards' _info.json "
                        "(or info.json), or at the folder that holds it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: not valid JSON ({e}); rerun the shard writer to rewrite it") from None
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("filenames"), list) and isinstance(v.get("shard_lengths"), list)
            and len(v["filenames"]) == len(v["shard_lengths"])
            and all(isinstance(n, int) and n >= 0 for n in v["shard_lengths"]) for v in splits.values()):
        raise DataError(f"{source}: not a shard manifest (expected splits.<name>.filenames and shard_lengths of "
                        "equal length, counts >= 0); rerun the shard writer to rewrite it")
    return info


def _expand(pattern: str, base: str = "") -> tuple[list[str], Optional[int]]:
    """(urls, total count or None) of 'a-{0..9}.tar,b.tar|N', each relative name joined to `base`."""
    pattern, _, count = pattern.partition("|")
    try:
        total = int(count) if count else None
    except ValueError:
        raise DataError(f"{pattern}|{count}: the count after '|' must be an integer number of samples") from None
    urls = [u if "://" in u or u.startswith(("/", "pipe:")) or not base else base + u
            for part in pattern.split(",") for u in braceexpand(part.strip()) if u]
    if not urls:
        raise DataError(f"no shards in {pattern!r}")
    return urls, total


def _even(urls: list[str], total: Optional[int], source: str) -> list[Shard]:
    """A total count spread over the shards as evenly as possible (timm does the same with '|N')."""
    if total is None:
        return [(u, None) for u in urls]
    log.warning("%s: per-shard counts estimated from the total %d (no manifest lists them); a shorter shard "
                "is re-read by its worker to keep batch counts equal", source, total)
    return [(u, total // len(urls) + (i < total % len(urls))) for i, u in enumerate(urls)]


def resolve_split(source: str, split: str) -> Split:
    """The split's shards and label field from any accepted source (module docstring), manifest checked."""
    if _is_shard_list(source):
        urls, total = _expand(source)
        return Split(_even(urls, total, source))
    manifest = source if source.endswith(".json") else find_manifest(source)
    if "{" in split or ".tar" in split:  # a shard pattern relative to the dataset root
        urls, total = _expand(split, _parent(manifest) if manifest else source.rstrip("/") + "/")
        return Split(_even(urls, total, f"{source} split {split}"))
    if manifest is None:
        raise DataError(f"{source}: no {' or '.join(MANIFEST_NAMES)} there; point data.train/data.val at the "
                        "shards' manifest, or at shards as a brace pattern with |count")
    info = read_manifest(manifest)
    if split not in info["splits"]:
        raise DataError(f"{manifest}: no split {split!r}; it has {sorted(info['splits'])}")
    s = info["splits"][split]
    base = _parent(manifest)
    shards = [(f if "://" in f or f.startswith(("/", "pipe:")) else base + f, n)
              for f, n in zip(s["filenames"], s["shard_lengths"])]
    alt = s.get("alt_label") or None
    if alt is not None and not isinstance(alt, str):
        raise DataError(f"{manifest}: split {split!r} alt_label must be a json field name or null, got {alt!r}")
    check_manifest(manifest, split, s, shards, check_index=alt is None)
    n = info.get("num_classes") if alt is None else None  # an alt_label split counts other classes
    return Split(shards, alt, n if isinstance(n, int) and n > 0 else None, info.get("labelled", True) is not False)


def index_counts(index_url: str) -> Optional[dict[str, int]]:
    """Samples per shard name in an `_index.parquet` (None if there is none), counted by pyarrow in 1M-row
    batches of the dictionary-encoded `shard` column: no Python string per row, memory flat in the rows."""
    fs, path = filesystem(index_url)
    if not fs.exists(path):
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    counts: dict[str, int] = {}
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, read_dictionary=["shard"])
        for batch in pf.iter_batches(batch_size=1 << 20, columns=["shard"]):
            vc = pc.value_counts(batch.column(0))
            for name, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                counts[name] = counts.get(name, 0) + n
    return counts


def check_manifest(source: str, split: str, s: dict, shards: list[Shard], check_index: bool = True) -> None:
    """The manifest's counts against what is cheap to read at startup: `_index.parquet` beside it (one row
    per sample written; a split that filters samples by an alt_label can't be compared with it) and, for
    local shards, that they exist and their sizes. A disagreement is refused: a wrong count would silently
    stretch the epoch and the lr schedule, or read samples twice; a missing shard would be found only after
    the first updates and the retries."""
    index_url = _parent(source) + "_index.parquet"
    counts = index_counts(index_url) if check_index else None
    if counts is not None:
        wrong = [(f, n, counts.get(f.rsplit("/", 1)[-1], 0)) for f, n in zip(s["filenames"], s["shard_lengths"])
                 if counts.get(f.rsplit("/", 1)[-1], 0) != n]
        if wrong:
            shown = ", ".join(f"{f}: {n} (index: {m})" for f, n, m in wrong[:5])
            raise DataError(f"{source}: split {split!r} shard counts disagree with {index_url} for {len(wrong)} "
                            f"shard(s): {shown}. Rerun the shard writer on the same output to rewrite the "
                            "manifest, or fix the manifest")
    total = s.get("num_samples")
    if total is not None and total != sum(s["shard_lengths"]):
        raise DataError(f"{source}: split {split!r} num_samples={total} but its shard_lengths add up to "
                        f"{sum(s['shard_lengths'])}; rerun the shard writer to rewrite the manifest")
    missing = []
    for url, n in shards:
        # Remote shards are checked as they are read (counts per shard, retries): no filesystem is made for
        # them here (32,768 of them cost seconds, and s3:// would need s3fs on the rank that checks).
        if url.startswith("pipe:") or fsspec.utils.get_protocol(url) not in ("file", "local"):
            continue
        sfs, path = filesystem(url)
        if not sfs.exists(path):
            missing.append(url)
            continue
        size = sfs.size(path)
        if n and size < n * MIN_SAMPLE_BYTES:
            raise DataError(f"{url}: {size} bytes cannot hold the {n} samples {source} lists for it; the shard "
                            "is truncated or the manifest is wrong (python -m pretrain.cli.make_shards verify)")
    if missing:
        raise DataError(f"{source}: split {split!r} lists {len(missing)} local shard(s) that do not exist: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; copy them there, or "
                        "rewrite the manifest (python -m pretrain.cli.make_shards verify lists what is missing)")


def resolve_split_once(source: str, split: str, world: int) -> Split:
    """resolve_split on rank 0 of the job, broadcast to the others: the manifest, the index (tens of MB at
    ImageNet-22K scale) and the shard sizes are read once per job, not once per rank. Without a process group
    (or with one rank) each caller reads for itself."""
    from ..collective import on_rank0
    if world == 1:
        return resolve_split(source, split)
    return on_rank0(lambda: resolve_split(source, split), f"reading {source}")
