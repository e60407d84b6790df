"""Who is calling: the X-API-Key of each request, resolved to a user (cluster/users.py).

The middleware answers 401 for a missing or unknown key and stores the caller on the
request; every message the API sends to the controller on a user's behalf carries it
(`stamp`), and the controller decides what that user may see.
"""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from api.errors import HttpError
from cluster.messages import Caller, UserReq
from cluster.users import KeyOwner, load_api_keys, owner_of_key

CALLER = web.RequestKey("caller", Caller)


def api_key_check(api_keys_file: str | None, is_open_path: Callable[[str], bool]):
    """Keys from the file (each with its user), or, without one, any key with Tinker's `tml-` prefix."""
    owners: dict[str, KeyOwner] | None = load_api_keys(api_keys_file) if api_keys_file else None

    @web.middleware
    async def check_api_key(request: web.Request, handler) -> web.StreamResponse:
        if not is_open_path(request.path):
            key = request.headers.get("X-API-Key")
            if not key:
                raise HttpError(401, "missing X-API-Key header")
            owner = owner_of_key(key, owners)
            if owner is None:
                raise HttpError(401, "invalid API key")
            request[CALLER] = Caller(user=owner.user, admin=owner.admin)
        return await handler(request)

    return check_api_key


def stamp(request: web.Request, req: Any) -> Any:
    """`req` on behalf of the request's caller."""
    if isinstance(req, UserReq):
        req.caller = request[CALLER]
    return req
