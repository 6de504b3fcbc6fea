"""Write images as WebDataset tar shards (timm's `imagenet-22k-wds` layout) and verify them.

Each sample is `<key>.jpg`, `<key>.cls` (class index, ASCII) and `<key>.json` (label, class name, width,
height, source). An unlabelled folder (`labelled=False`, for SimMIM) gives `<key>.jpg` and `<key>.json`
(width, height, source) and a manifest with `"labelled": false`. Beside the shards: `_info.json` (timm's format), `_index.parquet` (one row per sample),
`classes.txt` (class index = line number) and `_errors.json` (inputs skipped, with the reason).

Resumable: each shard is written under a temporary name and renamed when complete, with its index rows
in `_parts/`; a rerun with the same plan skips finished shards.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ..io import filesystem, read_bytes, write_bytes_atomic
from .loader import IMAGE_KEYS, iter_samples, mp_context
from .manifest import MANIFEST_NAMES, DataError, find_manifest, read_manifest

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("label", pa.int32()),
                          ("class_name", pa.string()), ("bytes", pa.int64()), ("width", pa.int32()),
                          ("height", pa.int32()), ("source", pa.string())])
log = logging.getLogger(__name__)
PLAN_FIELDS = ("src", "val_per_class", "samples_per_shard", "max_shard_bytes", "max_side", "seed", "quality")


@dataclass(frozen=True)
class Item:
    """One input image: where its bytes are and its class name. `ref` is (kind, *locator)."""
    ref: tuple
    class_name: str
    size: int = 0  # source bytes when known cheaply, for byte-sized shards

    @property
    def source(self) -> str:
        return "::".join(str(r) for r in self.ref[1:])


@dataclass
class WriteOptions:
    src: str
    out: str
    val_per_class: int = 0
    samples_per_shard: int = 1000
    max_shard_bytes: int = 0
    max_side: int = 0
    seed: int = 0
    quality: int = 90
    workers: int = 1
    image_column: Optional[str] = None
    label_column: str = "label"
    start_method: str = "auto"  # worker pool: auto (the platform's default), fork, spawn or forkserver
    labelled: bool = True  # False: a folder of images without classes (SimMIM); no `cls` members are written


# ------------------------------------------------------------------------------------------- sources

@dataclass
class Listing:
    """What a source holds: the images, every class it names (with images or not), and the inputs that
    could not even be listed (dangling or looping symlinks), with the reason."""
    items: list[Item]
    class_names: set[str]
    problems: list[dict]


def _list_folder(root: str) -> Listing:
    items, problems = [], []
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    for cls in classes:
        for dirpath, _, files in os.walk(os.path.join(root, cls)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    p = os.path.join(dirpath, f)
                    try:
                        items.append(Item(("file", p), cls, os.path.getsize(p)))
                    except OSError as e:  # a dangling symlink, a symlink loop, no permission
                        problems.append({"source": p, "class": cls, "reason": f"unreadable: {e.strerror or e}"})
    return Listing(items, set(classes), problems)


def _list_unlabelled(root: str) -> Listing:
    """Every image under `root`, at any depth, with no class (class name "")."""
    items, problems = [], []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTS):
                p = os.path.join(dirpath, f)
                try:
                    items.append(Item(("file", p), "", os.path.getsize(p)))
                except OSError as e:
                    problems.append({"source": p, "class": "", "reason": f"unreadable: {e.strerror or e}"})
    return Listing(items, {""}, problems)


def _list_class_tars(root: str) -> Listing:
    items = []
    names = sorted(f for f in os.listdir(root) if f.endswith(".tar"))
    for name in names:
        path = os.path.join(root, name)
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                    items.append(Item(("tar", path, m.name), name[:-4], m.size))
    return Listing(items, {n[:-4] for n in names}, [])


def _parquet_image_column(schema: pa.Schema, wanted: Optional[str]) -> str:
    if wanted:
        if wanted not in schema.names:
            raise DataError(f"image column {wanted!r} not in parquet columns {schema.names}")
        return wanted
    for name in ("image", "jpg", "img", "image_bytes", "bytes"):
        if name in schema.names:
            return name
    raise DataError(f"no image column found in parquet columns {schema.names}; pass --image-column")


def _list_parquet(root: str, label_column: str) -> Listing:
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".parquet")) \
        if os.path.isdir(root) else [root]
    items = []
    for path in files:
        if label_column not in pq.read_schema(path).names:
            raise DataError(f"{path}: label column {label_column!r} not found; pass --label-column")
        table = pq.read_table(path, columns=[label_column])
        for row, label in enumerate(table.column(label_column).to_pylist()):
            items.append(Item(("parquet", path, row), str(label)))
    return Listing(items, {it.class_name for it in items}, [])


def detect_source(src: str) -> str:
    if src.endswith(".parquet") or (os.path.isdir(src) and any(f.endswith(".parquet") for f in os.listdir(src))):
        return "parquet"
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a folder of class folders, class tars or parquet files")
    entries = os.listdir(src)
    if any(f.endswith(".tar") for f in entries):
        return "tars"
    if any(os.path.isdir(os.path.join(src, f)) for f in entries):
        return "folder"
    raise DataError(f"{src}: found no class folders, <class>.tar archives or .parquet files")


def refuse_output_inside_source(src: str, out: str) -> None:
    """An output folder inside a folder source would be read as a class (or its shards as class tars) on a
    rerun, shifting every label after it."""
    if "://" in out and not out.startswith("file://"):
        return
    src_real = os.path.realpath(src)
    out_real = os.path.realpath(out.removeprefix("file://"))
    if os.path.isdir(src_real) and (out_real == src_real or out_real.startswith(src_real + os.sep)):
        raise DataError(f"the output {out} is inside the source {src}: a rerun would read it as a class; write "
                         "the shards outside the source folder")


def list_items(opts: WriteOptions) -> Listing:
    kind = detect_source(opts.src)
    if not opts.labelled:
        if kind != "folder":
            raise DataError(f"{opts.src}: --no-labels takes a folder of images (at any depth); for {kind} sources "
                            "leave it out")
        return _list_unlabelled(opts.src)
    if kind == "folder":
        listing = _list_folder(opts.src)
        loose = [f for f in os.listdir(opts.src) if f.lower().endswith(IMAGE_EXTS)]
        if loose:  # they belong to no class: never dropped without a word
            what = "images but no class folders" if not listing.class_names else (
                f"{len(loose)} image(s) outside the class folders (e.g. {sorted(loose)[0]})")
            raise DataError(f"{opts.src}: {what}: for an unlabelled set (SimMIM) pass --no-labels; for "
                            "classification put each class's images in a folder of its own")
        return listing
    if kind == "tars":
        return _list_class_tars(opts.src)
    return _list_parquet(opts.src, opts.label_column)


def class_order(names: set[str]) -> list[str]:
    """Class index = position here: sorted names (class folders, tar names), every class the source
    names, with images or not, so that an empty class never shifts the ones after it."""
    # Integer labels (parquet) sort numerically so that label i stays class i.
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ---------------------------------------------------------------------------------------------- plan

def plan_splits(items: list[Item], opts: WriteOptions) -> dict[str, list[Item]]:
    """Seeded: N per class held out for validation, then each split shuffled globally."""
    rng = random.Random(opts.seed)
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_class[it.class_name].append(it)
    train, val = [], []
    for cls in sorted(by_class):
        members = by_class[cls]
        held = set(rng.sample(range(len(members)), min(opts.val_per_class, len(members))))
        for i, it in enumerate(members):
            (val if i in held else train).append(it)
    rng.shuffle(train)
    rng.shuffle(val)
    return {"train": train, "validation": val} if val else {"train": train}


def chunk(items: list[Item], per_shard: int, max_bytes: int) -> list[list[Item]]:
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        if cur and (len(cur) >= per_shard or (max_bytes and cur_bytes + it.size > max_bytes)):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += it.size
    if cur:
        shards.append(cur)
    return shards


# ------------------------------------------------------------------------------------------- images

class _Reader:
    """Fetches raw bytes for items, keeping class tars and parquet tables open within one worker."""

    def __init__(self, image_column: Optional[str]):
        self.image_column = image_column
        self._tars: dict[str, tarfile.TarFile] = {}
        self._tables: dict[str, pa.Table] = {}

    def __call__(self, it: Item) -> bytes:
        kind = it.ref[0]
        if kind == "file":
            with open(it.ref[1], "rb") as f:
                return f.read()
        if kind == "tar":
            tf = self._tars.get(it.ref[1]) or self._tars.setdefault(it.ref[1], tarfile.open(it.ref[1]))
            return tf.extractfile(it.ref[2]).read()
        path, row = it.ref[1], it.ref[2]
        if path not in self._tables:
            col = _parquet_image_column(pq.read_schema(path), self.image_column)
            self._tables = {path: pq.read_table(path, columns=[col])}  # one file resident at a time
        value = self._tables[path].column(0)[row].as_py()
        if isinstance(value, dict):  # HF datasets Image feature: {'bytes': ..., 'path': ...}
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"parquet cell is {type(value).__name__}, not image bytes")
        return bytes(value)


def prepare_jpeg(data: bytes, max_side: int, quality: int) -> tuple[bytes, int, int, str]:
    """Validate and normalize one image: (jpeg bytes, width, height, note).

    RGB JPEGs within `max_side` keep their original bytes (lossless, fast); anything else (CMYK,
    grayscale, palette, PNG and other formats, also when named .jpg) is converted to RGB JPEG.
    Raises ValueError for inputs that can't be decoded (not an image, truncated).
    """
    try:
        img = Image.open(io.BytesIO(data))
        fmt, mode = img.format, img.mode
        img.load()  # full decode: catches truncated files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    needs_resize = max_side and min(w, h) > max_side
    if fmt == "JPEG" and mode == "RGB" and not needs_resize:
        return data, w, h, ""
    note = []
    if mode != "RGB":
        if mode in ("RGBA", "LA", "P", "PA") and ("transparency" in img.info or mode in ("RGBA", "LA", "PA")):
            img = img.convert("RGBA")
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            img = bg
        else:
            img = img.convert("RGB")
        note.append(f"converted {mode}->RGB")
    if fmt != "JPEG":
        note.append(f"re-encoded {fmt}->JPEG")
    if needs_resize:
        s = max_side / min(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
        img = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
        note.append(f"resized to {w}x{h}")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), w, h, ", ".join(note)


# -------------------------------------------------------------------------------------------- write

@dataclass
class ShardJob:
    split: str
    index: int
    start: int  # global sample number of the first item: keys are stable across reruns
    items: list[Item]
    classes: dict[str, int]
    opts: WriteOptions

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


def _join(out: str, name: str) -> str:
    return out.rstrip("/") + "/" + name


def write_shard(job: ShardJob) -> tuple[str, int, list[dict]]:
    """Write one shard and its index part; returns (shard name, samples written, errors)."""
    import webdataset as wds

    read = _Reader(job.opts.image_column)
    rows, errors = [], []
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as sink:  # a fixed mtime: the same input gives the same bytes
        for offset, it in enumerate(job.items):
            key = f"{job.split}{job.start + offset:09d}"
            try:
                jpg, w, h, note = prepare_jpeg(read(it), job.opts.max_side, job.opts.quality)
            except (ValueError, OSError, KeyError) as e:
                errors.append({"source": it.source, "class": it.class_name, "reason": str(e)})
                continue
            labelled = job.opts.labelled
            label = job.classes[it.class_name] if labelled else -1
            meta = ({"label": label, "class_name": it.class_name} if labelled else {}) | {
                "width": w, "height": h, "source": it.source}
            if note:
                meta["note"] = note
            sample = {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}
            if labelled:
                sample["cls"] = str(label).encode()
            sink.write(sample)
            rows.append({"key": key, "shard": job.name, "label": label, "class_name": it.class_name,
                         "bytes": len(jpg), "width": w, "height": h, "source": it.source})
            if note:
                errors.append({"source": it.source, "class": it.class_name, "reason": note, "kept": True})
    data = buf.getvalue()
    write_bytes_atomic(_join(job.opts.out, job.name), data)
    part = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), part)
    write_bytes_atomic(_join(job.opts.out, f"_parts/{job.name}.errors.json"), json.dumps(errors).encode())
    write_bytes_atomic(_join(job.opts.out, f"_parts/{job.name}.parquet"), part.getvalue())
    # Written last: the shard is finished if this exists and the shard still has this size.
    write_bytes_atomic(_join(job.opts.out, f"_parts/{job.name}.done.json"),
                       json.dumps({"bytes": len(data), "samples": len(rows)}).encode())
    return job.name, len(rows), errors


def _finished(fs, out: str, name: str) -> bool:
    """A shard from an earlier run counts only if its done record exists and its size still matches
    (a shard truncated after it was written is written again)."""
    done = _join(out, f"_parts/{name}.done.json")
    if not fs.exists(done):
        return False
    want = json.loads(read_bytes(done))["bytes"]
    path = filesystem(_join(out, name))[1]
    if fs.exists(path) and fs.size(path) == want:
        return True
    log.warning("%s: %s bytes, written as %d: writing it again", _join(out, name),
                fs.size(path) if fs.exists(path) else "missing, 0", want)
    return False


def _plan_fingerprint(opts: WriteOptions, n_items: int) -> dict:
    plan = {**{k: getattr(opts, k) for k in PLAN_FIELDS}, "n_items": n_items}
    return plan if opts.labelled else {**plan, "labelled": False}  # labelled plans keep their older form


def _check_plan(fs, out: str, plan: dict) -> None:
    path = _join(out, "_parts/_plan.json")
    if fs.exists(path):
        old = json.loads(read_bytes(path))
        if old != plan:
            diff = {k: (old.get(k), plan.get(k)) for k in plan if old.get(k) != plan.get(k)}
            raise DataError(f"{out} holds shards from another plan ({diff} as (old, new)); "
                             "write to a new folder or rerun with the same arguments to resume")
    else:
        write_bytes_atomic(path, json.dumps(plan).encode())


def write_shards(opts: WriteOptions, progress: bool = True) -> dict:
    """Plan, write (in parallel, skipping finished shards) and write the manifest. Returns a summary."""
    refuse_output_inside_source(opts.src, opts.out)
    listing = list_items(opts)
    items = listing.items
    if not items:
        raise DataError(f"{opts.src}: no images found")
    classes = class_order(listing.class_names)
    class_idx = {c: i for i, c in enumerate(classes)}
    have = {it.class_name for it in items}
    empty = [c for c in classes if c not in have]
    problems = listing.problems + [
        {"source": _join(opts.src, c), "class": c, "reason": f"empty class: no images; kept as class {class_idx[c]} "
         "so that the classes after it keep their indices", "empty_class": True} for c in empty]
    fs, _ = filesystem(opts.out)
    fs.makedirs(filesystem(_join(opts.out, "_parts"))[1], exist_ok=True)
    _check_plan(fs, opts.out, _plan_fingerprint(opts, len(items)))
    jobs = []
    for split, members in plan_splits(items, opts).items():
        start = 0
        for i, shard in enumerate(chunk(members, opts.samples_per_shard, opts.max_shard_bytes)):
            jobs.append(ShardJob(split, i, start, shard, class_idx, opts))
            start += len(shard)
    todo = [j for j in jobs if not _finished(fs, opts.out, j.name)]
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(j.items) for j in todo), unit="img", desc="writing shards", smoothing=0.1)
    if todo:
        with mp_context(opts.start_method).Pool(opts.workers) if opts.workers > 1 else _Serial() as pool:
            for name, n, _ in pool.imap_unordered(write_shard, todo):
                if bar:
                    bar.update(n)
    if bar:
        bar.close()
    summary = write_manifest(opts.out, jobs, classes if opts.labelled else [], problems,
                             name=os.path.basename(opts.src.rstrip("/")), labelled=opts.labelled)
    summary.update(empty_classes=empty, skipped_shards=len(jobs) - len(todo), seconds=time.time() - t0,
                   written_images=sum(len(j.items) for j in todo))
    return summary


class _Serial:
    """Pool stand-in for workers=1 (no processes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


def write_manifest(out: str, jobs: list[ShardJob], classes: list[str], problems: list[dict] = (),
                   name: str = "", labelled: bool = True) -> dict:
    """_index.parquet, _info.json (timm's format; `name` is the source's, so the same input gives the same
    bytes wherever it is written), classes.txt and _errors.json (every input skipped or converted, every
    empty class)."""
    tables, errors = [], list(problems)
    for j in jobs:
        tables.append(pq.read_table(io.BytesIO(read_bytes(_join(out, f"_parts/{j.name}.parquet")))))
        errors += json.loads(read_bytes(_join(out, f"_parts/{j.name}.errors.json")))
    index = pa.concat_tables(tables)
    buf = io.BytesIO()
    pq.write_table(index, buf)
    write_bytes_atomic(_join(out, "_index.parquet"), buf.getvalue())
    counts = defaultdict(int)
    for shard in index.column("shard").to_pylist():
        counts[shard] += 1
    splits = {}
    for split in dict.fromkeys(j.split for j in jobs):
        names = [j.name for j in jobs if j.split == split]
        lengths = [counts[n] for n in names]
        splits[split] = {"name": split, "filenames": names, "shard_lengths": lengths, "num_samples": sum(lengths)}
    info = {"name": name or os.path.basename(out.rstrip("/")), "num_classes": len(classes), "splits": splits}
    if not labelled:
        info["labelled"] = False  # no `cls` members: the loader refuses them for classification
    write_bytes_atomic(_join(out, "_info.json"), json.dumps(info, indent=1).encode())
    write_bytes_atomic(_join(out, "classes.txt"), "".join(c + "\n" for c in classes).encode())
    skipped = [e for e in errors if not e.get("kept") and not e.get("empty_class")]
    write_bytes_atomic(_join(out, "_errors.json"), json.dumps(errors, indent=1).encode())
    return {"samples": {s: v["num_samples"] for s, v in splits.items()},
            "shards": {s: len(v["filenames"]) for s, v in splits.items()},
            "classes": len(classes), "skipped_inputs": len(skipped),
            "converted_inputs": sum(1 for e in errors if e.get("kept"))}


# ------------------------------------------------------------------------------------------- verify

def verify_shards(out: str) -> dict:
    """Check every shard against the manifest (`_info.json`, else `info.json`): readable, complete, decodable,
    labelled. A split with `alt_label` counts only the samples whose json label is >= 0, as the loader reads
    it; a shard file listed by several splits (the public set's `train` and `train_12k`) is decoded once."""
    if posixpath.basename(out.rstrip("/")) in MANIFEST_NAMES:  # the manifest itself: its folder holds the shards
        out = posixpath.dirname(out.rstrip("/")) or "."
    info = read_manifest(find_manifest(out) or _join(out, "_info.json"))
    bad: list[dict] = []
    checked, decoded = 0, set()
    labelled = info.get("labelled", True) is not False
    for split, s in info["splits"].items():
        alt = s.get("alt_label")
        for name, expected in zip(s["filenames"], s["shard_lengths"]):
            problems, n, decode = [], 0, name not in decoded
            decoded.add(name)
            try:
                for key, sample in iter_samples(io.BytesIO(read_bytes(_join(out, name)))):
                    if alt:
                        try:
                            if json.loads(sample["json"])[alt] < 0:
                                continue
                        except Exception as e:
                            problems.append(f"{key}: no {alt!r} label in its json ({type(e).__name__}: {e})")
                            continue
                    n += 1
                    image = next((k for k in IMAGE_KEYS if k in sample), None)
                    if image is None or (labelled and "cls" not in sample):
                        problems.append(f"{key}: missing {'an image (jpg, png, webp)' if image is None else 'cls'}")
                        continue
                    try:
                        if decode:
                            Image.open(io.BytesIO(sample[image])).load()
                        if labelled:
                            int(sample["cls"])
                    except Exception as e:
                        problems.append(f"{key}: {type(e).__name__}: {e}")
            except FileNotFoundError:
                problems.append("missing")
            except (tarfile.TarError, OSError, EOFError) as e:
                problems.append(f"unreadable after {n} samples ({type(e).__name__}: {e})")
            if n != expected and "missing" not in problems:
                problems.append(f"{n} samples, manifest says {expected}")
            checked += n
            if problems:
                bad.append({"shard": name, "split": split, "problems": problems})
    return {"checked_samples": checked, "bad_shards": bad}
