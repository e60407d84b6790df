"""Errors a controller handler raises to answer a request with a status and a detail."""


import logging

from actors.controller.workers import WorkerFailure
from cluster.errors import StatusError

log = logging.getLogger(__name__)


class ApiError(StatusError):
    """Raised by a controller handler: answered to the API as ErrorResp."""


def category_for(status: int) -> str:
    """Tinker's RequestFailedError category for a failed future."""
    return "user" if 400 <= status < 500 else "server"


def failure_of(exc: Exception, what: str) -> tuple[str, str]:
    """A failed future's (error, category) from what its work raised: a status says whose
    fault it was; a dead worker or an unexpected exception is the server's."""
    if isinstance(exc, StatusError):
        return exc.detail, category_for(exc.status)
    if isinstance(exc, WorkerFailure):
        return str(exc), "server"
    log.error("%s failed", what, exc_info=exc)
    return f"internal error: {exc}", "server"
