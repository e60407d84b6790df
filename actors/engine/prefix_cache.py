"""An exact prompt cache: the keys and values of prompts prefilled before, per adapter version.

A request whose prompt (the same token ids, for the same adapter id and version) was
prefilled before reuses that prompt's keys and values instead of prefilling it again
(actors/engine/torch_backend.py decides how: see its docstring). An entry holds, per
layer, the prompt's keys and values `[H, L, D]` and the logits of its last position,
which is what picks a sample's first token; that is all a request that does not score its
prompt needs, so such a hit runs no forward at all.

Exact means: the cached tensors are the ones a prefill computed for exactly these tokens
with exactly these weights. The key carries the adapter's version, a number the engine
draws anew each time an adapter is loaded, so a reloaded adapter never meets the keys
and values of its previous weights (and the engine drops those entries at once, to free
their memory). Results with the cache equal those without it up to float32 rounding (the
cached tensors were computed in another batch, whose shape changes the summation order).

Memory is bounded by `max_bytes` (EngineConfig.prefix_cache_bytes, `--prefix-cache-mb`):
least recently used entries are evicted first, and a prompt larger than the whole budget is
not kept. 0 turns the cache off.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# (adapter id or None for the base model, adapter version, prompt token ids)
Key = tuple[str | None, int, tuple[int, ...]]


@dataclass
class CachedPrompt:
    keys: list[torch.Tensor]  # per layer [H, L, D]
    values: list[torch.Tensor]
    last_logits: torch.Tensor  # [V]: the prompt's last position
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, CachedPrompt] = OrderedDict()
        self.nbytes = 0
        self.hits = 0  # prompts served from the cache (without or with a shorter prefill)
        self.misses = 0
        self.reused_tokens = 0  # prompt tokens whose prefill a hit saved

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Key) -> CachedPrompt | None:
        """The entry of exactly this prompt (now the most recently used), or None. Counts nothing."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def count(self, hit: bool, reused_tokens: int = 0) -> None:
        """Record what one prompt's admission got from the cache."""
        if hit:
            self.hits += 1
            self.reused_tokens += reused_tokens
        else:
            self.misses += 1

    def insert(self, key: Key, keys: list[torch.Tensor], values: list[torch.Tensor], last_logits: torch.Tensor) -> None:
        """Keep copies of one prompt's keys/values [H, L, D] per layer and last logits [V]."""
        if not self.enabled or key in self._entries:
            return
        keys, values = [k.clone() for k in keys], [v.clone() for v in values]
        last_logits = last_logits.clone()
        nbytes = sum(t.numel() * t.element_size() for t in keys + values + [last_logits])
        if nbytes > self.max_bytes:
            return
        self._entries[key] = CachedPrompt(keys, values, last_logits, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def drop_adapter(self, adapter_id: str) -> None:
        """Forget every entry of one adapter id (any version): it was reloaded, unloaded or evicted."""
        for key in [k for k in self._entries if k[0] == adapter_id]:
            self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, float]:
        return {"prefix_cache_bytes": float(self.nbytes), "prefix_cache_entries": float(len(self._entries)),
                "prefix_cache_hits": float(self.hits), "prefix_cache_misses": float(self.misses),
                "prefix_cache_reused_tokens": float(self.reused_tokens)}
