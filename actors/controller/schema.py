"""The state database's tables and the migrations that bring any older database up to date.

The schema has a version number (SQLite's `user_version`). Version 1 is what tinkerd
wrote before users existed (databases from before versioning read as 0 and are brought
to 1 first: columns added since the first release); version 2 gives every owned row a
`user` and adds the samples recorded for stable_reinforce. Rows that predate version 2
belong to LEGACY_USER until an admin reassigns them. A database newer than this code is
refused rather than half understood.
"""

from __future__ import annotations

import sqlite3

from cluster.users import LEGACY_USER

SCHEMA_VERSION = 2

# version 1, as released; later versions only ever add to it (see MIGRATIONS)
_BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    tags TEXT NOT NULL,
    user_metadata TEXT NOT NULL,
    sdk_version TEXT NOT NULL,
    finished REAL,
    finish_reason TEXT
);
CREATE TABLE IF NOT EXISTS training_runs (
    model_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora TEXT NOT NULL,
    user_metadata TEXT NOT NULL,
    created REAL NOT NULL,
    last_request REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    directory TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    adapter_id TEXT,
    model_path TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    result BLOB,
    error TEXT,
    category TEXT,
    created REAL NOT NULL,
    settled REAL
);
CREATE TABLE IF NOT EXISTS download_tokens (
    token TEXT PRIMARY KEY,
    tinker_path TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_model ON checkpoints(model_id, created);
CREATE INDEX IF NOT EXISTS runs_by_session ON training_runs(session_id);
CREATE INDEX IF NOT EXISTS samplers_by_session ON samplers(session_id);
CREATE INDEX IF NOT EXISTS futures_by_settled ON futures(settled);
"""

# version 0 -> 1: columns added after the first release, before versioning
_V1_COLUMNS = {
    # `owner`: a fingerprint of the key that created the session (what identified
    # callers before users existed)
    "sessions": {"display_name": "TEXT", "owner": "TEXT NOT NULL DEFAULT ''"},
    "checkpoints": {"public": "INTEGER NOT NULL DEFAULT 0", "expires_at": "REAL",
                    "user_metadata": "TEXT NOT NULL DEFAULT '{}'"},
}

OWNED_TABLES = ("sessions", "training_runs", "checkpoints", "samplers", "futures")
_V2_USER_INDEXES = (
    "CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions(user, created)",
    "CREATE INDEX IF NOT EXISTS runs_by_user ON training_runs(user, created)",
    "CREATE INDEX IF NOT EXISTS checkpoints_by_user ON checkpoints(user, created)",
)

_V2_SAMPLED_SEQUENCES = ("""
CREATE TABLE IF NOT EXISTS sampled_sequences (
    sequence_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    user TEXT NOT NULL,
    sampling_session_id TEXT NOT NULL,
    adapter_id TEXT,
    prompt_tokens BLOB NOT NULL,
    tokens BLOB NOT NULL,
    logprobs BLOB NOT NULL,
    params TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
)""", "CREATE INDEX IF NOT EXISTS sampled_sequences_by_use ON sampled_sequences(last_used)")


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _add_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    present = _columns(db, table)
    for column, decl in columns.items():
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def _to_v1(db: sqlite3.Connection) -> None:
    for table, columns in _V1_COLUMNS.items():
        _add_columns(db, table, columns)


def _to_v2(db: sqlite3.Connection) -> None:
    for table in OWNED_TABLES:
        # every row written so far predates users
        _add_columns(db, table, {"user": f"TEXT NOT NULL DEFAULT '{LEGACY_USER}'"})
    for statement in (*_V2_USER_INDEXES, *_V2_SAMPLED_SEQUENCES):  # execute, not executescript: that commits
        db.execute(statement)


MIGRATIONS = {1: _to_v1, 2: _to_v2}  # version -> the step that reaches it from the one before


def migrate(db: sqlite3.Connection, path: str) -> int:
    """Bring the database at `path` to SCHEMA_VERSION; return the version it had."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"the state database {path} has schema version {found}, newer than this tinkerd "
                           f"understands ({SCHEMA_VERSION}); run the tinkerd that wrote it, or another state dir")
    db.executescript(_BASE_SCHEMA)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN")
        try:
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return found
