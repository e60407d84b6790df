"""Who is calling: API keys, the users they belong to, and admins (no torch here).

An `--api-keys-file` has one key per line: `<key> [<user>] [admin]`. Several keys may
name one user; a key without a user name is a user of its own, named after a
fingerprint of the key (`key-<12 hex>`, never the key itself). `#` starts a comment.
Without the file any key with Tinker's `tml-` prefix is accepted, and each distinct key
is its own user by the same fingerprint rule.

Everything a user creates (sessions, training runs, checkpoints, sampling sessions,
futures, recorded samples) is theirs; rows written before users existed belong to
LEGACY_USER, which an admin can hand to a real user.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "tml-"  # the SDK refuses any other opaque key client-side
LEGACY_USER = "legacy"
ADMIN_FLAG = "admin"
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_RESERVED = {LEGACY_USER, ADMIN_FLAG}


@dataclass(frozen=True)
class KeyOwner:
    user: str
    admin: bool = False


def key_fingerprint_user(key: str) -> str:
    """The user a key is when nothing names one: stable, and not the secret itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def check_user_name(name: str) -> None:
    if not _USER_NAME.match(name):
        raise ValueError(f"user name {name!r} must match {_USER_NAME.pattern}")
    if name in _RESERVED:
        raise ValueError(f"user name {name!r} is reserved")


def parse_api_keys(text: str, source: str = "the API keys file") -> dict[str, KeyOwner]:
    """key -> its owner; ValueError naming the line for anything malformed."""
    owners: dict[str, KeyOwner] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source}, line {number}"
        key, rest = words[0], words[1:]
        admin = bool(rest) and rest[-1] == ADMIN_FLAG
        if admin:
            rest = rest[:-1]
        if len(rest) > 1:
            raise ValueError(f"{where}: expected `<key> [<user>] [admin]`, got {len(words)} words")
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"{where}: keys must start with {KEY_PREFIX!r} (the tinker SDK refuses others)")
        if key in owners:
            raise ValueError(f"{where}: the key is listed twice")
        user = rest[0] if rest else key_fingerprint_user(key)
        try:
            check_user_name(user)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        owners[key] = KeyOwner(user, admin)
    if not owners:
        raise ValueError(f"{source} lists no keys")
    return owners


def load_api_keys(path: str | Path) -> dict[str, KeyOwner]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    return parse_api_keys(text, str(path))


def owner_of_key(key: str, owners: dict[str, KeyOwner] | None) -> KeyOwner | None:
    """Who `key` belongs to, or None if it is not accepted here."""
    if owners is not None:
        return owners.get(key)
    return KeyOwner(key_fingerprint_user(key)) if key.startswith(KEY_PREFIX) else None
