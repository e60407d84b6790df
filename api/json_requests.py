"""The JSON request bodies of sessions, models, optimizer steps and sampling sessions, as messages.

Responses leave out the SDK's `type` literals: the SDK accepts them absent, and a
wrong one would be an error.
"""

from __future__ import annotations

import math
from typing import Any

from api.errors import bad_request
from api.json_fields import JsonObject
from api.rest import ttl_from_json
from cluster.config import ModelConfig
from cluster.messages import (
    AdamParams, CreateModelReq, CreateSamplingSessionReq, CreateSessionReq, FinishSessionReq, GetInfoResp,
    LoadWeightsReq, LoraSpec, OptimStepReq, SaveWeightsExternalReq, SaveWeightsForSamplerReq, SaveWeightsReq,
    SessionHeartbeatReq,
)

_FINISH_REASONS = ("success", "errored", "interrupted")


def create_session_from_json(body: JsonObject) -> CreateSessionReq:
    tags = body.get_list("tags", [])
    if not all(isinstance(t, str) for t in tags):
        raise bad_request("tags must be a list of strings")
    return CreateSessionReq(tags=tags, user_metadata=body.get_object("user_metadata", JsonObject({}, "")).value,
                            sdk_version=body.get_str("sdk_version", ""),
                            display_name=body.get_str("display_name", None))


def _string_metadata(body: JsonObject) -> dict[str, str]:
    """A checkpoint's user_metadata: Tinker types it str -> str."""
    metadata = body.get_object("user_metadata", JsonObject({}, "")).value
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise bad_request(f"user_metadata values must be strings; not for {bad}")
    return metadata


def heartbeat_from_json(body: JsonObject) -> SessionHeartbeatReq:
    return SessionHeartbeatReq(session_id=body.get_str("session_id"))


def finish_session_from_json(session_id: str, body: JsonObject) -> FinishSessionReq:
    reason = body.get_object("reason").get_str("type", "success") if body.has("reason") else "success"
    if reason not in _FINISH_REASONS:
        raise bad_request(f"reason.type must be one of {list(_FINISH_REASONS)}, got {reason!r}")
    return FinishSessionReq(session_id=session_id, reason=reason)


def _check_optimizer_config(body: JsonObject) -> None:
    if body.has("optimizer_config"):
        optimizer = body.get_object("optimizer_config").get_str("type")
        if optimizer != "adamw":
            raise bad_request(f"optimizer_config type {optimizer!r} is not supported; this server trains with adamw")


def create_model_from_json(body: JsonObject) -> CreateModelReq:
    _check_optimizer_config(body)
    return CreateModelReq(session_id=body.get_str("session_id"), model_seq_id=body.get_int("model_seq_id"),
                          base_model=body.get_str("base_model"), lora=_lora_from_json(body),
                          user_metadata=body.get_object("user_metadata", JsonObject({}, "")).value)


def _lora_from_json(body: JsonObject) -> LoraSpec:
    if not body.has("lora_config"):
        return LoraSpec()
    lora = body.get_object("lora_config")
    default = LoraSpec()
    rank = lora.get_int("rank", default.rank)
    if rank < 1 or rank & (rank - 1):
        raise bad_request(f"LoRA rank must be a power of 2, got {rank}")
    return LoraSpec(rank=rank, seed=lora.get_int("seed", None),
                    train_attn=lora.get_bool("train_attn", default.train_attn),
                    train_mlp=lora.get_bool("train_mlp", default.train_mlp),
                    train_unembed=lora.get_bool("train_unembed", default.train_unembed))


def get_info_json(resp: GetInfoResp) -> dict[str, Any]:
    return {"model_id": resp.model_id,
            "model_data": {"arch": resp.arch, "model_name": resp.model_name, "tokenizer_id": resp.tokenizer_id},
            "is_lora": resp.is_lora, "lora_rank": resp.lora_rank, "model_name": resp.model_name}


def optim_step_from_json(body: JsonObject) -> OptimStepReq:
    if body.has("optimizer_params"):
        kind = body.get_object("optimizer_params").get_str("type", "")
        raise bad_request(f"optimizer_params of type {kind!r} are not supported; this server takes adam_params")
    # 0.38 serialises its `optim_params` field as adam_params; the alias is accepted as well
    key = "adam_params" if body.has("adam_params") or not body.has("optim_params") else "optim_params"
    return OptimStepReq(model_id=body.get_str("model_id"), seq_id=body.get_int("seq_id"),
                        adam=_adam_from_json(body.get_object(key)))


def _adam_from_json(params: JsonObject) -> AdamParams:
    default = AdamParams()
    values = {name: params.get_float(name, getattr(default, name)) for name in (
        "learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")}
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise bad_request(f"{params.path(name)} must be a finite number >= 0, got {value}")
    for name in ("beta1", "beta2"):
        if values[name] >= 1:
            raise bad_request(f"{params.path(name)} must be in [0, 1), got {values[name]}")
    if values["eps"] == 0:
        raise bad_request(f"{params.path('eps')} must be > 0")
    return AdamParams(**values)


def save_weights_for_sampler_from_json(body: JsonObject) -> SaveWeightsForSamplerReq:
    # `kind` ("snapshot" | "inflight") needs no handling: every save is an immutable
    # snapshot, which satisfies the inflight contract too
    kind = body.get_str("kind", "snapshot")
    if kind not in ("snapshot", "inflight"):
        raise bad_request(f"kind must be 'snapshot' or 'inflight', got {kind!r}")
    name = body.get_str("path", None)
    session_seq = body.get_int("sampling_session_seq_id", None)
    if name is None and session_seq is None:
        raise bad_request("save_weights_for_sampler needs a path (a checkpoint name) or a sampling_session_seq_id")
    ttl = ttl_from_json(body)
    if ttl is not None and name is None:
        raise bad_request("ttl_seconds applies to named sampler checkpoints (with a path) only")
    return SaveWeightsForSamplerReq(model_id=body.get_str("model_id"), seq_id=body.get_int("seq_id"),
                                    name=name, sampling_session_seq_id=session_seq, ttl_seconds=ttl,
                                    user_metadata=_string_metadata(body))


def create_sampling_session_from_json(body: JsonObject) -> CreateSamplingSessionReq:
    base_model = body.get_str("base_model", None)
    model_path = body.get_str("model_path", None)
    if base_model is None and model_path is None:
        raise bad_request("create_sampling_session needs a base_model or a model_path")
    if model_path is not None and not model_path.startswith("tinker://"):
        raise bad_request(f"model_path must be a tinker:// path, got {model_path!r}")
    return CreateSamplingSessionReq(session_id=body.get_str("session_id"),
                                    sampling_session_seq_id=body.get_int("sampling_session_seq_id"),
                                    base_model=base_model, model_path=model_path)


def save_weights_from_json(body: JsonObject) -> SaveWeightsReq:
    if not body.has("path"):
        raise bad_request("save_weights needs a path (the checkpoint name)")
    return SaveWeightsReq(model_id=body.get_str("model_id"), seq_id=body.get_int("seq_id"), name=body.get_str("path"),
                          overwrite=body.get_bool("overwrite", False), ttl_seconds=ttl_from_json(body),
                          user_metadata=_string_metadata(body))


def save_weights_external_from_json(body: JsonObject) -> SaveWeightsExternalReq:
    if body.get_list("age_encryption_recipients", []):
        raise bad_request("age_encryption_recipients: this server does not encrypt exports; leave it out "
                          "(downloads are served by this server itself)")
    return SaveWeightsExternalReq(model_id=body.get_str("model_id"), seq_id=body.get_int("seq_id"),
                                  name=body.get_str("path"), ttl_seconds=ttl_from_json(body))


def load_weights_from_json(body: JsonObject, model: ModelConfig) -> LoadWeightsReq:
    """Either `load_state` into model_id (+ seq_id) or a new model from a checkpoint (session_id + model_seq_id)."""
    _check_optimizer_config(body)
    base_model = body.get_str("base_model", None)
    if base_model is not None and base_model not in (model.name, model.path):
        raise bad_request(f"base_model {base_model!r} is not served here; this server serves {model.name!r}")
    if body.has("model_id") == body.has("session_id"):
        raise bad_request("load_weights needs either model_id + seq_id or session_id + model_seq_id")
    # weights_access_token has nothing to act on: checkpoints here are local
    return LoadWeightsReq(path=body.get_str("path"), with_optimizer=body.get_bool("optimizer", False),
                          model_id=body.get_str("model_id", None), seq_id=body.get_int("seq_id", None),
                          session_id=body.get_str("session_id", None),
                          model_seq_id=body.get_int("model_seq_id", None),
                          user_metadata=body.get_object("user_metadata", JsonObject({}, "")).value)
