"""`deepspeed launch/pretrain.py --config configs/swin_l_22k.json`: the same as `python -m pretrain.cli.train`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("pretrain.cli.train")
