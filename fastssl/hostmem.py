"""Keep freed host memory in the process instead of handing it back to the kernel (``train.host_alloc``).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed. A CPU training step allocates and frees its large activations
every step (ResNet-18 at 96 px, batch 256: the first convolution's output alone is 151 MB), so each
step page-faults all of them in again and the kernel zeroes every page: 340,000 minor faults and
1.2 s of system time per 6 s step on cpu2 (BENCHMARKS.md, "Step on the CPU").

``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap, and ``M_TRIM_THRESHOLD`` at its
maximum keeps freed heap memory for the next step. The heap grows for the first few steps, until
freed blocks fit the next step's requests; from then on a step takes no faults and no system
time. The cost: memory once used stays reserved until the process exits (peak RSS 2.70 against
2.22 GB for that ResNet-18 step). The same can be had from outside with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``; jemalloc or tcmalloc
via ``LD_PRELOAD`` are the usual alternatives (Intel's PyTorch CPU tuning guide), neither on pip.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

HOST_ALLOCS = ("auto", "retain", "system")

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_retained = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (process-wide, idempotent). False where libc is not glibc."""
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    except (OSError, AttributeError):
        return False
    _retained = ok
    return ok


def apply_host_alloc(mode: str, device) -> str:
    """Apply ``train.host_alloc`` for a step on ``device``; returns what is in effect: ``retain`` or ``system``.

    ``auto`` retains on the CPU, where the step's activations live in host memory, and leaves
    CUDA runs alone (their large host buffers are pinned and cached by torch already).
    ``retain`` where glibc is missing falls back to ``system`` (nothing else to do there).
    """
    if mode not in HOST_ALLOCS:
        from fastssl.registry import closest

        raise ValueError(f"unknown train.host_alloc {mode!r}: {closest(mode, list(HOST_ALLOCS))}")
    want = mode == "retain" or (mode == "auto" and getattr(device, "type", str(device)) == "cpu")
    if want and retain_freed_memory():
        return "retain"
    return "retain" if _retained else "system"  # once set, it stays set for the process
