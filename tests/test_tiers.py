"""The tiers' rules, on a throwaway test file run by pytest itself with this conftest: missing infrastructure
skips with its reason in the fast tier and fails under SWIN_TESTS_STRICT=1 (`make test`, CI), where a run with
any skip fails as a whole; the markers select the fast tier."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = '''
import pytest
from conftest import need

def test_needs_something_missing():
    need(False, "a cluster that is not here")

def test_skips_on_its_own():
    pytest.skip("a skip of its own")

@pytest.mark.slow
def test_marked():
    pass

def test_plain():
    pass
'''


def run(tmp_path, strict: bool, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO / "tests" / "prelaunch.py", tmp_path / "prelaunch.py")
    env = {k: v for k, v in os.environ.items() if k != "SWIN_TESTS_STRICT"}
    env.update({"SWIN_TESTS_STRICT": "1"} if strict else {}, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
                           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three pytest sessions, each importing torch
def test_missing_infrastructure_skips_in_the_fast_tier_and_fails_the_whole_suite(tmp_path):
    fast = run(tmp_path, False, "-m", "not (dist or launcher or slurm or root or demo or slow)")
    assert fast.returncode == 0, fast.stdout[-2000:]
    assert "1 passed, 2 skipped, 1 deselected" in fast.stdout and "needs a cluster that is not here" in fast.stdout
    strict = run(tmp_path, True)
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert "1 failed" in strict.stdout and "Failed: needs a cluster that is not here" in strict.stdout
    skipped = run(tmp_path, True, "-k", "not needs")  # everything else passes, one test skips itself
    assert skipped.returncode == 1 and "SWIN_TESTS_STRICT=1: 1 test(s) skipped" in skipped.stdout, skipped.stdout
