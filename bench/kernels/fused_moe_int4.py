"""Kernel lab: fused_moe_int4 (routed gated expert MLPs on 4-bit experts, groups of 128, codes
unpacked in registers) vs the same experts in the activations' dtype (fused_moe) and vs
dequantize + a torch loop.

python -m octavo.bench.kernels.fused_moe_int4 [--quick] [--tokens 1,2,4,8,16,32] [--shapes 1024x2816x8x2]
Shapes are H x I x E x top_k. GB/s counts the expert weights actually read (half a byte each for
int4, plus their fp32 scales and offsets) and the activations, beside this machine's copy
bandwidth. The octavo ops run on weights prepared once, as the layers do; the driver (shapes,
tokens, routing) is fused_moe_fp8's.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import check, report, time_fn
from octavo.bench.kernels.fused_moe import torch_loop
from octavo.bench.kernels.fused_moe_fp8 import run_moe_lab
from octavo.models.layers.quantization.int4 import quantize_rtn

GROUP = 128


def quantize(w: torch.Tensor):
    """[E, N, K] -> (codes uint8, scales, zeros [E, N, G]): round to nearest per output row."""
    e, n, k = w.shape
    q, s, z = quantize_rtn(w.reshape(e * n, k), GROUP)
    return q.view(e, n, k), s.view(e, n, -1), z.view(e, n, -1)


def _prepare(h, i, e, g, dtype):
    q13, s13, z13 = quantize(torch.randn(e, 2 * i, h, generator=g) / h ** 0.5)
    q2, s2, z2 = quantize(torch.randn(e, h, i, generator=g) / i ** 0.5)
    d13 = ops_native.moe_int4_dequantize(q13, s13, z13, GROUP).to(dtype)
    d2 = ops_native.moe_int4_dequantize(q2, s2, z2, GROUP).to(dtype)
    int4 = ops.prepare_moe_int4_weights(q13, s13, z13, q2, s2, z2, GROUP)
    return (q13, s13, z13, q2, s2, z2), d13, d2, int4, ops.prepare_moe_weights(d13, d2)


def _measure(state, name, shape, hidden, tw, ti, repeats, copy_gbs):
    codes, d13, d2, int4, plain = state
    (h, i, e, k), t, dtype = shape, hidden.shape[0], hidden.dtype
    out = ops.fused_moe_int4_prepared(hidden, int4, tw, ti)
    exact = ops_native.fused_moe_int4(hidden.double(), *codes, tw, ti, GROUP)
    check(f"{name} T={t}", out, torch_loop(hidden, d13, d2, tw, ti), exact)
    selected = ti.unique().numel()
    group_bytes = (codes[1].numel() + codes[4].numel()) * 8 // e    # fp32 scale + offset
    act_bytes = 2 * hidden.numel() * hidden.element_size()
    flops = 2 * 3 * h * i * t * k
    q13, s13, z13, q2, s2, z2 = codes
    runs = {"octavo.fused_moe_int4": (lambda: ops.fused_moe_int4_prepared(hidden, int4, tw, ti),
                                      selected * (3 * h * i // 2 + group_bytes)),
            f"octavo.fused_moe ({str(dtype).split('.')[-1]} weights)":
                (lambda: ops.fused_moe_prepared(hidden, plain, tw, ti),
                 selected * 3 * h * i * d13.element_size()),
            "dequantize + torch loop":
                (lambda: torch_loop(hidden, ops_native.moe_int4_dequantize(q13, s13, z13, GROUP).to(dtype),
                                    ops_native.moe_int4_dequantize(q2, s2, z2, GROUP).to(dtype), tw, ti),
                 e * (3 * h * i // 2 + group_bytes))}
    for label, (fn, weight_bytes) in runs.items():
        report(f"{name} [{h}x{i}, {selected}/{e} experts] T={t} {label}",
               time_fn(fn, repeats), weight_bytes + act_bytes, flops, copy_gbs)


def main():
    run_moe_lab(__doc__, "fused_moe_int4", _prepare, _measure, tokens="1,2,4,8,16,32")


if __name__ == "__main__":
    main()
