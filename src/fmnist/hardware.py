"""What this machine offers: the cores this process may use, and which CPU it is (for results files).

Torch-free, so sweeps and the CLI can size their pools without loading torch.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N"
# What decides CPU speed for these networks, slowest first (`fmnist.devices.cpu_class` tells which this CPU is).
CPU_CLASSES = ("SSE", "AVX2", "AVX512", "AVX512-BF16", "AMX")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC 9B14', from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB. Linux's VmHWM belongs to the process's own address space; the
    `ru_maxrss` of a child started by fork/vfork + exec also counts its parent's pages from before the exec (a
    child of a 700 MB pytest reads 700 MB), so it is only the fallback where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    scale = 1024 * 1024 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
