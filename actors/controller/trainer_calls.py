"""A clock cycle's trainer messages: one per rank out, one outcome per request back.

A pass carries one entry per forward_backward request. Each request's datums are cut into
one contiguous shard per data-parallel group, and every tensor/pipeline rank of a group
gets its group's shard. Each group's outputs come from its reporting rank
(cluster/parallel.py); a request's shards are concatenated back in datum order and their
metrics merged by reduction suffix. A request every rank refused gets a 400 with the
reason, and the cycle's other requests their results.
"""

from __future__ import annotations

import numpy as np

from actors.controller.errors import ApiError
from cluster.messages import (
    ECHOED_REJECTION, ForwardBackwardReq, ForwardBackwardResult, OptimStepReq, PassEntry, SlotStep,
    TrainerForwardBackwardReq, TrainerOptimStepReq,
)
from cluster.metrics import merge_metrics
from cluster.parallel import ParallelDims


def pass_requests(dims: ParallelDims, work: list[tuple[int, ForwardBackwardReq]]) -> list[TrainerForwardBackwardReq]:
    """Per rank, the pass of every (slot, request) in `work`, each entry that rank's DP shard."""
    per_group = [[PassEntry(slot=slot, loss_fn=req.loss_fn, loss_fn_config=req.loss_fn_config,
                            forward_only=req.forward_only, batch=req.batch.select(*bounds))
                  for bounds in dims.shard_bounds(req.batch.num_datums)] for slot, req in work]
    return [TrainerForwardBackwardReq(entries=[shards[dims.coords(rank).dp] for shards in per_group])
            for rank in range(dims.world_size)]


def pass_outcomes(dims: ParallelDims, replies: list) -> list[ForwardBackwardResult | ApiError]:
    """Each entry's merged result, or its refusal, from every rank's reply (in rank order)."""
    reporting = [replies[dims.reporting_rank(dp)] for dp in range(dims.dp)]
    out = []
    for index in range(len(replies[0].outcomes)):
        refusal = _refusal([reply.outcomes[index].rejected for reply in replies])
        if refusal is not None:
            out.append(refusal)
            continue
        results = [reply.outcomes[index].result for reply in reporting]
        out.append(ForwardBackwardResult(
            lengths=np.concatenate([r.lengths for r in results]),
            logprobs=np.concatenate([r.logprobs for r in results]),
            elementwise_loss=np.concatenate([r.elementwise_loss for r in results]),
            metrics=merge_metrics([(r.metrics, len(r.lengths)) for r in results]),
        ))
    return out


def optim_request(work: list[tuple[int, OptimStepReq]]) -> TrainerOptimStepReq:
    return TrainerOptimStepReq(steps=[SlotStep(slot=slot, adam=req.adam) for slot, req in work])


def optim_outcomes(dims: ParallelDims, replies: list) -> list[dict | ApiError]:
    """Each step's metrics (the norm is of the whole gradient, all-reduced: every reporting rank knows the same
    one), or its refusal."""
    reporting = replies[dims.reporting_rank(0)]
    out = []
    for index, outcome in enumerate(reporting.outcomes):
        refusal = _refusal([reply.outcomes[index].rejected for reply in replies])
        out.append(refusal if refusal is not None else outcome.metrics)
    return out


def _refusal(reasons: list[str]) -> ApiError | None:
    given = [reason for reason in reasons if reason]
    if not given:
        return None
    own = [reason for reason in given if not reason.startswith(ECHOED_REJECTION)]
    return ApiError(400, (own or given)[0])
