"""Export a training checkpoint as consolidated fp32 safetensors in our, timm's and the official layout.

    python launch/export.py RUN_DIR [--tag step00010000] [--out DIR] [--layouts ours timm official]
"""
import _syspath  # noqa: F401  (must come first: see launch/_syspath.py)
import argparse
import sys

from pretrain.release import export_release


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="run dir, its checkpoints/ dir, or one tag folder")
    p.add_argument("--tag", help="default: the newest complete checkpoint")
    p.add_argument("--out", help="default: <run dir>/export")
    p.add_argument("--layouts", nargs="+", default=["ours", "timm", "official"], choices=["ours", "timm", "official"])
    a = p.parse_args(argv)
    try:
        for path in export_release(a.path, a.out, a.tag, tuple(a.layouts)):
            print(f"wrote {path}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
