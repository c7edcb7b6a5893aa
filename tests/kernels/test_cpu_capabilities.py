"""The DEFAULT and AVX2 builds of the CPU kernels (chosen at runtime, lowered with
ATEN_CPU_CAPABILITY) agree with the references too, not only the variant this CPU picks."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch
from attention_cases import make_batch, to_dtype
from kernel_utils import assert_close_to_ref
from octavo import ops, ops_native
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(5, 2 * 771, dtype=dtype)
    assert_close_to_ref(ops.silu_and_mul(x), ops_native.silu_and_mul(x), ops_native.silu_and_mul(x.double()))
    assert_close_to_ref(ops.gelu_and_mul(x), ops_native.gelu_and_mul(x), ops_native.gelu_and_mul(x.double()))
    w = torch.randn(1542, dtype=dtype)
    assert_close_to_ref(ops.rms_norm(x, w, 1e-6), ops_native.rms_norm(x, w, 1e-6),
                        ops_native.rms_norm(x.double(), w.double(), 1e-6))
    q = torch.randn(3, 4 * 80, dtype=dtype)
    cache = torch.randn(20, 80)
    pos = torch.tensor([0, 7, 19])
    outs = []
    for mod, qq in ((ops, q.clone()), (ops_native, q.clone()), (ops_native, q.double())):
        mod.rotary_embedding(pos, qq, None, 80, cache, True)
        outs.append(qq)
    assert_close_to_ref(*outs)
    b = to_dtype(make_batch([(1, 50), (9, 40), (1, 3)], 8, 2, 72, 16, torch.float32, seed=2), dtype)
    for kw in ({}, dict(sliding_window=7, soft_cap=3.0, alibi_slopes=torch.rand(8))):
        assert_close_to_ref(ops.paged_attention(**b, **kw), ops_native.paged_attention(**b, **kw),
                            ops_native.paged_attention(**to_dtype(b, torch.float64), **kw))
    # prefill-sized sequences take the tiled path (rows padded to whole vectors)
    b = to_dtype(make_batch([(41, 41), (37, 60)], 8, 2, 72, 16, torch.float32, seed=4), dtype)
    for kw in ({}, dict(sliding_window=7, soft_cap=3.0, alibi_slopes=torch.rand(8))):
        assert_close_to_ref(ops.paged_attention(**b, **kw), ops_native.paged_attention(**b, **kw),
                            ops_native.paged_attention(**to_dtype(b, torch.float64), **kw))
for dtype in (torch.bfloat16, torch.float16):    # residual: the fp32 sum rounded to nearest even
    x = (torch.randn(3, 1003) * torch.tensor([1.0, 2.0 ** -9, 2.0 ** -12])[:, None]).to(dtype)
    x[2, 5], x[2, 1000] = float("nan"), float("inf")
    r = torch.ones(3, 1003, dtype=dtype)
    r_k = r.clone()
    ops.fused_add_rms_norm(x.clone(), r_k, torch.ones(1003, dtype=dtype), 1e-5)
    torch.testing.assert_close(r_k, (x.float() + r.float()).to(dtype), rtol=0, atol=0, equal_nan=True)
x = torch.randn(7, 1003)
x[2, 5], x[3], x[4, 1], x[4, 900] = float("nan"), float("-inf"), 50.0, 50.0
assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_capability(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
