"""The prompt forward of one admission: prompts, or what of them the prefix cache lacks, in one batch.

Each row is a prompt whose first `past` tokens' keys and values come from the prefix cache
(actors/engine/prefix_cache.py; 0 for a miss) and whose remaining tokens, its suffix, are
computed here. The batch is the pasts left-padded to the longest past (`Pm` columns), then
the suffixes left-padded to the longest suffix (`S` columns). An explicit 4-D mask says who
attends what: the query in suffix column q of a row attends every real column of its row
(past or suffix) at or before its own; a pad query also attends itself, so that no query
row is fully masked (SDPA would make it NaN, and the pad's keys and values would carry the
NaN into the cache); no real query attends a pad. A batch of equally long prompts with no
past needs no mask: it is plain causal attention. Position ids are each token's true
position, so a suffix continues its past exactly as if the whole prompt ran at once.

The transformers forward runs it (with its DynamicCache, which a prefill fills once);
`logits_to_keep` keeps only the last positions' logits that some request of the batch reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from actors.lora import LoraSlots


@dataclass
class PromptRow:
    tokens: torch.Tensor  # long [L], the whole prompt
    slot: int
    past: int = 0  # leading tokens whose keys/values are given
    past_keys: list[torch.Tensor] | None = None  # per layer [H, >= past, D]
    past_values: list[torch.Tensor] | None = None


@dataclass
class PromptBatch:
    keys: list[torch.Tensor]  # per layer [P, H, W, D]
    values: list[torch.Tensor]
    real: torch.Tensor  # bool [P, W]: the columns holding each row's tokens
    logits: torch.Tensor  # [P, keep, V]: the last `keep` suffix positions of each row


def cache_kwarg(model: nn.Module) -> str:
    """The name of the cache argument of the model's forward (`past_key_values` before transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt_forward(model: nn.Module, slots: LoraSlots, rows: list[PromptRow], keep: int,
                   cache_arg: str) -> PromptBatch:
    device = rows[0].tokens.device
    past_width = max(r.past for r in rows)
    suffix_width = max(len(r.tokens) - r.past for r in rows)
    width = past_width + suffix_width
    input_ids = torch.zeros(len(rows), suffix_width, dtype=torch.long, device=device)
    position_ids = torch.zeros_like(input_ids)
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        n = len(row.tokens) - row.past
        input_ids[i, suffix_width - n:] = row.tokens[row.past:]
        position_ids[i, suffix_width - n:] = torch.arange(row.past, len(row.tokens), device=device)
        real[i, past_width - row.past:past_width] = True
        real[i, width - n:] = True
    if past_width == 0 and all(len(r.tokens) == suffix_width for r in rows):
        mask = None  # no padding, no past: plain causal attention, which SDPA runs without a mask (faster)
    else:
        causal = torch.ones(suffix_width, width, dtype=torch.bool, device=device).tril(diagonal=past_width)
        itself = torch.eye(suffix_width, width, dtype=torch.bool, device=device).roll(past_width, dims=1)
        mask = (real[:, None, None, :] & causal) | itself
    cache = DynamicCache(ddp_cache_data=_pasts(rows, past_width)) if past_width else DynamicCache()
    with slots.use(torch.tensor([r.slot for r in rows], device=device)):
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                       logits_to_keep=keep, **{cache_arg: cache}).logits
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PromptBatch(keys=keys, values=values, real=real, logits=logits)


def _pasts(rows: list[PromptRow], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, every row's given keys and values, left-padded with zeros to `width` columns."""
    given = next(r for r in rows if r.past)
    layers = []
    for layer, (k0, v0) in enumerate(zip(given.past_keys, given.past_values, strict=True)):
        heads, _, dim = k0.shape
        keys = k0.new_zeros(len(rows), heads, width, dim)
        values = v0.new_zeros(len(rows), heads, width, dim)
        for i, row in enumerate(rows):
            if row.past:
                keys[i, :, width - row.past:] = row.past_keys[layer][:, :row.past]
                values[i, :, width - row.past:] = row.past_values[layer][:, :row.past]
        layers.append((keys, values))
    return layers
