"""One clock cycle's pass of a DP shard through megatron-core's schedule.

The cycle's rows (every entry's datums, actors/trainer/cobatch.py) are cut into
microbatches of whole datums, at least one per pipeline stage and enough to keep each
within `max_tokens_per_pass`, each right-padded to the pass's longest datum (the pipeline
schedule sends fixed-shape activations between stages, so every microbatch has the same
`[rows, width]`; a last, short microbatch gets empty rows, which use the bare base slot).
`get_forward_backward_func()` runs them: without pipelining one after the other, with it
1F1B across the stages. Each row uses its entry's LoRA slot. On the last stage each
piece's loss is computed from the vocab-parallel logits (logprobs.py) with its entry's
Tinker loss, and the microbatch's summed loss over the entries that train is what the
schedule backpropagates; `calculate_per_token_loss` keeps the schedule from rescaling
it, so gradients are those of the sum, as in the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from actors.trainer.cobatch import CheckedEntry, Piece, PieceOutput, pass_width, piece_losses, piece_rows
from actors.trainer.losses import compute_loss
from actors.trainer.megatron.logprobs import vocab_parallel_target_logprobs
from actors.trainer.megatron.model import causal_mask


@dataclass
class Microbatch:
    input_ids: torch.Tensor  # int64 [rows, width], right-padded with 0
    real: torch.Tensor  # bool [rows, width]: positions holding a datum's token
    slots: torch.Tensor  # int64 [rows]: each row's adapter slot (0, the bare base, for empty rows)
    pieces: list[Piece]


def microbatches(entries: list[CheckedEntry], plan: list[list[Piece]], device: torch.device) -> list[Microbatch]:
    """The planned microbatches as tensors of one shape `[rows, width]`."""
    width = pass_width(entries)
    rows = max(sum(p.stop - p.first for p in pieces) for pieces in plan)
    out = []
    for pieces in plan:
        tokens, lengths, slots = piece_rows(entries, pieces)
        padding = rows - len(lengths)
        real = torch.arange(width, device=device).unsqueeze(0) < torch.tensor(
            np.pad(lengths, (0, padding)), device=device).unsqueeze(1)
        input_ids = torch.zeros(real.shape, dtype=torch.int64, device=device)
        input_ids[real] = torch.as_tensor(tokens, device=device)
        # empty rows take a real row's slot: they reach no loss, and a one-slot batch keeps the one-slot path
        out.append(Microbatch(input_ids, real, torch.as_tensor(np.pad(slots, (0, padding), mode="edge"), device=device),
                              pieces))
    return out


def run_pass(model: torch.nn.Module, entries: list[CheckedEntry], parts: list[Microbatch], vocab_size: int,
             adapter_scope: Callable[[Microbatch], object]) -> dict[int, list[PieceOutput]] | None:
    """Forward (and unless every entry is forward_only, backward) every microbatch through the schedule.

    `adapter_scope(part)` is entered around each microbatch's forward: it selects the LoRA
    slot of each row. Returns the pieces' outputs (per entry) on the last pipeline stage, else None.
    """
    rows, width = parts[0].input_ids.shape
    mask = causal_mask(width, parts[0].input_ids.device)
    positions = torch.arange(width, device=mask.device).expand(rows, width)
    forward_only = all(c.entry.forward_only for c in entries)
    outputs: dict[int, list[PieceOutput]] = {}

    def loss_of(part: Microbatch, logits: torch.Tensor):
        real_logits, logprobs, start = logits[part.real], [], 0
        for piece in part.pieces:
            lo, hi = piece.token_range(entries[piece.entry])
            logprobs.append(vocab_parallel_target_logprobs(real_logits[start:start + hi - lo],
                                                           entries[piece.entry].targets[lo:hi], vocab_size))
            start += hi - lo
        total = piece_losses(entries, part.pieces, logprobs, compute_loss, outputs)
        if total is None:  # only forward_only entries here, in a pass that trains: nothing to backpropagate
            total = real_logits.sum() * 0.0
        tokens = torch.tensor(int(part.real.sum()), dtype=torch.int)
        return total, tokens, {}

    def forward_step(data_iterator, stage):
        part = next(data_iterator)
        with adapter_scope(part):
            output = stage(part.input_ids, positions, mask)
        return output, lambda logits: loss_of(part, logits)

    with torch.set_grad_enabled(not forward_only):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(parts), model=[model], num_microbatches=len(parts),
            seq_length=width, micro_batch_size=rows, forward_only=forward_only)
    return outputs if parallel_state.is_pipeline_last_stage() else None
