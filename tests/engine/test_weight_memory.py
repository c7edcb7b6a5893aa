"""Model weights on huge-page mappings (engine/weight_memory.py): while a CPU model is built,
large `torch.empty` tensors come from anonymous mappings advised MADV_HUGEPAGE; everything else
is untouched, the values a model computes do not change, and the mappings go away with the
tensors."""
from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

from octavo import LLM, SamplingParams, ops, ops_native, weight_memory
from octavo.models.layers import cpu_gemm
from tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not weight_memory.enabled(),
                                reason="huge-page weights are a Linux feature (mmap.MADV_HUGEPAGE)")


def vma_of(addr: int) -> dict | None:
    """The /proc/self/smaps entry holding addr: its range and VmFlags, or None if unmapped."""
    vma = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                vma = {"lo": lo, "hi": hi} if lo <= addr < hi else None
            elif vma is not None and head[0] == "Rss:":
                vma["rss"] = int(head[1]) << 10
            elif vma is not None and head[0] == "VmFlags:":
                vma["flags"] = head[1:]
                return vma
    return None


def advised_huge(t: torch.Tensor) -> bool:
    vma = vma_of(t.data_ptr())
    return vma is not None and "hg" in vma.get("flags", [])


def test_large_empty_tensors_come_from_huge_page_mappings():
    big = (1024, 768)                                    # 1.5 MiB in bf16
    with weight_memory.HugePageWeights() as mode:
        a = torch.empty(big, dtype=torch.bfloat16)
        b = torch.empty(*big, dtype=torch.float32, requires_grad=True)
        c = torch.empty(torch.Size([640, 1024]), dtype=torch.bfloat16, device="cpu")
        small = torch.empty(64, 64)
        zeros = torch.zeros(big, dtype=torch.bfloat16)    # only `empty` is taken over
        strided = torch.empty(2, 512, 512, 4, memory_format=torch.channels_last)
    assert mode.bytes == a.nbytes + b.nbytes + c.nbytes
    for t, shape, dtype in ((a, big, torch.bfloat16), (b, big, torch.float32), (c, (640, 1024), torch.bfloat16)):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % 4096 == 0 and advised_huge(t)
        assert t.untyped_storage().nbytes() == t.nbytes   # alone in its storage: packable in place
    assert b.requires_grad and not a.requires_grad
    assert not advised_huge(small) and not advised_huge(zeros) and not advised_huge(strided)
    assert torch.count_nonzero(zeros) == 0
    assert strided.is_contiguous(memory_format=torch.channels_last)
    # the tensors do not overlap and hold what is written into them
    a.fill_(1.5)
    b.data.fill_(-2.0)
    c.copy_(torch.arange(640 * 1024, dtype=torch.float32).view(640, 1024))
    assert torch.all(a == 1.5) and torch.all(b == -2.0)
    assert torch.equal(c, torch.arange(640 * 1024, dtype=torch.float32).view(640, 1024).bfloat16())


def test_mappings_are_released_with_their_tensors():
    with weight_memory.HugePageWeights():
        t = torch.empty(4 << 20, dtype=torch.uint8)
        u = torch.empty(4 << 20, dtype=torch.uint8)
    addr = t.data_ptr()
    t.fill_(7)
    del t
    gc.collect()
    assert vma_of(addr) is not None                      # u still uses the mapping
    del u
    gc.collect()
    vma = vma_of(addr)
    assert vma is None or "hg" not in vma.get("flags", [])


def test_a_tensor_freed_before_its_neighbours_gives_its_pages_back():
    """A checkpoint weight repacked into another tensor after loading is dropped while the rest
    of its chunk lives on: its memory must not stay resident."""
    with weight_memory.HugePageWeights():
        keep = torch.empty(6 << 20, dtype=torch.uint8)
        drop = torch.empty(16 << 20, dtype=torch.uint8)
    keep.fill_(1)
    drop.fill_(2)
    before = vma_of(keep.data_ptr())["rss"]
    assert before >= (22 << 20)
    del drop
    gc.collect()
    after = vma_of(keep.data_ptr())["rss"]
    assert after <= before - (14 << 20), (before, after)
    assert int(keep.sum()) == 6 << 20                   # the neighbour's bytes are untouched


def test_a_weight_larger_than_a_chunk_gets_a_mapping_of_its_own(monkeypatch):
    monkeypatch.setattr(weight_memory, "_CHUNK", 4 << 20)
    with weight_memory.HugePageWeights():
        first = torch.empty(3 << 20, dtype=torch.uint8)
        large = torch.empty(9 << 20, dtype=torch.uint8)   # more than a chunk
        after = torch.empty(3 << 20, dtype=torch.uint8)   # does not fit beside `first`
    for t in (first, large, after):
        assert advised_huge(t)
        t.fill_(3)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in (first, large, after))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert int(first.sum()) == int(after.sum()) == 3 * (3 << 20)


@pytest.mark.parametrize("n,k", [(1000, 2048), (2048, 1031)])
def test_panels_packed_out_of_place_land_on_a_huge_page_mapping(n, k):
    """N not a multiple of 64 or K odd: the panels cannot overwrite the weight, so they get a
    mapping of their own (the bytes those of the plain-PyTorch packing)."""
    w = torch.randn(n, k).bfloat16()
    packed = ops.pack_linear_panels(w, in_place=True)
    assert torch.equal(packed, ops_native.pack_linear_panels(w))
    if not ops.USING_NATIVE:
        assert advised_huge(packed) and packed.untyped_storage().nbytes() == packed.nbytes
    small = ops.pack_linear_panels(torch.randn(100, 64).bfloat16())
    assert not advised_huge(small)


def test_int4_panels_land_on_a_huge_page_mapping():
    n, k, g = 4096, 1024, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s, o = torch.rand(n, k // g) + 0.5, torch.randn(n, k // g)
    packed, so = ops.pack_int4_panels(q, s, o, g)
    ref_packed, ref_so = ops_native.pack_int4_panels(q, s, o, g)
    assert torch.equal(packed, ref_packed) and torch.equal(so, ref_so)
    if not ops.USING_NATIVE:
        assert advised_huge(packed)                       # 2 MiB of codes: one huge page at least


def test_tails_keep_small_pages():
    """The part of a mapping past its last whole 2 MiB is not advised: a weight of 2 MiB + 4 KiB
    never costs two huge pages."""
    t = weight_memory.empty(((2 << 20) + 4096,), torch.uint8)
    head, tail = vma_of(t.data_ptr()), vma_of(t.data_ptr() + t.nbytes - 1)
    assert "hg" in head["flags"] and "hg" not in tail["flags"]
    assert head["hi"] - t.data_ptr() == 2 << 20


def test_other_devices_and_meta_tensors_pass_through():
    with weight_memory.HugePageWeights() as mode:
        m = torch.empty(4 << 20, dtype=torch.uint8, device="meta")
    assert m.device.type == "meta" and mode.bytes == 0


def test_a_model_built_on_huge_pages_generates_the_same_tokens(tmp_path, monkeypatch):
    """Every weight of a tiny Llama on huge-page mappings (the size threshold lowered to 0) gives
    the same greedy tokens as the model on malloc's memory, and its bf16 linear weights are
    packed into octavo's panels in place, on those mappings."""
    path = build_tiny_model(str(tmp_path / "llama"), "LlamaForCausalLM", vocab_size=512)
    prompts = [{"prompt_token_ids": [1, 5, 9, 33, 71, 2, 8]}, {"prompt_token_ids": [1, 40, 41, 42]}]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    kw = dict(dtype="bfloat16", kv_cache_memory=1 << 24, max_model_len=64)

    monkeypatch.setenv("OCTAVO_HUGE_PAGE_WEIGHTS", "0")
    plain = LLM(path, **kw)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    plain_params = list(plain.llm_engine.runner.model.parameters())
    assert not any(advised_huge(p) for p in plain_params)
    del plain, plain_params
    gc.collect()

    monkeypatch.setenv("OCTAVO_HUGE_PAGE_WEIGHTS", "1")
    monkeypatch.setattr(weight_memory, "MIN_BYTES", 0)
    huge = LLM(path, **kw)
    model = huge.llm_engine.runner.model
    embed = model.model.embed_tokens.weight
    assert advised_huge(embed)
    panels = [m.packed_weight.data for m in model.modules()
              if isinstance(getattr(m, "packed_weight", None), cpu_gemm.PanelWeight)]
    if not panels:
        print("no packed bf16 panels here (octavo's CPU GEMM is not in use): checked the embedding only")
    assert all(advised_huge(p) for p in panels)
    got = [o.outputs[0].token_ids for o in huge.generate(prompts, sp, use_tqdm=False)]
    assert got == expected


def test_refused_mappings_fall_back_to_malloc(monkeypatch):
    """A kernel without THP (madvise: EINVAL) keeps the mapping on plain pages; a mapping refused
    outright (strict overcommit) gives torch's own allocation: the model builds either way."""
    def no_thp(self, *args):
        raise OSError(22, "Invalid argument")
    real = mmap.mmap

    class NoTHP(real):
        madvise = no_thp
    monkeypatch.setattr(weight_memory.mmap, "mmap", NoTHP)
    with weight_memory.HugePageWeights() as mode:
        plain = torch.empty(4 << 20, dtype=torch.uint8)
    assert mode.bytes == 4 << 20 and not advised_huge(plain)
    plain.fill_(5)
    assert int(plain.sum()) == 5 * (4 << 20)

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(weight_memory.mmap, "mmap", refused)
    with weight_memory.HugePageWeights() as mode:
        a = torch.empty(4 << 20, dtype=torch.uint8)
    b = weight_memory.empty((4 << 20,), torch.uint8)
    assert mode.bytes == 0 and a.shape == b.shape == (4 << 20,)
    assert not advised_huge(a) and not advised_huge(b)


def test_off_switch(monkeypatch):
    monkeypatch.setenv("OCTAVO_HUGE_PAGE_WEIGHTS", "0")
    assert not weight_memory.enabled()
    monkeypatch.setenv("OCTAVO_HUGE_PAGE_WEIGHTS", "1")
    assert weight_memory.enabled()
