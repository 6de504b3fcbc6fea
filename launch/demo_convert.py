"""`python launch/demo_convert.py`: the same as `python -m pretrain.cli.demo_convert`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("pretrain.cli.demo_convert")
