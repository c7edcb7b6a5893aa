"""oneDNN-packed linear layers and LM head give F.linear's result (same-precision tolerance)."""
import pytest
import torch
import torch.nn.functional as F

from octavo.models.layers import cpu_gemm
from octavo.models.layers.embedding import ParallelLMHead
from octavo.models.layers.linear import QKVParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(not cpu_gemm.enabled(), reason="oneDNN linear not available in this torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_packed_layers_match_plain_linear(dtype, rows):
    torch.manual_seed(0)
    layers = [QKVParallelLinear(96, 16, 4, 2, bias=True, params_dtype=dtype),
              RowParallelLinear(80, 129, bias=False, params_dtype=dtype)]
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_()
        w64 = layer.weight.double()
        b64 = None if layer.bias is None else layer.bias.double()
        x = torch.randn(rows, layer.input_size_per_partition, dtype=dtype)
        exact = F.linear(x.double(), w64, b64)
        plain = layer(x)
        layer.process_weights_after_loading()
        if dtype == torch.bfloat16 and not (cpu_gemm.kernel_enabled(dtype) or cpu_gemm._onednn_bf16()):
            # no bf16 GEMM of ours or oneDNN's on this CPU (AVX2 only): the weight stays plain
            assert layer.packed_weight is None and layer.weight.numel() > 0
        else:
            assert layer.packed_weight is not None and layer.weight.numel() == 0
        packed = layer(x)
        assert packed.dtype == dtype and packed.shape == plain.shape
        plain_err = (plain.double() - exact).abs().max().item()
        packed_err = (packed.double() - exact).abs().max().item()
        assert packed_err <= 2 * plain_err + (1e-5 if dtype == torch.float32 else 1e-2)


def test_packed_lm_head_keeps_the_tied_weight():
    torch.manual_seed(0)
    head = ParallelLMHead(1000, 64)
    head.weight.data.normal_()
    before = head.weight.clone()
    x = torch.randn(5, 64)
    ref = F.linear(x.double(), before.double())
    head.process_weights_after_loading()
    assert torch.equal(head.weight, before)
    assert torch.allclose(head.compute_logits(x).double(), ref, atol=1e-4)
    assert cpu_gemm.linear(torch.randn(0, 64), head.packed_weight, None).shape == (0, 1000)
