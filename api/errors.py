"""The one exception API code raises to answer a request with an HTTP error."""

from __future__ import annotations


class HttpError(Exception):
    """Answered as `status` with the JSON body `{"detail": detail}`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def bad_request(detail: str) -> HttpError:
    return HttpError(400, detail)
