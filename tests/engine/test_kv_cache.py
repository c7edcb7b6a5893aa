"""KV-cache manager: exact block ids, reference counts, prefix hits and LRU eviction order."""
from octavo.kv_cache import KVCacheManager
from octavo.request import Request
from octavo.sampling_params import SamplingParams


def make_req(rid, tokens, **kw):
    return Request(rid, tokens, SamplingParams(max_tokens=8, **kw))


def compute(kv, req, n, cached=()):
    """What the scheduler does for one step of `n` new tokens."""
    assert kv.allocate(req, n, list(cached))
    req.num_computed_tokens += len(cached) * kv.block_size + n
    kv.cache_full_blocks(req)


def test_allocation_takes_blocks_in_order_and_counts_refs():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(10)))                     # 10 tokens -> 3 blocks
    compute(kv, a, 10)
    assert a.block_ids == [0, 1, 2]
    assert [kv.pool.blocks[i].ref_cnt for i in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert kv.pool.num_free == 5
    a.append_token(99)
    a.append_token(98)                                     # 12 tokens: still 3 blocks
    compute(kv, a, 2)
    assert a.block_ids == [0, 1, 2]
    a.append_token(97)                                     # 13th token needs block 3
    compute(kv, a, 1)
    assert a.block_ids == [0, 1, 2, 3]
    assert kv.usage == 0.5


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(10)))
    compute(kv, a, 10)                                     # full blocks 0, 1 are published
    b = make_req("b", list(range(8)) + [50, 51, 52])
    hit = kv.find_cached_prefix(b)
    assert hit == [0, 1]
    compute(kv, b, 3, hit)
    assert b.block_ids == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # a prompt that is exactly two cached blocks: the last block is recomputed
    c = make_req("c", list(range(8)))
    assert kv.find_cached_prefix(c) == [0]
    # a different first token shares nothing, even with the same later tokens
    d = make_req("d", [7] + list(range(1, 10)))
    assert kv.find_cached_prefix(d) == []


def test_freed_blocks_stay_cached_and_are_evicted_in_lru_order():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = make_req("a", [1, 2, 3, 4, 5])                     # blocks 0, 1 full; 2 partial
    compute(kv, a, 5)
    b = make_req("b", [9, 8, 7, 6, 5])                     # blocks 3, 4 full; 5 partial
    compute(kv, b, 5)
    kv.free(a)                                             # freed tail first: 2, 1, 0
    kv.free(b)                                             # then 5, 4, 3
    # the partial blocks (nothing cached) first, the most recently freed first; then the cached
    # ones, least recently freed first
    assert kv.pool.free_order() == [5, 2, 1, 0, 4, 3]
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    # a's prefix is still a hit after it finished
    a2 = make_req("a2", [1, 2, 3, 4, 0, 0])
    hit = kv.find_cached_prefix(a2)
    assert hit == [0, 1]
    compute(kv, a2, 2, hit)
    assert a2.block_ids == [0, 1, 5]                       # block 5 (never published) reused first
    assert kv.pool.free_order() == [2, 4, 3]
    # the next allocation takes 2 (partial, uncached), then evicts 4 (cached: b's second block)
    c = make_req("c", [0] * 4)
    compute(kv, c, 4)
    assert c.block_ids == [2, 4]
    b2 = make_req("b2", [9, 8, 7, 6, 1])
    assert kv.find_cached_prefix(b2) == [3]                # b's second block was overwritten


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_req("a", list(range(8)))
    compute(kv, a, 8)
    b = make_req("b", list(range(100, 109)))
    assert not kv.allocate(b, 9)
    assert b.block_ids == [] and kv.pool.num_free == 1
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [1, 1, 0]


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_req("a", list(range(10)))
    compute(kv, a, 10)
    kv.free(a)
    assert kv.find_cached_prefix(make_req("b", list(range(10)))) == []
    assert kv.pool.cached == {}


def test_freed_uncached_blocks_are_reused_before_untouched_ones():
    # prefix caching off: a finished request's blocks serve the next one, most recently freed
    # first, and the never-written blocks stay untouched (no page faults on the CPU)
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_req("a", list(range(10)))
    compute(kv, a, 10)
    assert a.block_ids == [0, 1, 2]
    kv.free(a)
    b = make_req("b", list(range(20, 28)))
    compute(kv, b, 8)
    assert b.block_ids == [0, 1]                           # a's first blocks, freed last
    c = make_req("c", list(range(30, 42)))
    compute(kv, c, 12)
    assert c.block_ids == [2, 3, 4]                        # then a's third, then untouched ones
    # prefix caching on: cached blocks are kept as long as never-used blocks are left
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = make_req("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    kv.free(a)
    b = make_req("b", [9, 9, 9, 9])
    compute(kv, b, 4)
    assert b.block_ids == [2, 3]                           # a's partial block, then untouched
    assert kv.find_cached_prefix(make_req("a2", [1, 2, 3, 4, 0])) == [0, 1]
    kv.free(b)
    assert kv.reset_prefix_cache()                         # forgotten: all used blocks warm
    assert set(kv.pool.free_order()[:4]) == {0, 1, 2, 3} and kv.pool.free_order()[4:] == [4, 5]
    assert kv.find_cached_prefix(make_req("a3", [1, 2, 3, 4, 0])) == []
