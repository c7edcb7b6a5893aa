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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_packed_lm_head(dtype, tied):
    # a tied head keeps the embedding's plain weight (rows are looked up in it); an untied
    # head's packed copy replaces its plain weight, as for the other linear layers
    from octavo.models.layers.embedding import VocabParallelEmbedding
    torch.manual_seed(0)
    head = ParallelLMHead(1000, 64, params_dtype=dtype)
    if tied:
        emb = VocabParallelEmbedding(1000, 64, params_dtype=dtype)
        head.tie_to(emb)
    head.weight.data.normal_()
    before = head.weight.detach().clone()
    x = torch.randn(5, 64, dtype=dtype)
    exact = F.linear(x.double(), before.double())
    plain_err = (F.linear(x, before).double() - exact).abs().max().item()
    head.process_weights_after_loading()
    head.process_weights_after_loading()          # a second call changes nothing
    if head.packed_weight is None:                 # no fast layout for this dtype here
        assert torch.equal(head.weight, before)
    elif tied:
        assert torch.equal(head.weight, before) and torch.equal(emb.weight, before)
    else:
        assert head.weight.numel() == 0
    logits = head.compute_logits(x)
    assert logits.dtype == torch.float32
    assert (logits.double() - exact).abs().max().item() <= 2 * plain_err + (1e-4 if dtype == torch.float32 else 1e-2)
    if head.packed_weight is not None:
        assert cpu_gemm.linear(torch.randn(0, 64, dtype=dtype), head.packed_weight, None).shape == (0, 1000)
