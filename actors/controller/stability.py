"""Samples recorded for stable_reinforce, and the check that a training datum reproduces them.

Sampling with `record_stability_info=True`: when a sample completes, the controller
records per sequence (by its `sample_sequence_ids` entry) the prompt, the sampled
tokens, the engine's own float32 logprobs, the adapter snapshot and the sampling
params. A record belongs to the sampling session's session and user, lives in SQLite
(it survives a restart) and is kept RECORD_TTL_S after it was last used; every
training request that uses it starts that day again.

`forward_backward(loss_fn="stable_reinforce")`: before the request is queued, every
datum's provenance spans (already well formed and tiling its fields: the API checked)
are held against the records. Each named sequence must be recorded, unexpired and
sampled in the training run's own session; every span must lie within its record;
`model_input` must equal the record where spans cover it; `target_tokens` must equal
the sampled tokens on sampled spans (prompt-span targets are not checked: the
cookbook pads them with 0); advantages may be nonzero only on sampled-span targets.
The trainer then gets the recorded logprobs in place of the client's, and a mask of
the targets that sampled spans cover (SAMPLED_MASK).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import numpy as np

from actors.controller.errors import ApiError
from actors.controller.store import StateStore
from cluster.loss_specs import SAMPLED_MASK, TARGET_TOKENS
from cluster.messages import DatumBatch, DatumProvenance, ForwardBackwardReq, ProvenanceSpan, SampleReq, SampleResult

RECORD_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class RecordedSequence:
    session_id: str
    user: str
    prompt: np.ndarray  # int64
    tokens: np.ndarray  # int64
    logprobs: np.ndarray  # float32

    def source(self, span: ProvenanceSpan) -> np.ndarray:
        return self.tokens if span.sampled else self.prompt


class StabilityRecords:
    def __init__(self, store: StateStore):
        self.store = store

    def record(self, session_id: str, user: str, sampling_session_id: str, adapter_id: str | None,
               req: SampleReq, sequence_ids: list[str], result: SampleResult) -> None:
        prompt = np.ascontiguousarray(req.prompt_tokens, dtype="<i4").tobytes()
        params = json.dumps(dataclasses.asdict(req.params))
        self.store.add_sampled_sequences([
            (sequence_id, session_id, user, sampling_session_id, adapter_id, prompt,
             np.ascontiguousarray(seq.tokens, dtype="<i4").tobytes(),
             np.ascontiguousarray(seq.logprobs, dtype="<f4").tobytes(), params)
            for sequence_id, seq in zip(sequence_ids, result.sequences, strict=True)])

    def sweep(self) -> int:
        return self.store.delete_sampled_sequences_unused_since(time.time() - RECORD_TTL_S)

    def training_batch(self, session_id: str, user: str, req: ForwardBackwardReq) -> DatumBatch:
        """req's batch with the recorded sampler logprobs and SAMPLED_MASK; 400 naming the datum,
        the span and the rule for any datum that does not reproduce its records."""
        names = sorted({s.sequence_id for p in req.provenance for s in (*p.model_input, *p.targets)})
        records = self._records(names, session_id, user)
        offsets = req.batch.offsets()
        logprobs = np.zeros(len(req.batch.tokens), np.float32)
        sampled_mask = np.zeros(len(req.batch.tokens), np.float32)
        for i, provenance in enumerate(req.provenance):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            _check_datum(f"data[{i}]", provenance, records, req.batch.tokens[lo:hi],
                         req.batch.loss_inputs[TARGET_TOKENS][lo:hi], req.batch.loss_inputs["advantages"][lo:hi],
                         logprobs[lo:hi], sampled_mask[lo:hi])
        self.store.touch_sampled_sequences(names)
        inputs = {**req.batch.loss_inputs, "logprobs": logprobs, SAMPLED_MASK: sampled_mask}
        return DatumBatch(tokens=req.batch.tokens, lengths=req.batch.lengths, loss_inputs=inputs)

    def _records(self, names: list[str], session_id: str, user: str) -> dict[str, RecordedSequence]:
        """The named records of this session (others' are as missing as unrecorded ones)."""
        rows = self.store.sampled_sequences(names, used_after=time.time() - RECORD_TTL_S)
        return {name: RecordedSequence(row["session_id"], row["user"],
                                       np.frombuffer(row["prompt_tokens"], "<i4").astype(np.int64),
                                       np.frombuffer(row["tokens"], "<i4").astype(np.int64),
                                       np.frombuffer(row["logprobs"], "<f4"))
                for name, row in rows.items() if row["session_id"] == session_id and row["user"] == user}


def _check_datum(where: str, provenance: DatumProvenance, records: dict[str, RecordedSequence],
                 tokens: np.ndarray, targets: np.ndarray, advantages: np.ndarray,
                 logprobs_out: np.ndarray, sampled_out: np.ndarray) -> None:
    """Check one datum; fill its recorded sampler logprobs and sampled-target mask."""
    for j, span, start, record in _located(f"{where}.model_input_spans", provenance.model_input, records):
        if not np.array_equal(tokens[start:start + span.length], record.source(span)[_range(span)]):
            raise _broken(f"{where}.model_input_spans[{j}]", span, f"model_input[{start}:{start + span.length}] "
                          f"differs from the recorded {_part(span)}")
    for j, span, start, record in _located(f"{where}.loss_fn_input_spans", provenance.targets, records):
        if not span.sampled:
            continue
        stop = start + span.length
        if not np.array_equal(targets[start:stop], record.tokens[_range(span)]):
            raise _broken(f"{where}.loss_fn_input_spans[{j}]", span,
                          f"target_tokens[{start}:{stop}] differ from the recorded sampled tokens")
        logprobs_out[start:stop] = record.logprobs[_range(span)]
        sampled_out[start:stop] = 1.0
    stray = np.flatnonzero((advantages != 0) & (sampled_out == 0))
    if len(stray):
        raise ApiError(400, f"{where}.loss_fn_inputs['advantages'] is nonzero at position {int(stray[0])}, "
                            "which no sampled_tokens span covers: advantages must be 0 on prompt-span targets")


def _located(where: str, spans: list[ProvenanceSpan], records: dict[str, RecordedSequence]):
    """(index, span, first position it covers, its record) for each span, checking that the
    record exists and the span lies within it."""
    start = 0
    for j, span in enumerate(spans):
        record = records.get(span.sequence_id)
        if record is None:
            raise _broken(f"{where}[{j}]", span, "names no sample recorded in this training run's session "
                          "(sample with record_stability_info=True; records are kept 24 h after last use)")
        if span.offset + span.length > len(record.source(span)):
            raise _broken(f"{where}[{j}]", span, f"runs past the end of the recorded {_part(span)} "
                          f"({len(record.source(span))} tokens)")
        yield j, span, start, record
        start += span.length


def _range(span: ProvenanceSpan) -> slice:
    return slice(span.offset, span.offset + span.length)


def _part(span: ProvenanceSpan) -> str:
    return "sampled tokens" if span.sampled else "prompt"


def _broken(where: str, span: ProvenanceSpan, rule: str) -> ApiError:
    kind = "sampled_tokens" if span.sampled else "prompt_tokens"
    return ApiError(400, f"{where} ({kind} of {span.sequence_id!r}, offset {span.offset}, length {span.length}) "
                         f"{rule}")
