"""`python launch/make_shards.py write SRC OUT`: the same as `python -m pretrain.make_shards`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("pretrain.make_shards")
