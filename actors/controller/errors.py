"""Errors a controller handler raises to answer a request with a status and a detail."""


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def category_for(status: int) -> str:
    """Tinker's RequestFailedError category for a failed future."""
    return "user" if 400 <= status < 500 else "server"
