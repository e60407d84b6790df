"""The HTTP front-end of tinkerd: aiohttp on uvloop, stateless.

Each request becomes one message to the controller over a DEALER socket, and its
reply becomes the HTTP response (protocol: ../shared/docs/tinker-protocol.md). All
state lives in the controller; this process only converts and validates.

Run: python -m api.server --config RUN_DIR/cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any, Callable

import orjson
import uvloop
import zmq
import zmq.asyncio
from aiohttp import web

from api.auth import api_key_check, stamp
from api.errors import HttpError
from api.forward_backward import (
    MAX_BODY_BYTES, decompress_body, forward_backward_from_json, forward_backward_from_proto,
    forward_backward_output_json, forward_backward_output_proto, parse_forward_backward_proto,
)
from api.json_fields import JsonObject, parse_json_object
from api.json_requests import (
    create_model_from_json, create_sampling_session_from_json, create_session_from_json,
    finish_session_from_json, get_info_json, heartbeat_from_json, load_weights_from_json, optim_step_from_json,
    save_weights_external_from_json, save_weights_for_sampler_from_json, save_weights_from_json,
)
from api.rest import RestHandlers, is_download_path, query_int, unserved_routes
from api.sampling import sample_request_from_json, sample_response_json, sample_response_proto
from cluster.config import ClusterConfig
from cluster.messages import (
    MAX_STATUS_WAIT_S, CancelFutureReq, ClusterStatusReq, ForwardBackwardResult, GetInfoReq, GetSamplerReq, JsonResult,
    RetrieveFutureReq, RetrieveFuturesReq, SampleResult, SkipSeqReq, SubmitResp,
)
from cluster.process import die_with_parent, set_process_name, setup_logging
from cluster.errors import StatusError
from cluster.transport import AsyncPeer

log = logging.getLogger(__name__)

CONTROLLER_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 5.0
JSON = "application/json"
PROTOBUF = "application/x-protobuf"
PREFIX = "/api/v1"
_OPEN_PATHS = frozenset({f"{PREFIX}/healthz"})  # the launcher polls it without a key


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON)


def protobuf_response(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=PROTOBUF)


@web.middleware
async def errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Every failure answers `{"detail": …}`: the SDK retries an empty-bodied 400 silently."""
    try:
        return await handler(request)
    except StatusError as exc:
        status, detail = exc.status, exc.detail
    except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
        status = exc.status
        detail = f"no route {request.method} {request.path}" if status == 404 else (exc.text or exc.reason)
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        status, detail = 500, f"internal error: {exc}"
    log.info("%s %s -> %d %s", request.method, request.path, status, detail)
    return json_response({"detail": detail}, status)


def _is_open_path(path: str) -> bool:
    return path in _OPEN_PATHS or is_download_path(path)


def _sequence(model_id: Any, seq_id: Any) -> tuple[str, int] | None:
    """(model_id, seq_id) of a training request, if its body names a usable pair."""
    if isinstance(model_id, str) and model_id and type(seq_id) is int and seq_id >= 1:
        return model_id, seq_id
    return None


def _json_sequence(body: JsonObject) -> tuple[str, int] | None:
    return _sequence(body.value.get("model_id"), body.value.get("seq_id"))


def _submission_json(resp: SubmitResp) -> dict[str, Any]:
    payload: dict[str, Any] = {"request_id": resp.request_id}
    if resp.model_id is not None:
        payload["model_id"] = resp.model_id
    if resp.sample_sequence_ids is not None:
        payload["sample_sequence_ids"] = resp.sample_sequence_ids
    return payload


def render_result(result: Any, accept: str) -> web.Response:
    """A finished future's result; fwd/bwd and sample results as protobuf when the client accepts it."""
    wants_protobuf = PROTOBUF in accept
    if isinstance(result, JsonResult):
        return json_response(result.payload)
    if isinstance(result, ForwardBackwardResult):
        if wants_protobuf:
            return protobuf_response(forward_backward_output_proto(result))
        return json_response(forward_backward_output_json(result))
    if isinstance(result, SampleResult):
        if wants_protobuf:
            return protobuf_response(sample_response_proto(result))
        return json_response(sample_response_json(result))
    raise TypeError(f"the controller returned a result of unexpected type {type(result).__name__}")


class Handlers:
    def __init__(self, config: ClusterConfig, controller: AsyncPeer):
        self.config = config
        self.controller = controller

    async def call(self, request: web.Request, req: Any, timeout: float = CONTROLLER_TIMEOUT_S) -> Any:
        """Send `req` to the controller on behalf of `request`'s caller; its reply."""
        try:
            return await self.controller.call(None, stamp(request, req), timeout)
        except asyncio.TimeoutError:
            raise HttpError(503, f"the controller did not answer {type(req).__name__} "
                                 f"within {timeout:.0f} s") from None

    @staticmethod
    async def body(request: web.Request) -> JsonObject:
        return parse_json_object(await request.read())

    async def submit(self, request: web.Request, req: Any) -> web.Response:
        return json_response(_submission_json(await self.call(request, req)))

    async def submit_sequenced(self, request: web.Request, sequence: tuple[str, int] | None,
                               make_req: Callable[[], Any]) -> web.Response:
        """Submit a training request; one refused here still spends its seq_id at the controller.

        The SDK never resends a refused seq_id (its next request carries the next one),
        so the model's ledger must learn that this one will never come.
        """
        try:
            req = make_req()
        except HttpError as exc:
            if sequence is not None:
                await self._skip_seq(request, *sequence, exc.detail)
            raise
        return await self.submit(request, req)

    async def _skip_seq(self, request: web.Request, model_id: str, seq_id: int, detail: str) -> None:
        try:
            await self.call(request, SkipSeqReq(model_id=model_id, seq_id=seq_id, detail=detail))
        except StatusError as exc:
            log.warning("seq_id %d of %s was refused here, and the controller did not take the skip: %s",
                        seq_id, model_id, exc.detail)

    # -- client configuration and health ----------------------------------------------

    async def client_config(self, request: web.Request) -> web.Response:
        # batched completion polling for samples is served (retrieve_futures); JWT, compressed
        # fwd/bwd bodies and server-side custom losses stay off
        return json_response({"sample_use_retrieve_futures": True})

    async def dynamic_config(self, request: web.Request) -> web.Response:
        return json_response({"refresh_interval_sec": 300, "sample_cancel_enabled": True})

    async def telemetry(self, request: web.Request) -> web.Response:
        return json_response({"status": "accepted"})

    async def healthz(self, request: web.Request) -> web.Response:
        """`?wait_s=S` (at most MAX_STATUS_WAIT_S): a starting cluster is answered once it has started or failed
        to, or after S seconds, so the launcher learns of it at once rather than at its next poll."""
        wait_s = query_int(request, "wait_s", 0, 0, MAX_STATUS_WAIT_S)
        status = await self.call(request, ClusterStatusReq(wait_s=float(wait_s)), timeout=HEALTH_TIMEOUT_S + wait_s)
        if status.failed:  # not "still starting": it will not get better by waiting
            raise HttpError(500, f"cluster failed: {status.detail}")
        if not status.ready:
            raise HttpError(503, status.detail or f"cluster not ready; workers: {status.workers}")
        # every worker's state (an engine being restarted shows as such), and the colocation state
        # machine (actors/controller/residency.py): mode, phase, the last barriers
        if status.degraded:  # still serving (sampling at least): 200, but say what is gone
            return json_response({"status": "degraded", "detail": status.degraded, "workers": status.workers,
                                  "residency": status.residency})
        return json_response({"status": "ok", "workers": status.workers, "residency": status.residency})

    async def server_capabilities(self, request: web.Request) -> web.Response:
        model = self.config.model
        return json_response({"supported_models": [{"model_name": model.name,
                                                    "max_context_length": model.max_context,
                                                    "trainable": True, "sampleable": True}]})

    # -- sessions -----------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        resp = await self.call(request, create_session_from_json(await self.body(request)))
        return json_response({"session_id": resp.session_id})

    async def session_heartbeat(self, request: web.Request) -> web.Response:
        await self.call(request, heartbeat_from_json(await self.body(request)))
        return json_response({})

    async def finish_session(self, request: web.Request) -> web.Response:
        await self.call(request, finish_session_from_json(request.match_info["session_id"], await self.body(request)))
        return json_response({})

    # -- training -----------------------------------------------------------------------

    async def create_model(self, request: web.Request) -> web.Response:
        return await self.submit(request, create_model_from_json(await self.body(request)))

    async def get_info(self, request: web.Request) -> web.Response:
        resp = await self.call(request, GetInfoReq(model_id=(await self.body(request)).get_str("model_id")))
        return json_response(get_info_json(resp))

    async def forward_backward(self, request: web.Request) -> web.Response:
        body = decompress_body(await request.read(), request.headers.get("Content-Encoding", ""))
        model = self.config.model
        if request.content_type == PROTOBUF:
            msg = parse_forward_backward_proto(body)
            return await self.submit_sequenced(request, _sequence(msg.model_id, msg.seq_id),
                                               lambda: forward_backward_from_proto(msg, model))
        if request.content_type == JSON:
            fields = parse_json_object(body)
            return await self.submit_sequenced(request, _json_sequence(fields),
                                               lambda: forward_backward_from_json(fields, model))
        raise HttpError(415, f"forward_backward takes {PROTOBUF} or {JSON}, got {request.content_type!r}")

    async def forward(self, request: web.Request) -> web.Response:
        """`TrainingClient.forward` of SDKs up to 0.20 (later ones send forward_only=true)."""
        model = self.config.model
        return await self._submit_json_sequenced(
            request, lambda body: forward_backward_from_json(body, model, forward_only=True))

    async def _submit_json_sequenced(self, request: web.Request,
                                     decode: Callable[[JsonObject], Any]) -> web.Response:
        body = await self.body(request)
        return await self.submit_sequenced(request, _json_sequence(body), lambda: decode(body))

    async def optim_step(self, request: web.Request) -> web.Response:
        return await self._submit_json_sequenced(request, optim_step_from_json)

    async def save_weights(self, request: web.Request) -> web.Response:
        return await self._submit_json_sequenced(request, save_weights_from_json)

    async def load_weights(self, request: web.Request) -> web.Response:
        return await self._submit_json_sequenced(request, lambda body: load_weights_from_json(body, self.config.model))

    async def save_weights_for_sampler(self, request: web.Request) -> web.Response:
        return await self._submit_json_sequenced(request, save_weights_for_sampler_from_json)

    async def save_weights_external(self, request: web.Request) -> web.Response:
        return await self._submit_json_sequenced(request, save_weights_external_from_json)

    # -- sampling -----------------------------------------------------------------------

    async def create_sampling_session(self, request: web.Request) -> web.Response:
        resp = await self.call(request, create_sampling_session_from_json(await self.body(request)))
        return json_response({"sampling_session_id": resp.sampling_session_id})

    async def get_sampler(self, request: web.Request) -> web.Response:
        resp = await self.call(request, GetSamplerReq(sampler_id=request.match_info["sampler_id"]))
        payload = {"sampler_id": resp.sampler_id, "base_model": resp.base_model}
        if resp.model_path is not None:
            payload["model_path"] = resp.model_path
        return json_response(payload)

    async def asample(self, request: web.Request) -> web.Response:
        return await self.submit(request, sample_request_from_json(await self.body(request), self.config.model))

    # -- futures ------------------------------------------------------------------------

    async def retrieve_future(self, request: web.Request) -> web.Response:
        request_id = (await self.body(request)).get_str("request_id")
        wait_s = self.config.api.long_poll_s
        resp = await self.call(request, RetrieveFutureReq(request_id=request_id, wait_s=wait_s),
                               timeout=wait_s + CONTROLLER_TIMEOUT_S)
        if resp.status == "pending":
            return json_response({"type": "try_again", "request_id": request_id, "queue_state": resp.queue_state})
        if resp.status == "error":
            return json_response({"error": resp.error, "category": resp.category})
        if resp.status == "done":
            return render_result(resp.result, request.headers.get("Accept", ""))
        raise TypeError(f"the controller answered retrieve_future with status {resp.status!r}")

    async def retrieve_futures(self, request: web.Request) -> web.Response:
        """Batched completion polling of one sampling session's samples (SDK flag sample_use_retrieve_futures)."""
        body = await self.body(request)
        target = body.get_object("target")
        if target.get_str("type", "sampling_session") != "sampling_session":
            raise HttpError(400, f"target.type must be 'sampling_session', got {target.get_str('type')!r}")
        timeout = body.get_float("timeout", None)  # absent: long-poll; 0: answer at once
        wait_s = self.config.api.long_poll_s if timeout is None else max(0.0, min(timeout, self.config.api.long_poll_s))
        # retrieved_request_ids needs nothing: results stay until swept, a re-poll may still want them
        resp = await self.call(request, RetrieveFuturesReq(
            sampling_session_id=target.get_str("sampling_session_id"),
            cloned_sampler_id=target.get_int("cloned_sampler_id", 0), prev_cursor=body.get_int("prev_cursor", 0),
            wait_s=wait_s), timeout=wait_s + CONTROLLER_TIMEOUT_S)
        return json_response({"completions": [{"state": c.state, "request_id": c.request_id}
                                              for c in resp.completions], "cursor": resp.cursor})

    async def cancel_future(self, request: web.Request) -> web.Response:
        resp = await self.call(request, CancelFutureReq(request_id=(await self.body(request)).get_str("request_id")))
        return json_response({"cancelled": resp.cancelled})


def create_app(config: ClusterConfig, controller: AsyncPeer) -> web.Application:
    app = web.Application(middlewares=[errors_as_json, api_key_check(config.api.api_keys_file, _is_open_path)],
                          client_max_size=MAX_BODY_BYTES)
    h = Handlers(config, controller)
    app.add_routes(RestHandlers(h.call).routes() + unserved_routes())
    app.add_routes([
        web.post(f"{PREFIX}/client/config", h.client_config),
        web.post(f"{PREFIX}/client/dynamic_config", h.dynamic_config),
        web.post(f"{PREFIX}/telemetry", h.telemetry),
        web.get(f"{PREFIX}/healthz", h.healthz),
        web.get(f"{PREFIX}/get_server_capabilities", h.server_capabilities),
        web.post(f"{PREFIX}/create_session", h.create_session),
        web.post(f"{PREFIX}/session_heartbeat", h.session_heartbeat),
        web.post(f"{PREFIX}/sessions/{{session_id}}/finish", h.finish_session),
        web.post(f"{PREFIX}/create_model", h.create_model),
        web.post(f"{PREFIX}/get_info", h.get_info),
        web.post(f"{PREFIX}/forward_backward", h.forward_backward),
        web.post(f"{PREFIX}/forward", h.forward),
        web.post(f"{PREFIX}/optim_step", h.optim_step),
        web.post(f"{PREFIX}/save_weights", h.save_weights),
        web.post(f"{PREFIX}/load_weights", h.load_weights),
        web.post(f"{PREFIX}/save_weights_for_sampler", h.save_weights_for_sampler),
        web.post(f"{PREFIX}/save_weights_external", h.save_weights_external),
        web.post(f"{PREFIX}/create_sampling_session", h.create_sampling_session),
        web.get(f"{PREFIX}/samplers/{{sampler_id}}", h.get_sampler),
        web.post(f"{PREFIX}/asample", h.asample),
        web.post(f"{PREFIX}/retrieve_future", h.retrieve_future),
        web.post(f"{PREFIX}/retrieve_futures", h.retrieve_futures),
        web.post(f"{PREFIX}/cancel_future", h.cancel_future),
    ])
    return app


def connect_controller(ctx: zmq.asyncio.Context, config: ClusterConfig) -> AsyncPeer:
    controller = AsyncPeer(ctx, zmq.DEALER, config.controller.api_address, bind=False)
    # the controller only ever answers; anything else it sends is a bug worth seeing
    controller.start(lambda _peer, msg: log.warning("unexpected %s from the controller", type(msg).__name__))
    return controller


async def start_http(config: ClusterConfig, controller: AsyncPeer) -> web.AppRunner:
    """Serve the API on config.api.host:port (port 0 picks one: see runner.addresses)."""
    # request bodies are decompressed by forward_backward itself (aiohttp's zstd needs an extra package)
    runner = web.AppRunner(create_app(config, controller), access_log=None, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, config.api.host, config.api.port).start()
    return runner


async def serve(config: ClusterConfig) -> None:
    ctx = zmq.asyncio.Context()
    controller = connect_controller(ctx, config)
    runner = await start_http(config, controller)
    log.info("API listening on %s, controller at %s", runner.addresses, config.controller.api_address)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        controller.close()
        ctx.term()


def run_api_process(config: ClusterConfig) -> None:
    set_process_name("tinkerd-api")
    die_with_parent()
    setup_logging("api")
    uvloop.run(serve(config))


def main() -> None:
    parser = argparse.ArgumentParser(description="tinkerd HTTP API process")
    parser.add_argument("--config", required=True, help="the cluster's ClusterConfig JSON")
    run_api_process(ClusterConfig.load(parser.parse_args().config))


if __name__ == "__main__":
    main()
