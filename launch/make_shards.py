"""`python launch/make_shards.py write SRC OUT`: the same as `python -m pretrain.cli.make_shards`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("pretrain.cli.make_shards")
