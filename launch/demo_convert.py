"""`python launch/demo_convert.py`: the same as `python -m finetune.demo_convert`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("finetune.demo_convert")
