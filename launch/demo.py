"""`python launch/demo.py`: the same as `python -m pretrain.cli.demo`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("pretrain.cli.demo")
