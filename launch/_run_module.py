"""Runs a package module as `__main__` for the scripts in this folder (the documented commands).

`launch/pretrain.py` is named like the `pretrain` package and Python puts this folder first on sys.path, so
the folder is dropped before anything is imported. The module then runs under its own name, so worker
processes started with spawn or forkserver import it by name and never re-run a script from here."""
import os
import runpy
import sys


def run(module: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
