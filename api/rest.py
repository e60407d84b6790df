"""The REST endpoints (RestClient and the `tinker` CLI): training runs, checkpoints, sessions, downloads.

Plain JSON in and out, no futures. Shapes follow the SDK's types (`TrainingRun`,
`Checkpoint`, `Cursor`, …): datetimes are ISO-8601 in UTC. Routes that name a
checkpoint carry its id unencoded, slash included (`…/checkpoints/weights/ckpt-1/ttl`),
and run ids contain `:`; the checkpoint id pattern below is what keeps a checkpoint
named `publish` apart from the `/publish` route.

Downloads: `external_weights_urls` answers one URL per file under
`/api/v1/checkpoint_files/<token>/<relpath>`, served by this process (the file is
streamed from the state dir). The token, minted by the controller, is the credential:
those GETs need no API key, because the CLI fetches them with plain `urllib`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from api.errors import HttpError, bad_request
from api.json_fields import JsonObject, parse_json_object
from cluster.messages import (
    CheckpointInfo, DeleteCheckpointReq, ExternalWeightsUrlsReq, GetSessionReq, GetTrainingRunReq,
    ListCheckpointsReq, ListSessionsReq, ListTrainingRunsReq, ReassignUserReq, ResolveDownloadReq,
    SetCheckpointPublicReq, SetCheckpointTtlReq, TrainingRunInfo, WeightsInfoReq,
)
from cluster.users import check_user_name

PREFIX = "/api/v1"
DOWNLOAD_PREFIX = f"{PREFIX}/checkpoint_files/"  # open: the token in the URL is the credential
CHECKPOINT_ID = r"(?:weights|sampler_weights|external_weights)/[^/]+"
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
MAX_TTL_S = 10 * 365 * 24 * 3600  # Tinker's upper bound: 10 years
MAX_PAGE = 1000
_ACCESS_SCOPES = ("owned", "accessible")

Call = Callable[..., Awaitable[Any]]


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def checkpoint_json(c: CheckpointInfo) -> dict[str, Any]:
    return {"checkpoint_id": f"{c.kind}/{c.name}", "checkpoint_type": CHECKPOINT_TYPES[c.kind],
            "time": iso(c.created), "tinker_path": c.tinker_path, "size_bytes": c.size_bytes,
            "public": c.public, "user_metadata": c.user_metadata, "expires_at": iso(c.expires_at)}


def training_run_json(r: TrainingRunInfo) -> dict[str, Any]:
    return {"training_run_id": r.model_id, "base_model": r.base_model, "model_owner": r.owner,
            "is_lora": r.is_lora, "corrupted": False, "lora_rank": r.lora_rank,
            "last_request_time": iso(r.last_request),
            "last_checkpoint": checkpoint_json(r.last_checkpoint) if r.last_checkpoint else None,
            "last_sampler_checkpoint": (checkpoint_json(r.last_sampler_checkpoint)
                                        if r.last_sampler_checkpoint else None),
            "user_metadata": r.user_metadata}


def ttl_from_json(body: JsonObject, key: str = "ttl_seconds") -> int | None:
    """A TTL in seconds (None = never expires). Tinker documents 1 h … 10 y; any positive TTL is taken here."""
    ttl = body.get_int(key, None)
    if ttl is not None and not 1 <= ttl <= MAX_TTL_S:
        raise bad_request(f"{body.path(key)} must be between 1 and {MAX_TTL_S} seconds (10 years), or null; "
                          f"got {ttl}")
    return ttl


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"query parameter {name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise bad_request(f"query parameter {name} must be in [{low}, {high}], got {value}")
    return value


def _check_scope(request: web.Request) -> None:
    scope = request.query.get("access_scope", "owned")
    if scope not in _ACCESS_SCOPES:
        raise bad_request(f"access_scope must be one of {list(_ACCESS_SCOPES)}, got {scope!r}")
    if "project_id" in request.query:
        raise bad_request("project_id: this server has no projects; leave it out")


def _page(request: web.Request, default_limit: int) -> tuple[int, int]:
    return (query_int(request, "limit", default_limit, 1, MAX_PAGE),
            query_int(request, "offset", 0, 0, 2**31 - 1))


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


class RestHandlers:
    def __init__(self, call: Call):
        self.call = call

    @staticmethod
    def _tinker_path(request: web.Request) -> str:
        return f"tinker://{request.match_info['run_id']}/{request.match_info['checkpoint_id']}"

    # -- training runs --------------------------------------------------------------------

    async def list_training_runs(self, request: web.Request) -> web.Response:
        _check_scope(request)
        limit, offset = _page(request, 20)
        resp = await self.call(request, ListTrainingRunsReq(limit=limit, offset=offset))
        return json_response({"training_runs": [training_run_json(r) for r in resp.runs],
                              "cursor": {"offset": offset, "limit": limit, "total_count": resp.total_count}})

    async def get_training_run(self, request: web.Request) -> web.Response:
        _check_scope(request)
        resp = await self.call(request, GetTrainingRunReq(model_id=request.match_info["run_id"]))
        return json_response(training_run_json(resp.run))

    # -- checkpoints ----------------------------------------------------------------------

    async def list_run_checkpoints(self, request: web.Request) -> web.Response:
        resp = await self.call(request, ListCheckpointsReq(model_id=request.match_info["run_id"], limit=2**31 - 1))
        return json_response({"checkpoints": [checkpoint_json(c) for c in resp.checkpoints]})

    async def list_user_checkpoints(self, request: web.Request) -> web.Response:
        limit, offset = _page(request, 100)
        resp = await self.call(request, ListCheckpointsReq(limit=limit, offset=offset))
        return json_response({"checkpoints": [checkpoint_json(c) for c in resp.checkpoints],
                              "cursor": {"offset": offset, "limit": limit, "total_count": resp.total_count}})

    async def delete_checkpoint(self, request: web.Request) -> web.Response:
        await self.call(request, DeleteCheckpointReq(tinker_path=self._tinker_path(request)))
        return json_response({})

    async def publish(self, request: web.Request) -> web.Response:
        await self.call(request, SetCheckpointPublicReq(tinker_path=self._tinker_path(request), public=True))
        return json_response({})

    async def unpublish(self, request: web.Request) -> web.Response:
        await self.call(request, SetCheckpointPublicReq(tinker_path=self._tinker_path(request), public=False))
        return json_response({})

    async def set_ttl(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        if "ttl_seconds" not in body.value:
            raise bad_request('set the TTL with {"ttl_seconds": <seconds>} or clear it with {"ttl_seconds": null}')
        await self.call(request, SetCheckpointTtlReq(tinker_path=self._tinker_path(request),
                                                     ttl_seconds=ttl_from_json(body)))
        return json_response({})

    async def weights_info(self, request: web.Request) -> web.Response:
        tinker_path = parse_json_object(await request.read()).get_str("tinker_path")
        resp = await self.call(request, WeightsInfoReq(tinker_path=tinker_path))
        return json_response({"base_model": resp.base_model, "is_lora": resp.is_lora, "lora_rank": resp.lora_rank,
                              "train_unembed": resp.train_unembed, "train_mlp": resp.train_mlp,
                              "train_attn": resp.train_attn, "optimizer_config": {"type": "adamw"}})

    # -- downloads ------------------------------------------------------------------------

    async def external_weights_urls(self, request: web.Request) -> web.Response:
        resp = await self.call(request, ExternalWeightsUrlsReq(tinker_path=self._tinker_path(request)))
        base = f"{request.url.origin()}{DOWNLOAD_PREFIX}{resp.token}"
        return json_response({"urls": {f: f"{base}/{f}" for f in resp.files}, "expires": iso(resp.expires)})

    async def download_file(self, request: web.Request) -> web.StreamResponse:
        resp = await self.call(request, ResolveDownloadReq(token=request.match_info["token"],
                                                  relpath=request.match_info["relpath"]))
        return web.FileResponse(resp.path, headers={"Content-Type": "application/octet-stream"})

    # -- sessions -------------------------------------------------------------------------

    async def list_sessions(self, request: web.Request) -> web.Response:
        _check_scope(request)
        limit, offset = _page(request, 20)
        resp = await self.call(request, ListSessionsReq(limit=limit, offset=offset))
        return json_response({"sessions": resp.session_ids})

    async def get_session(self, request: web.Request) -> web.Response:
        _check_scope(request)
        resp = await self.call(request, GetSessionReq(session_id=request.match_info["session_id"]))
        return json_response({"training_run_ids": resp.training_run_ids, "sampler_ids": resp.sampler_ids,
                              "user_metadata": resp.user_metadata, "display_name": resp.display_name})

    # -- users (admins only) --------------------------------------------------------------

    async def reassign_user(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        to_user = body.get_str("to_user")
        try:
            check_user_name(to_user)
        except ValueError as exc:
            raise bad_request(f"to_user: {exc}") from None
        resp = await self.call(request, ReassignUserReq(from_user=body.get_str("from_user"), to_user=to_user))
        return json_response({"moved": resp.moved})

    def routes(self) -> list[web.RouteDef]:
        checkpoint = f"{PREFIX}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:{CHECKPOINT_ID}}}"
        return [
            web.get(f"{PREFIX}/training_runs", self.list_training_runs),
            web.get(f"{PREFIX}/training_runs/{{run_id}}", self.get_training_run),
            web.get(f"{PREFIX}/training_runs/{{run_id}}/checkpoints", self.list_run_checkpoints),
            web.get(f"{PREFIX}/checkpoints", self.list_user_checkpoints),
            web.delete(checkpoint, self.delete_checkpoint),
            web.post(f"{checkpoint}/publish", self.publish),
            web.delete(f"{checkpoint}/publish", self.unpublish),
            web.put(f"{checkpoint}/ttl", self.set_ttl),
            web.get(f"{checkpoint}/external_weights_urls", self.external_weights_urls),
            web.post(f"{PREFIX}/weights_info", self.weights_info),
            web.get(f"{DOWNLOAD_PREFIX}{{token}}/{{relpath:.+}}", self.download_file),
            web.get(f"{PREFIX}/sessions", self.list_sessions),
            web.get(f"{PREFIX}/sessions/{{session_id}}", self.get_session),
            web.post(f"{PREFIX}/admin/reassign_user", self.reassign_user),
        ]


def is_download_path(path: str) -> bool:
    """Paths served without an API key (the download token is their credential)."""
    return path.startswith(DOWNLOAD_PREFIX)


# Endpoints of SDK 0.38 that tinkerd does not serve. A 501 naming the reason beats a bare
# 404: the caller learns it is a known gap, not a typo in its base_url.
UNSERVED = {
    ("POST", "/copy_weights"): "copying checkpoints into another project: tinkerd has no projects",
    ("PUT", "/sessions/{session_id}/project"): "moving a session to a project: tinkerd has no projects",
    ("POST", "/sessions/search"): "session search (experimental in the SDK); list them with GET /api/v1/sessions",
    ("GET", "/sessions/{session_id}/trace_export"): "trace export: tinkerd records no traces",
    ("POST", "/join_sampling_session"): "joining sampling sessions (client/config leaves it off)",
    ("POST", "/create_custom_loss"): "server-side custom losses (client/config leaves them off); "
                                      "forward_backward_custom computes custom losses client-side",
    ("POST", "/auth/token"): "JWT sign-in: tinkerd checks X-API-Key directly",
    ("GET", "/auth/apikey/me"): "API key management: keys come from --api-keys-file (or any tml- key)",
    ("DELETE", "/auth/apikey/me"): "API key management: keys come from --api-keys-file (or any tml- key)",
}


def unserved_routes() -> list[web.RouteDef]:
    def answer(reason: str):
        async def not_implemented(request: web.Request) -> web.Response:
            raise HttpError(501, f"{request.method} {request.path} is not served by tinkerd: {reason}")
        return not_implemented

    return [web.route(method, PREFIX + path, answer(reason)) for (method, path), reason in UNSERVED.items()]
