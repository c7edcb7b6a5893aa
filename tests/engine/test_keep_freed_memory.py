"""import octavo keeps freed memory for reuse (glibc: no mmap'd chunks, no trimming), so large
activations are not faulted in afresh on every forward; opt-outs leave malloc alone."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, resource
import octavo, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks                  # chunks mmap'd before (the interpreter's own)
flt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def step():  # a forward's large activations: allocated, written, freed, in an interleaved order
    a = torch.empty(96 << 20, dtype=torch.uint8); a.fill_(1)   # above glibc's largest mmap threshold
    b = torch.empty(40 << 20, dtype=torch.uint8); b.fill_(1)
    hblks = libc.mallinfo2().hblks - before
    del a
    c = torch.empty(96 << 20, dtype=torch.uint8); c.fill_(2)
    del b, c
    return hblks

faults = []
for _ in range(12):
    f0 = flt()
    hblks = step()
    faults.append(flt() - f0)
print(hblks, sum(faults[-4:]))
"""

pytestmark = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                                reason="glibc's malloc only")


def _run(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **env}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return tuple(int(v) for v in res.stdout.split())


def test_large_tensors_come_from_the_heap_and_are_reused():
    hblks, late_faults = _run()
    assert hblks == 0                      # no mmap'd chunk
    # once the heap has grown to the steps' size (glibc needs a few steps: a freed chunk is only
    # reused by torch's 64-byte aligned requests once it has merged with a neighbour), a step's
    # 232 MiB of writes land on pages already mapped: 59k page faults a step without this
    assert late_faults < 1000


@pytest.mark.parametrize("env", [dict(OCTAVO_KEEP_FREED_MEMORY="0"), dict(MALLOC_ARENA_MAX_="2")],
                         ids=["opt-out", "user-tuned-malloc"])
def test_opt_outs_leave_glibc_defaults(env):
    hblks, late_faults = _run(**env)
    assert hblks >= 1                      # glibc's own choice: the 96 MiB tensor is mmap'd
    assert late_faults > 4 * 20000         # and faulted in afresh on every step
