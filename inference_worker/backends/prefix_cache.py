"""The KV cache of prompt prefixes the transformers backend has read before.

Every chat's prompt starts with the same system prompt and context tiers (~1,000
tokens), then the conversation so far; without this cache each request reads all of
it again. The cache keeps the keys and values of what was read in blocks of
`block_tokens` tokens, as vLLM's automatic prefix caching does:

- a block is found by a hash chain: its key covers its own token ids and its
  parent's key, so a block matches only when the whole prompt up to its end matches;
  the chain's root is the namespace (the base model, or one loaded adapter version,
  since an adapter changes the keys and values);
- a row joining the batch looks up the longest chain of cached blocks its prompt
  starts with and reads only the rest; a prompt whose last token is cached still
  reads that one token (its logits pick the first answer token);
- once a row's prompt is read, its full blocks that were not cached are added, and
  once it has answered, the blocks of its answer too (the conversation's next prompt
  repeats it: the chat template renders the answer's text again, which a byte-level
  BPE tokenizer turns back into the same ids for ordinary text);
- memory is bounded in bytes; when a new block does not fit, the least recently used
  block that no running row holds and that has no cached child is dropped (a row
  holds its prompt's chain from lookup until it ends); when nothing can be dropped
  the block is not cached;
- a namespace is dropped whole when its adapter version is unloaded;
- blocks live in slots of a few large tensors (slabs), allocated as the cache fills
  and reused as blocks go: measured on this CPU, one small tensor per block (tens of
  thousands of long-lived allocations in glibc's heap) made every decoding step's
  own allocations slower, ~20 % per step on the demo model, even when nothing was
  ever found in the cache.

Only the generation thread calls it (no lock); the counters may be read anywhere.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from proto.messages import PrefixCacheStats
from services.host_memory import available_ram

log = logging.getLogger(__name__)
DEFAULT_BLOCK_TOKENS = 16
# Of the memory free on the model's device once the model is loaded.
DEFAULT_SHARE = 0.25
SLAB_BYTES = 64 << 20  # above glibc's largest mmap threshold: each slab is its own mapping

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [batch, kv_heads, tokens, head_dim]


@dataclass(eq=False)
class Block:
    """`tokens` token ids and their keys and values in every layer
    ([layers, kv_heads, block_tokens, head_dim] each)."""

    key: int
    namespace: str
    parent: Block | None
    tokens: tuple[int, ...]
    keys: torch.Tensor  # views of its slot in a slab
    values: torch.Tensor
    slot: tuple[int, int]  # (slab, index)
    refs: int = 0  # running rows holding it
    children: int = 0  # cached blocks whose parent it is

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(eq=False)
class Hit:
    """The cached start of one prompt: `blocks` (held until released) cover its first
    `tokens` tokens."""

    blocks: list[Block] = field(default_factory=list)
    tokens: int = 0


class _Slabs:
    """Block-sized slots in a few large tensors of shape [slots, 2 (keys, values),
    layers, kv_heads, block_tokens, head_dim], added one at a time as needed."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.slabs: list[torch.Tensor] = []
        self.free: list[tuple[int, int]] = []
        self.shape: tuple[int, ...] | None = None  # one block's
        self.dtype: torch.dtype | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> tuple[int, int]:
        """A free slot for a block of `shape` (the same for every block of a model)."""
        if self.shape is None:
            self.shape, self.dtype = shape, dtype
        elif (shape, dtype) != (self.shape, self.dtype):
            raise ValueError(f"a block of {shape} {dtype} in slabs of {self.shape} {self.dtype}")
        if not self.free:
            block_bytes = math.prod(shape) * dtype.itemsize
            per_slab = max(1, min(SLAB_BYTES, self.capacity_bytes) // block_bytes)
            self.slabs.append(torch.empty((per_slab, *shape), dtype=dtype, device=device))
            index = len(self.slabs) - 1
            self.free = [(index, slot) for slot in reversed(range(per_slab))]
        return self.free.pop()

    def view(self, slot: tuple[int, int]) -> torch.Tensor:
        return self.slabs[slot[0]][slot[1]]

    def give(self, slot: tuple[int, int]) -> None:
        self.free.append(slot)


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self._slabs = _Slabs(capacity_bytes)
        self.bytes = 0
        # Counters since start.
        self.lookups = 0
        self.lookup_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which were cached
        self.inserted = 0  # blocks added
        self.evictions = 0  # blocks dropped for room (not counting dropped namespaces)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def _root(namespace: str) -> int:
        return hash(("prefix-cache", namespace))

    def _find(
        self, namespace: str, parent: Block | None, parent_key: int, tokens: tuple[int, ...]
    ) -> Block | None:
        """The cached block after `parent` holding `tokens`; namespace, parent and tokens
        are compared too, so a hash collision can never match the wrong block."""
        block = self._blocks.get(hash((parent_key, tokens)))
        if block is None or block.parent is not parent or block.tokens != tokens:
            return None
        return block if block.namespace == namespace else None

    def lookup(self, namespace: str, ids: list[int]) -> Hit:
        """The longest cached start of `ids` (never its last token), held for the row."""
        if not self.enabled:
            return Hit()
        self.lookups += 1
        self.lookup_tokens += len(ids)
        size = self.block_tokens
        usable = len(ids) - 1  # the last token is always read: its logits are needed
        chain: list[Block] = []
        key = self._root(namespace)
        for start in range(0, max(usable, 0), size):
            tokens = tuple(ids[start : start + size])
            if len(tokens) < size:
                break
            block = self._find(namespace, chain[-1] if chain else None, key, tokens)
            if block is None:
                break
            chain.append(block)
            key = block.key
        hit = Hit(chain, min(len(chain) * size, max(usable, 0)))
        self.hit_tokens += hit.tokens
        self._hold(chain)
        self._touch(chain)
        return hit

    def past(self, hit: Hit) -> list[LayerKV]:
        """The hit's keys and values per layer, shaped as one row of a DynamicCache."""
        keys = torch.cat([b.keys for b in hit.blocks], dim=2)[:, :, : hit.tokens]
        values = torch.cat([b.values for b in hit.blocks], dim=2)[:, :, : hit.tokens]
        return [(keys[i].unsqueeze(0), values[i].unsqueeze(0)) for i in range(keys.shape[0])]

    def insert(
        self,
        namespace: str,
        ids: list[int],
        layers: list[LayerKV],
        row: int,
        first_column: int,
        held: list[Block],
    ) -> list[Block]:
        """Add the full blocks of prompt `ids` after the `held` chain (its cached start).

        Its keys and values are row `row` of `layers` (one cache's layers), from column
        `first_column` on. `held` grows in place with each block added or found, held,
        so that it stays the row's to release even if copying a block fails midway;
        blocks that find no room are left out (and so is everything after them).
        """
        if not self.enabled:
            return held
        size = self.block_tokens
        key = held[-1].key if held else self._root(namespace)
        try:
            for start in range(len(held) * size, len(ids) - size + 1, size):
                tokens = tuple(ids[start : start + size])
                parent = held[-1] if held else None
                block = self._find(namespace, parent, key, tokens)
                if block is None:
                    column = first_column + start
                    block = self._new_block(namespace, parent, key, tokens, layers, row, column)
                    if block is None:
                        break
                else:  # another row added it meanwhile
                    block.refs += 1
                held.append(block)
                key = block.key
        finally:
            self._touch(held)
        return held

    def _new_block(
        self,
        namespace: str,
        parent: Block | None,
        parent_key: int,
        tokens: tuple[int, ...],
        layers: list[LayerKV],
        row: int,
        column: int,
    ) -> Block | None:
        """A new block, held once; None when there is no room for it, or when its key
        is taken by another block (a hash collision: that one stays)."""
        key = hash((parent_key, tokens))
        if key in self._blocks:
            return None
        sample = layers[0][0]  # [batch, kv_heads, columns, head_dim]
        shape = (2, len(layers), sample.shape[1], len(tokens), sample.shape[3])
        if not self._make_room(math.prod(shape) * sample.element_size()):
            return None
        slot = self._slabs.take(shape, sample.dtype, sample.device)
        place = self._slabs.view(slot)
        end = column + len(tokens)
        try:
            for index, (keys, values) in enumerate(layers):
                place[0, index].copy_(keys[row, :, column:end])
                place[1, index].copy_(values[row, :, column:end])
        except BaseException:
            self._slabs.give(slot)
            raise
        block = Block(key, namespace, parent, tokens, place[0], place[1], slot, refs=1)
        self._blocks[key] = block
        self.bytes += block.nbytes
        self.inserted += 1
        if parent is not None:
            parent.children += 1
        return block

    def release(self, blocks: list[Block]) -> None:
        """A row that held `blocks` ended."""
        for block in blocks:
            block.refs -= 1

    def drop(self, namespace: str) -> int:
        """Forget every block of `namespace` (an adapter version that was unloaded)."""
        gone = [b for b in self._blocks.values() if b.namespace == namespace]
        for block in gone:
            self._remove(block)
        if gone:
            log.debug("prefix cache: dropped %d block(s) of %s", len(gone), namespace)
        return len(gone)

    def _hold(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.refs += 1

    def _touch(self, chain: list[Block]) -> None:
        # The chain's end becomes the least recent of its blocks: evicting from the end
        # keeps the start (shared by more prompts) and never orphans a cached block.
        for block in reversed(chain):
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.capacity_bytes:
            return False
        while self.bytes + nbytes > self.capacity_bytes:
            victim = next(
                (b for b in self._blocks.values() if b.refs == 0 and b.children == 0), None
            )
            if victim is None:
                return False
            self._remove(victim)
            self.evictions += 1
        return True

    def _remove(self, block: Block) -> None:
        if self._blocks.pop(block.key, None) is None:
            return
        self._slabs.give(block.slot)
        self.bytes -= block.nbytes
        if block.parent is not None:
            block.parent.children -= 1

    def stats(self) -> PrefixCacheStats | None:
        """Its size and counters; None when it is off."""
        if not self.enabled:
            return None
        return PrefixCacheStats(
            capacity_bytes=self.capacity_bytes,
            bytes=self.bytes,
            blocks=len(self._blocks),
            block_tokens=self.block_tokens,
            lookups=self.lookups,
            lookup_tokens=self.lookup_tokens,
            hit_tokens=self.hit_tokens,
            evictions=self.evictions,
        )


def default_capacity(device: str) -> int:
    """A quarter of the memory free on `device` now (after the model was loaded)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * DEFAULT_SHARE)
    return int(available_ram() * DEFAULT_SHARE)
