"""One forward(/backward) pass of a DP shard through megatron-core's schedule.

The shard's datums are cut into microbatches of whole datums, each right-padded to the
shard's longest datum (the pipeline schedule sends fixed-shape activations between
stages, so every microbatch has the same `[rows, width]`; a last, short microbatch gets
empty rows). `get_forward_backward_func()` runs them: without pipelining one after the
other, with it 1F1B across the stages. On the last stage each microbatch's loss is
computed from the vocab-parallel logits (logprobs.py) with the Tinker loss, and its
summed loss is what the schedule backpropagates; `calculate_per_token_loss` keeps the
schedule from rescaling it, so gradients are those of the sum, as in the torch backend.

Tinker losses are sums over datums (actors/trainer/losses.py), so microbatches of whole
datums add up to the batch: their per-token outputs are concatenated in datum order and
their metrics merged by suffix, as the controller merges DP shards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from actors.trainer.losses import compute_loss
from actors.trainer.megatron.logprobs import vocab_parallel_target_logprobs
from actors.trainer.megatron.model import causal_mask
from cluster.messages import DatumBatch
from cluster.metrics import merge_metrics


@dataclass
class Microbatch:
    input_ids: torch.Tensor  # int64 [rows, width], right-padded with 0
    real: torch.Tensor  # bool [rows, width]: positions holding a datum's token
    targets: torch.Tensor  # int64 [tokens] or [tokens, K], datum-major like `real`'s True cells
    inputs: dict[str, torch.Tensor]  # the other loss inputs, float32, same first dim
    lengths: torch.Tensor  # int64 [datums]


@dataclass
class PassOutput:
    """What the last pipeline stage learned; the other stages learn nothing and get None."""

    logprobs: torch.Tensor
    elementwise_loss: torch.Tensor
    metrics: dict[str, float]


def microbatches(batch: DatumBatch, targets: torch.Tensor, inputs: dict[str, torch.Tensor], count: int,
                 device: torch.device) -> list[Microbatch]:
    """The batch's datums in `count` microbatches (fewer if there are fewer datums) of equal shape."""
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    count = max(1, min(count, len(lengths)))
    rows = -(-len(lengths) // count)
    width = int(lengths.max())
    offsets = batch.offsets()
    out = []
    for first in range(0, len(lengths), rows):
        part = lengths[first:first + rows]
        lo, hi = int(offsets[first]), int(offsets[first + len(part)])
        real = torch.arange(width, device=device).unsqueeze(0) < torch.tensor(
            np.pad(part, (0, rows - len(part))), device=device).unsqueeze(1)
        input_ids = torch.zeros(real.shape, dtype=torch.int64, device=device)
        input_ids[real] = torch.tensor(np.asarray(batch.tokens[lo:hi]), dtype=torch.int64, device=device)
        out.append(Microbatch(input_ids, real, targets[lo:hi], {k: v[lo:hi] for k, v in inputs.items()},
                              torch.tensor(part, device=device)))
    return out


def run_pass(model: torch.nn.Module, parts: list[Microbatch], loss_fn: str, loss_fn_config: dict[str, float | str],
             forward_only: bool, vocab_size: int,
             adapter_scope: Callable[[Microbatch], contextlib.AbstractContextManager]
             ) -> PassOutput | None:
    """Forward (and unless forward_only, backward) every microbatch through the schedule.

    `adapter_scope(part)` is entered around each microbatch's forward: it selects the LoRA
    slot(s) its rows use. Returns the outputs on the last pipeline stage, else None.
    """
    rows, width = parts[0].input_ids.shape
    mask = causal_mask(width, parts[0].input_ids.device)
    positions = torch.arange(width, device=mask.device).expand(rows, width)
    results: list[tuple[torch.Tensor, torch.Tensor, dict[str, float], int]] = []

    def loss_of(part: Microbatch, logits: torch.Tensor):
        logprobs = vocab_parallel_target_logprobs(logits[part.real], part.targets, vocab_size)
        elementwise, metrics = compute_loss(loss_fn, logprobs, part.inputs, loss_fn_config, part.lengths)
        results.append((logprobs.detach(), elementwise.detach(), metrics, len(part.lengths)))
        tokens = torch.tensor(int(part.real.sum()), dtype=torch.int)
        return elementwise.sum(), tokens, {}

    def forward_step(data_iterator, stage):
        part = next(data_iterator)
        with adapter_scope(part):
            output = stage(part.input_ids, positions, mask)
        return output, lambda logits: loss_of(part, logits)

    with torch.set_grad_enabled(not forward_only):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(parts), model=[model], num_microbatches=len(parts),
            seq_length=width, micro_batch_size=rows, forward_only=forward_only)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return PassOutput(
        logprobs=torch.cat([r[0] for r in results]),
        elementwise_loss=torch.cat([r[1] for r in results]),
        metrics=merge_metrics([(r[2], r[3]) for r in results]),
    )
