"""`python launch/demo.py`: the same as `python -m finetune.demo`."""
if __name__ == "__main__":
    import _run_module

    _run_module.run("finetune.demo")
