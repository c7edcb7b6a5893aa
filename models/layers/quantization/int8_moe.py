"""Weight-only int8 FusedMoE experts on the INT8 MoE kernel (ops.fused_moe_int8_prepared): GPTQ
8-bit checkpoints (AutoGPTQ / GPTQModel; one qweight / qzeros / scales / g_idx per expert and
projection, W = (q - z) * s). The experts load through Int4MoEMethod's loaders (stacked over
experts in the logical layout: codes [E, N, K] and zero points [E, N, G] as uint8 0..255, scales
[E, N, G] float32; each rank keeps its slice of I), then are handed to the kernel as int8 codes
q - 128 with offsets -(z - 128) * s. GGUF's int8-kept experts have their own method
(quantization.gguf.GGUFInt8MoEMethod); both keep and run their experts through
prepare_int8_experts / apply_int8_experts (on CPU and CUDA kept in int8; where no kernel takes
them, dequantized once at load)."""
from __future__ import annotations

import torch

from octavo import ops, ops_native
from octavo.models.layers.quantization.int4_moe import Int4MoEMethod


def prepare_int8_experts(moe, q13, s13, o13, q2, s2, o2, gs13: int, gs2: int, kernel=None):
    """Int8 experts (codes, scales, offsets of w13 [E, 2I, H] and w2 [E, H, I]) -> what the
    methods keep in FusedMoE._prepared: ops.MoEInt8Weights for the CPU and CUDA kernels, or
    (kernel False; by default where no INT8 MoE kernel takes them: other devices, or CUDA with
    groups that are not whole 16-wide K steps) the experts dequantized once in the layer's dtype,
    as the dense weight-only int8 layers are."""
    if kernel is None:
        h, i = q13.shape[2], q2.shape[2]
        kernel = q13.device.type == "cpu" or ops.moe_int8_kernel_takes(
            q13.device, moe.w13_weight.dtype, h, i, ops_native.int4_groups(h, gs13)[0],
            ops_native.int4_groups(i, gs2)[0])
    if kernel:
        return ops.prepare_moe_int8_weights(q13, s13, o13, q2, s2, o2, gs13, gs2)
    dtype = moe.w13_weight.dtype
    return ops.prepare_moe_weights(ops_native.moe_int8_dequantize(q13, s13, o13, gs13).to(dtype),
                                   ops_native.moe_int8_dequantize(q2, s2, o2, gs2).to(dtype))


def apply_int8_experts(moe, hidden, topk_weights, topk_ids, native: bool = False):
    """FusedMoE forward on what prepare_int8_experts kept (native: the plain-PyTorch reference)."""
    p = moe._prepared
    if isinstance(p, ops.MoEInt8Weights):
        impl = ops_native if native else ops
        return impl.fused_moe_int8_prepared(hidden, p, topk_weights, topk_ids, moe.activation)
    if native:
        w13, w2 = (ops_native.unpack_moe_weights(p.w13, p.w2, p.hidden_size, p.inter_size)
                   if isinstance(p, ops.PackedMoEWeights) else p)
        return ops_native.fused_moe(hidden, w13, w2, topk_weights, topk_ids, moe.activation)
    return ops.fused_moe_prepared(hidden, p, topk_weights, topk_ids, moe.activation)


class GPTQ8MoEMethod(Int4MoEMethod):
    names = {"codes": "qweight", "scales": "scales", "zeros": "qzeros", "g_idx": "g_idx"}

    def __init__(self, config):
        if config.desc_act:
            raise ValueError("GPTQ 8-bit MoE experts with act order (desc_act: true) are not "
                             "supported: octavo's INT8 MoE kernel reads K in order; use a "
                             "checkpoint quantized with desc_act false, or 4 bits")
        super().__init__(config.group_size)
        self.v2 = config.v2

    def to_logical(self, role, loaded, rows, cols):
        from octavo.models.layers.quantization.int8 import unpack_cols8, unpack_rows8
        if role == "codes":                 # [K/4, N] -> [N, K]
            return unpack_rows8(loaded).t().to(torch.uint8)
        if role == "zeros":                 # [G, N/4] -> [N, G]; v1 stores z - 1
            z = unpack_cols8(loaded).t()
            return (z if self.v2 else (z + 1) & 255).to(torch.uint8)
        if role == "scales":                # [G, N] -> [N, G]
            return loaded.float().t()
        return loaded.to(torch.int32)       # g_idx

    def process_weights_after_loading(self, moe):
        """-> the packed experts (ops.MoEInt8Weights); they replace the loaded parameters."""
        h, i_all = moe.hidden_size, moe.intermediate_size
        gs13 = h if self.group_size == -1 else self.group_size
        gs2 = i_all if self.group_size == -1 else self.group_size
        g13 = moe.w13_g_idx.data
        g2 = moe.w2_g_idx.data
        if not (torch.equal(g13.long(), (torch.arange(h) // gs13).expand_as(g13))
                and torch.equal(g2.long(), (torch.arange(i_all) // gs2).expand_as(g2))):
            raise ValueError("GPTQ 8-bit MoE experts hold an act-order g_idx (columns out of "
                             "group order) although the config says desc_act: false; octavo's "
                             "INT8 MoE kernel reads K in order")
        q13, s13, z13, q2, s2, z2 = self.codes(moe)

        def codes(q):
            return (q.to(torch.int16) - 128).to(torch.int8)
        prepared = prepare_int8_experts(moe, codes(q13), s13, -(z13 - 128) * s13, codes(q2), s2,
                                        -(z2 - 128) * s2, self.group_size, self.group_size)
        for stack in ("w13", "w2"):
            for name in self.names.values():
                p = getattr(moe, f"{stack}_{name}")
                p.data = p.data.new_empty(0)
        return prepared

    @staticmethod
    def apply(moe, hidden, topk_weights, topk_ids):
        return apply_int8_experts(moe, hidden, topk_weights, topk_ids)

    @staticmethod
    def apply_native(moe, hidden, topk_weights, topk_ids):
        return apply_int8_experts(moe, hidden, topk_weights, topk_ids, native=True)
