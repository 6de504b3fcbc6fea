"""Pack images (labelled, or not: --no-labels) into WebDataset shards, or verify written shards.

    python -m pretrain.cli.make_shards write SRC OUT [--val-per-class N] [--samples-per-shard N]
                                       [--max-shard-bytes B] [--max-side N] [--workers N] [--seed S]
    python -m pretrain.cli.make_shards verify OUT
    (also `swin-make-shards ...` and `python launch/make_shards.py ...`)

SRC: a folder of class folders (fall11_whole/<wnid>/*.JPEG), a folder of <wnid>.tar archives, or parquet
file(s) with image bytes and a label column; with --no-labels, a folder of images at any depth. OUT: a local path or fsspec URL (s3://, gs://, ...).
"""
import json
import sys

from .. import cli


def main(argv=None) -> int:
    p = cli.parser("python -m pretrain.cli.make_shards", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write shards + manifest (resumable)")
    w.add_argument("src")
    w.add_argument("out")
    w.add_argument("--val-per-class", type=int, default=0, help="held-out validation images per class")
    w.add_argument("--samples-per-shard", type=int, default=1000)
    w.add_argument("--max-shard-bytes", type=int, default=0, help="also cut shards at this many source bytes")
    w.add_argument("--max-side", type=int, default=0, help="cap the shorter side (re-encodes JPEG q90)")
    w.add_argument("--quality", type=int, default=90)
    w.add_argument("--workers", type=int, default=1)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--image-column", help="parquet: image bytes column (default: image/jpg/img/bytes)")
    w.add_argument("--label-column", default="label", help="parquet: label column")
    w.add_argument("--no-labels", action="store_true", help="SRC is a folder of images without classes (any "
                   "depth), for SimMIM; --val-per-class N then holds out N images")
    w.add_argument("--no-progress", action="store_true")
    w.add_argument("--start-method", default="auto", choices=["auto", "fork", "spawn", "forkserver"],
                   help="how worker processes start (auto: the platform's default)")
    v = sub.add_parser("verify", help="check shards against _info.json")
    v.add_argument("out")
    a = p.parse_args(argv)
    return cli.run(lambda: write(a) if a.cmd == "write" else verify(a.out))


def write(a) -> int:
    from ..data.shards import WriteOptions, write_shards
    opts = WriteOptions(src=a.src, out=a.out, val_per_class=a.val_per_class,
                        samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes,
                        max_side=a.max_side, seed=a.seed, quality=a.quality, workers=a.workers,
                        image_column=a.image_column, label_column=a.label_column,
                        start_method=a.start_method, labelled=not a.no_labels)
    summary = write_shards(opts, progress=not a.no_progress)
    print(json.dumps(summary, indent=1))
    if summary["empty_classes"]:
        print(f"empty class folder(s) {', '.join(summary['empty_classes'])}: kept with no images so that the "
              f"classes after them keep their indices (see {a.out.rstrip('/')}/_errors.json)", file=sys.stderr)
    if summary["skipped_inputs"]:
        print(f"{summary['skipped_inputs']} input(s) skipped: see {a.out.rstrip('/')}/_errors.json",
              file=sys.stderr)
    return 0


def verify(out: str) -> int:
    from ..data.shards import verify_shards
    report = verify_shards(out)
    print(json.dumps(report, indent=1))
    return 1 if report["bad_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
