"""Images/s per CPU core: our shard loader vs torchvision ImageFolder, same timm training transform.

Both read the same JPEGs in one process on one thread (per-core figure), alternating, twice each:
- baseline: `torchvision.datasets.ImageFolder` + `timm.data.create_transform(224, is_training=True,
  auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, interpolation='bicubic')` (decode, augment, float
  tensor, normalize, random erasing on the CPU), the usual PyTorch recipe;
- ours: `ShardStream` over the shards of the same images: tar streaming, decoding of the random crop's
  region only at a reduced DCT scale where it allows (libjpeg-turbo, `aug.jpeg_roi`), torch's uint8
  resize, the same timm flip and RandAugment, uint8 tensors out (normalization and random erasing run on
  the GPU in training); and the same with `jpeg_roi: off` (Pillow decodes whole images).
Also the shard writer's images/s.

    python benchmarks/data_throughput.py [--images 400] [--sizes 500x375 1280x960]
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
from PIL import Image, ImageFilter

from pretrain.data.loader import LoaderConfig, ShardStream
from pretrain.data.shards import WriteOptions, write_shards
from pretrain.data.synthetic import draw_image
from pretrain.data.transforms import AugConfig


def make_photos(root: str, n: int, size: tuple[int, int], classes: int = 10) -> None:
    """Photo-like JPEGs (shapes + texture noise, q90) so file sizes resemble ImageNet's."""
    rng = random.Random(0)
    noise = Image.effect_noise(size, 40).convert("RGB")
    for i in range(n):
        c = i % classes
        os.makedirs(f"{root}/c{c}", exist_ok=True)
        img = Image.blend(draw_image(c, classes, rng, size), noise, 0.25).filter(ImageFilter.SMOOTH)
        img.save(f"{root}/c{c}/{i:05d}.jpg", quality=90)


def bench_baseline(root: str, limit: int) -> float:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    tf = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                          interpolation="bicubic")
    ds = ImageFolder(root, transform=tf)
    t0 = time.perf_counter()
    for i in range(min(limit, len(ds))):
        ds[i]
    return min(limit, len(ds)) / (time.perf_counter() - t0)


def bench_ours(info: str, limit: int, roi: str = "on", aug: AugConfig | None = None, **loader) -> float:
    """Our ShardStream's training images/s in this process; `aug`/`loader`: other LoaderConfig settings."""
    cfg = LoaderConfig(info, batch_size=32, workers=0, shuffle_buffer=256,
                       aug=aug or AugConfig(img_size=224, jpeg_roi=roi), **loader)
    stream = ShardStream(cfg, 0, 1, training=True)
    n, t0 = 0, time.perf_counter()
    for x, _ in stream:
        n += x.shape[0]
        if n >= limit:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--sizes", nargs="+", default=["500x375", "1280x960"])
    p.add_argument("--work", default=None, help="folder for the generated data (default: a temp dir)")
    a = p.parse_args()
    torch.set_num_threads(1)
    work = a.work or tempfile.mkdtemp(prefix="data_bench_")
    print(f"# one process, 1 thread; {a.images} images per size; work dir {work}")
    print("| size | writer img/s | ImageFolder+timm img/s | ours img/s | ours / baseline "
          "| ours, jpeg_roi off img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for spec in a.sizes:
        w, h = map(int, spec.split("x"))
        src, out = f"{work}/{spec}/src", f"{work}/{spec}/shards"
        if not os.path.isdir(src):
            make_photos(src, a.images, (w, h))
        t0 = time.perf_counter()
        s = write_shards(WriteOptions(src, out, samples_per_shard=100), progress=False)
        writer = s["written_images"] / (time.perf_counter() - t0) if s["written_images"] else float("nan")
        base, ours, whole = [], [], []
        n = a.images - a.images % 32
        for _ in range(2):
            base.append(bench_baseline(src, a.images))
            ours.append(bench_ours(f"{out}/_info.json", n))
            whole.append(bench_ours(f"{out}/_info.json", n, roi="off"))
        b, o, f = max(base), max(ours), max(whole)
        print(f"| {spec} | {writer:.0f} | {b:.0f} | {o:.0f} | {o / b:.2f}x | {f:.0f} | {f / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
