"""The systemd unit: `systemd-analyze verify` (Debian's systemd 252) on a copy whose ExecStart is this checkout's real
`bestshot` entry point, and `systemd-analyze security --offline` exposure below 2.0, with and without the drop-ins."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.main import build_parser

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "bestshot.service"
INSTALLED = "/opt/bestshot/venv/bin/bestshot"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (tests/setup_system.sh)")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def install(tmp_path: Path, drop_ins: tuple[str, ...] = (), extra: str = "") -> Path:
    """A copy of the unit (ExecStart on this venv's `bestshot`) with its drop-ins in bestshot.service.d/."""
    exe = Path(sys.executable).with_name("bestshot")
    assert exe.is_file(), f"{exe}: install the package (make venv)"
    unit = tmp_path / "bestshot.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(exe), 1) + extra)
    for name in drop_ins:
        d = tmp_path / "bestshot.service.d"
        d.mkdir(exist_ok=True)
        shutil.copy(SYSTEMD / name, d / name)
    return unit


def verify(unit: Path) -> tuple[int, list[str]]:
    """Exit status and the lines that concern our unit (verify only warns about unknown keys, exit 0)."""
    done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [ln for ln in lines if "bestshot" in ln]


def exposure(unit: Path) -> float:
    done = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True,
                          text=True, timeout=60)
    m = re.search(r"Overall exposure level for bestshot\.service: (\d+\.\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    return float(m[1])


def test_unit_says_what_the_service_needs():
    d = directives(UNIT.read_text())
    expected = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "always",
                "DynamicUser": "yes", "CacheDirectory": "bestshot", "ConfigurationDirectory": "bestshot",
                "ExecReload": "/bin/kill -HUP $MAINPID", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
                "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
                "MemoryDenyWriteExecute": "yes", "PrivateDevices": "yes", "RestartPreventExitStatus": "2",
                "MemoryHigh": "3G", "MemoryMax": "4G"}
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert "BESTSHOT_CACHE=%C/bestshot" in d["Environment"][0]
    [exec_start] = d["ExecStart"]
    assert exec_start == f"{INSTALLED} run --config /etc/bestshot/bestshot.yaml"
    args = build_parser().parse_args(exec_start.split()[1:])  # the command line the CLI really takes
    assert args.command == "run" and str(args.config) == "/etc/bestshot/bestshot.yaml"


@needs_analyze
@pytest.mark.parametrize("drop_ins", [(), ("bestshot-gpu.conf", "bestshot-curve.conf")], ids=["unit", "drop-ins"])
def test_verify(tmp_path, drop_ins):
    code, lines = verify(install(tmp_path, drop_ins))
    assert code == 0 and lines == [], lines


@needs_analyze
def test_verify_is_a_real_check(tmp_path):
    """The same check catches a misspelt directive and an ExecStart that does not exist."""
    code, lines = verify(install(tmp_path, extra="WatchdogSecs=30\n"))
    assert any("Unknown key 'WatchdogSecs'" in ln for ln in lines), lines
    unit = tmp_path / "bestshot.service"
    unit.write_text(UNIT.read_text())  # ExecStart=/opt/bestshot/venv/bin/bestshot: not on this machine
    code, lines = verify(unit)
    assert code != 0 and any("is not executable" in ln for ln in lines), lines


@needs_analyze
@pytest.mark.parametrize("drop_ins,stated", [((), 1.2), (("bestshot-gpu.conf",), 1.6)], ids=["unit", "gpu"])
def test_security_exposure(tmp_path, drop_ins, stated):
    """The exposure the unit's header and the README state, not a loose bound: a hardening regression fails."""
    level = exposure(install(tmp_path, drop_ins))
    print(f"systemd-analyze security: bestshot.service{' + ' + ', '.join(drop_ins) if drop_ins else ''}: "
          f"exposure {level}")
    assert level <= stated
