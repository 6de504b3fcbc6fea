"""Shard writer and streaming loader, on real JPEGs, real tar shards and real DataLoader workers."""
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import webdataset as wds
from PIL import Image

from pretrain.data.loader import DataError, LoaderConfig, build_loader
from pretrain.data.shards import WriteOptions, verify_shards, write_shards
from pretrain.data.synthetic import make_image_folder
from pretrain.data.transforms import AugConfig

from conftest import REPO, python
AUG = AugConfig(img_size=32, auto_augment=None)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("src") / "imgs"), num_classes=6, per_class=12,
                             size=(96, 72))


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "out")
    write_shards(WriteOptions(image_folder, out, val_per_class=2, samples_per_shard=7, workers=2), progress=False)
    return out


def loader_cfg(source, **kw):
    kw = {"batch_size": 4, "workers": 2, "shuffle_buffer": 8, "aug": AUG, "return_keys": True,
          "retries": 1, "retry_backoff_s": 0.01, **kw}
    return LoaderConfig(source, **kw)


def epoch_keys(loader):
    return [k for batch in loader for k in batch[-1]]


# --------------------------------------------------------------------------------------------- writer

def test_writer_folder_round_trip_and_timm_reads_it(shards, image_folder):
    info = json.loads(Path(shards, "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 60 and info["splits"]["validation"]["num_samples"] == 12
    assert info["splits"]["train"]["shard_lengths"] == [7] * 8 + [4]  # uneven last shard
    classes = Path(shards, "classes.txt").read_text().split()
    assert classes == sorted(os.listdir(image_folder))
    index = pq.read_table(Path(shards, "_index.parquet")).to_pylist()
    assert len(index) == 72 and len({r["key"] for r in index}) == 72
    assert len({r["source"] for r in index}) == 72  # every input exactly once
    for r in index:
        assert classes[r["label"]] == Path(r["source"]).parent.name
    val_per_class = Counter(r["label"] for r in index if r["shard"].startswith("validation"))
    assert set(val_per_class.values()) == {2}
    first_shard_labels = {r["label"] for r in index if r["shard"] == "train-000000.tar"}
    assert len(first_shard_labels) >= 3  # globally shuffled: shards mix classes
    assert verify_shards(shards) == {"checked_samples": 72, "bad_shards": []}
    ds = timm.data.create_dataset("wds/synthetic", root=shards, split="train", is_training=False)
    assert len(ds) == 60
    by_size = Counter(label for _, label in ds)
    assert sum(by_size.values()) == 60 and set(by_size) == set(range(6))


def test_writer_reads_class_tars_and_parquet(image_folder, tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    rows = []
    for cls in sorted(os.listdir(image_folder)):
        with tarfile.open(tars / f"{cls}.tar", "w") as tf:
            for f in sorted(os.listdir(Path(image_folder, cls))):
                tf.add(Path(image_folder, cls, f), arcname=f"{cls}/{f}")
                rows.append({"image": {"bytes": Path(image_folder, cls, f).read_bytes(), "path": f},
                             "label": int(cls[-2:])})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    for src, name in ((str(tars), "t"), (str(tmp_path / "data.parquet"), "p")):
        out = str(tmp_path / name)
        summary = write_shards(WriteOptions(src, out, samples_per_shard=20), progress=False)
        assert summary["samples"] == {"train": 72} and summary["classes"] == 6
        index = pq.read_table(Path(out, "_index.parquet")).to_pylist()
        classes = Path(out, "classes.txt").read_text().split()
        assert Counter(classes[r["label"]] for r in index) == Counter(
            {c: 12 for c in (sorted(os.listdir(image_folder)) if name == "t" else map(str, range(6)))})
        assert verify_shards(out)["bad_shards"] == []


def test_writer_converts_or_skips_bad_images(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "good.jpg", quality=90)
    Image.new("CMYK", (40, 30)).save(src / "cmyk.jpg")
    Image.new("L", (40, 30), 128).save(src / "gray.jpg")
    Image.new("RGB", (40, 30)).save(src / "png_in_disguise.jpg", format="PNG")
    (src / "not_an_image.jpg").write_text("hello")
    jpg = io.BytesIO()
    Image.new("RGB", (400, 300), (1, 2, 3)).save(jpg, "JPEG")
    (src / "truncated.jpg").write_bytes(jpg.getvalue()[:300])
    Image.new("RGB", (800, 400)).save(src / "big.jpg")
    out = str(tmp_path / "out")
    summary = write_shards(WriteOptions(str(tmp_path / "src"), out, max_side=200), progress=False)
    assert summary["samples"] == {"train": 5} and summary["skipped_inputs"] == 2
    errors = json.loads(Path(out, "_errors.json").read_text())
    reasons = {Path(e["source"]).name: e["reason"] for e in errors}
    assert "undecodable" in reasons["not_an_image.jpg"] and "undecodable" in reasons["truncated.jpg"]
    assert "CMYK->RGB" in reasons["cmyk.jpg"] and "L->RGB" in reasons["gray.jpg"]
    assert "PNG->JPEG" in reasons["png_in_disguise.jpg"] and "400x200" in reasons["big.jpg"]
    index = {Path(r["source"]).name: r for r in pq.read_table(Path(out, "_index.parquet")).to_pylist()}
    assert (index["big.jpg"]["width"], index["big.jpg"]["height"]) == (400, 200)
    assert verify_shards(out)["bad_shards"] == []


def test_rerun_skips_finished_shards_and_refuses_another_plan(image_folder, tmp_path):
    out = tmp_path / "out"
    opts = WriteOptions(image_folder, str(out), samples_per_shard=10)
    write_shards(opts, progress=False)
    keep = (out / "train-000000.tar").stat().st_mtime_ns
    (out / "train-000003.tar").unlink()
    (out / "_parts" / "train-000003.tar.parquet").unlink()  # as if killed before it finished
    summary = write_shards(opts, progress=False)
    assert summary["skipped_shards"] == 7 and summary["written_images"] == 10
    assert (out / "train-000000.tar").stat().st_mtime_ns == keep
    assert verify_shards(str(out))["bad_shards"] == []
    with pytest.raises(DataError, match="another plan"):
        write_shards(WriteOptions(image_folder, str(out), samples_per_shard=11), progress=False)


def test_cli_write_to_fsspec_url_and_verify_reports_bad_shards(image_folder, tmp_path):
    run = lambda *a: python("launch/make_shards.py", *a)  # noqa: E731
    out = str(tmp_path / "cli")
    r = run("write", image_folder, "file://" + out, "--samples-per-shard", "30", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == {"train": 72}
    data = Path(out, "train-000001.tar").read_bytes()
    Path(out, "train-000001.tar").write_bytes(data[: len(data) // 2])
    r = run("verify", out)
    assert r.returncode == 1
    bad = json.loads(r.stdout)["bad_shards"]
    assert [b["shard"] for b in bad] == ["train-000001.tar"]


# --------------------------------------------------------------------------------------------- loader

def test_equal_batches_on_every_rank_and_no_sample_twice(shards):
    cfg = loader_cfg(f"{shards}/_info.json")
    loaders = [build_loader(cfg, rank, 2) for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    keys = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld)
        assert all(b[0].shape == (4, 3, 32, 32) and b[0].dtype == torch.uint8 for b in batches)
        keys += [k for b in batches for k in b[-1]]
    assert len(keys) == len(set(keys))  # nothing read twice
    assert len(keys) >= 60 - 2 * 2 * 4 * 2  # at most ~2 partial batches dropped per worker slot


def test_order_is_a_function_of_seed_and_epoch(shards):
    cfg = loader_cfg(f"{shards}/_info.json")
    a, b = build_loader(cfg, 0, 2), build_loader(cfg, 0, 2)
    first = [torch.cat([x[0].flatten() for x in a])]
    assert torch.equal(first[0], torch.cat([x[0].flatten() for x in b]))
    assert epoch_keys(a) != epoch_keys(build_loader(cfg, 0, 2))  # epoch 1 differs from epoch 0
    seed0 = epoch_keys(build_loader(cfg, 0, 2))
    other = loader_cfg(f"{shards}/_info.json", seed=1)
    seed1 = epoch_keys(build_loader(other, 0, 2))
    assert seed1 == epoch_keys(build_loader(other, 0, 2)) and seed1 != seed0  # another seed: another order


def test_mid_epoch_resume_gives_identical_batches(shards):
    cfg = loader_cfg(f"{shards}/_info.json", batch_size=2)
    full = list(build_loader(cfg, 1, 2))
    ld = build_loader(cfg, 1, 2)
    it = iter(ld)
    for _ in range(3):
        next(it)
    state = ld.state_dict()
    assert state["batches_done"] == 3
    resumed = build_loader(cfg, 1, 2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for got, want in zip(rest, full[3:]):
        assert got[-1] == want[-1] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = build_loader(loader_cfg(f"{shards}/_info.json", batch_size=2, workers=1), 1, 2)
    with pytest.raises(DataError, match="cannot resume mid-epoch"):
        other.load_state_dict(state)


def test_validation_reads_every_sample_exactly_once(shards):
    cfg = loader_cfg(f"{shards}/_info.json", split="validation", batch_size=5)
    loaders = [build_loader(cfg, r, 3, training=False) for r in range(3)]  # 2 shards, 3 ranks
    counts = [len(list(ld)) for ld in loaders]
    assert len(set(counts)) == 1
    keys = [k for ld in loaders for b in ld for k, v in zip(b[-1], b[2]) if v]
    assert sorted(keys) == sorted(r["key"] for r in pq.read_table(Path(shards, "_index.parquet")).to_pylist()
                                  if r["shard"].startswith("validation"))


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def jpeg(color=(9, 99, 199)):
    b = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(b, "JPEG")
    return b.getvalue()


def make_shards(root, n_shards=4, per=6, corrupt=()):
    filenames, lengths = [], []
    for s in range(n_shards):
        name = f"s-{s}.tar"
        write_tar(root / name, [{"__key__": f"k{s}_{i}", "jpg": b"garbage" if (s, i) in corrupt else jpeg(),
                                 "cls": str(i % 3).encode()} for i in range(per)])
        filenames.append(name)
        lengths.append(per)
    info = {"splits": {"train": {"name": "train", "filenames": filenames, "shard_lengths": lengths,
                                 "num_samples": sum(lengths)}}}
    (root / "_info.json").write_text(json.dumps(info))
    return str(root / "_info.json")


def test_corrupt_sample_skipped_counted_and_capped(tmp_path):
    info = make_shards(tmp_path, corrupt={(2, 1)})
    cfg = loader_cfg(info, batch_size=2, workers=0)
    ld = build_loader(cfg, 0, 2)
    assert len(list(ld)) == len(ld)  # the short role cycles: batch count unchanged
    other = build_loader(cfg, 1, 2)
    list(other)
    # Rank 0 needs all 12 of its samples; one is corrupt, so it re-reads its shards and meets it again.
    assert (ld.corrupt_samples, other.corrupt_samples) == (2, 0)
    strict = loader_cfg(info, batch_size=2, workers=0, max_corrupt=0)
    with pytest.raises(DataError, match=r"s-2\.tar"):
        for r in range(2):
            list(build_loader(strict, r, 2))


@pytest.mark.parametrize("cut", ["mid_member", "boundary"])
def test_truncated_shard(tmp_path, cut):
    info = make_shards(tmp_path)
    data = (tmp_path / "s-1.tar").read_bytes()
    # member boundary: drop the last sample's members (and the end-of-archive blocks) cleanly
    size = len(data) // 2 if cut == "mid_member" else _offset_of_member(tmp_path / "s-1.tar", "k1_4.cls")
    (tmp_path / "s-1.tar").write_bytes(data[:size])
    fatal = loader_cfg(info, batch_size=2, workers=0)
    run = lambda cfg: [list(build_loader(cfg, r, 2)) for r in range(2)]
    if cut == "mid_member":
        with pytest.raises(DataError, match=r"s-1\.tar: unreadable"):
            run(fatal)
    out = run(loader_cfg(info, batch_size=2, workers=0, on_bad_shard="skip"))
    assert len(out[0]) == len(out[1]) == build_loader(fatal, 0, 2).__len__()


def _offset_of_member(path, name):
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.name == name:
                return m.offset
    raise AssertionError(name)


def test_missing_shard_retried_then_named(tmp_path):
    info = make_shards(tmp_path)
    loaders = [build_loader(loader_cfg(info, workers=0, batch_size=2), r, 2) for r in range(2)]
    (tmp_path / "s-3.tar").unlink()  # gone after startup: retried, then named
    with pytest.raises(DataError, match=r"s-3\.tar: unreadable"):
        for ld in loaders:
            list(ld)


def test_missing_local_shards_are_refused_at_startup(tmp_path):
    info = make_shards(tmp_path)
    (tmp_path / "s-3.tar").unlink()
    with pytest.raises(DataError, match=r"split 'train' lists 1 local shard\(s\) that do not exist: .*s-3\.tar"):
        build_loader(loader_cfg(info, workers=0, batch_size=2), 0, 2)


def test_pipe_urls_need_the_config_flag(tmp_path):
    make_shards(tmp_path, n_shards=1)
    url = f"pipe:cat {tmp_path}/s-0.tar"
    cfg = loader_cfg(url, workers=0, batch_size=2)
    with pytest.raises(DataError, match="allow_pipe"):
        list(build_loader(cfg, 0, 1, training=False))
    cfg.allow_pipe = True
    assert sum(int(b[2].sum()) for b in build_loader(cfg, 0, 1, training=False)) == 6


def test_evaluation_resizes_with_aug_interpolation():
    """aug.interpolation acts in evaluation too (the official build_transform), 'random' evaluates bicubic;
    the reference is torchvision's Resize + CenterCrop with that mode."""
    import numpy as np
    from torchvision import transforms as T

    from pretrain.data.transforms import eval_transform
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = {}
    for name in ("bilinear", "bicubic", "random"):
        out[name] = eval_transform(AugConfig(img_size=32, interpolation=name))(img)
        mode = T.InterpolationMode.BICUBIC if name == "random" else T.InterpolationMode(name)
        want = T.Compose([T.Resize(36, interpolation=mode), T.CenterCrop(32), T.PILToTensor()])(img)
        assert torch.equal(out[name], want), name  # exact: the same resize, uint8 out
    assert not torch.equal(out["bilinear"], out["bicubic"]) and torch.equal(out["random"], out["bicubic"])


def test_training_transform_output_and_batch_augment():
    from pretrain.data.transforms import BatchAugment, train_transform
    x = train_transform(AugConfig(img_size=32))(jpeg())
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    aug = BatchAugment(AugConfig(img_size=32), num_classes=3, device="cpu")
    xb, yb = aug(torch.stack([x, x]), torch.tensor([0, 2]), step_seed=5)
    assert xb.dtype == torch.float32 and yb.shape == (2, 3)
    torch.testing.assert_close(yb.sum(1), torch.ones(2))  # soft targets: smoothing + mixing keep mass 1
    xb2, yb2 = aug(torch.stack([x, x]), torch.tensor([0, 2]), step_seed=5)
    assert torch.equal(xb, xb2) and torch.equal(yb, yb2)  # seeded per step


def test_randaugment_inc1_survives_zero_bit_posterize():
    from timm.data.auto_augment import rand_augment_transform
    import pretrain.data.transforms  # noqa: F401  (applies the Pillow >= 13 fix)
    ra = rand_augment_transform("rand-m10-n1-inc1", {})
    ra.ops = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    ra.ops[0].prob = 1.0
    out = ra(Image.new("RGB", (8, 8), (200, 100, 50)))  # magnitude 10 -> keep 0 bits
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_tar_reader_matches_tarfile_with_long_pax_names():
    from pretrain.data.loader import iter_samples
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for i in range(3):
            w.write({"__key__": f"deep/dir/{'x' * 120}_{i}", "jpg": bytes([i]) * (700 + i), "cls": b"1"})
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        ref = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    got = [(f"{k}.{ext}", v) for k, d in iter_samples(io.BytesIO(raw)) for ext, v in d.items()]
    assert sorted(got) == sorted(ref) and len(got) == 6
    with pytest.raises(tarfile.ReadError):
        list(iter_samples(io.BytesIO(raw[:1500])))


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.slow),
                                    pytest.param("forkserver", marks=pytest.mark.slow)])
def test_writer_pool_and_loader_workers_under_each_start_method(shards, image_folder, tmp_path, method):
    out = str(tmp_path / "out")
    write_shards(WriteOptions(image_folder, out, val_per_class=2, samples_per_shard=7, workers=2,
                              start_method=method), progress=False)
    index = lambda d: pq.read_table(f"{d}/_index.parquet").to_pylist()  # noqa: E731
    assert index(out) == index(shards)  # the same shards as the fixture's (fork) pool wrote

    def keys(source: str, start_method: str) -> list[str]:
        cfg = LoaderConfig(f"{source}/_info.json", batch_size=4, workers=2, aug=AUG, return_keys=True,
                           start_method=start_method)
        loader = build_loader(cfg, rank=0, world=1)
        try:
            return [k for batch in loader for k in batch[-1]]
        finally:
            loader.close()
    got = keys(out, method)
    assert got == keys(shards, "fork") and len(got) == 60  # 6 classes x 10 training images


# ------------------------------------------------------------------- the public timm/imagenet-22k-wds layout

def write_timm_22k_layout(root: Path, per_shard: int = 10) -> dict:
    """Shards as the public `timm/imagenet-22k-wds` set is laid out, written with webdataset's own ShardWriter:
    `imagenet22k-{train,validation}-NNNN.tar`, samples `jpg` (one `png`, one `webp`, which timm's reader also
    takes) + `cls` + `json` {label, label_12k (-1 outside the 12k classes), class_name, width, height}, and the
    manifest its builder writes (rwightman/imagenet-12k wds/build_wds.py, process_dataset): `info.json` only,
    splits train/validation with alt_label null and train_12k/validation_12k with alt_label "label_12k" over
    the same files, their shard_lengths counting only the samples whose label_12k >= 0.
    Returns {split: [(key, label)]} as timm's reader labels them."""
    twelve = {0: 0, 2: 1, 3: 2, 5: 3}  # 22k class -> 12k class; classes 1 and 4 are outside the 12k subset
    info = {"name": "imagenet22k", "splits": {}}
    expected: dict = {}
    for split, n_shards in (("train", 4), ("validation", 2)):
        records = []
        with wds.ShardWriter(str(root / f"imagenet22k-{split}-%04d.tar"), maxcount=per_shard, verbose=0) as w:
            for i in range(n_shards * per_shard):
                label = i % 6
                key = f"n{label:08d}_{split}{i}"
                fmt = {3: "png", 7: "webp"}.get(i, "jpg")
                img = io.BytesIO()
                Image.new("RGB", (40, 32), (label * 40, 90, 9)).save(img, {"jpg": "JPEG"}.get(fmt, fmt.upper()))
                meta = {"label": label, "label_12k": twelve.get(label, -1), "class_name": f"n{label:08d}",
                        "width": 40, "height": 32}
                w.write({"__key__": key, fmt: img.getvalue(), "cls": label, "json": meta})
                records.append((i // per_shard, key, meta))
        names = [f"imagenet22k-{split}-{s:04d}.tar" for s in range(n_shards)]
        for alt in (None, "label_12k"):
            lengths = [sum(1 for s, _, m in records if s == shard and (alt is None or m[alt] >= 0))
                       for shard in range(n_shards)]
            name = split if alt is None else f"{split}_12k"
            info["splits"][name] = {"name": name, "filenames": names, "shard_lengths": lengths, "alt_label": alt,
                                    "num_samples": sum(lengths)}
            expected[name] = sorted((k, m[alt or "label"]) for _, k, m in records if alt is None or m[alt] >= 0)
    (root / "info.json").write_text(json.dumps(info, indent=4))
    return expected


def test_public_22k_layout_every_split_as_timm_reads_it(tmp_path):
    expected = write_timm_22k_layout(tmp_path)
    assert {s: len(v) for s, v in expected.items()} == {"train": 40, "train_12k": 27, "validation": 20,
                                                        "validation_12k": 13}
    for split, want in expected.items():
        # The dataset root, no manifest name: the loader finds info.json as timm does (no _info.json here).
        loader = build_loader(loader_cfg(str(tmp_path), split=split, batch_size=3), 0, 1, training=False)
        got = sorted((k, int(y)) for x, ys, valid, keys in loader for k, y, v in zip(keys, ys, valid) if v)
        assert got == want and loader.num_samples == len(want), split
        ds = timm.data.create_dataset("wds/imagenet22k", root=str(tmp_path), split=split, is_training=False)
        assert Counter(int(t) for _, t in ds) == Counter(y for _, y in want), split  # timm's own reader agrees
    assert verify_shards(str(tmp_path)) == {"checked_samples": 100, "bad_shards": []}


def test_12k_split_trains_with_12k_labels_equal_batches_and_no_excluded_sample(tmp_path):
    want = dict(write_timm_22k_layout(tmp_path)["train_12k"])
    cfg = loader_cfg(str(tmp_path), split="train_12k", batch_size=2, workers=2)
    loaders = [build_loader(cfg, r, 2) for r in range(2)]
    # 12k samples per shard 7, 6, 7, 7: ranks get 14 and 13, so 6 batches of 2 each (24 of the 27 samples).
    assert len(loaders[0]) == len(loaders[1]) == 6
    seen = [(k, int(y)) for ld in loaders for x, ys, keys in ld for k, y in zip(keys, ys)]
    assert len(seen) == len(dict(seen)) == 24  # nothing read twice
    assert all(want[k] == y for k, y in seen)  # the label_12k labels; nothing outside the 12k classes
    # A split given as a brace pattern with its count (timm's form), beside the root: counts spread evenly.
    brace = build_loader(loader_cfg(str(tmp_path), split="imagenet22k-train-{0000..0003}.tar|40", batch_size=5), 0, 2)
    assert len(brace) == 4 and sum(len(b[-1]) for b in brace) == 20


def test_alt_label_missing_from_a_samples_json_names_the_shard_and_key(tmp_path):
    write_timm_22k_layout(tmp_path)
    with wds.TarWriter(str(tmp_path / "imagenet22k-validation-0001.tar")) as w:
        for i in range(10):
            meta = {"label": 0} if i == 4 else {"label": 0, "label_12k": 0}
            w.write({"__key__": f"v{i}", "jpg": jpeg(), "cls": 0, "json": meta})
    with pytest.raises(DataError, match=r"imagenet22k-validation-0001\.tar: sample v4 has no 'label_12k'"):
        list(build_loader(loader_cfg(str(tmp_path), split="validation_12k", workers=0), 0, 1, training=False))
    with pytest.raises(DataError, match=r"no split 'train_21k'; it has \['train', 'train_12k'"):
        build_loader(loader_cfg(str(tmp_path), split="train_21k"), 0, 1)
    with pytest.raises(DataError, match=r"no _info.json or info.json there"):
        build_loader(loader_cfg(str(tmp_path / "nowhere")), 0, 1)


LEFT_OPEN = """
import sys
from pretrain.data.loader import LoaderConfig, ShardLoader
from pretrain.data.transforms import AugConfig
loader = ShardLoader(LoaderConfig(sys.argv[1], batch_size=2, workers=2, aug=AugConfig(img_size=32, auto_augment=None)))
next(iter(loader))
print("left open", flush=True)
"""


@pytest.mark.slow
def test_a_loader_left_open_does_not_hang_the_exit(shards):
    """Workers ignore SIGTERM (Slurm's signal is the trainer's), so multiprocessing's exit-time terminate()
    can't stop them: a loader its caller never closed (an error path, a test) once hung the interpreter's
    exit, and with it the suite's. The exit must come (within the 60 s timeout; it takes ~1 s)."""
    r = subprocess.run([sys.executable, "-c", LEFT_OPEN, shards], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "left open" in r.stdout, r.stderr[-2000:]
