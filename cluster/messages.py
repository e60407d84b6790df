"""Every control message that crosses a process boundary, in one place.

Rules (see README "Architecture"):
- a message is a keyword-only dataclass; `…Req` expects exactly one `…Resp` (or an
  `ErrorResp`) carrying the same `call_id`; `…Event` is one-way;
- numpy arrays anywhere inside a message travel as extra ZMQ frames (cluster/codec.py),
  never pickled; everything else must be msgpack-able (str, int, float, bool, None,
  bytes, list, dict with str keys, or another message dataclass);
- handlers are named `handle_<MessageName>`.

Token batches are flattened: `tokens` holds every datum's tokens back to back and
`lengths` says where each datum ends, so a batch is two arrays whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MESSAGE_TYPES: dict[str, type] = {}


def message(cls):
    """Register a dataclass as a wire message (its name is its tag on the wire)."""
    cls = dataclass(kw_only=True)(cls)
    MESSAGE_TYPES[cls.__name__] = cls
    return cls


@message
class Message:
    call_id: int = 0


# ----------------------------------------------------------------------------------
# Shared value types
# ----------------------------------------------------------------------------------


@message
class LoraSpec:
    rank: int = 32
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int | None = None


@message
class AdamParams:
    """Tinker's AdamW knobs and its defaults (decoupled weight decay; clip 0 = off)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@message
class DatumBatch:
    """Datums flattened: datum i owns tokens[offsets[i]:offsets[i+1]] of every array.

    `loss_inputs[name]` has shape `[total_tokens, *trailing]` (e.g. `[T]` or `[T, K]`
    for top-k distillation targets); position t of `tokens` predicts
    `loss_inputs["target_tokens"][t]`.
    """

    tokens: np.ndarray  # int64 [total_tokens]
    lengths: np.ndarray  # int64 [num_datums]
    loss_inputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_datums(self) -> int:
        return int(len(self.lengths))

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def select(self, start: int, stop: int) -> "DatumBatch":
        """Datums [start, stop) as their own batch (used to shard across DP ranks)."""
        offs = self.offsets()
        lo, hi = int(offs[start]), int(offs[stop])
        return DatumBatch(
            tokens=self.tokens[lo:hi],
            lengths=self.lengths[start:stop],
            loss_inputs={k: v[lo:hi] for k, v in self.loss_inputs.items()},
        )


@message
class ProvenanceSpan:
    """A run of a datum field's positions that reproduces part of a recorded sample.

    `sampled` False: positions [offset, offset + length) of the prompt of the request that
    sampled `sequence_id`; True: of that sequence's sampled tokens (SDK 0.38's
    PromptProvenanceSpan / SampledProvenanceSpan). Runs tile their field in order.
    """

    sequence_id: str
    sampled: bool
    offset: int = 0
    length: int = 0


@message
class DatumProvenance:
    """Where one datum's tokens came from: runs tiling `model_input`, and runs tiling `target_tokens`."""

    model_input: list[ProvenanceSpan] = field(default_factory=list)
    targets: list[ProvenanceSpan] = field(default_factory=list)


@message
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # False only for an explicit `stop: []`, which Tinker defines as "run to max_tokens"
    stop_at_eos: bool = True


# ----------------------------------------------------------------------------------
# Results held by futures (the API renders them as JSON or protobuf)
# ----------------------------------------------------------------------------------


@message
class JsonResult:
    """A result whose wire form is a plain JSON object (create_model, optim_step, …)."""

    payload: dict[str, Any] = field(default_factory=dict)


@message
class ForwardBackwardResult:
    """Per-datum outputs flattened like DatumBatch (same lengths, same trailing shape)."""

    lengths: np.ndarray  # int64 [num_datums]
    logprobs: np.ndarray  # float32 [total_tokens, *trailing]
    elementwise_loss: np.ndarray  # float32 [total_tokens, *trailing]
    metrics: dict[str, float] = field(default_factory=dict)


@message
class SampledSequence:
    tokens: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n]
    stop_reason: str = "length"  # "stop" | "length"
    # int32 / float32 [n, k]: the top-k of the distribution each token was drawn from;
    # None when topk_sample_logprobs was not requested
    topk_token_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


@message
class SampleResult:
    sequences: list[SampledSequence] = field(default_factory=list)
    # float32 [prompt_len], NaN at position 0 and before the last N with prompt_logprobs_last_n;
    # None when not requested
    prompt_logprobs: np.ndarray | None = None
    # int32 / float32 [prompt_len, k]; all-sentinel rows where prompt_logprobs is NaN; None when not requested
    topk_prompt_token_ids: np.ndarray | None = None
    topk_prompt_logprobs: np.ndarray | None = None
    # float32 [prompt_len - 1, K], 0.0 where the request named no id; None when not requested
    target_prompt_logprobs: np.ndarray | None = None
    # bool, same shape: the cells a sparse (CSR) request listed, so the answer is CSR with the
    # same indices whichever API process renders it; None for a dense request
    target_prompt_listed: np.ndarray | None = None
    # int64 / float32 [prompt_len - 1, k]; None when prompt_alt_tokens_k was 0
    prompt_alt_token_ids: np.ndarray | None = None
    prompt_alt_logprobs: np.ndarray | None = None


# ----------------------------------------------------------------------------------
# API front-end  <->  controller
# ----------------------------------------------------------------------------------


@message
class Caller:
    """Who sent a request: the API sets it from the API key (cluster/users.py); the
    controller answers 404 for anything the caller does not own (admins own everything)."""

    user: str = ""
    admin: bool = False

    def owns(self, user: str) -> bool:
        return self.admin or user == self.user

    def listing_user(self) -> str | None:
        """Whose rows a listing shows this caller: their own, or everyone's (None) for an admin."""
        return None if self.admin else self.user


@message
class UserReq(Message):
    """A request made on a user's behalf: every API -> controller request but health and downloads."""

    caller: Caller = field(default_factory=Caller)


@message
class ErrorResp(Message):
    """Any request may be answered by this instead of its `…Resp`."""

    status: int = 500  # HTTP status the API should answer with
    detail: str = ""


@message
class SubmitResp(Message):
    """Answer to every future-returning submission."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


@message
class CreateSessionReq(UserReq):
    tags: list[str] = field(default_factory=list)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    sdk_version: str = ""
    display_name: str | None = None


@message
class CreateSessionResp(Message):
    session_id: str


@message
class SessionHeartbeatReq(UserReq):
    session_id: str


@message
class SessionHeartbeatResp(Message):
    pass


@message
class FinishSessionReq(UserReq):
    session_id: str
    reason: str = "success"


@message
class FinishSessionResp(Message):
    pass


@message
class CreateModelReq(UserReq):
    session_id: str
    model_seq_id: int
    base_model: str
    lora: LoraSpec
    user_metadata: dict[str, Any] = field(default_factory=dict)


@message
class GetInfoReq(UserReq):
    model_id: str


@message
class GetInfoResp(Message):
    model_id: str
    model_name: str
    tokenizer_id: str
    arch: str
    lora_rank: int
    is_lora: bool = True


@message
class ForwardBackwardReq(UserReq):
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    batch: DatumBatch
    # one per datum, for losses that train on recorded samples (stable_reinforce); else None
    provenance: list[DatumProvenance] | None = None


@message
class OptimStepReq(UserReq):
    model_id: str
    seq_id: int
    adam: AdamParams


@message
class SaveWeightsForSamplerReq(UserReq):
    model_id: str
    seq_id: int
    name: str | None = None  # named snapshot -> tinker://<model>/sampler_weights/<name>
    sampling_session_seq_id: int | None = None  # ephemeral -> a new sampling session
    ttl_seconds: int | None = None  # named only: the checkpoint expires this long after it is written
    user_metadata: dict[str, str] = field(default_factory=dict)


@message
class SaveWeightsReq(UserReq):
    """`save_state`: weights and optimizer state -> tinker://<model>/weights/<name>."""

    model_id: str
    seq_id: int
    name: str
    overwrite: bool = False
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)


@message
class SaveWeightsExternalReq(UserReq):
    """Export the adapter in Hugging Face PEFT form -> tinker://<model>/external_weights/<name>."""

    model_id: str
    seq_id: int
    name: str
    ttl_seconds: int | None = None


@message
class LoadWeightsReq(UserReq):
    """Load a `weights` checkpoint: into an existing model (legacy `load_state`, sequenced
    by model_id + seq_id) or as a new model (`create_training_client_from_state`, by
    session_id + model_seq_id, the new model's implicit seq 0)."""

    path: str
    with_optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)  # of the new model (create-from-state)


@message
class SkipSeqReq(UserReq):
    """A sequenced training request (model_id + seq_id) that the API refused with a 4xx.

    The SDK never resends a seq_id whose submission failed: its next request carries
    seq_id + 1. So the controller must count this seq_id as done (a no-op), or the
    model's ledger would hold every later request back waiting for it.
    """

    model_id: str
    seq_id: int
    detail: str = ""  # why the API refused it, for the log


@message
class SkipSeqResp(Message):
    pass


@message
class CreateSamplingSessionReq(UserReq):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


@message
class CreateSamplingSessionResp(Message):
    sampling_session_id: str


@message
class GetSamplerReq(UserReq):
    sampler_id: str


@message
class GetSamplerResp(Message):
    sampler_id: str
    base_model: str
    model_path: str | None = None


@message
class SampleReq(UserReq):
    sampling_session_id: str
    seq_id: int
    prompt_tokens: np.ndarray  # int64 [n]
    num_samples: int = 1
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    # SDK 0.38 options; their rules are in cluster/sample_options.py
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None  # None = score the whole prompt
    target_prompt_token_ids: np.ndarray | None = None  # int64 [prompt_len - 1, K]; -1 = nothing asked
    target_prompt_listed: np.ndarray | None = None  # bool, same shape: a sparse request's cells
    prompt_alt_tokens_k: int = 0
    # keep each sequence (prompt, tokens, logprobs, adapter, params) for stable_reinforce
    record_stability_info: bool = False


@message
class CancelFutureReq(UserReq):
    request_id: str


@message
class CancelFutureResp(Message):
    cancelled: bool  # False: the future had already settled (or is not a sample)


@message
class RetrieveFutureReq(UserReq):
    request_id: str
    wait_s: float = 25.0  # long-poll budget; the controller answers "pending" after it


@message
class RetrieveFutureResp(Message):
    status: str  # "pending" | "done" | "error"
    queue_state: str = "active"
    result: JsonResult | ForwardBackwardResult | SampleResult | None = None
    error: str = ""
    category: str = "server"  # "user" | "server" | "unknown" (Tinker's RequestFailedError)


MAX_STATUS_WAIT_S = 20  # the longest a ClusterStatusReq (and so the API's healthz?wait_s=) may wait


@message
class ClusterStatusReq(Message):
    # > 0 (at most MAX_STATUS_WAIT_S): answer once the cluster has started (or failed to), or after this long:
    # the launcher's wait for a cold start, which then learns of it at once instead of a poll interval later
    wait_s: float = 0.0


@message
class ClusterStatusResp(Message):
    ready: bool
    model_name: str
    workers: dict[str, str] = field(default_factory=dict)  # name -> state
    detail: str = ""
    failed: bool = False  # a worker failed: the cluster will not become ready (detail says why)
    # the colocation state machine: {"mode": "dedicated"} or {"mode": "colocated", "phase": …, "barriers": […]}
    residency: dict[str, Any] = field(default_factory=dict)
    # serving, but not all of it: e.g. the trainer group could not be restarted (training answers 503)
    degraded: str = ""


@message
class FutureCompletion:
    request_id: str
    state: str  # "finished" | "failed"


@message
class RetrieveFuturesReq(UserReq):
    """Batched completion polling of one sampling session's samples (`retrieve_futures`).

    Completions at or before `prev_cursor` are acknowledged and forgotten; the answer
    holds every later one, waiting up to `wait_s` for the first if there is none yet.
    """

    sampling_session_id: str
    cloned_sampler_id: int = 0
    prev_cursor: int = 0
    wait_s: float = 25.0


@message
class RetrieveFuturesResp(Message):
    completions: list[FutureCompletion] = field(default_factory=list)
    cursor: int = 0


# ----------------------------------------------------------------------------------
# REST listings (API <-> controller): training runs, checkpoints, sessions. Answered
# with plain JSON, never futures; times are unix seconds (the API renders ISO-8601).
# ----------------------------------------------------------------------------------

@message
class CheckpointInfo:
    tinker_path: str
    model_id: str
    kind: str  # "weights" | "sampler_weights" | "external_weights"
    name: str
    created: float  # unix time
    size_bytes: int | None = None
    public: bool = False
    expires_at: float | None = None  # unix time; None = never
    user_metadata: dict[str, str] = field(default_factory=dict)


@message
class TrainingRunInfo:
    model_id: str
    base_model: str
    owner: str
    lora_rank: int | None
    last_request: float  # unix time
    is_lora: bool = True
    last_checkpoint: CheckpointInfo | None = None
    last_sampler_checkpoint: CheckpointInfo | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)


@message
class ListTrainingRunsReq(UserReq):
    limit: int = 20
    offset: int = 0


@message
class ListTrainingRunsResp(Message):
    runs: list[TrainingRunInfo] = field(default_factory=list)
    total_count: int = 0


@message
class GetTrainingRunReq(UserReq):
    model_id: str


@message
class GetTrainingRunResp(Message):
    run: TrainingRunInfo


@message
class ListCheckpointsReq(UserReq):
    """One run's checkpoints (model_id set, all of them) or everyone's (paged)."""

    model_id: str | None = None
    limit: int = 100
    offset: int = 0


@message
class ListCheckpointsResp(Message):
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    total_count: int = 0


@message
class DeleteCheckpointReq(UserReq):
    tinker_path: str


@message
class SetCheckpointPublicReq(UserReq):
    tinker_path: str
    public: bool


@message
class SetCheckpointTtlReq(UserReq):
    tinker_path: str
    ttl_seconds: int | None  # None = never expires


@message
class CheckpointUpdatedResp(Message):
    """Answer to DeleteCheckpointReq, SetCheckpointPublicReq, SetCheckpointTtlReq."""


@message
class ExternalWeightsUrlsReq(UserReq):
    tinker_path: str


@message
class ExternalWeightsUrlsResp(Message):
    """A download token for the checkpoint's files; the API builds one URL per file."""

    token: str
    files: list[str] = field(default_factory=list)  # paths relative to the checkpoint root
    expires: float = 0.0  # unix time


@message
class ResolveDownloadReq(Message):
    token: str
    relpath: str


@message
class ResolveDownloadResp(Message):
    path: str  # absolute path of the file on this node


@message
class WeightsInfoReq(UserReq):
    tinker_path: str


@message
class WeightsInfoResp(Message):
    base_model: str
    lora_rank: int
    train_unembed: bool
    train_mlp: bool
    train_attn: bool
    is_lora: bool = True


@message
class ListSessionsReq(UserReq):
    limit: int = 20
    offset: int = 0


@message
class ListSessionsResp(Message):
    session_ids: list[str] = field(default_factory=list)
    total_count: int = 0


@message
class GetSessionReq(UserReq):
    session_id: str


@message
class GetSessionResp(Message):
    training_run_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)
    user_metadata: dict[str, str] = field(default_factory=dict)
    display_name: str | None = None


@message
class ReassignUserReq(UserReq):
    """Admins only: hand every row of one user to another (say, the `legacy` rows from before users)."""

    from_user: str
    to_user: str


@message
class ReassignUserResp(Message):
    moved: dict[str, int] = field(default_factory=dict)  # table -> rows handed over


# ----------------------------------------------------------------------------------
# Workers (trainer ranks, engines)  <->  controller
# ----------------------------------------------------------------------------------


@message
class RankCoords:
    """A trainer rank's place in the parallel layout (cluster/parallel.py)."""

    dp: int = 0
    tp: int = 0
    pp: int = 0


@message
class WorkerReadyEvent(Message):
    role: str  # "trainer" | "engine"
    rank: int
    world_size: int
    weights_address: str = ""  # engines: where trainers push adapters
    coords: RankCoords | None = None  # trainers: the coordinates the rank computed for itself
    info: dict[str, Any] = field(default_factory=dict)


@message
class WorkerFailedEvent(Message):
    """Sent by a worker that is about to die, so the controller can name the cause."""

    role: str
    rank: int
    error: str


@message
class ShutdownEvent(Message):
    pass


@message
class WorkerHeartbeatEvent(Message):
    """Sent by every engine (and trainer rank) every heartbeat interval, from a thread of its own, so the
    controller learns of a dead process within the heartbeat timeout even while the worker computes."""

    role: str
    rank: int
    pid: int
    host: str = ""
    memory: dict[str, float] = field(default_factory=dict)  # rss_bytes, device_allocated_bytes, …


# ----------------------------------------------------------------------------------
# The admin probe (launch/probe.py) <-> controller, on the controller's API socket
# ----------------------------------------------------------------------------------


@message
class AdminReq(Message):
    """An admin command; `token` is the one the launcher wrote into STATE_DIR/run/admin.token (mode 0600)."""

    token: str = ""


@message
class AdminStatusReq(AdminReq):
    pass


@message
class AdminSessionsReq(AdminReq):
    pass


@message
class AdminRunsReq(AdminReq):
    pass


@message
class AdminFuturesReq(AdminReq):
    recent: int = 20  # settled futures to list besides every pending one


@message
class AdminDrainReq(AdminReq):
    """Refuse new work from now on (503); what is queued or running finishes."""


@message
class AdminKillRunReq(AdminReq):
    model_id: str


@message
class AdminShutdownReq(AdminReq):
    """Stop the cluster: the controller answers, tells every worker to stop, and exits; the launcher follows."""


@message
class AdminWorkerReportReq(AdminReq):
    """The launcher's line to the controller about its processes (launch/cluster.py's supervisor).

    `report`: "" (a poll), "exited" (the process(es) of `role` `index` exited: for role "trainer" the whole group
    is gone), or "lost" (the launcher gave up restarting them). Answered with the controller's view of the trainer
    group: `info["trainer_deaths"]` counts the deaths it declared, so the launcher can tell a group the controller
    found hung (late heartbeats, a call past its timeout) and kill it.
    """

    role: str = "trainer"
    index: int = 0
    report: str = ""
    detail: str = ""


@message
class AdminResp(Message):
    info: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the table the command lists, one dict a row


# ----------------------------------------------------------------------------------
# Residency: the barriers of colocated training and sampling (actors/controller/residency.py)
# ----------------------------------------------------------------------------------


@message
class EngineReleaseMemoryReq(Message):
    """Give back memory for a training phase; only while the engine is idle (the controller drains it first).

    tags: "kv_cache" (the KV cache and what lives with it, e.g. CUDA graphs), "weights" (the base model;
    an engine whose weights are not backed up elsewhere reloads them from the model's files on resume).
    """

    tags: list[str]


@message
class EngineResumeMemoryReq(Message):
    tags: list[str]


@message
class EngineMemoryResp(Message):
    memory: dict[str, float] = field(default_factory=dict)  # measured after the change


@message
class TrainerOffloadReq(Message):
    """Move the base weights and optimizer state off the device (a no-op where there is no device)."""


@message
class TrainerOnloadReq(Message):
    pass


@message
class TrainerMemoryResp(Message):
    moved: bool = False  # False: nothing to move (a CPU trainer holds no device memory)
    memory: dict[str, float] = field(default_factory=dict)


@message
class TrainerCreateAdapterReq(Message):
    slot: int
    lora: LoraSpec


@message
class TrainerCreateAdapterResp(Message):
    pass


@message
class TrainerDropAdapterReq(Message):
    slot: int


@message
class TrainerDropAdapterResp(Message):
    pass


@message
class PassEntry:
    """One model's part of a clock cycle's pass: this rank's shard of one forward_backward (an empty shard is
    legal). Entries of several models (slots) share one pass; each keeps its own loss."""

    slot: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    batch: DatumBatch


# how a rank's refusal begins when another rank refused the request: the controller passes on the refusing
# rank's own reason instead (actors/controller/trainer_calls.py)
ECHOED_REJECTION = "another trainer rank rejected"


@message
class PassOutcome:
    """One entry's result, or why every rank refused it (a refused entry changes nothing; the others ran)."""

    result: ForwardBackwardResult | None = None
    rejected: str = ""


@message
class TrainerForwardBackwardReq(Message):
    """One clock cycle's pass on one rank: every entry's rows in one batch, each row with its entry's slot."""

    entries: list[PassEntry]


@message
class TrainerForwardBackwardResp(Message):
    outcomes: list[PassOutcome]  # one per entry, in order


@message
class SlotStep:
    slot: int
    adam: AdamParams


@message
class StepOutcome:
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: str = ""


@message
class TrainerOptimStepReq(Message):
    """The optim_steps of one clock cycle (several models' slots; their gradients are all-reduced together)."""

    steps: list[SlotStep]


@message
class TrainerOptimStepResp(Message):
    outcomes: list[StepOutcome]  # one per step, in order


@message
class TrainerPushAdapterReq(Message):
    """Export a slot's adapter: push it to engines in memory and/or write it to disk.

    Only trainer rank 0 acts on it (weights are identical across DP ranks); the others
    answer at once.
    """

    slot: int
    adapter_id: str
    engine_addresses: list[str] = field(default_factory=list)
    save_dir: str | None = None  # PEFT layout: adapter_model.safetensors + adapter_config.json


@message
class TrainerPushAdapterResp(Message):
    size_bytes: int = 0


@message
class EngineLoadAdapterReq(Message):
    """Sent by trainer rank 0 straight to an engine's weights socket.

    `tensors` uses PEFT key names (see actors/lora.py); each array is a frame.
    """

    adapter_id: str
    lora: LoraSpec
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@message
class EngineLoadAdapterResp(Message):
    pass


@message
class EngineLoadAdapterFromDiskReq(Message):
    adapter_id: str
    path: str  # a directory in PEFT layout


@message
class EngineUnloadAdapterReq(Message):
    adapter_id: str


@message
class EngineUnloadAdapterResp(Message):
    pass


@message
class EngineSampleReq(Message):
    adapter_id: str | None  # None = the base model
    request_id: str = ""  # the controller's future: what EngineCancelSampleReq names
    prompt_tokens: np.ndarray  # int64 [n]
    num_samples: int = 1
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    # SDK 0.38 options; their rules are in cluster/sample_options.py
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None  # None = score the whole prompt
    target_prompt_token_ids: np.ndarray | None = None  # int64 [prompt_len - 1, K]; -1 = nothing asked
    target_prompt_listed: np.ndarray | None = None  # bool, same shape: a sparse request's cells
    prompt_alt_tokens_k: int = 0


@message
class EngineSampleResp(Message):
    result: SampleResult


@message
class EngineCancelSampleReq(Message):
    """Drop a sample request's work; the engine answers that request with a 499 ErrorResp."""

    request_id: str


@message
class EngineCancelSampleResp(Message):
    cancelled: bool  # False: not running there (already answered)


# ----------------------------------------------------------------------------------
# Trainer checkpoints
# ----------------------------------------------------------------------------------


@message
class TrainerSaveStateReq(Message):
    """Write a slot's training state as a `weights` checkpoint directory.

    Layout: the adapter in PEFT layout (`adapter_model.safetensors` +
    `adapter_config.json`) plus, with the optimizer, `optimizer.safetensors` (the slot's
    Adam moments under the adapter's tensor names + `.exp_avg` / `.exp_avg_sq`, and
    `step`; float32). Written into `directory + ".tmp"`, then renamed into place (an
    existing `directory` is replaced). Only trainer rank 0 writes (DP ranks hold the same
    state); the others answer at once with size_bytes=0.
    """

    slot: int
    directory: str
    with_optimizer: bool = True


@message
class TrainerSaveStateResp(Message):
    size_bytes: int = 0  # the checkpoint's total size on disk (rank 0)


@message
class TrainerLoadStateReq(Message):
    """Load a `weights` (or PEFT adapter) directory into a slot; sent to every trainer rank.

    The LoRA spec (rank, alpha, trained modules) comes from the checkpoint, not from the
    slot's previous adapter. Without the optimizer the slot starts with fresh Adam state
    (Tinker's `load_state`); with it, the exact moments and step count
    (`load_state_with_optimizer`). On any error no rank changes the slot.
    """

    slot: int
    directory: str
    with_optimizer: bool
    seed: int | None = None  # recorded in the returned spec


@message
class TrainerLoadStateResp(Message):
    lora: LoraSpec  # the spec read back from the checkpoint

