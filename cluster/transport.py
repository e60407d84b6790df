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
from collections import deque
from typing import Any, Awaitable, Callable, Sequence

import zmq

from cluster.errors import StatusError
from cluster.codec import decode, encode, peek_header
from cluster.messages import ErrorResp

log = logging.getLogger(__name__)

Handler = Callable[[bytes | None, Any], Awaitable[None] | None]
_RECV_BATCH = 64  # messages read per wake-up before the loop's other callbacks get a turn


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
    """One ROUTER (many peers, addressed by identity) or DEALER (one peer, `None`).

    The socket is a plain ZMQ socket that the event loop watches through its file descriptor:
    zmq.asyncio wraps every send and receive in futures and loop callbacks. Measured on the 2-core VM,
    CPU of the calling process per request and reply: 200-240 us through zmq.asyncio, 130-170 us this
    way (a blocking socket: 100-125 us); an SDK round trip passes ten messages through these sockets.
    ZMQ's descriptor signals edges, not levels (the socket's state may have changed), and any send or
    EVENTS read may consume that signal: so every wake-up reads until the socket has nothing more,
    and every send checks whether something arrived meanwhile.
    """

    def __init__(self, ctx: zmq.Context, kind: int, address: str, *,
                 bind: bool, identity: bytes | None = None):
        self.kind = kind
        self.sock = zmq.Socket(ctx, kind)  # plain even on a zmq.asyncio context: see the class docstring
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
        self._handler: Handler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._wake_due = False
        self._backlog: deque[list] = deque()  # messages waiting for room: a peer past its high-water mark

    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._on_events)
        self._wake()  # what arrived before the reader was there signalled nobody

    def _wake(self) -> None:
        if self._loop is not None and not self._wake_due:
            self._wake_due = True
            self._loop.call_soon(self._on_events)

    def _on_events(self) -> None:
        self._wake_due = False
        if self.sock.closed:
            return
        self._flush_backlog()
        for _ in range(_RECV_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._dispatch(frames)
        else:
            self._wake()  # more may be waiting: let the loop's other callbacks run first
            return
        if self._backlog:
            self._check_events()  # the last read may have taken the signal that there is room now

    def _check_events(self) -> None:
        """Read the socket's state (which may take the descriptor's signal) and act on it."""
        events = self.sock.getsockopt(zmq.EVENTS)
        if events & zmq.POLLIN or (self._backlog and events & zmq.POLLOUT):
            self._wake()

    def _dispatch(self, frames: list) -> None:
        peer = None
        if self.kind == zmq.ROUTER:
            peer, frames = frames[0].bytes, frames[1:]
        try:
            msg = decode(frames)
        except Exception as exc:
            answer = _undecodable(frames, peer, exc)
            if answer is None:
                return
            kind, msg = answer
            if kind == "request":
                self.reply(peer, msg, msg)
                return
        waiter = self._pending.pop((peer, msg.call_id), None) if _is_reply(msg) else None
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(msg)
            return
        result = self._handler(peer, msg)
        if asyncio.iscoroutine(result):
            self._loop.create_task(self._guard(result, peer, msg))

    async def _guard(self, coro: Awaitable, peer: bytes | None, msg: Any) -> None:
        try:
            await coro
        except Exception as exc:  # a handler bug must not kill the loop, nor go unanswered
            log.exception("handler for %s failed", type(msg).__name__)
            if type(msg).__name__.endswith("Req"):
                self.reply(peer, msg, ErrorResp(status=500, detail=f"internal error: {exc}"))

    def send(self, peer: bytes | None, msg: Any) -> None:
        """Send now, or behind the messages already waiting for room (a peer past its high-water mark);
        sent at once to a ROUTER peer that is gone, it raises zmq.ZMQError (EHOSTUNREACH)."""
        frames = encode(msg)
        if self.kind == zmq.ROUTER:
            frames = [peer, *frames]
        if self._backlog:
            self._backlog.append(frames)
            return
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._backlog.append(frames)
        finally:
            self._check_events()  # the send may have taken the signal of a message that arrived meanwhile

    def _flush_backlog(self) -> None:
        while self._backlog:
            try:
                self.sock.send_multipart(self._backlog[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return  # still full: the descriptor signals when the peer has read
            except zmq.ZMQError as exc:  # its peer went away while it waited
                log.warning("dropping a message that waited for a peer that is gone: %s", exc)
            self._backlog.popleft()

    def reply(self, peer: bytes | None, req: Any, resp: Any) -> None:
        """Answer `req`; a reply to a ROUTER peer that has gone (say, a restarted API
        process, whose successor has a new identity) is dropped with a warning: whoever
        asked is no longer there to read it."""
        resp.call_id = req.call_id
        if not self._send_unless_gone(peer, resp):
            log.warning("dropping %s for %r: that peer is gone", type(resp).__name__, peer)

    def _send_unless_gone(self, peer: bytes | None, msg: Any) -> bool:
        """send(); False if a ROUTER's peer is gone (unroutable), any other failure raises."""
        try:
            self.send(peer, msg)
            return True
        except zmq.ZMQError as exc:
            if self.kind != zmq.ROUTER or exc.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def _register(self, peer: bytes | None, req: Any) -> asyncio.Future:
        req.call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[(peer, req.call_id)] = fut
        return fut

    async def call(self, peer: bytes | None, req: Any, timeout: float | None = None) -> Any:
        """Send `req` and await its reply. A request to a peer that is gone waits like one to a peer that
        does not answer: the deadline, or the owner's fail_pending when it learns the peer died, ends it."""
        fut = self._register(peer, req)
        try:
            if not self._send_unless_gone(peer, req):
                log.warning("%s to %r was not sent: that peer is gone", type(req).__name__, peer)
            resp = await (fut if timeout is None else asyncio.wait_for(fut, timeout))
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
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._fd = None
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
        return self.wait_reply(self.send_request(req), timeout_ms)

    def send_request(self, req: Any) -> Any:
        """The first half of `call`, so that one thread can have requests out to several peers at once."""
        req.call_id = next(self._ids)
        self.send(req)
        return req

    def wait_reply(self, req: Any, timeout_ms: int = 600_000) -> Any:
        """The reply to `req` (sent by send_request); RemoteError for an ErrorResp."""
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
