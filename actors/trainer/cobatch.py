"""One clock cycle's pass: the entries of several models (adapter slots) in one batch.

The controller sends each rank a list of `PassEntry`s, one per model's forward_backward
(this rank's DP shard of it). Their datums become the rows of one batch, row i using its
entry's slot (`LoraSlots.use(per_row_slots)`), so one forward (and one backward) serves
every model. A model's gradients land in its own slot only: the rows of other slots do
not touch them, and an idle slot's gradients and optimizer state are never read.

Each entry keeps its own loss: its rows' target logprobs go through its own `loss_fn`,
and the pass backpropagates the sum of the losses of the entries that are not
forward_only. Tinker losses are sums over datums (actors/trainer/losses.py), so the
gradient of that sum, restricted to one slot, is that model's gradient alone.

A pass larger than `max_tokens_per_pass` padded tokens (rows x longest row) runs as
microbatches of equal row count, gradients accumulating. A microbatch may cut an entry:
its pieces' outputs are concatenated back in datum order and their metrics merged by
reduction suffix, as the controller merges DP shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.messages import ForwardBackwardResult, PassEntry
from cluster.metrics import merge_metrics


@dataclass
class CheckedEntry:
    """An entry every rank accepted, with its loss inputs as tensors (actors/trainer/batch_checks.py)."""

    entry: PassEntry
    targets: torch.Tensor  # int64 [T] or [T, K], datum-major
    inputs: dict[str, torch.Tensor]
    offsets: np.ndarray  # int64 [datums + 1]: datum i owns tokens offsets[i]:offsets[i + 1]

    @classmethod
    def of(cls, entry: PassEntry, targets: torch.Tensor, inputs: dict[str, torch.Tensor]) -> "CheckedEntry":
        return cls(entry, targets, inputs, entry.batch.offsets())


@dataclass
class Piece:
    """Datums [first, stop) of one entry, all inside one microbatch."""

    entry: int
    first: int
    stop: int

    def token_range(self, checked: CheckedEntry) -> tuple[int, int]:
        return int(checked.offsets[self.first]), int(checked.offsets[self.stop])


@dataclass
class PieceOutput:
    logprobs: torch.Tensor  # detached, float32
    elementwise_loss: torch.Tensor
    metrics: dict[str, float]
    datums: int


def plan_microbatches(entries: list[CheckedEntry], max_tokens: int, min_count: int = 1) -> list[list[Piece]]:
    """Every non-empty entry's datums, in entry then datum order, cut into equal row counts: as few
    microbatches as keep rows x longest row within `max_tokens` (at least `min_count`, at most one per row)."""
    rows = [(index, datum) for index, checked in enumerate(entries) for datum in range(checked.entry.batch.num_datums)]
    if not rows:
        return []
    width = max(int(checked.entry.batch.lengths.max()) for checked in entries if checked.entry.batch.num_datums)
    count = max(min_count, -(-len(rows) * width // max_tokens))
    per_part = -(-len(rows) // min(count, len(rows)))
    plan = []
    for start in range(0, len(rows), per_part):
        pieces: list[Piece] = []
        for index, datum in rows[start:start + per_part]:
            if pieces and pieces[-1].entry == index:
                pieces[-1].stop = datum + 1
            else:
                pieces.append(Piece(index, datum, datum + 1))
        plan.append(pieces)
    return plan


def pass_width(entries: list[CheckedEntry]) -> int:
    """The longest datum of the pass: every microbatch is padded to it (the pipeline needs one shape)."""
    return max((int(c.entry.batch.lengths.max()) for c in entries if c.entry.batch.num_datums), default=0)


def piece_rows(entries: list[CheckedEntry], pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The microbatch's (tokens back to back, row lengths, row slots), in piece order."""
    tokens, lengths, slots = [], [], []
    for piece in pieces:
        checked = entries[piece.entry]
        lo, hi = piece.token_range(checked)
        tokens.append(np.asarray(checked.entry.batch.tokens[lo:hi], dtype=np.int64))
        part = np.asarray(checked.entry.batch.lengths[piece.first:piece.stop], dtype=np.int64)
        lengths.append(part)
        slots.append(np.full(len(part), checked.entry.slot, dtype=np.int64))
    return np.concatenate(tokens), np.concatenate(lengths), np.concatenate(slots)


def piece_losses(entries: list[CheckedEntry], pieces: list[Piece], target_logprobs: list[torch.Tensor],
                 compute_loss, outputs: dict[int, list[PieceOutput]]) -> torch.Tensor | None:
    """Each piece's loss from its rows' logprobs (`target_logprobs[i]`, differentiable); the outputs are
    appended per entry. Returns the sum of the losses to backpropagate (None if every piece is forward_only)."""
    total = None
    for piece, logprobs in zip(pieces, target_logprobs):
        checked = entries[piece.entry]
        entry = checked.entry
        lo, hi = piece.token_range(checked)
        lengths = torch.tensor(np.array(entry.batch.lengths[piece.first:piece.stop]), device=logprobs.device)
        inputs = {name: value[lo:hi] for name, value in checked.inputs.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not entry.forward_only):
            elementwise, metrics = compute_loss(entry.loss_fn, logprobs, inputs, entry.loss_fn_config, lengths)
        if not entry.forward_only and elementwise.requires_grad:
            total = elementwise.sum() if total is None else total + elementwise.sum()
        outputs.setdefault(piece.entry, []).append(
            PieceOutput(logprobs.detach(), elementwise.detach(), metrics, piece.stop - piece.first))
    return total


def gather_targets(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logp(target) from `[tokens, vocab]` log-probabilities: `[T]` or `[T, K]` like targets."""
    if targets.dim() == 1:
        return logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return logprobs.gather(1, targets)


def entry_results(entries: list[CheckedEntry], outputs: dict[int, list[PieceOutput]], compute_loss,
                  device: torch.device) -> list[ForwardBackwardResult]:
    """Each entry's result from its pieces, in datum order (an empty shard gets its loss's zero result)."""
    results = []
    for index, checked in enumerate(entries):
        entry = checked.entry
        lengths = np.asarray(entry.batch.lengths, dtype=np.int64).copy()
        parts = outputs.get(index)
        if not parts:
            zeros = torch.zeros(checked.targets.shape, dtype=torch.float32, device=device)
            with torch.no_grad():
                elementwise, metrics = compute_loss(entry.loss_fn, zeros, checked.inputs, entry.loss_fn_config,
                                                    torch.as_tensor(lengths, device=device))
            parts = [PieceOutput(zeros, elementwise, metrics, 0)]
        metrics = parts[0].metrics if len(parts) == 1 else merge_metrics([(p.metrics, p.datums) for p in parts])
        results.append(ForwardBackwardResult(
            lengths=lengths, logprobs=to_numpy_f32(torch.cat([p.logprobs for p in parts])),
            elementwise_loss=to_numpy_f32(torch.cat([p.elementwise_loss for p in parts])), metrics=metrics))
    return results


def to_numpy_f32(tensor: torch.Tensor) -> np.ndarray:
    """A float32 copy on the CPU (never a view of live parameters or moments)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()
