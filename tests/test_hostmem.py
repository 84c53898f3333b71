"""train.host_alloc: freed host memory is kept for the next step instead of page-faulting it in again."""
import json
import platform
import subprocess
import sys

import pytest
import torch

from fastssl.config import ConfigError, load_config
from fastssl.hostmem import apply_host_alloc

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A fresh process, so the setting cannot leak into (or come from) other tests. It allocates, fills
# and frees a 64 MB tensor (above glibc's largest mmap threshold) 32 times and counts the page
# faults of the last 8: 16,384 pages of 4 KiB each time when the memory goes back to the kernel.
# Retained, the first rounds still fault (torch's 64-byte alignment makes each request a little
# larger than the block freed before it, until freed blocks coalesce: 6-9 rounds seen), then none do.
FAULTS = """
import json, resource, sys, torch
from fastssl.hostmem import apply_host_alloc
mode = apply_host_alloc(sys.argv[1], torch.device(sys.argv[2]))
faults = []
for _ in range(32):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20 // 4).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"mode": mode, "faults": sum(faults[-8:])}))
"""


def _faults(mode: str, device: str) -> dict:
    p = subprocess.run([sys.executable, "-c", FAULTS, mode, device], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@glibc
def test_retain_reuses_freed_memory_without_page_faults():
    system, retain = _faults("system", "cpu"), _faults("auto", "cpu")
    assert system["mode"] == "system" and retain["mode"] == "retain"
    assert system["faults"] > 80_000, system   # 8 x 64 MB came back from the kernel, page by page
    assert retain["faults"] < 1_000, retain    # the freed block was reused


@glibc
def test_auto_leaves_cuda_runs_alone():
    assert _faults("auto", "cuda")["mode"] == "system"  # only decides; allocates nothing on the GPU


def test_bad_name_fails_with_the_closest():
    with pytest.raises(ConfigError, match="retain"):
        load_config(None, ["train.host_alloc=retian"])
    with pytest.raises(ValueError, match="retain"):
        apply_host_alloc("retian", torch.device("cpu"))
