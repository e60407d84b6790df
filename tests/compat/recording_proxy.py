"""A loopback HTTP proxy that records what an SDK sends and what the server answers.

    python -m tests.compat.recording_proxy UPSTREAM_URL LOG.jsonl [--port 0]

Prints `proxy ready: base_url=http://127.0.0.1:PORT`, forwards every request to
UPSTREAM_URL unchanged, and appends one JSON line per exchange to LOG.jsonl: method,
path, the request's Content-Type / Accept / Content-Encoding / User-Agent, a summary of
the body (JSON with long arrays shortened; protobuf as a byte count), and the status,
Content-Type and (summarised) body of the answer. A diagnosis tool for the SDK
compatibility test: point an old SDK at the proxy to see the exact wire exchange.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "host", "content-length"}
_REQUEST_HEADERS = ("Content-Type", "Accept", "Content-Encoding", "User-Agent", "X-Tinker-Request-Type")


def summarise(value: Any, depth: int = 0) -> Any:
    """JSON with arrays of more than 6 items cut to their first 3 and a count."""
    if isinstance(value, dict):
        return {k: summarise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > 6:
            return [summarise(v, depth + 1) for v in value[:3]] + [f"... {len(value)} items"]
        return [summarise(v, depth + 1) for v in value]
    if isinstance(value, str) and len(value) > 300:
        return value[:300] + f"... ({len(value)} chars)"
    return value


def body_summary(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if "json" in content_type or raw[:1] in (b"{", b"["):
        try:
            return summarise(json.loads(raw))
        except ValueError:
            pass
    if "protobuf" in content_type:
        return f"<{len(raw)} bytes protobuf>"
    text = raw[:500].decode("utf-8", errors="replace")
    return text + (f"... ({len(raw)} bytes)" if len(raw) > 500 else "")


class RecordingProxy:
    def __init__(self, upstream: str, log_path: str):
        self.upstream = upstream.rstrip("/")
        self.log_path = log_path
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.session is None:
            self.session = aiohttp.ClientSession(auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=120))
        raw = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        entry: dict[str, Any] = {
            "t": round(time.time(), 3), "method": request.method, "path": request.path_qs,
            "headers": {h: request.headers[h] for h in _REQUEST_HEADERS if h in request.headers},
            "body": body_summary(raw, request.headers.get("Content-Type", "")),
        }
        try:
            async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                            data=raw or None, allow_redirects=False) as upstream:
                body = await upstream.read()
                out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
                status = upstream.status
        except aiohttp.ClientError as exc:
            entry.update(status=502, response=f"proxy: upstream failed: {exc}")
            self._write(entry)
            return web.Response(status=502, text=str(exc))
        entry.update(status=status, response_type=out_headers.get("Content-Type"),
                     response=body_summary(body, out_headers.get("Content-Type", "")))
        self._write(entry)
        return web.Response(body=body, status=status, headers=out_headers)

    def _write(self, entry: dict) -> None:
        with open(self.log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")


async def serve(upstream: str, log_path: str, port: int) -> None:
    proxy = RecordingProxy(upstream, log_path)
    app = web.Application(client_max_size=512 * 2**20)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"proxy ready: base_url=http://{host}:{bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("upstream")
    parser.add_argument("log")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.upstream, args.log, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
