"""KV memory: allocated once at start, one slot per running sequence.

Running sequences occupy slots 0..n-1 with no holes: when one finishes, the
last one moves into its slot (one copy of that sequence's keys). A decode
step then reads the cache as a plain view, `cache[:, :n]`, instead of
gathering scattered slots every layer of every step.

The prefix cache keeps the keys/values of a persona's system prompt, per
(adapter version, prompt tokens): every request of that persona starts with
the same tokens, so only the new part of its prompt is prefilled.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from npcd.engine.model import LlamaSpec

PrefixKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [layers, kv_heads, length, head_dim]


class KVCache:
    def __init__(self, spec: LlamaSpec, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (spec.num_layers, slots, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def slots_for_budget(spec: LlamaSpec, max_len: int, dtype: torch.dtype, budget_mb: int, want: int) -> int:
        """How many sequences fit a memory cap (0 = no cap)."""
        if budget_mb <= 0:
            return want
        per_slot = 2 * spec.num_layers * spec.num_kv_heads * max_len * spec.head_dim * torch.finfo(dtype).bits // 8
        fit = (budget_mb << 20) // per_slot
        if fit < 1:
            raise ValueError(f"kv_cache_mb={budget_mb} holds no sequence of max_seq_len={max_len} "
                             f"(one needs {per_slot / 2**20:.1f} MiB)")
        return min(want, int(fit))

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def write(self, slot: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        length = kv[0].shape[2]
        self.k[:, slot, :, :length] = kv[0]
        self.v[:, slot, :, :length] = kv[1]


class PrefixCache:
    """LRU map (adapter version, prefix tokens) -> prefix keys/values."""

    def __init__(self, entries: int):
        self.entries = entries
        self._store: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        kv = self._store.get(key)
        if kv is None:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return kv

    def put(self, key: tuple, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.entries == 0:
            return
        self._store[key] = kv
        self._store.move_to_end(key)
        while len(self._store) > self.entries:
            self._store.popitem(last=False)

    def drop_version(self, version_key: object) -> None:
        """Forget prefixes computed with an adapter version that was replaced or unloaded."""
        for key in [k for k in self._store if k[0] == version_key]:
            del self._store[key]

    def __len__(self) -> int:
        return len(self._store)
