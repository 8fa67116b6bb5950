"""Peak extra memory of one call, shared by the benchmarks.

CPU: the process's resident-set high-water mark (VmHWM) is reset through
/proc/self/clear_refs, so the growth of one call is VmHWM - VmRSS(before). Run it in a fresh
subprocess per peer: freed pages stay mapped, and a peer measured after another would see
the first one's heap. CUDA: torch.cuda.max_memory_allocated over the call minus what was
allocated before it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

MIB = 2**20


def proc_status_kib(field: str) -> int:
    """One `kB` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_cpu_peak() -> int:
    """Reset VmHWM to the current VmRSS; returns VmRSS in KiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kib("VmRSS")


def cpu_peak_extra_mib(fn: Callable[[], None]) -> float:
    """Resident-set growth of one call after a warm-up call: VmHWM - VmRSS(before), in MiB."""
    fn()
    before = reset_cpu_peak()
    fn()
    return (proc_status_kib("VmHWM") - before) / 1024


def cuda_peak_extra_mib(fn: Callable[[], None]) -> float:
    """torch.cuda.max_memory_allocated over one call minus what was allocated before it, in MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB
