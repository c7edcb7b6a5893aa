"""Kernel lab: fused_moe_int8 (routed gated expert MLPs on weight-only int8 experts, W = q * scale
+ offset per group of 32 as GGUF Q8_0 / Q5_K hold them, codes widened in registers) vs the same
experts on the INT4 kernel, in the activations' dtype (fused_moe), and dequantize + a torch loop.

python -m octavo.bench.kernels.fused_moe_int8 [--quick] [--tokens 1,2,4,8,16,32] [--shapes 1024x2816x8x2]
Shapes are H x I x E x top_k. GB/s counts the expert weights actually read (a byte each for int8,
half a byte for int4, plus their fp32 scales and offsets) and the activations, beside this
machine's copy bandwidth. The octavo ops run on weights prepared once, as the layers do; the
driver (shapes, tokens, routing) is fused_moe_fp8's.
"""
import torch

from octavo import ops, ops_native
from octavo.bench.kernels.common import check, report, time_fn
from octavo.bench.kernels.fused_moe import torch_loop
from octavo.bench.kernels.fused_moe_fp8 import run_moe_lab
from octavo.bench.kernels.fused_moe_int4 import quantize as quantize_int4

GROUP = 32


def quantize(w: torch.Tensor):
    """[E, N, K] -> (codes int8, scales, offsets [E, N, K/32]): symmetric round to nearest per
    group (Q8_0's rule), offsets zero."""
    e, n, k = w.shape
    wg = torch.nn.functional.pad(w, (0, -k % GROUP)).view(e, n, -1, GROUP)   # last group short
    s = (wg.abs().amax(-1) / 127).clamp(min=1e-8)
    q = torch.round(wg / s[..., None]).clamp(-128, 127).to(torch.int8).view(e, n, -1)[..., :k]
    return q.contiguous(), s, torch.zeros_like(s)


def _prepare(h, i, e, g, dtype):
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5, torch.randn(e, h, i, generator=g) / i ** 0.5
    codes = (*quantize(w13), *quantize(w2))
    d13 = ops_native.moe_int8_dequantize(*codes[:3], GROUP).to(dtype)
    d2 = ops_native.moe_int8_dequantize(*codes[3:], GROUP).to(dtype)
    int8 = ops.prepare_moe_int8_weights(*codes, GROUP, GROUP)
    int4 = ops.prepare_moe_int4_weights(*quantize_int4(w13), *quantize_int4(w2), 128)
    return codes, d13, d2, int8, int4, ops.prepare_moe_weights(d13, d2)


def _measure(state, name, shape, hidden, tw, ti, repeats, copy_gbs):
    codes, d13, d2, int8, int4, plain = state
    (h, i, e, k), t, dtype = shape, hidden.shape[0], hidden.dtype
    out = ops.fused_moe_int8_prepared(hidden, int8, tw, ti)
    exact = ops_native.fused_moe_int8(hidden.double(), *codes, tw, ti, GROUP, GROUP)
    check(f"{name} T={t}", out, torch_loop(hidden, d13, d2, tw, ti), exact)
    selected = ti.unique().numel()
    scale_bytes = 3 * h * i // GROUP * 8                 # fp32 scale + offset per group
    act_bytes = 2 * hidden.numel() * hidden.element_size()
    flops = 2 * 3 * h * i * t * k
    runs = {"octavo.fused_moe_int8": (lambda: ops.fused_moe_int8_prepared(hidden, int8, tw, ti),
                                      selected * (3 * h * i + scale_bytes)),
            "octavo.fused_moe_int4 (g128)": (lambda: ops.fused_moe_int4_prepared(hidden, int4, tw, ti),
                                             selected * (3 * h * i // 2 + 3 * h * i // 128 * 8)),
            f"octavo.fused_moe ({str(dtype).split('.')[-1]} weights)":
                (lambda: ops.fused_moe_prepared(hidden, plain, tw, ti),
                 selected * 3 * h * i * d13.element_size()),
            "dequantize + torch loop":
                (lambda: torch_loop(hidden, ops_native.moe_int8_dequantize(*codes[:3], GROUP).to(dtype),
                                    ops_native.moe_int8_dequantize(*codes[3:], GROUP).to(dtype), tw, ti),
                 e * (3 * h * i + scale_bytes))}
    for label, (fn, weight_bytes) in runs.items():
        report(f"{name} [{h}x{i}, {selected}/{e} experts] T={t} {label}",
               time_fn(fn, repeats), weight_bytes + act_bytes, flops, copy_gbs)


def main():
    run_moe_lab(__doc__, "fused_moe_int8", _prepare, _measure, tokens="1,2,4,8,16,32")


if __name__ == "__main__":
    main()
