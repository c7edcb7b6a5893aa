"""4-bit FusedMoE experts on the INT4 MoE kernel (ops.fused_moe_int4_prepared): GPTQ, AWQ and
compressed-tensors pack-quantized checkpoints (one tensor per expert and projection, converted
to the logical layout by the dense methods' own unpackers) and quantization="int4" (round to
nearest, group 128, of float experts at load).

Parameters, stacked over experts in the logical layout of the dense INT4 methods: codes uint8
w13 [E, 2I/tp, H] (gate rows, then up rows) and w2 [E, H, I/tp], scales float32 [E, N, G] and
zero points uint8 [E, N, G] (8 where the format is symmetric), named `w13_<checkpoint name>` /
`w2_<...>` so that FusedMoE's routing of `experts.<e>.<proj>.<name>` finds them. Each rank keeps
its slice of I, as for float experts: rows of gate / up, columns (and their groups) of down.

Act order (GPTQ desc_act, compressed-tensors actorder "group"): g_idx int32 w13 [E, 2, H] (gate's,
up's) and w2 [E, I]. w2's act order becomes the order of the intermediate (gate and up rows sorted
with it), so every group of w2 is contiguous; w13's is the kernel's per-expert input permutation.
On tensor parallel ranks a rank's share of I is then a run of whole groups in that order, which
only w2's g_idx tells: every rank loads all of I and keeps its share after loading.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from octavo import ops, ops_native
from octavo.models.layers.quantization.int4 import quantize_rtn

ROLES = ("codes", "scales", "zeros", "g_idx", "shape")


class Int4MoEMethod:
    """Subclasses name the checkpoint's tensors (`names`: role -> name) and convert one of them
    to the logical layout (`to_logical`); this class creates, loads, packs and runs them."""

    names: dict[str, str] = {}
    symmetric = False          # zero points implied (8) when the checkpoint has none
    act_order = False          # the config declares act order (g_idx that is not k // group_size)

    def __init__(self, group_size: int):
        self.group_size = group_size
        self.full_inter = False    # every rank holds all of I until after loading (act order, TP)

    def to_logical(self, role: str, loaded: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One projection's checkpoint tensor -> codes [rows, cols] uint8, scales [rows, G]
        float32, zeros [rows, G] uint8 or g_idx [cols] int32 (rows x cols: its full weight)."""
        raise NotImplementedError

    def _groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else -(-k // self.group_size)

    def create_weights(self, moe) -> None:
        e, i, h = moe.num_experts, moe.local_size, moe.hidden_size
        if moe.tp_size > 1 and self.group_size != -1 and i % self.group_size:
            raise ValueError(f"the experts' intermediate shard of {i} columns is not a whole number "
                             f"of 4-bit groups of {self.group_size}: use fewer tensor parallel ranks")
        self.full_inter = self.act_order and moe.tp_size > 1 and "g_idx" in self.names
        i = moe.intermediate_size if self.full_inter else i
        for stack in ("w13", "w2"):     # the float stacks are not loaded: the codes replace them
            empty = nn.Parameter(torch.empty(0, dtype=getattr(moe, f"{stack}_weight").dtype),
                                 requires_grad=False)
            empty.optional = True
            setattr(moe, f"{stack}_weight", empty)
        for stack, (n, k) in (("w13", (2 * i, h)), ("w2", (h, i))):
            shapes = {"codes": ((e, n, k), torch.uint8), "scales": ((e, n, self._groups(k)), torch.float32),
                      "zeros": ((e, n, self._groups(k)), torch.uint8),
                      # gate's and up's [E, 2, H]; down's over all of I on every rank
                      "g_idx": ((e, 2, h) if stack == "w13" else (e, moe.intermediate_size), torch.int32),
                      "shape": ((1,), torch.int64)}
            for role, name in self.names.items():
                shape, dtype = shapes[role]
                p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                p.weight_loader = self._loader(moe, role)
                p.optional = role in ("g_idx", "shape") or (role == "zeros" and self.symmetric)
                if role == "zeros":
                    p.data.fill_(8)
                if role == "g_idx":     # absent from the checkpoint: the plain order
                    k_all = shape[-1]
                    gs = k_all if self.group_size == -1 else self.group_size
                    p.data.copy_((torch.arange(k_all, dtype=torch.int32) // gs).expand(shape))
                setattr(moe, f"{stack}_{name}", p)

    def _loader(self, moe, role: str):
        def load(param, loaded, shard_id):
            expert, kind = shard_id if isinstance(shard_id, tuple) else (None, shard_id)
            if expert is None or kind not in ("w1", "w3", "w2"):
                raise ValueError("4-bit expert tensors are read one expert and projection at a time "
                                 f"(experts.<e>.<proj>.{self.names[role]}), got shard {shard_id!r}")
            if not 0 <= expert < moe.num_experts:
                raise ValueError(f"expert {expert} is out of range for {moe.num_experts} experts")
            if role == "shape":
                return                  # implied by the layer
            i_full, h = moe.intermediate_size, moe.hidden_size
            i, rank = (i_full, 0) if self.full_inter else (moe.local_size, moe.tp_rank)
            rows, cols = (h, i_full) if kind == "w2" else (i_full, h)
            logical = self.to_logical(role, loaded, rows, cols)
            if role == "g_idx":
                if tuple(logical.shape) != (cols,):
                    raise ValueError(f"expert {kind} {self.names[role]} holds {list(logical.shape)} "
                                     f"values; expected [{cols}]")
                dst = param.data[expert] if kind == "w2" else param.data[expert, int(kind == "w3")]
                dst.copy_(logical)
                return
            want = (rows, cols) if role == "codes" else (rows, self._groups(cols))
            if tuple(logical.shape) != want:
                raise ValueError(f"expert {kind} {self.names[role]} holds a {list(logical.shape)} "
                                 f"tensor once unpacked; expected {list(want)}")
            if kind == "w2":            # this rank's columns of I (its groups; all for per-channel)
                cut = i if role == "codes" else param.shape[2]
                src = logical if logical.shape[1] == cut else logical.narrow(1, rank * cut, cut)
                dst = param.data[expert]
            else:
                src = logical.narrow(0, rank * i, i)
                dst = param.data[expert].narrow(0, 0 if kind == "w1" else i, i)
            dst.copy_(src)
            if role == "codes":
                moe._loaded.add((expert, kind))
        return load

    def codes(self, moe):
        """-> (w13 codes, scales, zeros, w2 codes, scales, zeros), as ops.prepare_moe_int4_weights
        takes them."""
        def get(stack, role):
            return getattr(moe, f"{stack}_{self.names[role]}").data
        return (get("w13", "codes"), get("w13", "scales"), get("w13", "zeros").float(),
                get("w2", "codes"), get("w2", "scales"), get("w2", "zeros").float())

    def g_idx(self, moe) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (w13 g_idx [E, H], w2 g_idx [E, I of the whole layer]) as loaded, or (None, None)
        for formats without one. Gate and up share their input, so GPTQ gives them one act order;
        octavo's kernel needs that."""
        if "g_idx" not in self.names:
            return None, None
        g13 = getattr(moe, f"w13_{self.names['g_idx']}").data
        g2 = getattr(moe, f"w2_{self.names['g_idx']}").data
        differ = (g13[:, 0] != g13[:, 1]).any(1).nonzero().flatten().tolist()
        if differ:
            raise ValueError(f"expert {differ[0]}'s gate and up projections have different g_idx; "
                             "octavo's INT4 MoE kernel needs them equal (as GPTQ writes them: the "
                             "two share their input)")
        return g13[:, 0], g2

    def _inter_share(self, moe, w13, w2, g2):
        """w2's act order (g2 [E, I]) -> this rank's experts ((codes, scales, zeros) of w13 and
        of w2) with its share of I sorted by group: gate and up rows and down columns alike."""
        e, i_all = g2.shape
        order = ops_native.moe_int4_act_order(g2, e, i_all, self.group_size, "w2")
        if order is None and not self.full_inter:
            return w13, w2
        if order is None:
            order = torch.arange(i_all).expand(e, i_all)
        if moe.tp_size > 1 and not self.full_inter:
            raise ValueError("the experts' down projections have act-order g_idx but the "
                             "quantization config does not declare act order (desc_act / actorder): "
                             "octavo reads that to shard them over tensor parallel ranks; fix the "
                             "config or use tensor_parallel_size=1")
        i = moe.local_size if self.full_inter else i_all
        rank = moe.tp_rank if self.full_inter else 0
        share = order[:, rank * i:(rank + 1) * i].to(g2.device)              # [E, i]
        rows = torch.cat((share, share + i_all), 1)                          # gate, then up rows

        def take_rows(t):
            return None if t is None else t.gather(1, rows[..., None].expand(-1, -1, t.shape[2]))
        q2, s2, z2 = w2
        q2 = q2.gather(2, share[:, None, :].expand(-1, q2.shape[1], -1))
        if s2.shape[2] > 1:     # the share's groups (whole ones: create_weights checked)
            g0, n = rank * i // self.group_size, -(-i // self.group_size)
            s2, z2 = s2[:, :, g0:g0 + n], None if z2 is None else z2[:, :, g0:g0 + n]
        return tuple(take_rows(t) for t in w13), (q2, s2, z2)

    def process_weights_after_loading(self, moe):
        """-> the packed experts; the packed copy replaces the checkpoint's parameters."""
        q13, s13, z13, q2, s2, z2 = self.codes(moe)
        g13, g2 = self.g_idx(moe)
        if g2 is not None:
            (q13, s13, z13), (q2, s2, z2) = self._inter_share(moe, (q13, s13, z13), (q2, s2, z2), g2)
        prepared = ops.prepare_moe_int4_weights(q13, s13, z13, q2, s2, z2, self.group_size,
                                                w13_g_idx=g13)
        for stack in ("w13", "w2"):
            for name in self.names.values():
                p = getattr(moe, f"{stack}_{name}")
                p.data = p.data.new_empty(0)
        return prepared

    @staticmethod
    def apply(moe, hidden, topk_weights, topk_ids):
        return ops.fused_moe_int4_prepared(hidden, moe._prepared, topk_weights, topk_ids,
                                           moe.activation)

    @staticmethod
    def apply_native(moe, hidden, topk_weights, topk_ids):
        return ops_native.fused_moe_int4_prepared(hidden, moe._prepared, topk_weights, topk_ids,
                                                  moe.activation)


class _DenseConverted(Int4MoEMethod):
    """GPTQ / AWQ: the dense method's to_logical(param with .kind, tensor) converts each tensor."""

    names = {"codes": "qweight", "scales": "scales", "zeros": "qzeros", "g_idx": "g_idx"}

    def __init__(self, config, dense_method):
        super().__init__(config.group_size)
        self.dense = dense_method
        self.act_order = bool(config.desc_act)
        self.names = {r: n for r, n in self.names.items() if n != "g_idx" or config.name == "gptq"}

    def to_logical(self, role, loaded, rows, cols):
        out = self.dense.to_logical(SimpleNamespace(kind=self.names[role]), loaded)
        return out.float() if role == "scales" else out


def gptq_moe_method(config) -> Int4MoEMethod:
    from octavo.models.layers.quantization.gptq_awq import GPTQLinearMethod
    return _DenseConverted(config, GPTQLinearMethod(config))


def awq_moe_method(config) -> Int4MoEMethod:
    from octavo.models.layers.quantization.gptq_awq import AWQLinearMethod
    return _DenseConverted(config, AWQLinearMethod(config))


class CTW4A16MoEMethod(Int4MoEMethod):
    """compressed-tensors pack-quantized 4-bit experts: weight_packed int32 [N, K/8] along K,
    weight_scale [N, G], weight_zero_point [N/8, G] packed along N (asymmetric only)."""

    names = {"codes": "weight_packed", "scales": "weight_scale", "zeros": "weight_zero_point",
             "g_idx": "weight_g_idx", "shape": "weight_shape"}

    def __init__(self, scheme: dict):
        w = scheme["weights"]
        strategy = w.get("strategy", "channel")
        super().__init__(int(w["group_size"]) if strategy == "group" else -1)
        self.symmetric = bool(w.get("symmetric", True))
        self.act_order = w.get("actorder") not in (None, False, "static") and strategy == "group"

    def to_logical(self, role, loaded, rows, cols):
        from octavo.models.layers.quantization.compressed_tensors import unpack_int32
        if role == "codes":
            return unpack_int32(loaded, 4, 1, cols).to(torch.uint8)
        if role == "zeros":
            if loaded.dtype == torch.int32 and loaded.shape[0] < rows:     # packed along N
                z = unpack_int32(loaded, 4, 0, rows)
            else:                                                          # signed, unpacked
                z = loaded.to(torch.int32) + 8
            return z.reshape(rows, -1).to(torch.uint8)
        if role == "scales":
            return loaded.float().reshape(loaded.shape[0], -1)
        return loaded.to(torch.int32)


class Int4RTNMoEMethod(Int4MoEMethod):
    """quantization="int4": float experts load as usual and are quantized (round to nearest,
    asymmetric, groups of group_size along K) once after loading."""

    names = {}

    def create_weights(self, moe) -> None:
        pass                            # FusedMoE's own float parameters load the checkpoint

    def codes(self, moe):
        out = []
        for w in (moe.w13_weight.data, moe.w2_weight.data):
            e, n, k = w.shape
            q, s, z = quantize_rtn(w.reshape(e * n, k), self.group_size)
            out += [q.view(e, n, k), s.view(e, n, -1), z.view(e, n, -1)]
        return tuple(out)

    def process_weights_after_loading(self, moe):
        prepared = super().process_weights_after_loading(moe)
        moe.w13_weight.data = moe.w13_weight.data.new_empty(0)   # the packed codes replace them
        moe.w2_weight.data = moe.w2_weight.data.new_empty(0)
        return prepared
