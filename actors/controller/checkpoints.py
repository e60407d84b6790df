"""The REST side of training runs and checkpoints: listings, delete, publish, TTL, downloads.

Everything here reads and writes the SQLite store; nothing waits on a worker. A
checkpoint lives in `STATE_DIR/checkpoints/<model_id>/<kind>/<name>/`; deleting it (by
hand or when its TTL runs out, in `sweep`) removes that directory and its row.

Downloads (`external_weights_urls`): the controller mints an unguessable token per
request, valid for URL_TTL_S; the API turns it into one URL per file under
`/api/v1/checkpoint_files/<token>/<relpath>` and serves those GETs (the token is the
credential: `tinker checkpoint download` fetches them with plain GETs, no API key).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from actors.controller.errors import ApiError
from actors.controller.store import StateStore
from cluster.messages import (
    Caller, CheckpointInfo, CheckpointUpdatedResp, DeleteCheckpointReq, ExternalWeightsUrlsReq, ExternalWeightsUrlsResp,
    GetTrainingRunReq, GetTrainingRunResp, ListCheckpointsReq, ListCheckpointsResp, ListTrainingRunsReq,
    ListTrainingRunsResp, ResolveDownloadReq, ResolveDownloadResp, SetCheckpointPublicReq, SetCheckpointTtlReq,
    TrainingRunInfo, WeightsInfoReq, WeightsInfoResp,
)

log = logging.getLogger(__name__)
URL_TTL_S = 3600.0  # how long a download URL works


def as_str_dict(metadata: dict[str, Any] | None) -> dict[str, str]:
    """User metadata as Tinker's REST objects type it (str -> str): other values as JSON text."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def checkpoint_info(row: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(tinker_path=row["tinker_path"], model_id=row["model_id"], kind=row["kind"],
                          name=row["name"], created=row["created"], size_bytes=row["size_bytes"],
                          public=row["public"], expires_at=row["expires_at"],
                          user_metadata=as_str_dict(row["user_metadata"]))


def expiry_for(ttl_seconds: int | None) -> float | None:
    return None if ttl_seconds is None else time.time() + ttl_seconds


class CheckpointService:
    def __init__(self, store: StateStore):
        self.store = store

    # -- lookups --------------------------------------------------------------------------

    def live_checkpoint(self, tinker_path: str, caller: Caller) -> dict[str, Any]:
        """A checkpoint the caller may read: their own, or a published one."""
        row = self.store.checkpoint(tinker_path)
        if row is None or not (row["public"] or caller.owns(row["user"])):
            raise ApiError(404, f"no checkpoint at {tinker_path!r} (never saved, deleted, or expired)")
        return row

    def owned_checkpoint(self, tinker_path: str, caller: Caller) -> dict[str, Any]:
        """A checkpoint the caller may change or delete: their own (a published one of someone else's is 403)."""
        row = self.live_checkpoint(tinker_path, caller)
        if not caller.owns(row["user"]):
            raise ApiError(403, f"{tinker_path} is published by another user: only its owner can change or "
                                "delete it")
        return row

    def _run_row(self, model_id: str, caller: Caller) -> dict[str, Any]:
        row = self.store.training_run(model_id)
        if row is None or not caller.owns(row["user"]):
            raise ApiError(404, f"unknown training run {model_id!r}")
        return row

    def _run_info(self, row: dict[str, Any]) -> TrainingRunInfo:
        last = self.store.latest_checkpoint(row["model_id"], "weights")
        last_sampler = self.store.latest_checkpoint(row["model_id"], "sampler_weights")
        return TrainingRunInfo(
            model_id=row["model_id"], base_model=row["base_model"], owner=row["user"],
            lora_rank=row["lora"].get("rank"), last_request=row["last_request"],
            last_checkpoint=checkpoint_info(last) if last else None,
            last_sampler_checkpoint=checkpoint_info(last_sampler) if last_sampler else None,
            user_metadata=as_str_dict(row["user_metadata"]))

    # -- training runs --------------------------------------------------------------------

    def handle_ListTrainingRunsReq(self, req: ListTrainingRunsReq) -> ListTrainingRunsResp:
        rows, total = self.store.training_runs(req.caller.listing_user(), req.limit, req.offset)
        return ListTrainingRunsResp(runs=[self._run_info(r) for r in rows], total_count=total)

    def handle_GetTrainingRunReq(self, req: GetTrainingRunReq) -> GetTrainingRunResp:
        return GetTrainingRunResp(run=self._run_info(self._run_row(req.model_id, req.caller)))

    # -- checkpoints ----------------------------------------------------------------------

    def handle_ListCheckpointsReq(self, req: ListCheckpointsReq) -> ListCheckpointsResp:
        """One run's checkpoints (only its owner lists them, published or not), or the caller's."""
        if req.model_id is not None:
            self._run_row(req.model_id, req.caller)
            rows, total = self.store.checkpoints(req.model_id, None, req.limit, req.offset)
        else:
            rows, total = self.store.checkpoints(None, req.caller.listing_user(), req.limit, req.offset)
        return ListCheckpointsResp(checkpoints=[checkpoint_info(r) for r in rows], total_count=total)

    def handle_DeleteCheckpointReq(self, req: DeleteCheckpointReq) -> CheckpointUpdatedResp:
        self.delete(self.owned_checkpoint(req.tinker_path, req.caller))
        return CheckpointUpdatedResp()

    def handle_SetCheckpointPublicReq(self, req: SetCheckpointPublicReq) -> CheckpointUpdatedResp:
        self.owned_checkpoint(req.tinker_path, req.caller)
        self.store.set_checkpoint_public(req.tinker_path, req.public)
        return CheckpointUpdatedResp()

    def handle_SetCheckpointTtlReq(self, req: SetCheckpointTtlReq) -> CheckpointUpdatedResp:
        self.owned_checkpoint(req.tinker_path, req.caller)
        self.store.set_checkpoint_expiry(req.tinker_path, expiry_for(req.ttl_seconds))
        return CheckpointUpdatedResp()

    def handle_WeightsInfoReq(self, req: WeightsInfoReq) -> WeightsInfoResp:
        row = self.live_checkpoint(req.tinker_path, req.caller)
        config_path = Path(row["directory"]) / "adapter_config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise ApiError(404, f"checkpoint {req.tinker_path} has no readable adapter_config.json: {exc}") from None
        run = self.store.training_run(row["model_id"])
        kinds = config.get("tinkerd", {})
        return WeightsInfoResp(
            base_model=run["base_model"] if run else config.get("base_model_name_or_path", ""),
            lora_rank=int(config["r"]), train_unembed=bool(kinds.get("train_unembed", True)),
            train_mlp=bool(kinds.get("train_mlp", True)), train_attn=bool(kinds.get("train_attn", True)))

    def delete(self, row: dict[str, Any]) -> None:
        """Remove a checkpoint's files, then its row."""
        directory = Path(row["directory"])
        if directory.exists():
            shutil.rmtree(directory)
        self.store.delete_checkpoint(row["tinker_path"])
        log.info("deleted checkpoint %s (%s)", row["tinker_path"], directory)

    def sweep(self) -> int:
        """Delete every checkpoint whose TTL has run out, and stale download tokens."""
        expired = self.store.expired_checkpoints()
        for row in expired:
            try:
                self.delete(row)
            except OSError as exc:  # keep the row: the next sweep tries again
                log.error("could not delete expired checkpoint %s: %s", row["tinker_path"], exc)
        self.store.delete_expired_tokens()
        return len(expired)

    # -- downloads ------------------------------------------------------------------------

    def handle_ExternalWeightsUrlsReq(self, req: ExternalWeightsUrlsReq) -> ExternalWeightsUrlsResp:
        row = self.live_checkpoint(req.tinker_path, req.caller)
        if row["kind"] != "external_weights":
            raise ApiError(400, f"{req.tinker_path} is a {row['kind']} checkpoint; download URLs exist only for "
                                "external_weights checkpoints (export one with save_weights_external)")
        root = Path(row["directory"])
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        token, expires = secrets.token_urlsafe(32), time.time() + URL_TTL_S
        self.store.add_download_token(token, req.tinker_path, expires)
        return ExternalWeightsUrlsResp(token=token, files=files, expires=expires)

    def handle_ResolveDownloadReq(self, req: ResolveDownloadReq) -> ResolveDownloadResp:
        token = self.store.download_token(req.token)
        row = self.store.checkpoint(token["tinker_path"]) if token is not None else None
        if row is None:  # the token is the credential: whoever holds one may fetch its checkpoint's files
            raise ApiError(404, "unknown or expired download URL; ask for new ones with external_weights_urls")
        root = Path(row["directory"]).resolve()
        path = (root / req.relpath).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ApiError(404, f"{token['tinker_path']} has no file {req.relpath!r}")
        return ResolveDownloadResp(path=str(path))
