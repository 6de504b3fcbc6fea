"""Imported first by every script here: `launch/pretrain.py` is named like the `pretrain` package, and
Python puts this folder first on sys.path, so `import pretrain` would find the script. Drop the folder.
(Worker pools started from these scripts must fork, not spawn: a spawned child re-runs the script
without this folder on its path.)"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
