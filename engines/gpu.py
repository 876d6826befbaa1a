"""The GPU as TensorRT sees it: name, compute capability, SM count and memory (pycuda, else nvidia-smi), the
primary context.

Engine building (trt_build) and the TensorRT runtime (agent.backends.tensorrt) both need these; pycuda is imported
lazily, so this module loads on machines without it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


class GpuUnavailable(RuntimeError):
    """No CUDA GPU (or no driver) on this machine."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    sm_count: int | None = None  # streaming multiprocessors (nvidia-smi cannot tell)
    memory_mb: int | None = None  # total device memory, MiB


def parse_nvidia_smi(text: str) -> GpuInfo:
    """The first line of `nvidia-smi --query-gpu=name,compute_cap[,memory.total] --format=csv,noheader,nounits`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise GpuUnavailable("no GPU: nvidia-smi lists no device")
    head, _, last = lines[0].rpartition(",")
    memory = None
    if last.strip().isdigit():  # memory.total
        memory = int(last)
        head, _, last = head.rpartition(",")
    name, cc = head.strip(), last.strip()
    if not name or not cc.replace(".", "").isdigit():
        raise GpuUnavailable(f"no GPU: cannot read nvidia-smi's answer {lines[0]!r}")
    return GpuInfo(name, cc, None, memory)


def gpu_info() -> GpuInfo:
    """GPU 0's name and compute capability, from the CUDA driver (pycuda), else from nvidia-smi."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            raise GpuUnavailable(f"no GPU (pycuda: {e}; no nvidia-smi)") from e
        done = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise GpuUnavailable(f"no GPU: nvidia-smi failed: {done.stderr.strip() or done.stdout.strip()}") from e
        return parse_nvidia_smi(done.stdout)
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise GpuUnavailable("no GPU: the CUDA driver sees no device")
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        sms = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        return GpuInfo(dev.name(), f"{major}.{minor}", int(sms), int(dev.total_memory()) >> 20)
    except cuda.Error as e:
        raise GpuUnavailable(f"no GPU (CUDA driver: {e})") from e


@contextlib.contextmanager
def cuda_primary_context(device: int = 0) -> Iterator[object]:
    """The device's primary context, current on this thread for the duration (pycuda)."""
    import pycuda.driver as cuda

    cuda.init()
    ctx = cuda.Device(device).retain_primary_context()
    ctx.push()
    try:
        yield ctx
    finally:
        cuda.Context.pop()
