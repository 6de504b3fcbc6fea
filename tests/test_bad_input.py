"""Nothing lost, nothing silent: bad input as a hostile user would give it gets a clear error naming the
file, key or shape, or is skipped and listed; never a silent wrong result."""
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pretrain.weights import CheckpointError, CheckpointMismatchError, export, load_pretrained, read_checkpoint
from pretrain.data.loader import DataError, LoaderConfig, build_loader
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import make_image_folder
from pretrain.data.transforms import AugConfig
from pretrain.models import build_model

from conftest import python

AUG = AugConfig(img_size=32, auto_augment=None)
TINY = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=64, window_size=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("bad") / "imgs"), num_classes=4, per_class=10,
                             size=(48, 40))


def copy_shards(images: str, out: Path) -> Path:
    write_shards(WriteOptions(images, str(out), val_per_class=2, samples_per_shard=8), progress=False)
    return out


# ------------------------------------------------------------------------------------------ manifest

def test_inflated_manifest_counts_are_refused_at_startup(images, tmp_path):
    out = copy_shards(images, tmp_path / "s")
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [n * 10 for n in info["splits"]["train"]["shard_lengths"]]
    info["splits"]["train"]["num_samples"] *= 10
    (out / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"shard counts disagree with .*_index.parquet .*train-000000.tar: 80 \(index: 8\)"):
        build_loader(LoaderConfig(str(out / "_info.json"), batch_size=4, workers=0, aug=AUG))
    (out / "_index.parquet").unlink()  # foreign shards without an index: the sizes still give it away
    with pytest.raises(DataError, match=r"train-000000.tar: \d+ bytes cannot hold the 80 samples"):
        build_loader(LoaderConfig(str(out / "_info.json"), batch_size=4, workers=0, aug=AUG))


@pytest.mark.slow
def test_invalid_manifest_json_is_one_line_exit_2_in_training_and_verify(images, tmp_path):
    out = copy_shards(images, tmp_path / "s")
    (out / "_info.json").write_text('{"splits": {"train": ')
    with pytest.raises(DataError, match=r"_info.json: not valid JSON"):
        build_loader(LoaderConfig(str(out / "_info.json"), batch_size=4, workers=0, aug=AUG))
    r = python("-m", "pretrain.cli.make_shards", "verify", str(out))
    assert r.returncode == 2 and "_info.json: not valid JSON" in r.stderr and "Traceback" not in r.stderr


def test_short_validation_shard_is_refused_or_reported_with_the_true_count(images, tmp_path):
    out = copy_shards(images, tmp_path / "s")
    val = json.loads((out / "_info.json").read_text())["splits"]["validation"]
    assert val["num_samples"] == 8
    whole = (out / val["filenames"][0]).read_bytes()
    (out / val["filenames"][0]).write_bytes(b"")  # an empty validation shard: refused at startup
    with pytest.raises(DataError, match=r"validation-000000.tar: 0 bytes cannot hold the 8 samples"):
        build_loader(LoaderConfig(str(out / "_info.json"), split="validation", batch_size=4, workers=0, aug=AUG),
                     training=False)
    (out / val["filenames"][0]).write_bytes(whole)
    loader = build_loader(LoaderConfig(str(out / "_info.json"), split="validation", batch_size=4, workers=0,
                                       aug=AUG), training=False)
    (out / val["filenames"][0]).write_bytes(b"")  # emptied after startup: read as 0 samples
    seen = sum(int(v.sum()) for _, _, v in loader)
    assert seen == 0 and loader.num_samples == 8  # what the loop compares: it warns and records val_expected


# ---------------------------------------------------------------------------------------- the writer

def test_empty_class_folder_keeps_the_indices_and_is_reported(images, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(images, src)
    (src / "class_01").rename(src / "class_01_was")
    (src / "class_00b").mkdir()  # sorts between class_00 and class_01_was: an empty class
    summary = write_shards(WriteOptions(str(src), str(tmp_path / "out"), samples_per_shard=8), progress=False)
    classes = (tmp_path / "out" / "classes.txt").read_text().split()
    assert classes == ["class_00", "class_00b", "class_01_was", "class_02", "class_03"]
    assert summary["empty_classes"] == ["class_00b"] and summary["classes"] == 5
    errors = json.loads((tmp_path / "out" / "_errors.json").read_text())
    assert any(e["class"] == "class_00b" and "empty class" in e["reason"] for e in errors)
    labels = {r["class_name"]: r["label"] for r in pq.read_table(tmp_path / "out" / "_index.parquet").to_pylist()}
    assert labels["class_02"] == 3  # after the empty class, not shifted into its place


def test_dangling_and_looping_symlinks_are_skipped_and_listed(images, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(images, src)
    os.symlink(src / "nowhere.jpg", src / "class_00" / "dangling.jpg")
    os.symlink(src / "class_01" / "loop.jpg", src / "class_01" / "loop.jpg")
    summary = write_shards(WriteOptions(str(src), str(tmp_path / "out"), samples_per_shard=8), progress=False)
    assert summary["samples"] == {"train": 40} and summary["skipped_inputs"] == 2
    reasons = {Path(e["source"]).name: e["reason"] for e in json.loads((tmp_path / "out" / "_errors.json").read_text())}
    assert "dangling.jpg" in reasons and "loop.jpg" in reasons and "unreadable" in reasons["loop.jpg"]


def test_rerun_rewrites_a_truncated_shard_whose_part_survived(images, tmp_path):
    out = copy_shards(images, tmp_path / "s")
    whole = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").write_bytes(whole[:len(whole) // 2])
    summary = write_shards(WriteOptions(images, str(out), val_per_class=2, samples_per_shard=8), progress=False)
    assert summary["written_images"] == 8 and (out / "train-000001.tar").read_bytes() == whole


def test_same_input_and_options_give_the_same_bytes(images, tmp_path):
    a = copy_shards(images, tmp_path / "a")
    b = copy_shards(images, tmp_path / "elsewhere" / "b")
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    assert names == sorted(p.name for p in b.iterdir() if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------------------------------- checkpoints

def test_damaged_bias_table_is_an_error_naming_the_key_not_a_resize(tmp_path):
    sd = build_model("swin_tiny", **TINY).state_dict()
    bad = dict(sd)
    bad["layers.0.blocks.1.attn.relative_position_bias_table"] = torch.zeros(121, 2)
    for model in (build_model("swin_tiny", **TINY), build_model("swin_tiny", **{**TINY, "img_size": 96, "window_size": 6})):
        with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.blocks\.1\.attn\.relative_position_bias_table "
                                                          r"\(121, 2\) \(window 6\)"):
            load_pretrained(model, bad)
    path = export(build_model("swin_tiny", **TINY), str(tmp_path / "t.pth"), layout="official")
    raw = torch.load(path, weights_only=True)
    raw["model"]["layers.0.blocks.1.attn.relative_position_bias_table"] = torch.zeros(121, 2)
    torch.save(raw, path)
    r = python("-m", "pretrain.cli.convert", path, str(tmp_path / "o.safetensors"), "--layout", "timm")
    assert r.returncode == 2 and "layers.0.blocks.1.attn.relative_position_bias_table (121, 2)" in r.stderr
    assert r.stderr.count("relative_position_bias_table") == 1, r.stderr  # the one bad tensor, not 20 good ones


def test_foreign_free_text_config_metadata_never_breaks_loading(tmp_path):
    model = build_model("swin_tiny", **TINY)
    path = export(model, str(tmp_path / "o.pth"), layout="official")
    raw = torch.load(path, weights_only=True)
    raw["config"] = "MODEL:\n  TYPE: swin\n  NAME: swin_tiny  # yaml, as the official training code saves it"
    torch.save(raw, path)
    assert load_pretrained(build_model("swin_tiny", **TINY), path).layout == "official"


def test_random_or_truncated_bytes_are_not_sent_to_allow_pickle(tmp_path):
    good = export(build_model("swin_tiny", **TINY), str(tmp_path / "g.pth"), layout="official")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    (tmp_path / "cut.pth").write_bytes(Path(good).read_bytes()[:5000])
    for name in ("random.pth", "cut.pth"):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(str(tmp_path / name))
        assert "not a readable checkpoint" in str(e.value) and "allow" not in str(e.value).lower(), str(e.value)


def test_http_checkpoints_load(tmp_path):
    model = build_model("swin_tiny", **TINY)
    export(model, str(tmp_path / "m.safetensors"), layout="timm")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fresh = build_model("swin_tiny", **TINY)
        load_pretrained(fresh, f"http://127.0.0.1:{server.server_address[1]}/m.safetensors")
    finally:
        server.shutdown()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


# ------------------------------------------------------------------------------- the entry points

@pytest.mark.dist
@pytest.mark.launcher
def test_entry_points_turn_data_and_checkpoint_errors_into_one_line(images, tmp_path):
    from conftest import base_config, launch
    out = copy_shards(images, tmp_path / "s")
    (out / "_info.json").write_text("{not json")
    r = launch(base_config(str(out / "_info.json"), tmp_path / "run"), launcher="deepspeed")  # the documented command
    assert r.returncode == 2 and "_info.json: not valid JSON" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    r = python("finetune/run.py", "--res", "64", "--pretrained", str(tmp_path / "random.pth"),
               "--data", str(copy_shards(images, tmp_path / "s2")), "--output", str(tmp_path / "ft"),
               "--set", "data.workers=0", timeout=300)
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_evaluation_that_reads_fewer_images_than_listed_says_so_with_the_true_count(images, tmp_path):
    import io
    import tarfile
    out = copy_shards(images, tmp_path / "s")
    val = json.loads((out / "_info.json").read_text())["splits"]["validation"]["filenames"][0]
    src, dst = tarfile.open(out / val), io.BytesIO()
    with tarfile.open(fileobj=dst, mode="w") as tar:  # same members and sizes, the images' bytes garbage
        for m in src.getmembers():
            data = src.extractfile(m).read()
            tar.addfile(m, io.BytesIO(os.urandom(len(data)) if m.name.endswith(".jpg") else data))
    (out / val).write_bytes(dst.getvalue())
    ckpt = export(build_model("swin_tiny", **{**TINY, "num_classes": 10}), str(tmp_path / "w.safetensors"))
    r = python("finetune/run.py", "--config", "configs/finetune/swin_tiny_cpu.json", "--eval-only", "--res", "64",
               "--window", "4", "--pretrained", ckpt, "--data", str(out), "--set", "data.workers=0",
               "model.num_classes=10", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "WARNING: evaluated 0 of the 8 validation images the manifest lists" in r.stdout, r.stdout[-2000:]
    assert "'samples': 0" in r.stdout and "'expected': 8" in r.stdout  # the true count, beside the listed one
