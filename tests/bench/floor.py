"""The SDK floor: a stub Tinker server that answers at once, so the benchmark can measure what
the client's side of a call costs by itself.

    python -m tests.bench.floor [--host 127.0.0.1] [--port 0]    # prints "floor ready: base_url=URL"

This is a measuring instrument of the benchmark, not a server: no model, no torch, no
controller. One aiohttp process on uvloop (as tinkerd's API) answers every call the latency
workloads make (client/config, create_session, heartbeats, telemetry, create_model,
get_info, forward_backward, optim_step, save_weights_for_sampler both ways,
create_sampling_session, samplers/{id}, asample, retrieve_future, retrieve_futures,
cancel_future, finish) with a canned valid result that is ready the moment it is
submitted. The SDK still makes every HTTP call it makes against tinkerd, because the
stub answers client/config with tinkerd's own flags (batched sample polling included)
and encodes results with tinkerd's own encoders (api/server.render_result, api/proto).
So a latency figure measured here is the SDK, HTTP and loopback alone: no server can
answer sooner, and raw compute + this floor is the best a client can see.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from aiohttp import web

from actors.controller.sampling import CLONE_SEQ_STRIDE
from api.errors import HttpError
from api.forward_backward import MAX_BODY_BYTES, decompress_body, parse_forward_backward_proto
from api.json_fields import JsonObject, parse_json_object
from api.sampling import DEFAULT_MAX_TOKENS
from api.server import PREFIX, Handlers, errors_as_json, json_response, render_result
from cluster.config import ApiConfig
from cluster.messages import ForwardBackwardResult, JsonResult, SampledSequence, SampleResult
from cluster.process import die_with_parent
from tests.bench import spec

READY = "floor ready: base_url="
LONG_POLL_S = ApiConfig.long_poll_s  # as tinkerd's API: the SDK's own poll timeout is 45 s
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Completions:
    """One (sampling session, clone)'s finished samples that its poller has not acknowledged."""

    entries: list[tuple[int, str]] = field(default_factory=list)  # (cursor, request_id)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, cursor: int, request_id: str) -> None:
        self.entries.append((cursor, request_id))
        self.changed.set()
        self.changed = asyncio.Event()  # a waiter holds the old one, which stays set

    def ack(self, cursor: int) -> None:
        self.entries = [e for e in self.entries if e[0] > cursor]


class Stub:
    """The stub's state: results waiting for their retrieve_future, sample completions, samplers."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.cursor = 0
        self.results: dict[str, Any] = {}
        self.completions: dict[tuple[str, int], _Completions] = {}
        self.samplers: dict[str, dict[str, Any]] = {}  # sampling session id -> samplers/{id} answer
        self.base_models: dict[str, str] = {}  # model_id -> base_model
        self.canned: dict[tuple, Any] = {}  # results by shape, built once
        # tinkerd's own client/config, dynamic_config and telemetry answers: the same flags
        # make the SDK take the same paths (e.g. retrieve_futures for samples) as against tinkerd
        self.product = Handlers(None, None)

    def store(self, result: Any) -> str:
        request_id = f"floor-{next(self.ids)}"
        self.results[request_id] = result
        return request_id

    def submit(self, result: Any, **extra: Any) -> web.Response:
        return json_response({"request_id": self.store(result), **extra})

    def _canned(self, key: tuple, make) -> Any:
        if key not in self.canned:
            self.canned[key] = make()
        return self.canned[key]

    # -- sessions and models ---------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        return json_response({"session_id": str(uuid.uuid4())})

    async def ok(self, request: web.Request) -> web.Response:
        return json_response({})

    async def create_model(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        model_id = f"{body.get_str('session_id')}:train:{body.get_int('model_seq_id')}"
        self.base_models[model_id] = body.get_str("base_model")
        return self.submit(JsonResult(payload={"model_id": model_id}), model_id=model_id)

    async def get_info(self, request: web.Request) -> web.Response:
        model_id = parse_json_object(await request.read()).get_str("model_id")
        name = self.base_models.get(model_id, "floor")
        return json_response({"model_id": model_id, "model_data": {"arch": "floor", "model_name": name,
                                                                   "tokenizer_id": name},
                              "is_lora": True, "lora_rank": 32, "model_name": name})

    # -- training --------------------------------------------------------------------------

    async def forward_backward(self, request: web.Request) -> web.Response:
        msg = parse_forward_backward_proto(decompress_body(await request.read(),
                                                           request.headers.get("Content-Encoding", "")))
        # int32 token bytes per chunk: the datums' lengths, all the canned result has to match
        lengths = tuple(sum(len(c.encoded_text.tokens) // 4 for c in d.model_input) for d in msg.data)
        result = self._canned(("fwdbwd", lengths), lambda: ForwardBackwardResult(
            lengths=np.array(lengths, dtype=np.int64), logprobs=np.zeros(sum(lengths), np.float32),
            elementwise_loss=np.zeros(sum(lengths), np.float32), metrics={"loss:sum": 0.0}))
        return self.submit(result, model_id=msg.model_id)

    async def optim_step(self, request: web.Request) -> web.Response:
        model_id = parse_json_object(await request.read()).get_str("model_id")
        return self.submit(JsonResult(payload={"metrics": {}}), model_id=model_id)

    async def save_weights_for_sampler(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        model_id = body.get_str("model_id")
        session_id = model_id.split(":train:")[0]
        if body.has("path"):  # named: a snapshot path, sampled later through create_sampling_session
            payload = {"path": f"tinker://{model_id}/sampler_weights/{body.get_str('path')}",
                       "sampling_session_id": None}
        else:  # ephemeral: the server makes the sampling session itself
            sampling_session_id = f"{session_id}:sample:{body.get_int('sampling_session_seq_id')}"
            self.samplers[sampling_session_id] = {"sampler_id": sampling_session_id,
                                                  "base_model": self.base_models.get(model_id, "floor")}
            payload = {"path": None, "sampling_session_id": sampling_session_id}
        return self.submit(JsonResult(payload=payload), model_id=model_id)

    # -- sampling --------------------------------------------------------------------------

    async def create_sampling_session(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        sampling_session_id = f"{body.get_str('session_id')}:sample:{body.get_int('sampling_session_seq_id')}"
        path = body.get_str("model_path", None)
        base_model = body.get_str("base_model", None)
        if base_model is None and path is not None:
            base_model = self.base_models.get(path.removeprefix("tinker://").split("/")[0], "floor")
        self.samplers[sampling_session_id] = {"sampler_id": sampling_session_id, "base_model": base_model or "floor",
                                              **({"model_path": path} if path else {})}
        return json_response({"sampling_session_id": sampling_session_id})

    async def get_sampler(self, request: web.Request) -> web.Response:
        sampler = self.samplers.get(request.match_info["sampler_id"])
        if sampler is None:
            raise HttpError(404, f"unknown sampler {request.match_info['sampler_id']!r}")
        return json_response(sampler)

    async def asample(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        sampling_session_id, seq_id = body.get_str("sampling_session_id"), body.get_int("seq_id")
        num_samples = body.get_int("num_samples", 1)
        max_tokens = body.get_object("sampling_params", JsonObject({}, "")).get_int("max_tokens", DEFAULT_MAX_TOKENS)
        result = self._canned(("sample", num_samples, max_tokens), lambda: SampleResult(sequences=[SampledSequence(
            tokens=np.full(max_tokens, spec.FIRST_TOKEN, np.int32), logprobs=np.zeros(max_tokens, np.float32),
            stop_reason="length") for _ in range(num_samples)]))
        request_id = self.store(result)
        self.cursor += 1
        key = (sampling_session_id, seq_id // CLONE_SEQ_STRIDE)
        self.completions.setdefault(key, _Completions()).add(self.cursor, request_id)
        return json_response({"request_id": request_id, "sample_sequence_ids": [
            f"{sampling_session_id}:{seq_id}:{i}" for i in range(num_samples)]})

    # -- futures ---------------------------------------------------------------------------

    async def retrieve_future(self, request: web.Request) -> web.Response:
        request_id = parse_json_object(await request.read()).get_str("request_id")
        result = self.results.pop(request_id, None)  # the SDK fetches each result once
        if result is None:
            raise HttpError(404, f"unknown request_id {request_id!r}")
        return render_result(result, request.headers.get("Accept", ""))

    async def retrieve_futures(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        target = body.get_object("target")
        key = (target.get_str("sampling_session_id"), target.get_int("cloned_sampler_id", 0))
        log = self.completions.setdefault(key, _Completions())
        prev = body.get_int("prev_cursor", 0)
        log.ack(prev)
        timeout = body.get_float("timeout", None)  # absent: long-poll; 0: answer at once
        wait_s = LONG_POLL_S if timeout is None else max(0.0, min(timeout, LONG_POLL_S))
        if not log.entries and wait_s > 0:
            try:
                await asyncio.wait_for(log.changed.wait(), timeout=wait_s)
            except asyncio.TimeoutError:
                pass
        return json_response({"completions": [{"state": "finished", "request_id": r} for _, r in log.entries],
                              "cursor": log.entries[-1][0] if log.entries else prev})

    async def cancel_future(self, request: web.Request) -> web.Response:
        return json_response({"cancelled": False})  # every request is done before it could be cancelled

    async def capabilities(self, request: web.Request) -> web.Response:
        return json_response({"supported_models": [{"model_name": "floor", "trainable": True, "sampleable": True}]})


def create_app() -> web.Application:
    stub = Stub()
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY_BYTES)
    post = {"client/config": stub.product.client_config, "client/dynamic_config": stub.product.dynamic_config,
            "telemetry": stub.product.telemetry, "create_session": stub.create_session,
            "session_heartbeat": stub.ok, "sessions/{session_id}/finish": stub.ok,
            "create_model": stub.create_model, "get_info": stub.get_info,
            "forward_backward": stub.forward_backward, "optim_step": stub.optim_step,
            "save_weights_for_sampler": stub.save_weights_for_sampler,
            "create_sampling_session": stub.create_sampling_session, "asample": stub.asample,
            "retrieve_future": stub.retrieve_future, "retrieve_futures": stub.retrieve_futures,
            "cancel_future": stub.cancel_future}
    app.add_routes([web.post(f"{PREFIX}/{path}", handler) for path, handler in post.items()])
    app.add_routes([web.get(f"{PREFIX}/samplers/{{sampler_id}}", stub.get_sampler),
                    web.get(f"{PREFIX}/get_server_capabilities", stub.capabilities)])
    return app


async def serve(host: str, port: int) -> None:
    # like tinkerd's API: bodies are decompressed by forward_backward itself
    runner = web.AppRunner(create_app(), access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"{READY}http://{bound_host}:{bound_port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class Floor:
    """A running stub server (a child process of the benchmark)."""

    def __init__(self, proc: subprocess.Popen, base_url: str):
        self.proc, self.base_url = proc, base_url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(timeout_s: float = 60.0) -> Floor:
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.floor"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)
    ready = threading.Event()
    found: list[str] = []

    def read() -> None:  # keeps draining the pipe for the stub's whole life
        for line in proc.stdout:
            if line.startswith(READY) and not ready.is_set():
                found.append(line[len(READY):].strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True, name="floor-output").start()
    if not ready.wait(timeout_s) or not found:
        Floor(proc, "").stop()
        raise RuntimeError(f"the SDK floor stub did not start (exit code {proc.poll()})")
    return Floor(proc, found[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the ready line)")
    args = p.parse_args(argv)
    die_with_parent()  # a benchmark that dies must not leave its stub listening
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
