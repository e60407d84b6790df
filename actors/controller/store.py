"""SQLite record of sessions, training runs, checkpoints, samplers and futures (the state dir's database).

The controller writes through on every change, so a restarted controller (same state
dir) still lists every run and checkpoint, serves checkpoints written before, and
answers `retrieve_future` for futures settled before. Rows are small and writes rare
next to training steps, so plain sqlite3 on the event loop thread is fine (WAL,
synchronous=NORMAL: a crash of the process loses nothing, a power cut at most the
last commits). Times are unix seconds.

A checkpoint whose `expires_at` has passed is invisible at once (every read filters
it out); the controller's periodic sweep then deletes its files and its row.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from actors.controller.schema import OWNED_TABLES, migrate

_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_SQL_VARIABLES = 500  # ids per IN (...) query, well under SQLite's limit on bound variables


class StateStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)  # autocommit
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.found_version = migrate(self.db, str(path))

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        row = self.db.execute(sql, args).fetchone()
        return dict(row) if row else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self.db.execute(sql, args)]

    def _count(self, sql: str, args: tuple = ()) -> int:
        return int(self.db.execute(sql, args).fetchone()[0])

    # -- sessions -------------------------------------------------------------------------

    def add_session(self, session_id: str, user: str, tags: list[str], user_metadata: dict, sdk_version: str,
                    display_name: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO sessions(session_id, user, created, tags, user_metadata, sdk_version, display_name)"
            " VALUES (?,?,?,?,?,?,?)",
            (session_id, user, time.time(), json.dumps(tags), json.dumps(user_metadata), sdk_version,
             display_name))

    def finish_session(self, session_id: str, reason: str) -> None:
        self.db.execute("UPDATE sessions SET finished=?, finish_reason=? WHERE session_id=? AND finished IS NULL",
                        (time.time(), reason, session_id))

    def session(self, session_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        if row:
            row["user_metadata"] = json.loads(row["user_metadata"])
        return row

    def sessions(self, user: str | None, limit: int, offset: int) -> tuple[list[str], int]:
        """A user's session ids (everyone's for user None), newest first, and how many there are in all."""
        where, args = _of_user(user)
        rows = self.db.execute(f"SELECT session_id FROM sessions WHERE {where} ORDER BY created DESC, session_id"
                               " LIMIT ? OFFSET ?", (*args, limit, offset))
        return [r[0] for r in rows], self._count(f"SELECT COUNT(*) FROM sessions WHERE {where}", args)

    def unfinished_sessions(self) -> list[tuple[str, str]]:
        """(session_id, user) of every session that has not finished."""
        return [(r[0], r[1]) for r in self.db.execute("SELECT session_id, user FROM sessions WHERE finished IS NULL")]

    # -- training runs --------------------------------------------------------------------

    def add_training_run(self, model_id: str, session_id: str, user: str, base_model: str, lora: dict,
                         user_metadata: dict) -> None:
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO training_runs(model_id, session_id, user, base_model, lora, user_metadata,"
            " created, last_request) VALUES (?,?,?,?,?,?,?,?)",
            (model_id, session_id, user, base_model, json.dumps(lora), json.dumps(user_metadata), now, now))

    def set_training_run_lora(self, model_id: str, lora: dict) -> None:
        self.db.execute("UPDATE training_runs SET lora=? WHERE model_id=?", (json.dumps(lora), model_id))

    def touch_training_run(self, model_id: str) -> None:
        self.db.execute("UPDATE training_runs SET last_request=? WHERE model_id=?", (time.time(), model_id))

    def forget_training_run(self, model_id: str) -> None:
        """A run whose creation failed: it never existed."""
        self.db.execute("DELETE FROM training_runs WHERE model_id=?", (model_id,))

    @staticmethod
    def _run_row(row: dict[str, Any]) -> dict[str, Any]:
        row["lora"] = json.loads(row["lora"])
        row["user_metadata"] = json.loads(row["user_metadata"])
        return row

    def training_run(self, model_id: str) -> dict[str, Any] | None:
        """The run joined with its session's finish state."""
        row = self._one("SELECT r.*, s.finished AS session_finished, s.finish_reason"
                        " FROM training_runs r LEFT JOIN sessions s USING (session_id) WHERE r.model_id=?",
                        (model_id,))
        return self._run_row(row) if row else None

    def training_runs(self, user: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A user's runs (everyone's for user None), newest first, and how many there are in all."""
        where, args = _of_user(user, "r.user")
        rows = self._all("SELECT r.*, s.finished AS session_finished, s.finish_reason"
                         f" FROM training_runs r LEFT JOIN sessions s USING (session_id) WHERE {where}"
                         " ORDER BY r.created DESC, r.model_id LIMIT ? OFFSET ?", (*args, limit, offset))
        return [self._run_row(r) for r in rows], self._count(f"SELECT COUNT(*) FROM training_runs r WHERE {where}",
                                                             args)

    def training_run_ids(self, session_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT model_id FROM training_runs WHERE session_id=? ORDER BY created", (session_id,))]

    # -- checkpoints ----------------------------------------------------------------------

    def add_checkpoint(self, tinker_path: str, model_id: str, user: str, kind: str, name: str, directory: str,
                       size_bytes: int, expires_at: float | None = None,
                       user_metadata: dict[str, str] | None = None) -> None:
        """Record a checkpoint (replacing one at the same path: a fresh row, not public)."""
        self.db.execute(
            "INSERT OR REPLACE INTO checkpoints(tinker_path, model_id, user, kind, name, directory, size_bytes,"
            " created, public, expires_at, user_metadata) VALUES (?,?,?,?,?,?,?,?,0,?,?)",
            (tinker_path, model_id, user, kind, name, directory, size_bytes, time.time(), expires_at,
             json.dumps(user_metadata or {})))

    @staticmethod
    def _checkpoint_row(row: dict[str, Any]) -> dict[str, Any]:
        row["public"] = bool(row["public"])
        row["user_metadata"] = json.loads(row["user_metadata"])
        return row

    def checkpoint(self, tinker_path: str) -> dict[str, Any] | None:
        """The live (unexpired) checkpoint at tinker_path."""
        row = self._one(f"SELECT * FROM checkpoints WHERE tinker_path=? AND {_LIVE}", (tinker_path, time.time()))
        return self._checkpoint_row(row) if row else None

    def checkpoints(self, model_id: str | None, user: str | None, limit: int,
                    offset: int) -> tuple[list[dict[str, Any]], int]:
        """Live checkpoints of one run (model_id) or of one user (everyone's for user None), newest first;
        and how many there are in all."""
        owned, owned_args = _of_user(user)
        where, args = f"{owned} AND {_LIVE}", (*owned_args, time.time())
        if model_id is not None:
            where, args = f"model_id=? AND {where}", (model_id, *args)
        rows = self._all(f"SELECT * FROM checkpoints WHERE {where} ORDER BY created DESC, tinker_path"
                         " LIMIT ? OFFSET ?", (*args, limit, offset))
        return [self._checkpoint_row(r) for r in rows], self._count(f"SELECT COUNT(*) FROM checkpoints WHERE {where}",
                                                                    args)

    def latest_checkpoint(self, model_id: str, kind: str) -> dict[str, Any] | None:
        row = self._one(f"SELECT * FROM checkpoints WHERE model_id=? AND kind=? AND {_LIVE}"
                        " ORDER BY created DESC LIMIT 1", (model_id, kind, time.time()))
        return self._checkpoint_row(row) if row else None

    def expired_checkpoints(self) -> list[dict[str, Any]]:
        return [self._checkpoint_row(r) for r in self._all(
            "SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (time.time(),))]

    def delete_checkpoint(self, tinker_path: str) -> None:
        self.db.execute("DELETE FROM checkpoints WHERE tinker_path=?", (tinker_path,))
        self.db.execute("DELETE FROM download_tokens WHERE tinker_path=?", (tinker_path,))

    def set_checkpoint_public(self, tinker_path: str, public: bool) -> None:
        self.db.execute("UPDATE checkpoints SET public=? WHERE tinker_path=?", (int(public), tinker_path))

    def set_checkpoint_expiry(self, tinker_path: str, expires_at: float | None) -> None:
        self.db.execute("UPDATE checkpoints SET expires_at=? WHERE tinker_path=?", (expires_at, tinker_path))

    # -- download tokens (external_weights_urls) -----------------------------------------

    def add_download_token(self, token: str, tinker_path: str, expires: float) -> None:
        self.db.execute("INSERT INTO download_tokens VALUES (?,?,?)", (token, tinker_path, expires))

    def download_token(self, token: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM download_tokens WHERE token=? AND expires > ?", (token, time.time()))

    def delete_expired_tokens(self) -> None:
        self.db.execute("DELETE FROM download_tokens WHERE expires <= ?", (time.time(),))

    # -- samplers (sampling sessions) -----------------------------------------------------

    def add_sampler(self, sampler_id: str, session_id: str, user: str, base_model: str, adapter_id: str | None,
                    model_path: str | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO samplers(sampler_id, session_id, user, base_model, adapter_id,"
                        " model_path, created) VALUES (?,?,?,?,?,?,?)",
                        (sampler_id, session_id, user, base_model, adapter_id, model_path, time.time()))

    def sampler(self, sampler_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM samplers WHERE sampler_id=?", (sampler_id,))

    def sampler_ids(self, session_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT sampler_id FROM samplers WHERE session_id=? ORDER BY created", (session_id,))]

    # -- futures --------------------------------------------------------------------------

    def add_future(self, request_id: str, kind: str, user: str) -> None:
        self.db.execute("INSERT INTO futures(request_id, kind, user, state, created) VALUES (?,?,?,'pending',?)",
                        (request_id, kind, user, time.time()))

    def settle_future(self, request_id: str, state: str, result: bytes | None = None, error: str = "",
                      category: str = "") -> None:
        """state: "done" (with the result, an encode_blob) or "error" (with error and category)."""
        self.db.execute("UPDATE futures SET state=?, result=?, error=?, category=?, settled=? WHERE request_id=?",
                        (state, result, error, category, time.time(), request_id))

    def future(self, request_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM futures WHERE request_id=?", (request_id,))

    def fail_pending_futures(self, error: str, category: str) -> int:
        """Settle every future still pending (their work died with the previous controller)."""
        cur = self.db.execute("UPDATE futures SET state='error', error=?, category=?, settled=? WHERE state='pending'",
                              (error, category, time.time()))
        return cur.rowcount

    def delete_futures_settled_before(self, cutoff: float) -> int:
        return self.db.execute("DELETE FROM futures WHERE settled IS NOT NULL AND settled < ?", (cutoff,)).rowcount

    # -- samples recorded for stable_reinforce (record_stability_info) ------------------

    def add_sampled_sequences(self, rows: list[tuple]) -> None:
        """rows: (sequence_id, session_id, user, sampling_session_id, adapter_id, prompt_tokens,
        tokens, logprobs, params); arrays as raw little-endian bytes, params as JSON text."""
        now = time.time()
        self.db.executemany("INSERT OR REPLACE INTO sampled_sequences VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            [(*row, now, now) for row in rows])

    def sampled_sequences(self, sequence_ids: list[str], used_after: float) -> dict[str, dict[str, Any]]:
        """The recorded sequences among `sequence_ids` last used after `used_after` (unexpired)."""
        found = {}
        for start in range(0, len(sequence_ids), _SQL_VARIABLES):
            chunk = sequence_ids[start:start + _SQL_VARIABLES]
            marks = ",".join("?" * len(chunk))
            for row in self._all(f"SELECT * FROM sampled_sequences WHERE sequence_id IN ({marks}) AND last_used > ?",
                                 (*chunk, used_after)):
                found[row["sequence_id"]] = row
        return found

    def touch_sampled_sequences(self, sequence_ids: list[str]) -> None:
        now = time.time()
        self.db.executemany("UPDATE sampled_sequences SET last_used=? WHERE sequence_id=?",
                            [(now, s) for s in sequence_ids])

    def delete_sampled_sequences_unused_since(self, cutoff: float) -> int:
        return self.db.execute("DELETE FROM sampled_sequences WHERE last_used <= ?", (cutoff,)).rowcount

    # -- users ----------------------------------------------------------------------------

    def reassign_user(self, from_user: str, to_user: str) -> dict[str, int]:
        """Hand every row of `from_user` to `to_user` (say, the legacy rows); rows moved per table."""
        moved = {}
        self.db.execute("BEGIN")
        try:
            for table in (*OWNED_TABLES, "sampled_sequences"):
                moved[table] = self.db.execute(f"UPDATE {table} SET user=? WHERE user=?",
                                               (to_user, from_user)).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return moved

    def close(self) -> None:
        self.db.close()


def _of_user(user: str | None, column: str = "user") -> tuple[str, tuple]:
    """A WHERE clause selecting one user's rows; every row for user None (an admin's view)."""
    return ("1", ()) if user is None else (f"{column}=?", (user,))
