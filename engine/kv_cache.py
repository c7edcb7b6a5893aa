"""Paged KV-cache bookkeeping: a block pool with reference counts, prefix caching and LRU reuse.

Blocks hold `block_size` tokens. A full block is identified by the hash chain of its tokens
(parent block's hash + its own tokens), so two requests with the same prefix share blocks.
Freed blocks keep their hash and go to the back of the free queue; allocation takes from the
front, so the least recently freed cached block is the first to be reused (and forgotten).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from .request import Request


class Block:
    __slots__ = ("block_id", "ref_cnt", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.hash: Hashable | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[Hashable, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), "caller must check num_free first"
        ids = []
        for _ in range(n):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:                      # reuse evicts the cached content
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free[block_id]
            block.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free[block_id] = None


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._num_registered: dict[str, int] = {}          # request id -> full blocks hashed in pool
        self.prefix_queries = 0                             # tokens looked up in the prefix cache
        self.prefix_hits = 0                                # of which were found

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.num_blocks

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        tokens = req.all_token_ids
        for i in range(len(req.block_hashes), len(tokens) // bs):
            parent = hash(req.block_hashes[-1]) if req.block_hashes else None
            req.block_hashes.append((parent, tuple(tokens[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks already holding this request's leading tokens (at least one token is left to
        compute, since the last token's logits are needed)."""
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return []
        self._update_hashes(req)
        limit = (req.num_tokens - 1) // self.block_size
        hit = []
        for key in req.block_hashes[:limit]:
            block_id = self.pool.cached.get(key)
            if block_id is None:
                break
            hit.append(block_id)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hit) * self.block_size
        return hit

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give `req` blocks for its next `num_new_tokens` tokens (after `cached_blocks`, which
        become its first blocks). Returns False, changing nothing, if the pool is too small."""
        bs = self.block_size
        have = len(req.block_ids) + len(cached_blocks)
        total_tokens = req.num_computed_tokens + len(cached_blocks) * bs + num_new_tokens
        need = max(0, -(-total_tokens // bs) - have)
        idle_hits = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_cnt == 0)
        if need > self.pool.num_free - idle_hits:
            return False
        self.pool.touch(list(cached_blocks))
        req.block_ids.extend(cached_blocks)
        req.block_ids.extend(self.pool.allocate(need))
        if cached_blocks:                       # those are published already
            self._num_registered[req.request_id] = len(cached_blocks)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Publish the request's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(req)
        start = self._num_registered.get(req.request_id, 0)
        end = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for i in range(start, end):
            key, block = req.block_hashes[i], self.pool.blocks[req.block_ids[i]]
            if block.hash is None and key not in self.pool.cached:
                block.hash = key
                self.pool.cached[key] = block.block_id
        self._num_registered[req.request_id] = max(start, end)

    def free(self, req: Request) -> None:
        # tail blocks first, so that a prompt's shared head stays cached the longest
        self.pool.release(list(reversed(req.block_ids)))
        req.block_ids = []
        self._num_registered.pop(req.request_id, None)

    def reset_prefix_cache(self) -> bool:
        if self.pool.num_free != self.num_blocks:
            return False
        for block in self.pool.blocks:
            block.hash = None
        self.pool.cached.clear()
        return True
