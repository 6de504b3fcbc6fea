"""Release export: consolidated fp32 weights of a training checkpoint, in our, timm's, the official and the
transformers layout (a folder for `from_pretrained`; a SimMIM run: ours, the official SimMIM layout, the encoder
alone for fine-tuning or timm, and transformers' Swin(v2)ForMaskedImageModeling).

    python -m pretrain.cli.release RUN_DIR [--tag step00010000] [--out DIR] [--layouts ours timm official transformers]
    (also `swin-export ...` and `python launch/export.py ...`)

Only the checkpoint's model section is read: a run whose config has keys this version does not know
exports, with a warning naming them.
"""
from __future__ import annotations

import sys

from .. import cli
from ..weights import LAYOUTS, SIMMIM_LAYOUTS, export_run


def main(argv=None) -> int:
    p = cli.parser("python -m pretrain.cli.release", __doc__)
    p.add_argument("path", help="run dir, its checkpoints/ dir, or one tag folder")
    p.add_argument("--tag", help="default: the newest complete checkpoint")
    p.add_argument("--out", help="default: <run dir>/export")
    p.add_argument("--layouts", nargs="+", choices=sorted(set(LAYOUTS + SIMMIM_LAYOUTS)),
                   help="default: every layout the model has (a Swin: ours timm official; a SimMIM run: ours "
                        "official encoder)")
    a = p.parse_args(argv)

    def job() -> None:
        layouts = tuple(a.layouts) if a.layouts else None
        for path in export_run(a.path, a.out, a.tag, layouts, warn=lambda m: print(m, file=sys.stderr)):
            print(f"wrote {path}")
    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
