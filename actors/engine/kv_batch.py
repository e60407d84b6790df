"""The running batch's tensors: a left-padded KV cache and what each row feeds next.

Rows are sequences of possibly different lengths and adapters. The cache is
left-padded: row b's real tokens occupy the last columns, `attention_mask[b]` marks
them, and `positions[b]` is the position id of the token row b feeds next (its true
length so far), so rotary embeddings see every sequence as if it ran alone. Padded
columns hold zeros and are masked out, so they change nothing.

Two batches merge by left-padding the shorter cache; finished rows leave by row
selection, after which columns no row attends to any more are cut off the left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class KvBatch:
    cache: DynamicCache
    attention_mask: torch.Tensor  # long [B, T]: which cache columns are real
    positions: torch.Tensor  # long [B]: position id of the token each row feeds next
    pending: torch.Tensor  # long [B]: the last sampled token, not yet in the cache
    slots: torch.Tensor  # long [B]: LoRA slot of each row

    def __len__(self) -> int:
        return int(self.pending.shape[0])

    def advance(self) -> dict:
        """Model kwargs that feed every row's pending token; the batch grows by that column."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        inputs = dict(input_ids=self.pending.unsqueeze(1), attention_mask=self.attention_mask,
                      position_ids=self.positions.unsqueeze(1), past_key_values=self.cache, use_cache=True)
        self.positions = self.positions + 1
        return inputs

    def select(self, rows: torch.Tensor) -> "KvBatch":
        """The batch restricted to `rows` (indices, in order; repeats allowed)."""
        mask = self.attention_mask.index_select(0, rows)
        kept = mask.any(dim=0).nonzero()
        start = int(kept[0]) if len(kept) else mask.shape[1]  # drop columns nobody attends to
        layers = [(k.index_select(0, rows)[:, :, start:], v.index_select(0, rows)[:, :, start:])
                  for k, v in _layers(self.cache)]
        return KvBatch(cache=DynamicCache(ddp_cache_data=layers), attention_mask=mask[:, start:],
                       positions=self.positions.index_select(0, rows),
                       pending=self.pending.index_select(0, rows), slots=self.slots.index_select(0, rows))

    @staticmethod
    def concat(first: "KvBatch", second: "KvBatch") -> "KvBatch":
        """Rows of `first` then rows of `second`; the shorter cache is left-padded."""
        width = max(first.attention_mask.shape[1], second.attention_mask.shape[1])
        layers = [(torch.cat([_left_pad(k1, width, 2), _left_pad(k2, width, 2)]),
                   torch.cat([_left_pad(v1, width, 2), _left_pad(v2, width, 2)]))
                  for (k1, v1), (k2, v2) in zip(_layers(first.cache), _layers(second.cache), strict=True)]
        return KvBatch(
            cache=DynamicCache(ddp_cache_data=layers),
            attention_mask=torch.cat([_left_pad(first.attention_mask, width, 1),
                                      _left_pad(second.attention_mask, width, 1)]),
            positions=torch.cat([first.positions, second.positions]),
            pending=torch.cat([first.pending, second.pending]),
            slots=torch.cat([first.slots, second.slots]),
        )


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: (input_ids, attention_mask, position_ids), each [B, L]."""
    width = max(len(p) for p in prompts)
    device = prompts[0].device
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(keys, values) for keys, values, _ in cache]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
