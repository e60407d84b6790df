"""The one shape of a failed request everywhere: an HTTP-like status and a detail for the user."""

from __future__ import annotations


class StatusError(Exception):
    """Answered as `status` with `detail`: over HTTP as `{"detail": …}`, over ZMQ as ErrorResp."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail
