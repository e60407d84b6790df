"""The futures store: every submission gets a request_id; results wait here to be polled.

`retrieve_future` long-polls: `wait()` holds the caller until the future settles or
its budget runs out (then the API answers `try_again`). Results stay retrievable after
the first fetch, because the SDK may re-poll after a lost response; settled futures
are swept after `keep_s`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.messages import RetrieveFutureResp


@dataclass
class _Future:
    kind: str
    created: float = field(default_factory=time.monotonic)
    settled_at: float | None = None
    result: Any = None
    error: str = ""
    category: str = "server"
    event: asyncio.Event = field(default_factory=asyncio.Event)


class UnknownFuture(KeyError):
    pass


class FutureStore:
    def __init__(self, keep_s: float = 3600.0):
        self._futures: dict[str, _Future] = {}
        self.keep_s = keep_s

    def create(self, kind: str) -> str:
        request_id = f"req-{uuid.uuid4().hex}"
        self._futures[request_id] = _Future(kind=kind)
        return request_id

    def resolve(self, request_id: str, result: Any) -> None:
        fut = self._futures.get(request_id)
        if fut is None or fut.settled_at is not None:
            return
        fut.result, fut.settled_at = result, time.monotonic()
        fut.event.set()

    def fail(self, request_id: str, error: str, category: str = "server") -> None:
        fut = self._futures.get(request_id)
        if fut is None or fut.settled_at is not None:
            return
        fut.error, fut.category, fut.settled_at = error, category, time.monotonic()
        fut.event.set()

    def is_pending(self, request_id: str) -> bool:
        fut = self._futures.get(request_id)
        return fut is not None and fut.settled_at is None

    async def wait(self, request_id: str, wait_s: float) -> RetrieveFutureResp:
        fut = self._futures.get(request_id)
        if fut is None:
            raise UnknownFuture(request_id)
        if fut.settled_at is None:
            try:
                await asyncio.wait_for(fut.event.wait(), timeout=max(0.0, wait_s))
            except asyncio.TimeoutError:
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
        return len(stale)

    def __len__(self) -> int:
        return len(self._futures)
