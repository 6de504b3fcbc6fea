"""A launched run with faults injected: `deepspeed tests/faulty_train.py pretrain|finetune --faults JSON|@FILE ARGS`.

The faults (pretrain.training.Faults: NaN losses, slow updates, a crash inside a save) are an object handed
to the entry point's main(); the loop reads no environment variable for them. ARGS are the entry point's.
"""
import sys


def main() -> int:
    launcher = [a for a in sys.argv[1:] if a.startswith("--local_rank")]  # deepspeed puts it first
    app, flag, spec, *rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    assert flag == "--faults", "usage: faulty_train.py pretrain|finetune --faults JSON ARGS"
    rest = launcher + rest
    from pretrain.training import Faults
    faults = Faults.from_json(open(spec[1:]).read() if spec.startswith("@") else spec)  # JSON, or @FILE
    if app == "pretrain":
        from pretrain.cli.train import main as entry
    else:
        from finetune.run import main as entry
    return entry(rest, faults=faults)


if __name__ == "__main__":
    sys.exit(main())
