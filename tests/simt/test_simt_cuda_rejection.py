"""The csrc/cuda rejection sampler (one block per row, block-wide argmax reductions) under the
SIMT emulator (torch.ops.octavo_simt.rejection_sample) emits exactly the reference's tokens
(octavo.spec_decode.rejection) for the same explicit noise."""
import pytest
import torch

import simt_ext
from octavo.spec_decode.rejection import rejection_sample
from rejection_cases import KINDS, make_case


@pytest.fixture(scope="module")
def simt():
    return simt_ext.load()


def run(simt, draft_token_ids, num_draft_tokens, draft_probs, target_probs, uniform, exp_noise,
        greedy):
    B, K = draft_token_ids.shape
    out = torch.full((B, K + 1), 12345, dtype=torch.int64)    # every entry must be written
    simt.rejection_sample(out, draft_token_ids, num_draft_tokens, draft_probs, target_probs,
                          uniform.double(), exp_noise, greedy)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K,V", [(0, 7), (1, 1), (3, 45), (8, 300)])
def test_kernel_equals_reference(simt, kind, K, V):
    case = make_case(kind, 5, K, V, seed=K * 17 + V)
    assert torch.equal(run(simt, **case), rejection_sample(**case))


def test_strided_inputs(simt):
    case = make_case("draft_probs", 4, 3, 70, seed=5)
    case["target_probs"] = case["target_probs"][:1].expand(4, 4, 70)
    case["draft_probs"] = case["draft_probs"][:1].expand(4, 3, 70)
    case["exp_noise"] = torch.empty(4, 4, 80).exponential_()[:, :, 5:75]
    assert torch.equal(run(simt, **case), rejection_sample(**case))


def test_bad_num_draft_tokens_traps(simt):
    """The kernel checks what the host must not read (a GPU launch does not sync)."""
    case = make_case("point_mass", 3, 2, 10)
    with pytest.raises(RuntimeError, match="num_draft_tokens"):
        run(simt, **{**case, "num_draft_tokens": torch.tensor([0, 3, 1])})
    bad = case["draft_token_ids"].clone()
    bad[1, 0] = -4
    with pytest.raises(RuntimeError, match="vocabulary"):
        run(simt, **{**case, "draft_token_ids": bad, "num_draft_tokens": torch.tensor([2, 2, 2])})
