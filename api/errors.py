"""The one exception API code raises to answer a request with an HTTP error."""

from __future__ import annotations

from cluster.errors import StatusError


class HttpError(StatusError):
    """Raised by API code: answered as `status` with the JSON body `{"detail": detail}`."""


def bad_request(detail: str) -> HttpError:
    return HttpError(400, detail)
