"""KV memory: allocated once at start, one slot per running sequence.

Running sequences occupy slots 0..n-1 with no holes: when one finishes, the
last one moves into its slot (one copy of that sequence's keys). A decode
step then reads the cache as a plain view, `cache[:, :n]`, instead of
gathering scattered slots every layer of every step.

The prefix cache keeps the keys/values of prompt beginnings: a persona's system
turn (every request of that persona starts with the same tokens) and each
conversation's last line (its next line's prompt extends it), so only the new
part of a prompt is prefilled.
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
    """Computed keys/values of prompt beginnings, LRU, bounded in bytes.

    An entry holds the tokens it was computed for and their KV. The KV of the first n tokens depends on those
    tokens alone (causal attention), so a prompt can reuse the longest common prefix of any entry computed with
    the same adapter version, not only an exact match. Two owners put entries here:

    * a persona's system turn, key (version, its tokens): shared by every request of the persona;
    * a conversation, key (version, CONVERSATION, its cache key): the prompt and reply of its last line, which
      the next line's prompt extends (earlier turns, then that reply, then the new line).
    """

    CONVERSATION = "conversation"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple, tuple[tuple[int, ...], PrefixKV]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(kv: PrefixKV) -> int:
        return sum(t.numel() * t.element_size() for t in kv)

    def longest(self, keys: list[tuple], prompt: list[int], *, touch: bool = True) -> tuple[int, PrefixKV | None]:
        """(length, KV) of the longest prefix of `prompt` held under any of `keys`, at most len(prompt) - 1 (the
        last prompt token is always computed: its logits give the first new token); (0, None) when none.
        `touch=False` only looks (an estimate for the step budget): no LRU move, no hit counted."""
        best, best_kv, best_key = 0, None, None
        limit = len(prompt) - 1
        for key in keys:
            entry = self._store.get(key)
            if entry is None:
                continue
            tokens, kv = entry
            n = common_prefix(tokens, prompt, limit)
            if n > best:
                best, best_kv, best_key = n, kv, key
        if touch:
            if best_key is None:
                self.misses += 1
            else:
                self.hits += 1
                self._store.move_to_end(best_key)
        if best_kv is None:
            return 0, None
        return best, (best_kv[0][:, :, :best], best_kv[1][:, :, :best])

    def put(self, key: tuple, tokens: tuple[int, ...], kv: PrefixKV) -> None:
        old = self._store.pop(key, None)
        if old is not None:
            self.bytes -= self._size(old[1])
        size = self._size(kv)
        if size > self.max_bytes:
            return
        self._store[key] = (tokens, kv)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._store.popitem(last=False)
            self.bytes -= self._size(evicted)

    def drop_version(self, version_key: object) -> None:
        """Forget prefixes computed with an adapter version that was replaced or unloaded."""
        for key in [k for k in self._store if k[0] == version_key]:
            self.bytes -= self._size(self._store.pop(key)[1])

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: tuple) -> bool:
        return key in self._store


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    if tuple(a[:n]) == tuple(b[:n]):  # the usual case, at C speed
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on slices, still at C speed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(a[:mid]) == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo
