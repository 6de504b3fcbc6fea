"""`python launch/export.py RUN_DIR`: the same as `python -m pretrain.cli.release`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("pretrain.cli.release")
