"""Fine-tune a pretrained Swin at a new resolution and window, then evaluate (or only evaluate).

    python finetune/run.py --res 384 --pretrained swin_base_patch4_window7_224_22k.pth --data shards/
    torchrun --nproc_per_node 8 finetune/run.py --config configs/finetune/swin_l_22kto1k_384.json --data ...
    python finetune/run.py --res 384 --eval-only --pretrained released_384.pth --data val_shards/
    (also `python -m finetune.run ...` and `swin-finetune ...`; `--set backend=deepspeed` under ZeRO)

--config: a JSON file or a shipped recipe's name (finetune/swin_l_22kto1k_384); without it, the recipe
finetune/swin_b_22kto1k_{384 or 224}. The window defaults to res/32.
"""
import os
import sys
from typing import Optional

from finetune.config import load_finetune_config, missing_inputs, revalidate, with_flags
from pretrain import cli
from pretrain.config import ConfigError
from pretrain.errors import ALLOW_PICKLE, RESET_HEAD


def parse(argv=None):
    p = cli.parser("python -m finetune.run", __doc__, config=True)
    p.add_argument("--res", type=int, help="input resolution (default: the config's)")
    p.add_argument("--window", type=int, help="attention window (default: res/32, so 12 at 384)")
    p.add_argument("--pretrained", help="our run dir or export, an official .pth, timm weights; path or URL")
    p.add_argument("--from-scratch", action="store_true", help="random init with the same recipe (a baseline)")
    p.add_argument("--data", help="shard folder (its _info.json or info.json) or manifest, with 'train' and "
                                  "'validation' splits")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (all processes)")
    p.add_argument("--output", help="run dir (checkpoints, metrics, export)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the weights at --res and stop")
    p.add_argument("--allow-random-head", action="store_true",
                   help="--eval-only: evaluate even when the weights have no head for --num-classes (chance)")
    p.add_argument("--resume", choices=["auto"], help="continue the run in --output from its newest checkpoint")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, faults=None) -> int:
    """`faults`: a pretrain.training.Faults, for tests (tests/faulty_train.py)."""
    a = parse(argv)
    config = a.config or f"finetune/swin_b_22kto1k_{384 if (a.res or 384) > 224 else 224}"  # a shipped recipe

    def job() -> dict:
        cfg = load_finetune_config(config, a.set)
        if a.from_scratch:
            cfg.finetune.from_scratch, cfg.finetune.pretrained = True, ""
        cfg = revalidate(with_flags(cfg, a.res, a.window, a.pretrained, a.data, a.num_classes, a.epochs,
                                    a.batch_size, a.output))
        missing = missing_inputs(cfg, a.eval_only, bool(a.resume))
        if missing:
            raise ConfigError(f"config {config} (res {cfg.model.img_size}, window "
                              f"{cfg.model.window_size}) still needs:\n  " + "\n  ".join(missing))
        from finetune.stage import evaluate_only, finetune_stage
        from pretrain.training import Trainer, compile_cache_env
        os.environ.update(compile_cache_env(cfg))  # inductor reads its cache folders from the environment
        if a.eval_only:
            return evaluate_only(cfg, bool(a.resume), a.allow_random_head)
        return Trainer(cfg, resume=a.resume, stage=finetune_stage(cfg), faults=faults).fit()
    return cli.run(job, spellings={ALLOW_PICKLE: "--set finetune.allow_pickle=true",
                                   RESET_HEAD: "--set finetune.reset_head=true"})


if __name__ == "__main__":
    sys.exit(main())
