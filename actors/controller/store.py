"""SQLite record of sessions, training runs and checkpoints (the state dir's database).

The controller writes through on every change; rows are small and writes are rare
compared with training steps, so plain sqlite3 on the event loop thread is fine.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
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
"""


class StateStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)  # autocommit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def add_session(self, session_id: str, tags: list[str], user_metadata: dict, sdk_version: str) -> None:
        self.db.execute(
            "INSERT INTO sessions(session_id, created, tags, user_metadata, sdk_version) VALUES (?,?,?,?,?)",
            (session_id, time.time(), json.dumps(tags), json.dumps(user_metadata), sdk_version))

    def finish_session(self, session_id: str, reason: str) -> None:
        self.db.execute("UPDATE sessions SET finished=?, finish_reason=? WHERE session_id=? AND finished IS NULL",
                        (time.time(), reason, session_id))

    def add_training_run(self, model_id: str, session_id: str, base_model: str, lora: dict,
                         user_metadata: dict) -> None:
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO training_runs VALUES (?,?,?,?,?,?,?)",
            (model_id, session_id, base_model, json.dumps(lora), json.dumps(user_metadata), now, now))

    def set_training_run_lora(self, model_id: str, lora: dict) -> None:
        self.db.execute("UPDATE training_runs SET lora=? WHERE model_id=?", (json.dumps(lora), model_id))

    def touch_training_run(self, model_id: str) -> None:
        self.db.execute("UPDATE training_runs SET last_request=? WHERE model_id=?", (time.time(), model_id))

    def add_checkpoint(self, tinker_path: str, model_id: str, kind: str, name: str, directory: str,
                       size_bytes: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?)",
                        (tinker_path, model_id, kind, name, directory, size_bytes, time.time()))

    def checkpoint(self, tinker_path: str) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM checkpoints WHERE tinker_path=?", (tinker_path,))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    def close(self) -> None:
        self.db.close()
