"""Streaming loader for WebDataset shards: deterministic, equal batch counts on every rank, resumable.

Order is a pure function of (seed, epoch, rank, world, workers, batch size):
1. The plan (pretrain.data.plan): shards shuffled by (seed, epoch), dealt to ranks by sample count, then to
   each rank's worker slots ("roles"), a short role taking a shard's head from a role with samples to spare.
2. Every rank yields the same number of batches Q, computed from the manifest alone: the most that every
   rank can fill without reading a sample twice. Role r yields Q // W (+1 for the first Q % W roles)
   batches, which the DataLoader's in-order round robin turns into batches 0..Q-1.
3. Each role streams its pieces through a seeded shuffle buffer; each sample's augmentation is seeded by
   (seed, epoch, sample key). Short or corrupt shards leave a role short: it then cycles its pieces again,
   so the batch count never changes and no rank waits for another (no DDP hang).
4. Resume: the state is (epoch, batches done). On restart each role skips its finished batches at the raw
   sample level (no decoding), and worker i takes role (i + done) % W so the round robin continues where
   it stopped. A different world size, worker count or batch size mid-epoch is refused (clear error);
   at an epoch boundary any of them may change.

Evaluation reads each sample exactly once across ranks; ranks are padded with invalid samples (flag 0)
to the same batch count, so metrics count exactly `num_samples` images.
"""
from __future__ import annotations

import atexit
import json
import logging
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (its exit function is registered before ours: ours runs first)
import random
import subprocess
import tarfile
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..compat import shutdown_loader_workers, worker_error_line
from ..config import DataSection
from ..io import MissingPackageError, open_url
from ..seeding import mix_seed
from ..slurm import ignore_signals_in_worker
from .manifest import DataError, resolve_split_once
from .plan import EpochPlan, Piece, train_plan
from .targets import Labels, Targets
from .transforms import AugConfig, decode, eval_decode_min_side, seeded

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "png", "webp")  # the image member, first found (timm's reader: 'jpg;png;webp')


@dataclass
class LoaderConfig:
    """One split's loader. The fields named like the config's data section (pretrain.config.DataSection)
    take its defaults and, through `from_section`, its values: the section is the one place they are set."""
    source: str  # _info.json/info.json URL, its folder, or shards "s3://b/t-{0000..0099}.tar|COUNT" (manifest)
    split: str = "train"
    batch_size: int = 64
    workers: int = DataSection.workers
    seed: int = 0
    shuffle_buffer: int = DataSection.shuffle_buffer
    allow_pipe: bool = DataSection.allow_pipe  # "pipe:" URLs run a shell command: only when the config says so
    max_corrupt: int = DataSection.max_corrupt  # per rank and epoch; more fails the run naming the shards
    on_bad_shard: str = DataSection.on_bad_shard  # or "skip": an unreadable shard after retries
    retries: int = DataSection.retries
    retry_backoff_s: float = 1.0
    pin_memory: bool = True
    return_keys: bool = False  # append the sample keys to every batch (tests, debugging)
    start_method: str = DataSection.start_method  # worker processes: auto, fork, spawn or forkserver
    aug: AugConfig = field(default_factory=AugConfig)
    targets: Targets = field(default_factory=Labels)  # the task's: class labels, SimMIM masks (data.masks), ...

    @classmethod
    def from_section(cls, data: DataSection, source: str, split: str, **rest) -> "LoaderConfig":
        shared = {f.name: getattr(data, f.name) for f in fields(cls) if f.name in SECTION_KEYS}
        return cls(source, split=split, **shared, **rest)


SECTION_KEYS = {f.name for f in fields(DataSection)} - {"train", "val", "train_split", "val_split"}


# --------------------------------------------------------------------------------------------- shards

def open_shard(url: str, allow_pipe: bool):
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(f"{url}: 'pipe:' URLs run a shell command; --set data.allow_pipe=true to allow")
        return subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE).stdout
    try:
        return open_url(url, "rb").open()
    except MissingPackageError as e:  # from a loader worker: a DataError comes back as one line
        raise DataError(str(e)) from None


def _tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream.

    A small ustar/GNU/pax header reader: tarfile builds a full TarInfo per member, which cost as much
    as a tenth of the per-image time on a loader worker. Truncation raises tarfile.ReadError.
    """
    long_name = None
    while True:
        header = f.read(512)
        if not header or header == b"\0" * 512:
            return
        if len(header) < 512:
            raise tarfile.ReadError("unexpected end of data in a header")
        try:
            size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
        except ValueError:
            raise tarfile.ReadError("bad header (size field)") from None
        kind = header[156:157]
        padded = size + (-size % 512)
        data = f.read(padded)
        if len(data) < padded:
            raise tarfile.ReadError(f"unexpected end of data: member needs {padded} bytes, got {len(data)}")
        data = data[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"g"):  # pax extended header: take 'path', ignore the rest
            if kind == b"x":
                for rec in data.decode("utf-8", "replace").split("\n"):
                    _, _, kv = rec.partition(" ")
                    if kv.startswith("path="):
                        long_name = kv[5:]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        name = long_name or (header[345:500].rstrip(b"\0").decode() + "/" if header[257:262] == b"ustar"
                             and header[345] else "") + header[:100].rstrip(b"\0").decode()
        long_name = None
        yield name, data


def iter_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) from a tar stream, grouping consecutive members of one key."""
    cur_key, cur = None, {}
    for name, data in _tar_members(fileobj):
        base = name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        key = name[: len(name) - len(base)] + key
        if key != cur_key and cur:
            yield cur_key, cur
            cur = {}
        cur_key = key
        cur[ext] = data
    if cur:
        yield cur_key, cur


# ----------------------------------------------------------------------------------------- dataset

def mp_context(method: str) -> mp.context.BaseContext:
    """The multiprocessing context for `method` ("auto": the platform's default start method)."""
    return mp.get_context(None if method == "auto" else method)


class ShardStream(IterableDataset):
    """One rank's stream of batches: (uint8 images (B,3,H,W), targets) or, for eval, plus valid (B,). The
    targets are what `cfg.targets` makes: labels (B,), or e.g. SimMIM's masks (B, H/4, W/4)."""

    def __init__(self, cfg: LoaderConfig, rank: int, world: int, training: bool):
        self.cfg, self.rank, self.world, self.training = cfg, rank, world, training
        split = resolve_split_once(cfg.source, cfg.split, world)
        self.shards, self.alt_label = split.shards, split.alt_label
        self.targets = cfg.targets
        self.targets.check(split, cfg.source, cfg.split)
        if (training or world > 1) and any(n is None for _, n in self.shards):
            raise DataError(f"{cfg.source}: {'training' if training else 'evaluation on several ranks'} needs "
                            "per-shard sample counts for equal batches on every rank: point data.source at "
                            "the shards' _info.json, or give the total as 'PATTERN|COUNT'")
        self.roles = max(1, cfg.workers)
        if training and len(self.shards) < world * self.roles:
            raise DataError(f"{len(self.shards)} shards for {world} ranks x {self.roles} workers: need at least "
                            f"{world * self.roles}; write smaller shards (--samples-per-shard) or use fewer workers")
        # Shared with (persistent) worker processes, so set_epoch reaches them.
        # Made in the workers' own context: a lock made for fork can't be passed to spawned workers.
        ctx = mp_context(cfg.start_method)
        self._epoch, self._start, self.corrupt = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0)
        self.transform = self.targets.transform(cfg.aug, training)
        self.min_side = eval_decode_min_side(cfg.aug)  # evaluation; training decodes per crop
        self.corrupt_shards: set[str] = set()  # per worker process, for the error message
        self._plan: Optional[EpochPlan] = None  # the current epoch's, made once per process (workers: copies)

    # ---- the plan: a pure function of (seed, epoch, world, roles, batch size), pretrain.data.plan
    def epoch_plan(self, epoch: Optional[int] = None) -> EpochPlan:
        """The training plan of `epoch` (default: the current one), computed once per epoch in each process
        that needs it (the loop's, and each worker's)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan_epoch != epoch:
            c = self.cfg
            self._plan = train_plan(self.shards, c.seed, epoch, self.rank, self.world, self.roles, c.batch_size)
            self._plan_epoch = epoch
        return self._plan

    def _eval_roles(self, rank: int) -> list[list[Piece]]:
        mine = self.shards[rank::self.world]
        return [[(u, 0, None) for u, _ in mine[r::self.roles]] for r in range(self.roles)]

    def _eval_batches(self, rank: int) -> list[int]:
        """Batches per role of `rank` when every sample is read once (the last one partial)."""
        B, mine = self.cfg.batch_size, self.shards[rank::self.world]
        return [-(-sum(n or 0 for _, n in mine[r::self.roles]) // B) for r in range(self.roles)]

    def batches_per_epoch(self) -> int:
        """Q, the same on every rank, from the manifest alone."""
        if self.training:
            return self.epoch_plan().batches
        return max(sum(self._eval_batches(r)) for r in range(min(self.world, len(self.shards)) or 1))

    def plan(self) -> tuple[list[list[Piece]], list[int]]:
        """(pieces per role for this rank, batches per role)."""
        if self.training:
            p = self.epoch_plan()
            return p.pieces, p.quotas
        roles = self._eval_roles(self.rank)
        unknown = any(n is None for _, n in self.shards)  # one rank, no manifest: read it all
        return roles, [2**62] * len(roles) if unknown else self._eval_batches(self.rank)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch.value, self._start.value = epoch, start_batch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def start_batch(self) -> int:
        return self._start.value

    # ---- streaming
    def _read_piece(self, url: str, start: int, stop: Optional[int], expected: Optional[int]
                    ) -> Iterator[tuple[str, dict, str]]:
        """Samples [start, stop) of a shard (stop None: to its end), counted after the split's label filter;
        network errors retried from where they broke off."""
        done, attempt = 0, 0  # samples of the piece yielded so far
        while True:
            try:
                n = 0
                with open_shard(url, self.cfg.allow_pipe) as f:
                    for key, sample in iter_samples(f):
                        if self.alt_label and not self._relabel(key, sample, url):
                            continue
                        n += 1
                        if stop is not None and n > stop:  # only a piece that ends at the shard's count reads on
                            self._longer(url, expected)
                            return
                        if n > start + done:
                            done += 1
                            yield key, sample, url
                            # A piece ending at the shard's listed count reads one sample on: a count below
                            # the real size (a small |COUNT, a stale manifest) would drop the rest every epoch.
                            if stop is not None and start + done >= stop and stop != expected:
                                return
                want = expected if stop is None else stop
                if want is not None and n < want:
                    msg = f"{url}: {n} samples, but {self.cfg.source} lists {expected} for it"
                    if self.training and self.cfg.on_bad_shard == "fatal":
                        # A count the shard can't hold stretches the epoch and the lr schedule with re-read
                        # samples; evaluation reports the images it read (val_samples / val_expected).
                        raise DataError(msg + ": the shard is truncated or the manifest is wrong (python -m "
                                        "pretrain.cli.make_shards verify); --set data.on_bad_shard=skip to go on")
                    log.warning("%s (truncated shard?)", msg)
                return
            except DataError:
                raise
            except (OSError, tarfile.TarError, EOFError) as e:
                if isinstance(e, tarfile.ReadError) or attempt >= self.cfg.retries:
                    # A tar cut mid-member won't heal by retrying; network errors get `retries` tries.
                    msg = f"{url}: unreadable after {start + done} samples ({type(e).__name__}: {e})"
                    if self.cfg.on_bad_shard == "fatal":
                        raise DataError(msg + "; --set data.on_bad_shard=skip to continue without it") from None
                    log.warning("%s; skipped", msg)
                    return
                attempt += 1
                time.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))

    def _longer(self, url: str, expected: int) -> None:
        """A shard holding more samples than its count: training would never read the rest, in any epoch."""
        msg = (f"{url}: more than the {expected} samples {self.cfg.source} counts for it, so the rest would never "
               "be read; give the split's real total after '|' or point at the shards' manifest (python -m "
               "pretrain.cli.make_shards verify checks one)")
        if self.cfg.on_bad_shard == "fatal":
            raise DataError(msg + "; --set data.on_bad_shard=skip trains on the counted samples only")
        log.warning("%s; only its first %d samples are read (data.on_bad_shard=skip)", msg, expected)

    def _relabel(self, key: str, sample: dict, url: str) -> bool:
        """An alt_label split: the label is that field of the sample's json; False leaves the sample out (< 0),
        as timm's reader does. Done before the shuffle buffer, so counts and resume skips see kept samples only."""
        try:
            value = json.loads(sample["json"])[self.alt_label]
        except (KeyError, TypeError, ValueError) as e:
            what = "no json member" if "json" not in sample else f"no {self.alt_label!r} in its json ({e!r})"
            raise DataError(f"{url}: sample {key} has {what}, which split {self.cfg.split!r} labels by "
                            f"(alt_label {self.alt_label!r}); use a split without alt_label or fix the shard") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{url}: sample {key}: json {self.alt_label!r} is {value!r}, not an integer label")
        if value < 0:
            return False
        sample["cls"] = str(value).encode()
        return True

    def _raw(self, pieces: list[Piece], role: int) -> Iterator[tuple[str, dict, str]]:
        """Shuffled raw samples of one role; cycles its pieces if they run short (keeps batch counts)."""
        rng = random.Random(mix_seed(self.cfg.seed, self.epoch, self.rank, role, "buffer"))
        expected = dict(self.shards)
        buf: list = []
        for cycle in range(1_000_000 if self.training else 1):
            got = 0
            for url, start, stop in pieces:
                for item in self._read_piece(url, start, stop, expected.get(url)):
                    got += 1
                    if not self.training:
                        yield item
                        continue
                    buf.append(item)
                    if len(buf) >= self.cfg.shuffle_buffer:
                        i = rng.randrange(len(buf))
                        buf[i], buf[-1] = buf[-1], buf[i]
                        yield buf.pop()
            rng.shuffle(buf)  # drain this pass before any sample is read a second time
            yield from buf
            buf.clear()
            if got == 0:
                break

    def _decode(self, key: str, sample: dict, url: str):
        try:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                raise KeyError(f"no image member ({', '.join(IMAGE_KEYS)}); it has {sorted(sample)}")
            label = int(sample["cls"]) if self.targets.labelled else None
            if self.training:  # the transform decodes only what its random crop needs
                seed = (self.cfg.seed, self.epoch)
                image = seeded(mix_seed(*seed, key), self.transform, data)
            else:
                seed, image = None, self.transform(decode(data, self.min_side))
            return image, self.targets.target(label, key, url, seed)
        except DataError:
            raise
        except Exception as e:  # corrupt image, missing member, bad label
            with self.corrupt.get_lock():
                self.corrupt.value += 1
                total = self.corrupt.value
            self.corrupt_shards.add(url)
            log.warning("rank %d: corrupt sample %s skipped (%s)", self.rank, key, e)
            if total > self.cfg.max_corrupt:
                raise DataError(f"{total} corrupt samples on rank {self.rank} this epoch (limit "
                                f"data.max_corrupt={self.cfg.max_corrupt}); last {key}: {e}; shards: "
                                f"{sorted(self.corrupt_shards)}") from None
            return None

    def _batches(self, role: int) -> Iterator:
        pieces, quota = self.plan()
        pieces, q = pieces[role], quota[role]
        B, W = self.cfg.batch_size, self.roles
        done = self.start_batch // W + (role < self.start_batch % W)  # batches this role already gave
        if not self.training:
            done = 0  # evaluation always runs whole
        skip = done * B
        imgs, labels, keys, made = [], [], [], done
        for key, sample, url in self._raw(pieces, role):
            if made >= q:
                return
            if skip:
                skip -= 1
                continue
            out = self._decode(key, sample, url)
            if out is None:
                continue
            imgs.append(out[0])
            labels.append(out[1])
            keys.append(key)
            if len(imgs) == B:
                yield self._collate(imgs, labels, keys)
                imgs, labels, keys, made = [], [], [], made + 1
        if imgs and made < q:
            yield self._collate(imgs, labels, keys)

    def _collate(self, imgs, labels, keys):
        # (B, 3, H, W) in channels-last memory: the transforms' (3, H, W) tensors are views of HWC
        # arrays, so stacking them as HWC is a plain copy (a strided one otherwise).
        images = torch.stack([im.permute(1, 2, 0) for im in imgs]).permute(0, 3, 1, 2)
        batch = (images, self.targets.collate(labels))
        if not self.training:
            batch += (torch.ones(len(labels), dtype=torch.bool),)
        return batch + (keys,) if self.cfg.return_keys else batch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is None and self.roles > 1:
            # In-process: interleave the roles exactly as the DataLoader's round robin would.
            its = [self._batches(r) for r in range(self.roles)]
            start = self.start_batch % self.roles
            order = [its[(start + i) % self.roles] for i in range(self.roles)]
            while order:
                for it in list(order):
                    try:
                        yield next(it)
                    except StopIteration:
                        order.remove(it)
            return
        yield from self._batches((worker + self.start_batch) % self.roles)


# ------------------------------------------------------------------------------------------ loaders

class ShardLoader:
    """Iterates one rank's batches for the current epoch and tracks its position for checkpoints.

    Training batches are (uint8 images, labels); evaluation batches (uint8 images, labels, valid), padded
    with all-invalid batches so every rank yields `len(loader)` batches.
    """

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world: int = 1, training: bool = True):
        self.cfg, self.training = cfg, training
        self.dataset = ShardStream(cfg, rank, world, training)
        self.epoch, self.batches_done = 0, 0
        self._loader: Optional[DataLoader] = None

    def __len__(self) -> int:
        self.dataset.set_epoch(self.epoch, 0)
        return self.dataset.batches_per_epoch()

    @property
    def num_samples(self) -> int:
        return sum(n or 0 for _, n in self.dataset.shards)

    def epoch_share(self) -> float:
        """The share of the split's samples the current epoch trains on, all ranks together (< 1: every rank
        yields the same whole number of batches)."""
        return self.dataset.epoch_plan(self.epoch).share

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self) -> dict:
        c = self.cfg
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world": self.dataset.world,
                "workers": self.dataset.roles, "batch_size": c.batch_size, "seed": c.seed, "source": c.source}

    def load_state_dict(self, state: dict) -> None:
        if state["batches_done"]:
            now = {"world": self.dataset.world, "workers": self.dataset.roles, "batch_size": self.cfg.batch_size,
                   "seed": self.cfg.seed}
            changed = {k: (state[k], v) for k, v in now.items() if state[k] != v}
            if changed:
                raise DataError(
                    f"cannot resume mid-epoch (epoch {state['epoch']}, batch {state['batches_done']}) with "
                    f"changed {changed} as (saved, now): the sample order depends on them. Resume with the "
                    "saved values, or from a checkpoint taken at an epoch boundary")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            w = self.cfg.workers
            # Its own generator: creating an iterator must not draw from the global torch RNG, or a resumed
            # run's dropout/drop-path streams would shift by one draw against an uninterrupted run.
            self._loader = DataLoader(self.dataset, batch_size=None, num_workers=w,
                                      multiprocessing_context=mp_context(self.cfg.start_method) if w else None,
                                      pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                                      persistent_workers=w > 0, prefetch_factor=2 if w else None,
                                      generator=torch.Generator().manual_seed(self.cfg.seed),
                                      worker_init_fn=ignore_signals_in_worker if w else None)
            if w:
                _OPEN.add(self)
        return self._loader

    def __iter__(self):
        total = len(self)
        self.dataset.set_epoch(self.epoch, self.batches_done if self.training else 0)
        with self.dataset.corrupt.get_lock():
            self.dataset.corrupt.value = 0
        n = 0
        try:
            for batch in _one_line_errors(self._dataloader(), self.dataset.rank):
                if self.training:
                    self.batches_done += 1
                n += 1
                yield batch
        except Exception:
            self.close()  # an error ends the epoch: stop the workers now (they ignore SIGTERM)
            raise
        if not self.training:
            while n < total:  # pad so every rank runs the same number of (possibly collective) steps
                yield self._padding_batch()
                n += 1
            return
        if self.batches_done != total:
            raise DataError(f"rank {self.dataset.rank}: epoch {self.epoch} gave {self.batches_done} batches, "
                            f"planned {total}")
        self.epoch, self.batches_done = self.epoch + 1, 0

    def _padding_batch(self):
        s = self.cfg.aug.img_size
        batch = (torch.zeros(1, 3, s, s, dtype=torch.uint8), self.cfg.targets.padding(s),
                 torch.zeros(1, dtype=torch.bool))
        return batch + ([""],) if self.cfg.return_keys else batch

    def close(self) -> None:
        """Stop the worker processes (gracefully, through the DataLoader's queues)."""
        it = getattr(self._loader, "_iterator", None) if self._loader is not None else None
        if it is not None:
            shutdown_loader_workers(it)
        self._loader = None

    @property
    def corrupt_samples(self) -> int:
        """Corrupt samples skipped on this rank in the current epoch."""
        return self.dataset.corrupt.value


# Loader workers ignore SIGTERM (Slurm signals every process; the trainer acts), so multiprocessing's
# exit-time terminate() cannot stop them and its join would wait forever. A loader still open at exit (a
# caller that never closed it) is closed first: this is registered after multiprocessing.util's exit
# function, and atexit runs the last registered first.
_OPEN: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()


def _one_line_errors(batches, rank: int):
    """A DataError met while reading, as one line naming the rank (and only this rank prints it): a worker's
    comes back from torch wrapped in its traceback text, whose last line is the error itself."""
    try:
        yield from batches
    except DataError as e:
        msg = str(e).rstrip()
        if msg != worker_error_line(msg):
            msg = worker_error_line(msg).split("DataError: ", 1)[-1]
        err = DataError(msg if msg.startswith(f"rank {rank}") else f"rank {rank}: {msg}")
        err.rank_local = True
        raise err from None


def build_loader(cfg: LoaderConfig, rank: int = 0, world: int = 1, training: bool = True) -> ShardLoader:
    return ShardLoader(cfg, rank, world, training)
