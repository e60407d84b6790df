"""Target-token logprobs from vocab-parallel logits, exact across tensor-parallel shards.

Under tensor parallelism each rank holds the logits of a contiguous slice of the
(padded) vocabulary, `[N, V / tp]`. `log p(t) = logit[t] - logsumexp(logits)` needs both
parts across all slices:
- the logsumexp: each rank's max (no gradient needed: it cancels), then each rank's sum
  of exp(logit - max), summed over TP;
- the target's logit: each rank picks the targets that fall in its slice (zero
  elsewhere), summed over TP.
Both sums use mcore's `reduce_from_tensor_model_parallel_region` (all-reduce forward,
identity backward): every TP rank computes the same loss from the summed values, so each
rank's backward only needs its own slice's gradient, which then flows into the output
layer like any column-parallel output.

Rows of the vocabulary padding (vocab padded to a multiple of tp) hold logit 0, not -inf
(model.py): they are masked out here, or they would take probability mass.

Targets may be `[N]` or `[N, K]` (several candidate tokens per position, for top-k
distillation), which is why this is not mcore's vocab_parallel_cross_entropy (one target
per position).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def vocab_parallel_target_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """logp(targets) in float32, `[N]` or `[N, K]` like `targets`, from this rank's
    `[N, V_local]` slice of the logits; `vocab_size` is the model's real (unpadded) size."""
    local_vocab = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    logits = logits.float()
    padding = torch.arange(start, start + local_vocab, device=logits.device) >= vocab_size
    if bool(padding.any()):
        logits = logits.masked_fill(padding, float("-inf"))
    with torch.no_grad():
        row_max = logits.max(dim=-1).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = reduce_from_tensor_model_parallel_region((logits - row_max.unsqueeze(-1)).exp().sum(dim=-1))
    log_normaliser = row_max + sum_exp.log()

    columns = targets if targets.dim() == 2 else targets.unsqueeze(1)
    in_slice = (columns >= start) & (columns < start + local_vocab)
    picked = logits.gather(1, (columns - start).clamp(0, local_vocab - 1))
    picked = reduce_from_tensor_model_parallel_region(torch.where(in_slice, picked, torch.zeros_like(picked)))
    logprobs = picked - log_normaliser.unsqueeze(1)
    return logprobs if targets.dim() == 2 else logprobs.squeeze(1)
