"""Durable state: the SQLite store, futures that outlive the controller, checkpoint TTLs and downloads."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import numpy as np
import pytest

from actors.controller.checkpoints import CheckpointService
from actors.controller.errors import ApiError
from actors.controller.futures import RESTART_ERROR, FutureStore, UnknownFuture
from actors.controller.schema import SCHEMA_VERSION
from actors.controller.store import StateStore
from cluster.messages import Caller, ForwardBackwardResult, JsonResult
from cluster.users import LEGACY_USER
from cluster.messages import (
    DeleteCheckpointReq, ExternalWeightsUrlsReq, ListCheckpointsReq, ResolveDownloadReq, SetCheckpointPublicReq,
    SetCheckpointTtlReq, WeightsInfoReq,
)

RUN = "s1:train:0"
ALICE = Caller(user="alice")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "tinkerd.sqlite3"


def _checkpoint(store: StateStore, tmp_path, kind: str, name: str, expires_at=None) -> str:
    directory = tmp_path / "checkpoints" / RUN / kind / name
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    (directory / "adapter_config.json").write_text('{"r": 8, "tinkerd": {"train_attn": true}}')
    path = f"tinker://{RUN}/{kind}/{name}"
    store.add_checkpoint(path, RUN, "alice", kind, name, str(directory), 7, expires_at, {"step": "3"})
    return path


def test_sessions_runs_and_checkpoints_survive_reopening(db_path, tmp_path):
    store = StateStore(db_path)
    store.add_session("s1", "alice", ["t"], {"who": "me"}, "0.38.0", display_name="demo")
    store.add_training_run(RUN, "s1", "alice", "tiny", {"rank": 8}, {"n": 3})
    path = _checkpoint(store, tmp_path, "weights", "c1")
    store.add_sampler("s1:sample:0", "s1", "alice", "tiny", path, None)
    store.close()

    store = StateStore(db_path)
    assert store.unfinished_sessions() == [("s1", "alice")]
    assert store.session("s1")["display_name"] == "demo"
    run = store.training_run(RUN)
    assert (run["user"], run["lora"], run["user_metadata"]) == ("alice", {"rank": 8}, {"n": 3})
    assert store.checkpoint(path)["user_metadata"] == {"step": "3"}
    assert store.sampler_ids("s1") == ["s1:sample:0"] and store.training_run_ids("s1") == [RUN]
    store.finish_session("s1", "expired")
    assert store.unfinished_sessions() == [] and store.training_run(RUN)["finish_reason"] == "expired"


def test_an_older_database_gains_the_new_columns(db_path):
    old = sqlite3.connect(db_path)
    old.executescript("""
        CREATE TABLE sessions (session_id TEXT PRIMARY KEY, created REAL NOT NULL, tags TEXT NOT NULL,
            user_metadata TEXT NOT NULL, sdk_version TEXT NOT NULL, finished REAL, finish_reason TEXT);
        CREATE TABLE checkpoints (tinker_path TEXT PRIMARY KEY, model_id TEXT NOT NULL, kind TEXT NOT NULL,
            name TEXT NOT NULL, directory TEXT NOT NULL, size_bytes INTEGER NOT NULL, created REAL NOT NULL);
        INSERT INTO sessions VALUES ('old', 1.0, '[]', '{}', '0.30.4', NULL, NULL);
        INSERT INTO checkpoints VALUES ('tinker://r/weights/a', 'r', 'weights', 'a', '/x', 5, 2.0);
    """)
    old.close()
    store = StateStore(db_path)
    assert store.found_version == 0
    assert store.session("old")["owner"] == ""
    row = store.checkpoint("tinker://r/weights/a")
    assert (row["public"], row["expires_at"], row["user_metadata"]) == (False, None, {})
    assert (store.session("old")["user"], row["user"]) == (LEGACY_USER, LEGACY_USER)


def test_an_expired_checkpoint_is_hidden_at_once_and_swept_from_disk(db_path, tmp_path):
    store = StateStore(db_path)
    checkpoints = CheckpointService(store)
    keep = _checkpoint(store, tmp_path, "weights", "keep")
    gone = _checkpoint(store, tmp_path, "sampler_weights", "gone", expires_at=time.time() - 1)
    assert store.checkpoint(gone) is None
    listed = checkpoints.handle_ListCheckpointsReq(ListCheckpointsReq(limit=10, caller=ALICE))
    assert [c.tinker_path for c in listed.checkpoints] == [keep] and listed.total_count == 1
    directory = tmp_path / "checkpoints" / RUN / "sampler_weights" / "gone"
    assert directory.exists()
    assert checkpoints.sweep() == 1
    assert not directory.exists() and store.expired_checkpoints() == []

    checkpoints.handle_SetCheckpointTtlReq(SetCheckpointTtlReq(tinker_path=keep, ttl_seconds=3600, caller=ALICE))
    assert store.checkpoint(keep)["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
    checkpoints.handle_DeleteCheckpointReq(DeleteCheckpointReq(tinker_path=keep, caller=ALICE))
    assert store.checkpoint(keep) is None and not (tmp_path / "checkpoints" / RUN / "weights" / "keep").exists()
    with pytest.raises(ApiError) as err:
        checkpoints.handle_DeleteCheckpointReq(DeleteCheckpointReq(tinker_path=keep, caller=ALICE))
    assert err.value.status == 404


def test_download_tokens_name_files_of_external_checkpoints_only(db_path, tmp_path):
    store = StateStore(db_path)
    checkpoints = CheckpointService(store)
    training = _checkpoint(store, tmp_path, "weights", "t")
    external = _checkpoint(store, tmp_path, "external_weights", "e")
    with pytest.raises(ApiError, match="external_weights"):
        checkpoints.handle_ExternalWeightsUrlsReq(ExternalWeightsUrlsReq(tinker_path=training, caller=ALICE))
    urls = checkpoints.handle_ExternalWeightsUrlsReq(ExternalWeightsUrlsReq(tinker_path=external, caller=ALICE))
    assert urls.files == ["adapter_config.json", "adapter_model.safetensors"] and len(urls.token) >= 40
    found = checkpoints.handle_ResolveDownloadReq(ResolveDownloadReq(token=urls.token, relpath="adapter_config.json"))
    assert found.path.endswith("external_weights/e/adapter_config.json")
    for token, relpath in ((urls.token, "../t/adapter_config.json"), (urls.token, "missing"),
                           ("not-a-token", "adapter_config.json")):
        with pytest.raises(ApiError) as err:
            checkpoints.handle_ResolveDownloadReq(ResolveDownloadReq(token=token, relpath=relpath))
        assert err.value.status == 404


def test_settled_futures_are_answered_after_a_restart_and_pending_ones_fail(db_path):
    async def scenario():
        store = StateStore(db_path)
        futures = FutureStore(store)
        done, failed, pending = (futures.create(kind, "alice") for kind in ("ForwardBackwardReq", "x", "y"))
        result = ForwardBackwardResult(lengths=np.array([2, 1]), logprobs=np.array([-1, -2, -3], np.float32),
                                       elementwise_loss=np.array([1, 2, 3], np.float32), metrics={"loss:sum": 6.0})
        futures.resolve(done, result)
        futures.fail(failed, "bad input", "user")
        store.close()

        store = StateStore(db_path)  # a new controller on the same state dir
        futures = FutureStore(store)
        assert futures.fail_orphans() == 1
        got = await futures.wait(done, 0, ALICE)
        assert got.status == "done" and got.result.metrics == {"loss:sum": 6.0}
        np.testing.assert_array_equal(got.result.logprobs, result.logprobs)
        assert (await futures.wait(failed, 0, ALICE)).error == "bad input"
        orphan = await futures.wait(pending, 0, ALICE)
        assert (orphan.status, orphan.error, orphan.category) == ("error", RESTART_ERROR, "server")
        with pytest.raises(UnknownFuture):
            await futures.wait("req-nope", 0, ALICE)
        with pytest.raises(UnknownFuture):  # restored from the database, still only alice's
            await futures.wait(done, 0, Caller(user="bob"))
        assert (await futures.wait(done, 0, Caller(user="root", admin=True))).status == "done"

        futures.keep_s = 0.0
        time.sleep(0.01)
        futures.resolve(futures.create("z", "alice"), JsonResult(payload={}))
        time.sleep(0.01)
        futures.sweep()
        assert store.future(done) is None
        with pytest.raises(UnknownFuture):
            await futures.wait(done, 0, ALICE)

    asyncio.run(scenario())


# -- users and the schema version ----------------------------------------------------------

# what tinkerd wrote before users existed (schema version 1; it never set user_version)
_RELEASED_BEFORE_USERS = """
    CREATE TABLE sessions (session_id TEXT PRIMARY KEY, created REAL NOT NULL, tags TEXT NOT NULL,
        user_metadata TEXT NOT NULL, sdk_version TEXT NOT NULL, finished REAL, finish_reason TEXT,
        display_name TEXT, owner TEXT NOT NULL DEFAULT '');
    CREATE TABLE training_runs (model_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, base_model TEXT NOT NULL,
        lora TEXT NOT NULL, user_metadata TEXT NOT NULL, created REAL NOT NULL, last_request REAL NOT NULL);
    CREATE TABLE checkpoints (tinker_path TEXT PRIMARY KEY, model_id TEXT NOT NULL, kind TEXT NOT NULL,
        name TEXT NOT NULL, directory TEXT NOT NULL, size_bytes INTEGER NOT NULL, created REAL NOT NULL,
        public INTEGER NOT NULL DEFAULT 0, expires_at REAL, user_metadata TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE samplers (sampler_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, base_model TEXT NOT NULL,
        adapter_id TEXT, model_path TEXT, created REAL NOT NULL);
    CREATE TABLE futures (request_id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, result BLOB,
        error TEXT, category TEXT, created REAL NOT NULL, settled REAL);
    CREATE TABLE download_tokens (token TEXT PRIMARY KEY, tinker_path TEXT NOT NULL, expires REAL NOT NULL);
    INSERT INTO sessions VALUES ('s0', 1.0, '[]', '{}', '0.38.0', NULL, NULL, NULL, 'key-0123456789ab');
    INSERT INTO training_runs VALUES ('s0:train:0', 's0', 'tiny', '{"rank": 8}', '{}', 1.0, 1.0);
    INSERT INTO checkpoints VALUES ('tinker://s0:train:0/weights/a', 's0:train:0', 'weights', 'a', '/x', 5, 2.0,
        0, NULL, '{}');
    INSERT INTO samplers VALUES ('s0:sample:0', 's0', 'tiny', NULL, NULL, 3.0);
    INSERT INTO futures VALUES ('req-1', 'sample', 'done', NULL, NULL, NULL, 4.0, 5.0);
"""


def test_rows_from_before_users_belong_to_legacy_until_an_admin_hands_them_over(db_path):
    old = sqlite3.connect(db_path)
    old.executescript(_RELEASED_BEFORE_USERS)
    old.close()
    store = StateStore(db_path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.unfinished_sessions() == [("s0", LEGACY_USER)]
    assert store.training_run("s0:train:0")["user"] == LEGACY_USER
    assert store.sessions("alice", 10, 0) == ([], 0) and store.sessions(None, 10, 0) == (["s0"], 1)
    assert store.checkpoints(None, "alice", 10, 0) == ([], 0)
    assert store.future("req-1")["user"] == LEGACY_USER and store.sampler("s0:sample:0")["user"] == LEGACY_USER

    moved = store.reassign_user(LEGACY_USER, "alice")
    assert moved == {"sessions": 1, "training_runs": 1, "checkpoints": 1, "samplers": 1, "futures": 1,
                     "sampled_sequences": 0}
    assert store.sessions("alice", 10, 0) == (["s0"], 1)
    rows, total = store.checkpoints(None, "alice", 10, 0)
    assert total == 1 and rows[0]["tinker_path"] == "tinker://s0:train:0/weights/a"
    store.close()
    assert StateStore(db_path).found_version == SCHEMA_VERSION  # opening again migrates nothing


def test_a_database_newer_than_this_code_is_refused(db_path):
    newer = sqlite3.connect(db_path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(RuntimeError, match="newer than this tinkerd"):
        StateStore(db_path)


def test_checkpoints_are_private_unless_published_and_only_their_owner_changes_them(db_path, tmp_path):
    store = StateStore(db_path)
    checkpoints = CheckpointService(store)
    path = _checkpoint(store, tmp_path, "external_weights", "e")
    bob, admin = Caller(user="bob"), Caller(user="root", admin=True)
    for req in (WeightsInfoReq(tinker_path=path, caller=bob), ExternalWeightsUrlsReq(tinker_path=path, caller=bob),
                SetCheckpointPublicReq(tinker_path=path, public=True, caller=bob),
                DeleteCheckpointReq(tinker_path=path, caller=bob)):
        with pytest.raises(ApiError) as err:
            getattr(checkpoints, f"handle_{type(req).__name__}")(req)
        assert err.value.status == 404, type(req).__name__
    assert checkpoints.handle_ListCheckpointsReq(ListCheckpointsReq(caller=bob)).checkpoints == []

    checkpoints.handle_SetCheckpointPublicReq(SetCheckpointPublicReq(tinker_path=path, public=True, caller=ALICE))
    assert checkpoints.handle_ExternalWeightsUrlsReq(ExternalWeightsUrlsReq(tinker_path=path, caller=bob)).files
    assert checkpoints.handle_ListCheckpointsReq(ListCheckpointsReq(caller=bob)).checkpoints == []  # not bob's
    for req in (SetCheckpointTtlReq(tinker_path=path, ttl_seconds=60, caller=bob),
                DeleteCheckpointReq(tinker_path=path, caller=bob)):
        with pytest.raises(ApiError) as err:
            getattr(checkpoints, f"handle_{type(req).__name__}")(req)
        assert err.value.status == 403 and "only its owner" in err.value.detail
    assert [c.tinker_path for c in checkpoints.handle_ListCheckpointsReq(ListCheckpointsReq(caller=admin)).checkpoints
            ] == [path]
    checkpoints.handle_DeleteCheckpointReq(DeleteCheckpointReq(tinker_path=path, caller=admin))
    assert store.checkpoint(path) is None
