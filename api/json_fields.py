"""Typed reads of JSON request fields, each failure a 400 naming the field.

`null` counts as absent everywhere: SDKs up to 0.16 send explicit nulls for unset
optional fields, 0.38 leaves them out.
"""

from __future__ import annotations

from typing import Any

import orjson

from api.errors import bad_request

REQUIRED: Any = object()


def parse_json_object(raw: bytes) -> "JsonObject":
    """A request body as a JSON object; an empty body is `{}`."""
    if not raw.strip():
        return JsonObject({}, "")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    return as_json_object(value, "")


def as_json_object(value: Any, where: str) -> "JsonObject":
    """`value` (found at `where`, "" for the body) as a JsonObject; 400 unless it is an object."""
    if not isinstance(value, dict):
        raise bad_request(f"{where or 'request body'} must be a JSON object, got {_json_type(value)}")
    return JsonObject(value, where)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


class JsonObject:
    def __init__(self, value: dict[str, Any], where: str):
        self.value = value
        self.where = where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def _raw(self, key: str, default: Any) -> Any:
        value = self.value.get(key)
        if value is None and default is REQUIRED:
            raise bad_request(f"{self.path(key)} is required")
        return value

    def _typed(self, key: str, default: Any, types: tuple[type, ...], expected: str) -> Any:
        value = self._raw(key, default)
        if value is None:
            return default
        # bool is an int in Python, never in JSON
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            raise bad_request(f"{self.path(key)} must be {expected}, got {_json_type(value)}")
        return value

    def get_str(self, key: str, default: Any = REQUIRED) -> str:
        return self._typed(key, default, (str,), "a string")

    def get_int(self, key: str, default: Any = REQUIRED) -> int:
        return self._typed(key, default, (int,), "an integer")

    def get_float(self, key: str, default: Any = REQUIRED) -> float:
        value = self._typed(key, default, (int, float), "a number")
        return float(value) if value is not None else value

    def get_bool(self, key: str, default: Any = REQUIRED) -> bool:
        return self._typed(key, default, (bool,), "a boolean")

    def get_list(self, key: str, default: Any = REQUIRED) -> list:
        return self._typed(key, default, (list,), "an array")

    def get_object(self, key: str, default: Any = REQUIRED) -> "JsonObject":
        value = self._typed(key, default, (dict,), "an object")
        return JsonObject(value, self.path(key)) if isinstance(value, dict) else value
