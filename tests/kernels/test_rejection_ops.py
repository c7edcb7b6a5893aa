"""The CPU rejection sampler (csrc/cpu/rejection.cpp via octavo.ops.rejection_sample) emits
exactly the reference's tokens (octavo.spec_decode.rejection) for the same explicit noise; the
distribution tests in tests/spec_decode run through it too."""
import os
import subprocess
import sys

import pytest
import torch

from octavo import ops
from octavo.spec_decode.rejection import PAD, rejection_sample
from rejection_cases import KINDS, make_case

pytestmark = pytest.mark.skipif(ops.USING_NATIVE, reason="OCTAVO_USE_NATIVE_OPS=1: no kernels")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K,V", [(0, 7), (1, 1), (1, 33), (3, 257), (4, 1000), (8, 77),
                                 (8, 5125)])
def test_kernel_equals_reference(kind, K, V):
    case = make_case(kind, 9, K, V, seed=K * 131 + V)
    out = ops.rejection_sample(**case)
    ref = rejection_sample(**case)
    assert torch.equal(out, ref), (out, ref)
    lengths = (ref != PAD).sum(dim=1)
    assert (lengths >= 1).all() and (lengths <= case["num_draft_tokens"] + 1).all()


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_lower_cpu_capabilities(capability):
    """The DEFAULT and AVX2 builds of the kernel (ATEN_CPU_CAPABILITY is read once per process,
    so each runs in a subprocess)."""
    code = ("import torch, sys; sys.path.insert(0, 'tests/kernels')\n"
            "from octavo import ops\nfrom octavo.spec_decode.rejection import rejection_sample\n"
            "from rejection_cases import KINDS, make_case\n"
            "for kind in KINDS:\n"
            "    for K, V in [(3, 45), (8, 1000)]:\n"
            "        c = make_case(kind, 5, K, V, seed=V)\n"
            "        assert torch.equal(ops.rejection_sample(**c), rejection_sample(**c)), kind\n"
            "print('ok')\n")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_strided_and_half_inputs():
    """Stride-0 batch dims (one distribution expanded over rows), row slices of wider buffers,
    bf16 probabilities (the reference's .float()) and float32 uniforms."""
    case = make_case("draft_probs", 6, 4, 300, seed=3)
    case["target_probs"] = case["target_probs"][:1].expand(6, 5, 300)
    case["draft_probs"] = case["draft_probs"][:1].expand(6, 4, 300).to(torch.bfloat16)
    wide = torch.zeros(6, 9, dtype=torch.int64)
    wide[:, 2:6] = case["draft_token_ids"]
    case["draft_token_ids"] = wide[:, 2:6]
    noise = torch.empty(6, 5, 320).exponential_()
    case["exp_noise"] = noise[:, :, 10:310]
    assert torch.equal(ops.rejection_sample(**case), rejection_sample(**case))


def test_bad_inputs_raise_value_error():
    case = make_case("point_mass", 3, 2, 10)
    with pytest.raises(ValueError, match="exp_noise"):
        ops.rejection_sample(**{**case, "exp_noise": case["exp_noise"][:, :2]})
    with pytest.raises(ValueError, match="num_draft_tokens"):
        ops.rejection_sample(**{**case, "num_draft_tokens": torch.tensor([0, 3, 1])})
    bad = case["draft_token_ids"].clone()
    bad[1, 0] = 10
    with pytest.raises(ValueError, match="vocabulary"):
        ops.rejection_sample(**{**case, "draft_token_ids": bad,
                                "num_draft_tokens": torch.tensor([2, 2, 2])})
    # greedy rows only compare draft ids: an id outside the vocabulary is just not accepted
    case_greedy = {**case, "draft_token_ids": bad, "greedy": torch.ones(3, dtype=torch.bool)}
    assert torch.equal(ops.rejection_sample(**case_greedy), rejection_sample(**case_greedy))
    with pytest.raises(ValueError, match="float32"):
        ops.rejection_sample(**{**case, "exp_noise": case["exp_noise"].double()})


def test_opcheck():
    case = make_case("mixed", 4, 3, 20)
    out = torch.empty(4, 4, dtype=torch.int64)
    torch.library.opcheck(torch.ops.octavo.rejection_sample.default,
                          (out, case["draft_token_ids"], case["num_draft_tokens"],
                           case["draft_probs"], case["target_probs"],
                           case["uniform"].double(), case["exp_noise"], case["greedy"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_equals_reference_and_replays_in_a_graph(kind):
    """The CUDA kernel (its launch shape depends on shapes only) inside a captured graph."""
    case = make_case(kind, 33, 5, 32003, seed=11)
    ref = rejection_sample(**case)
    dev = {key: (val.cuda() if val is not None else None) for key, val in case.items()}
    dev["uniform"] = dev["uniform"].double()
    assert torch.equal(ops.rejection_sample(**dev).cpu(), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.rejection_sample(**dev)
    other = make_case(kind, 33, 5, 32003, seed=12)
    for key, val in other.items():
        if val is not None:
            dev[key].copy_(val)
    graph.replay()
    assert torch.equal(out.cpu(), rejection_sample(**other))
