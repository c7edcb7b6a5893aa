"""import octavo keeps freed memory for reuse (glibc: no mmap'd chunks, no trimming), so large
activations are not faulted in afresh on every forward; opt-outs leave malloc alone."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, os
import octavo, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks                  # chunks mmap'd before (the interpreter's own)
x = torch.empty(96 << 20, dtype=torch.uint8)     # 96 MiB: above glibc's largest mmap threshold
x.fill_(1)
info = libc.mallinfo2()
ptr = x.data_ptr()
del x
y = torch.empty(96 << 20, dtype=torch.uint8)
print(info.hblks - before, int(y.data_ptr() == ptr))
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
    hblks, same = _run()
    assert hblks == 0 and same == 1        # no mmap'd chunk; the freed block is handed out again


@pytest.mark.parametrize("env", [dict(OCTAVO_KEEP_FREED_MEMORY="0"), dict(MALLOC_ARENA_MAX_="2")],
                         ids=["opt-out", "user-tuned-malloc"])
def test_opt_outs_leave_glibc_defaults(env):
    hblks, _ = _run(**env)
    assert hblks >= 1                      # glibc's own choice: the 96 MiB tensor is mmap'd
