"""Errors a controller handler raises to answer a request with a status and a detail."""


from cluster.errors import StatusError


class ApiError(StatusError):
    """Raised by a controller handler: answered to the API as ErrorResp."""


def category_for(status: int) -> str:
    """Tinker's RequestFailedError category for a failed future."""
    return "user" if 400 <= status < 500 else "server"
