"""The futures store: every submission gets a request_id; results wait here to be polled.

`retrieve_future` long-polls: `wait()` holds the caller until the future settles or
its budget runs out (then the API answers `try_again`). Results stay retrievable after
the first fetch, because the SDK may re-poll after a lost response; settled futures
are swept after `keep_s`.

Every future is also written through to SQLite (state, then the result as an
`encode_blob` of its message, or the error), so after a controller restart a future
settled before it is still answered from the database. Futures that were pending when
the previous controller stopped can never settle: `fail_orphans` marks them failed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from actors.controller.store import StateStore
from cluster.codec import decode_blob, encode_blob
from cluster.messages import Caller, RetrieveFutureResp

RESTART_ERROR = "the server restarted before this request finished; submit it again"


class Waiters:
    """Polls held until something happens (a future settles, a completion is logged). Each is a bare loop
    future with a timer, no task per poll, so the reply goes out on the loop turn the wake-up happens."""

    def __init__(self):
        self._held: list[asyncio.Future] = []

    def wake(self) -> None:
        for waiter in self._held:
            if not waiter.done():
                waiter.set_result(True)
        self._held.clear()

    async def wait(self, timeout_s: float) -> bool:
        """True once woken, False after timeout_s."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._held.append(waiter)
        timer = loop.call_later(max(0.0, timeout_s), _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            if waiter in self._held:
                self._held.remove(waiter)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


@dataclass
class _Future:
    kind: str
    user: str  # who may retrieve it: whoever submitted the request
    created: float = field(default_factory=time.monotonic)
    settled_at: float | None = None
    result: Any = None
    error: str = ""
    category: str = "server"
    settled: Waiters = field(default_factory=Waiters)  # the polls held until it settles


class UnknownFuture(KeyError):
    pass


class FutureStore:
    def __init__(self, store: StateStore, keep_s: float = 3600.0):
        self._futures: dict[str, _Future] = {}
        self.store = store
        self.keep_s = keep_s

    def fail_orphans(self) -> int:
        """At start-up: fail the futures a previous controller left pending."""
        return self.store.fail_pending_futures(RESTART_ERROR, "server")

    def create(self, kind: str, user: str) -> str:
        request_id = f"req-{uuid.uuid4().hex}"
        self._futures[request_id] = _Future(kind=kind, user=user)
        self.store.add_future(request_id, kind, user)
        return request_id

    def resolve(self, request_id: str, result: Any) -> None:
        fut = self._futures.get(request_id)
        if fut is None or fut.settled_at is not None:
            return
        fut.result, fut.settled_at = result, time.monotonic()
        fut.settled.wake()
        self.store.settle_future(request_id, "done", result=encode_blob(result))

    def fail(self, request_id: str, error: str, category: str = "server") -> None:
        fut = self._futures.get(request_id)
        if fut is None or fut.settled_at is not None:
            return
        fut.error, fut.category, fut.settled_at = error, category, time.monotonic()
        fut.settled.wake()
        self.store.settle_future(request_id, "error", error=error, category=category)

    def is_pending(self, request_id: str) -> bool:
        fut = self._futures.get(request_id)
        return fut is not None and fut.settled_at is None

    def kind(self, request_id: str, caller: Caller | None = None) -> str | None:
        """The future's kind; None if there is none (or, given a caller, none of theirs)."""
        fut = self._futures.get(request_id)
        if fut is None or (caller is not None and not caller.owns(fut.user)):
            return None
        return fut.kind

    def reassign_user(self, from_user: str, to_user: str) -> None:
        for fut in self._futures.values():
            if fut.user == from_user:
                fut.user = to_user

    def _from_database(self, request_id: str) -> _Future | None:
        """A future settled by an earlier controller (or swept from memory), from SQLite."""
        row = self.store.future(request_id)
        if row is None or row["state"] == "pending":
            return None
        fut = _Future(kind=row["kind"], user=row["user"], settled_at=time.monotonic())
        if row["state"] == "done":
            fut.result = decode_blob(row["result"])
        else:
            fut.error, fut.category = row["error"] or "failed", row["category"] or "unknown"
        self._futures[request_id] = fut
        return fut

    async def wait(self, request_id: str, wait_s: float, caller: Caller) -> RetrieveFutureResp:
        """The future's outcome once settled, or "pending" after wait_s; UnknownFuture if it is
        not the caller's (another user's future does not exist for them)."""
        fut = self._futures.get(request_id) or self._from_database(request_id)
        if fut is None or not caller.owns(fut.user):
            raise UnknownFuture(request_id)
        if fut.settled_at is None and not await fut.settled.wait(wait_s):
            return RetrieveFutureResp(status="pending")
        if fut.error:
            return RetrieveFutureResp(status="error", error=fut.error, category=fut.category)
        return RetrieveFutureResp(status="done", result=fut.result)

    def sweep(self) -> int:
        """Forget futures settled more than keep_s ago; return how many went."""
        cutoff = time.monotonic() - self.keep_s
        stale = [rid for rid, f in self._futures.items() if f.settled_at is not None and f.settled_at < cutoff]
        for rid in stale:
            del self._futures[rid]
        self.store.delete_futures_settled_before(time.time() - self.keep_s)
        return len(stale)

    def describe(self, recent: int) -> list[dict]:
        """Every pending future, then the `recent` most recently settled ones (for the admin probe)."""
        now = time.monotonic()
        pending = [(rid, f) for rid, f in self._futures.items() if f.settled_at is None]
        settled = sorted(((rid, f) for rid, f in self._futures.items() if f.settled_at is not None),
                         key=lambda item: item[1].settled_at, reverse=True)[:recent]
        return [{"request_id": rid, "kind": f.kind, "user": f.user,
                 "state": "pending" if f.settled_at is None else ("failed" if f.error else "finished"),
                 "age_s": round(now - f.created, 1),
                 "took_s": None if f.settled_at is None else round(f.settled_at - f.created, 3),
                 "error": f.error[:120]} for rid, f in pending + settled]

    def __len__(self) -> int:
        return len(self._futures)
