"""The CI skip guard (tests/skip_guard.py) on a throwaway suite run in its own pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = '''
import pytest

@pytest.mark.gpu
def test_gpu():
    pytest.skip("no GPU here")

def test_ok():
    pass
'''


def run(tmp_path: Path, extra: str = "", *args: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "test_extra.py").write_text("import pytest\n" + extra)
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "BESTSHOT_ALLOW_SKIPS")} | env
    environ["PYTHONPATH"] = str(Path(__file__).parent)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_guard", "-p", "no:cacheprovider", "-c",
                           os.devnull, "--rootdir", str(tmp_path), *args, str(tmp_path)], capture_output=True,
                          text=True, env=environ, timeout=120)


def test_gpu_skips_pass_under_ci(tmp_path):
    r = run(tmp_path, CI="true")
    assert r.returncode == 0, r.stdout
    assert "1 passed, 1 skipped" in r.stdout


@pytest.mark.parametrize("extra,what", [
    ("\ndef test_missing():\n    pytest.skip('systemd-analyze not installed')\n", "systemd-analyze not installed"),
    ("\n@pytest.mark.skipif(True, reason='no shared data')\ndef test_data():\n    pass\n", "no shared data"),
    ("\nnope = pytest.importorskip('no_such_module_here')\n", "could not import 'no_such_module_here'"),
])
def test_other_skips_fail_under_ci(tmp_path, extra, what):
    r = run(tmp_path, extra, CI="true")
    assert r.returncode == 1, r.stdout
    assert "skips are failures here" in r.stdout and what in r.stdout
    assert run(tmp_path, extra, CI="true", BESTSHOT_ALLOW_SKIPS="1").returncode == 0  # the way out, on purpose


@pytest.mark.parametrize("extra,what", [
    ("\ndef test_missing():\n    pytest.skip('systemd-analyze not installed')\n", "systemd-analyze not installed"),
    ("\nnope = pytest.importorskip('no_such_module_here')\n", "could not import 'no_such_module_here'"),
])
def test_skips_fail_under_ci_in_parallel_workers_too(tmp_path, extra, what):
    """`make test` runs pytest-xdist workers: their skips, a whole module's included, reach the guard."""
    r = run(tmp_path, extra, "-n", "2", CI="true")
    assert r.returncode == 1, r.stdout
    assert "skips are failures here" in r.stdout and what in r.stdout
