"""Checks on a forward_backward request that every trainer backend makes before any compute.

A request is checked whole before the forward pass, so a bad one fails fast with a 400
that names the problem and leaves the slot's gradients alone.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.trainer.losses import check_loss_fn, compute_loss
from cluster.messages import DatumBatch

TARGET_TOKENS = "target_tokens"


def checked_loss_inputs(loss_fn: str, loss_fn_config: dict[str, float | str], batch: DatumBatch,
                        vocab_size: int, max_context: int, device: torch.device
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """target_tokens (int64 `[T]` or `[T, K]`) and the other loss inputs (float32), once
    the loss, its config, the batch's shapes and its token ids are known to be good."""
    check_loss_fn(loss_fn)
    check_batch(batch, vocab_size, max_context)
    targets = torch.tensor(np.asarray(batch.loss_inputs[TARGET_TOKENS]), dtype=torch.int64, device=device)
    inputs = {name: torch.tensor(np.asarray(value), dtype=torch.float32, device=device)
              for name, value in batch.loss_inputs.items() if name != TARGET_TOKENS}
    # the loss checks its config and inputs on an empty slice: cheap, and it fails
    # before the forward pass instead of after it
    compute_loss(loss_fn, torch.zeros((0, *targets.shape[1:]), device=device),
                 {name: value[:0] for name, value in inputs.items()}, loss_fn_config)
    return targets, inputs


def check_batch(batch: DatumBatch, vocab_size: int, max_context: int) -> None:
    """The batch's shapes and token ids; ValueError names what is wrong."""
    lengths = np.asarray(batch.lengths)
    total = int(len(batch.tokens))
    if lengths.ndim != 1 or (lengths < 1).any():
        raise ValueError("every datum needs at least one model_input token")
    if int(lengths.sum()) != total:
        raise ValueError(f"datum lengths sum to {int(lengths.sum())} but the batch has {total} tokens")
    if len(lengths) and int(lengths.max()) > max_context:
        raise ValueError(f"a datum has {int(lengths.max())} tokens, more than the model's "
                         f"context window of {max_context}")
    if TARGET_TOKENS not in batch.loss_inputs:
        raise ValueError(f"loss_fn_inputs needs {TARGET_TOKENS!r} (got {sorted(batch.loss_inputs)})")
    for name, value in batch.loss_inputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise ValueError(f"loss_fn_inputs[{name!r}] has shape {list(value.shape)}; its first "
                             f"dimension must equal the number of model_input tokens ({total})")
    check_token_ids("model_input", batch.tokens, vocab_size)
    targets = batch.loss_inputs[TARGET_TOKENS]
    if targets.ndim not in (1, 2):
        raise ValueError(f"target_tokens must be [N] or [N, K], got shape {list(targets.shape)}")
    check_token_ids(TARGET_TOKENS, targets, vocab_size)


def check_token_ids(what: str, ids: np.ndarray, vocab_size: int) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} has token ids outside [0, {vocab_size}) "
                         f"(min {int(ids.min())}, max {int(ids.max())})")
