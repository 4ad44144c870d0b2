"""keep_freed_memory: once warm, a training-step-like pattern of large tensors reuses the process's pages (no
page faults), where glibc's defaults unmap them on free and fault every page back in (the negative control)."""
import os
import subprocess
import sys

import pytest

_STEP_MB = (128, 32, 80, 16, 128)  # tensors alive together in one "step", then freed
_PROBE = f"""
import resource, torch
from megacrystal.host_memory import keep_freed_memory
tuned = keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    alive = [torch.empty(mb * 2**18).fill_(1.0) for mb in {_STEP_MB}]
    del alive
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(10):  # warm-up: the heap grows until a step fits in freed blocks (a few steps)
    faults_of_one_step()
print(tuned, max(faults_of_one_step() for _ in range(3)))
"""


def _probe(**env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_a_warm_step_reuses_freed_pages_instead_of_faulting_them_back_in():
    pages = sum(_STEP_MB) * 2**20 // os.sysconf("SC_PAGE_SIZE")
    tuned, faults = _probe()
    assert tuned == "True" and faults < pages // 100
    untuned, faults = _probe(MEGACRYSTAL_SYSTEM_MALLOC="1")
    assert untuned == "False" and faults > pages // 2  # glibc's default: every page faulted in again



_BIG_BLOCK_PROBE = """
import sys
from megacrystal.host_memory import bound_retained_memory, keep_freed_memory
(bound_retained_memory if sys.argv[1] == "bound" else keep_freed_memory)()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
for mb in (96, 200, 64):  # an encoder's scratch buffers for a few huge documents, written, then freed
    block = bytearray(b"x") * (mb * 2**20)
    small = [bytearray(4096) for _ in range(100)]  # small objects allocated meanwhile stay alive
    del block
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_bound_retained_memory_gives_a_huge_block_back():
    def kept(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _BIG_BLOCK_PROBE, mode], capture_output=True, text=True,
                             check=True)
        return float(out.stdout)

    assert kept("bound") < 5  # MB still held after the huge block is freed
    assert kept("keep") > 150  # the training setting keeps it (the control)
