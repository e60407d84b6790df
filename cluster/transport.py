"""ZeroMQ sockets that speak cluster/messages.py.

`AsyncPeer` (asyncio; controller and API) wraps one ROUTER or DEALER socket:
- `call(peer, req)` sends a request and awaits the `…Resp` with the same call_id;
- `fan_out(peers, reqs)` sends N requests and awaits all N replies (the barrier the
  controller uses for every multi-rank step);
- incoming requests and events go to `handler(peer, msg)`, which may `reply(...)`.

`BlockingPeer` is the same for compute workers, whose event loop is a plain
recv -> compute -> reply loop so that torch never shares a thread with asyncio.

A message that cannot be decoded is never just dropped, or whoever sent it would wait
forever: if its header still names it, a request is answered with a 400 ErrorResp and a
reply fails the call waiting for it (a 502); only frames that say nothing at all (not
even a call_id) are logged and discarded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import zmq
import zmq.asyncio

from cluster.errors import StatusError
from cluster.codec import decode, encode, peek_header
from cluster.messages import ErrorResp

log = logging.getLogger(__name__)

Handler = Callable[[bytes | None, Any], Awaitable[None] | None]


class RemoteError(StatusError):
    """The other side answered a request with ErrorResp."""


def _is_reply(msg: Any) -> bool:
    return type(msg).__name__.endswith("Resp")


def _undecodable(frames: Sequence, peer: bytes | None, exc: Exception) -> tuple[str, ErrorResp] | None:
    """For frames `decode` refused: ("request" | "reply", the ErrorResp standing for it), or
    None when not even their header says what they were."""
    header = peek_header(frames)
    if header is None:
        log.error("discarding undecodable frames from %r (no message header): %s", peer, exc)
        return None
    name, call_id = header
    log.error("undecodable %s (call %d) from %r: %s", name, call_id, peer, exc)
    if name.endswith("Resp"):
        return "reply", ErrorResp(call_id=call_id, status=502, detail=f"undecodable {name} reply: {exc}")
    return "request", ErrorResp(call_id=call_id, status=400, detail=f"undecodable {name}: {exc}")


class AsyncPeer:
    """One ROUTER (many peers, addressed by identity) or DEALER (one peer, `None`)."""

    def __init__(self, ctx: zmq.asyncio.Context, kind: int, address: str, *,
                 bind: bool, identity: bytes | None = None):
        self.kind = kind
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.ROUTER:
            # fail loudly instead of dropping a message to a peer that is gone
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        (self.sock.bind if bind else self.sock.connect)(address)
        self.address = address
        self._ids = itertools.count(1)
        self._pending: dict[tuple[bytes | None, int], asyncio.Future] = {}
        self._task: asyncio.Task | None = None

    def start(self, handler: Handler) -> None:
        self._task = asyncio.get_running_loop().create_task(self._recv_loop(handler))

    async def _recv_loop(self, handler: Handler) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            peer = None
            if self.kind == zmq.ROUTER:
                peer, frames = frames[0].bytes, frames[1:]
            try:
                msg = decode(frames)
            except Exception as exc:
                answer = _undecodable(frames, peer, exc)
                if answer is None:
                    continue
                kind, msg = answer
                if kind == "request":
                    self.reply(peer, msg, msg)
                    continue
            waiter = self._pending.pop((peer, msg.call_id), None) if _is_reply(msg) else None
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(msg)
                continue
            result = handler(peer, msg)
            if asyncio.iscoroutine(result):
                asyncio.get_running_loop().create_task(self._guard(result, peer, msg))

    async def _guard(self, coro: Awaitable, peer: bytes | None, msg: Any) -> None:
        try:
            await coro
        except Exception as exc:  # a handler bug must not kill the loop, nor go unanswered
            log.exception("handler for %s failed", type(msg).__name__)
            if type(msg).__name__.endswith("Req"):
                self.reply(peer, msg, ErrorResp(status=500, detail=f"internal error: {exc}"))

    def send(self, peer: bytes | None, msg: Any) -> None:
        frames = encode(msg)
        if self.kind == zmq.ROUTER:
            frames = [peer, *frames]
        self.sock.send_multipart(frames, copy=False)

    def reply(self, peer: bytes | None, req: Any, resp: Any) -> None:
        """Answer `req`; a reply to a ROUTER peer that has gone (say, a restarted API
        process, whose successor has a new identity) is dropped with a warning: whoever
        asked is no longer there to read it."""
        resp.call_id = req.call_id
        try:
            self.send(peer, resp)
        except zmq.ZMQError as exc:
            if self.kind != zmq.ROUTER or exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("dropping %s for %r: that peer is gone", type(resp).__name__, peer)

    def _register(self, peer: bytes | None, req: Any) -> asyncio.Future:
        req.call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[(peer, req.call_id)] = fut
        return fut

    async def call(self, peer: bytes | None, req: Any, timeout: float | None = None) -> Any:
        fut = self._register(peer, req)
        try:
            self.send(peer, req)
            resp = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop((peer, req.call_id), None)
        if isinstance(resp, ErrorResp):
            raise RemoteError(resp.status, resp.detail)
        return resp

    async def fan_out(self, peers: Sequence[bytes | None], reqs: Sequence[Any],
                      timeout: float | None = None) -> list[Any]:
        """Send reqs[i] to peers[i]; return replies in the same order once all arrived."""
        return list(await asyncio.gather(
            *(self.call(p, r, timeout) for p, r in zip(peers, reqs, strict=True))))

    def fail_pending(self, peer: bytes | None, error: BaseException) -> None:
        """Wake every call waiting on `peer` (it died) with `error`."""
        for key in [k for k in self._pending if k[0] == peer]:
            fut = self._pending.pop(key)
            if not fut.done():
                fut.set_exception(error)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close(0)


class BlockingPeer:
    """A blocking DEALER or ROUTER for worker processes (no asyncio)."""

    def __init__(self, ctx: zmq.Context, kind: int, address: str, *, bind: bool,
                 identity: bytes | None = None):
        self.kind = kind
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        (self.sock.bind if bind else self.sock.connect)(address)
        self._ids = itertools.count(1)

    def send(self, msg: Any, peer: bytes | None = None) -> None:
        frames = encode(msg)
        if self.kind == zmq.ROUTER:
            frames = [peer, *frames]
        self.sock.send_multipart(frames, copy=False)

    def reply(self, req: Any, resp: Any, peer: bytes | None = None) -> None:
        resp.call_id = req.call_id
        self.send(resp, peer)

    def recv(self, timeout_ms: int | None = None) -> tuple[bytes | None, Any] | None:
        """Next (peer, message), or None if nothing arrived within timeout_ms.

        An undecodable request is answered here (400) and skipped; an undecodable reply
        comes back as the ErrorResp that stands for it, so `call` raises.
        """
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            remaining = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if remaining is not None and not self.sock.poll(remaining, zmq.POLLIN):
                return None
            frames = self.sock.recv_multipart(copy=False)
            peer = None
            if self.kind == zmq.ROUTER:
                peer, frames = frames[0].bytes, frames[1:]
            try:
                return peer, decode(frames)
            except Exception as exc:
                answer = _undecodable(frames, peer, exc)
            if answer is not None and answer[0] == "reply":
                return peer, answer[1]
            if answer is not None:
                self.send(answer[1], peer)

    def call(self, req: Any, timeout_ms: int = 600_000) -> Any:
        """Send req and block for its reply. Only for DEALERs with no other traffic."""
        req.call_id = next(self._ids)
        self.send(req)
        while True:
            got = self.recv(timeout_ms)
            if got is None:
                raise TimeoutError(f"no reply to {type(req).__name__} in {timeout_ms} ms")
            _, resp = got
            if resp.call_id == req.call_id and _is_reply(resp):
                if isinstance(resp, ErrorResp):
                    raise RemoteError(resp.status, resp.detail)
                return resp
            log.warning("dropping unexpected %s while waiting", type(resp).__name__)

    def close(self, linger_ms: int = 0) -> None:
        """Close; `linger_ms` > 0 lets queued messages (say, a last failure report) leave first."""
        self.sock.close(linger=linger_ms)
