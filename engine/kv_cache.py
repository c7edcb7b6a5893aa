"""Paged KV-cache bookkeeping: a block pool with reference counts, prefix caching and LRU reuse.

Blocks hold `block_size` tokens. A full block is identified by the hash chain of its tokens
(parent block's hash + its own tokens), so two requests with the same prefix share blocks.
Freed blocks keep their hash and go to the back of the free queue; allocation takes from the
front, so the least recently freed cached block is the first to be reused (and forgotten).
Freed blocks with nothing cached in them (prefix caching off, a request's partial last block)
are reused first, the most recently freed one first: on the CPU a block that was never written
costs page faults (first-touch writes ran at a quarter of the copy bandwidth on the team's
machines), and a recent one is still in cache. Never-used blocks come next, then the cached
ones, least recently freed first, as before.

Models with a fixed per-request state (Mamba) also need one state slot per running request:
`allocate` hands one out with a request's first blocks and refuses admission when none is free,
so the scheduler has one admission rule for both kinds; `free` returns it.

State snapshots: a finished request's slot is kept, keyed by the exact tokens its state
covers, until a new request needs the slot (least recently used first). A request whose prompt
extends those tokens starts from a copy of that state instead of token 0 (beam search steps,
n > 1 siblings). Hybrid models (attention layers too) also need the K/V of those tokens: the
snapshot names the blocks that held them, without keeping a reference; each block carries a
generation that allocation bumps, so a snapshot whose blocks were reused is simply invalid.
A restoring request shares the full blocks and gets a copy of the partial last one. The copies
are device work: they queue in `state_copies` / `block_copies` and run at the start of the next
step, before its forward.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from .request import Request


class Block:
    __slots__ = ("block_id", "ref_cnt", "hash", "gen")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.hash: Hashable | None = None
        self.gen = 0                 # times allocated: a state snapshot's blocks are still its own

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        # never-used blocks, then freed cached ones (LRU at the front)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # freed blocks holding nothing cached; allocation takes the most recently freed
        self.free_warm: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[Hashable, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.free_warm)

    def free_order(self) -> list[int]:
        """The free blocks in the order allocation takes them."""
        return list(reversed(self.free_warm)) + list(self.free)

    def allocate(self, n: int) -> list[int]:
        assert n <= self.num_free, "caller must check num_free first"
        ids = []
        for _ in range(n):
            if self.free_warm:
                block_id, _ = self.free_warm.popitem(last=True)
            else:
                block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:                      # reuse evicts the cached content
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_cnt = 1
            block.gen += 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                (self.free if block_id in self.free else self.free_warm).pop(block_id)
            block.ref_cnt += 1

    def release(self, block_ids: list[int], reuse_first: bool = True) -> None:
        """reuse_first=False: the blocks' content is still wanted (a state snapshot names them),
        so they wait in the queue like cached blocks even when they hold no hash."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.hash is None and reuse_first:
                    self.free_warm[block_id] = None
                else:
                    self.free[block_id] = None

    def forget_cached(self) -> None:
        """Every block's cached content is dropped (all blocks free): the used ones become
        warm free blocks, in their LRU order."""
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        used = [b for b in self.free if self.blocks[b].gen > 0]
        for block_id in used:
            del self.free[block_id]
            self.free_warm[block_id] = None
            self.free_warm.move_to_end(block_id, last=False)


def split_cache_budget(budget: int, bytes_per_block: int, bytes_per_slot: int, max_num_seqs: int,
                       blocks_per_seq: int) -> tuple[int, int]:
    """(num_blocks, num_slots) for a cache budget in bytes shared by paged layers and state
    layers. Every running request holds exactly one slot, so more than max_num_seqs slots are
    never used: slots come first, as many as the scheduler can run at once, as long as the
    blocks of one max_model_len request still fit; the blocks take the rest. Without paged
    layers (pure Mamba) there are no blocks. Raises ValueError when not even one request fits."""
    if bytes_per_slot <= 0:
        return (budget // bytes_per_block if bytes_per_block else 0), 0
    reserve = bytes_per_block * blocks_per_seq
    num_slots = min(max_num_seqs, max(0, budget - reserve) // bytes_per_slot)
    if num_slots < 1:
        raise ValueError(
            f"the cache budget of {budget} bytes does not hold one request: its state takes "
            f"{bytes_per_slot} bytes" + (f" and {blocks_per_seq} KV blocks of max_model_len take "
                                          f"{reserve}" if reserve else "")
            + f"; raise the cache budget to at least {bytes_per_slot + reserve}"
            + (" or lower max_model_len" if reserve else ""))
    num_blocks = (budget - num_slots * bytes_per_slot) // bytes_per_block if bytes_per_block else 0
    return num_blocks, num_slots


class StateSlotPool:
    """Free list of per-request state slots (a request keeps its slot until it finishes, is
    aborted or preempted), and the snapshots: slots nobody runs in whose state covers known
    tokens. A snapshot counts as free: `allocate` evicts the least recently used one when the
    free list is empty, so snapshots never hold back admission."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))   # pop() gives slot 0 first
        # slot -> (lora id, tokens its state covers, their blocks as (block id, generation)),
        # least recently used first
        self.snapshots: OrderedDict[int, tuple[Hashable, tuple[int, ...], tuple]] = OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self.free_slots) + len(self.snapshots)

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshots)

    def allocate(self, keep: int | None = None) -> int:
        """A free slot, else the least recently used snapshot's other than `keep`'s."""
        if self.free_slots:
            return self.free_slots.pop()
        for slot in self.snapshots:
            if slot != keep:
                del self.snapshots[slot]
                return slot
        raise AssertionError("caller must check num_free first")

    def release(self, slot: int) -> None:
        assert slot not in self.free_slots and slot not in self.snapshots, \
            f"double free of state slot {slot}"
        self.free_slots.append(slot)

    def keep(self, slot: int, lora: Hashable, tokens: tuple[int, ...], blocks: tuple = ()) -> None:
        """Make `slot` (no request's any more) a snapshot of the state after `tokens`."""
        assert slot not in self.free_slots and slot not in self.snapshots
        for old, v in self.snapshots.items():     # the same state twice: keep the newer one
            if v[:2] == (lora, tokens):            # (its K/V blocks, if any, are the fresher)
                self.drop(old)
                break
        self.snapshots[slot] = (lora, tokens, blocks)

    def take(self, slot: int) -> None:
        """The snapshot in `slot` becomes a request's slot (its state is used up in place)."""
        del self.snapshots[slot]

    def drop(self, slot: int) -> None:
        """Forget the snapshot in `slot` (its K/V blocks were reused)."""
        del self.snapshots[slot]
        self.free_slots.append(slot)

    def find(self, lora: Hashable, tokens: list[int]) -> tuple[int, int] | None:
        """(slot, length) of the longest snapshot whose tokens are a prefix of `tokens` and
        shorter than them (the last token is left to compute: its logits are needed)."""
        best = None
        for slot, (lo, toks, _) in self.snapshots.items():
            n = len(toks)
            if (lo == lora and 0 < n < len(tokens) and (best is None or n > best[1])
                    and toks[-1] == tokens[n - 1] and tuple(tokens[:n]) == toks):
                best = (slot, n)
        if best is not None:
            self.snapshots.move_to_end(best[0])
        return best


def _first_parent(req: Request):
    # the first block's key names the LoRA adapter: its K/V differ from the base model's
    lora = getattr(req, "lora_request", None)
    return None if lora is None else ("lora", lora.lora_int_id)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_state_slots: int = 0, state_snapshots: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        # slots of the per-request state layers; no blocks at all: a model without paged layers
        self.slots = StateSlotPool(num_state_slots) if num_state_slots else None
        self.paged = num_blocks > 0 or self.slots is None
        self.state_snapshots = state_snapshots and self.slots is not None
        self.state_copies: list[tuple[int, int]] = []       # (from slot, to slot), next step
        self.block_copies: list[tuple[int, int]] = []       # (from block, to block), next step
        self._num_registered: dict[str, int] = {}          # request id -> full blocks hashed in pool
        self.prefix_queries = 0                             # tokens looked up in the prefix cache
        self.prefix_hits = 0                                # of which were found

    @property
    def usage(self) -> float:
        if not self.paged:
            return 1.0 - self.slots.num_free / self.slots.num_slots
        return 1.0 - self.pool.num_free / self.num_blocks

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        tokens = req.all_token_ids
        for i in range(len(req.block_hashes), len(tokens) // bs):
            parent = hash(req.block_hashes[-1]) if req.block_hashes else _first_parent(req)
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

    def find_state_snapshot(self, req: Request) -> tuple[int, int] | None:
        """(slot, length) of the longest state snapshot of this request's leading tokens, at
        least one token short of them, whose K/V blocks (hybrids) are intact; None without."""
        if not self.state_snapshots or req.sampling_params.prompt_logprobs is not None:
            return None
        while True:
            found = self.slots.find(_first_parent(req), req.all_token_ids)
            if found is None or all(self.pool.blocks[b].gen == g
                                    for b, g in self.slots.snapshots[found[0]][2]):
                return found
            self.slots.drop(found[0])

    def _take_slot(self, req: Request, snapshot: int | None) -> None:
        """A slot for `req`: a copy of the snapshot's state, or the snapshot's slot itself when
        it is the only one left."""
        if snapshot is not None and self.slots.num_free == 1:
            self.slots.take(snapshot)
            req.state_slot = snapshot
            return
        req.state_slot = self.slots.allocate(keep=snapshot)
        if snapshot is not None:
            self.state_copies.append((snapshot, req.state_slot))

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = (),
                 snapshot: int | None = None) -> bool:
        """Give `req` blocks for its next `num_new_tokens` tokens (after `cached_blocks`, which
        become its first blocks). Returns False, changing nothing, if the pool is too small or
        no state slot is free. `snapshot`: a snapshot slot (from find_state_snapshot) whose
        state `req` starts from; its full K/V blocks become the request's first blocks and its
        partial last block is copied into the request's next one."""
        needs_slot = self.slots is not None and req.state_slot is None
        if needs_slot and self.slots.num_free == 0:
            return False
        if not self.paged:
            if needs_slot:
                self._take_slot(req, snapshot)
            return True
        bs = self.block_size
        partial = None
        if snapshot is not None:
            _, tokens, blocks = self.slots.snapshots[snapshot]
            cached_blocks = [b for b, _ in blocks[:len(tokens) // bs]]
            if len(tokens) % bs:
                partial = blocks[len(tokens) // bs][0]
                num_new_tokens += len(tokens) % bs
        have = len(req.block_ids) + len(cached_blocks)
        total_tokens = req.num_computed_tokens + len(cached_blocks) * bs + num_new_tokens
        need = max(0, -(-total_tokens // bs) - have)
        idle_hits = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_cnt == 0)
        # the partial block stays readable until the copy (it runs before the next forward)
        if need > self.pool.num_free - idle_hits:
            return False
        if needs_slot:
            self._take_slot(req, snapshot)
        self.pool.touch(list(cached_blocks))
        req.block_ids.extend(cached_blocks)
        req.block_ids.extend(self.pool.allocate(need))
        if partial is not None:
            self.block_copies.append((partial, req.block_ids[len(cached_blocks)]))
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

    def snapshot_state(self, req: Request) -> bool:
        """Copy the running request's state (covering its computed tokens) into a snapshot
        slot, before its next step changes it (n > 1: the siblings start from it). False when
        no slot is spare."""
        if not self.state_snapshots or self.slots.num_free == 0:
            return False
        slot = self.slots.allocate()
        self.state_copies.append((req.state_slot, slot))
        self._keep(slot, req)
        return True

    def _keep(self, slot: int, req: Request) -> None:
        n = req.num_computed_tokens
        blocks = tuple((b, self.pool.blocks[b].gen) for b in req.block_ids[:-(-n // self.block_size)])
        self.slots.keep(slot, _first_parent(req), tuple(req.all_token_ids[:n]), blocks)

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The state and block copies queued for the next step."""
        copies = self.state_copies, self.block_copies
        self.state_copies, self.block_copies = [], []
        return copies

    def free(self, req: Request, keep_state: bool = False) -> None:
        """Give back the request's blocks and state slot. keep_state: its state is final and
        covers exactly its computed tokens (it finished), so the slot becomes a snapshot (of
        the blocks too: they stay valid until they are allocated again)."""
        snapshot = False
        if req.state_slot is not None and keep_state and self.state_snapshots \
                and req.num_computed_tokens > 0:
            self._keep(req.state_slot, req)
            req.state_slot = None
            snapshot = True
        # tail blocks first, so that a prompt's shared head stays cached the longest
        self.pool.release(list(reversed(req.block_ids)), reuse_first=not snapshot)
        req.block_ids = []
        if req.state_slot is not None:
            self.slots.release(req.state_slot)
            req.state_slot = None
        self._num_registered.pop(req.request_id, None)

    def reset_prefix_cache(self) -> bool:
        if self.pool.num_free != self.num_blocks:
            return False
        self.pool.forget_cached()
        return True
