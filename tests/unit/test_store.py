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
from actors.controller.store import StateStore
from cluster.messages import ForwardBackwardResult, JsonResult
from cluster.messages import (
    DeleteCheckpointReq, ExternalWeightsUrlsReq, ListCheckpointsReq, ResolveDownloadReq, SetCheckpointTtlReq,
)

RUN = "s1:train:0"


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "tinkerd.sqlite3"


def _checkpoint(store: StateStore, tmp_path, kind: str, name: str, expires_at=None) -> str:
    directory = tmp_path / "checkpoints" / RUN / kind / name
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    (directory / "adapter_config.json").write_text('{"r": 8, "tinkerd": {"train_attn": true}}')
    path = f"tinker://{RUN}/{kind}/{name}"
    store.add_checkpoint(path, RUN, kind, name, str(directory), 7, expires_at, {"step": "3"})
    return path


def test_sessions_runs_and_checkpoints_survive_reopening(db_path, tmp_path):
    store = StateStore(db_path)
    store.add_session("s1", ["t"], {"who": "me"}, "0.38.0", display_name="demo", owner="key-abc")
    store.add_training_run(RUN, "s1", "tiny", {"rank": 8}, {"n": 3})
    path = _checkpoint(store, tmp_path, "weights", "c1")
    store.add_sampler("s1:sample:0", "s1", "tiny", path, None)
    store.close()

    store = StateStore(db_path)
    assert store.unfinished_sessions() == ["s1"]
    assert store.session("s1")["display_name"] == "demo"
    run = store.training_run(RUN)
    assert (run["owner"], run["lora"], run["user_metadata"]) == ("key-abc", {"rank": 8}, {"n": 3})
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
    assert store.session("old")["owner"] == ""
    row = store.checkpoint("tinker://r/weights/a")
    assert (row["public"], row["expires_at"], row["user_metadata"]) == (False, None, {})


def test_an_expired_checkpoint_is_hidden_at_once_and_swept_from_disk(db_path, tmp_path):
    store = StateStore(db_path)
    checkpoints = CheckpointService(store)
    keep = _checkpoint(store, tmp_path, "weights", "keep")
    gone = _checkpoint(store, tmp_path, "sampler_weights", "gone", expires_at=time.time() - 1)
    assert store.checkpoint(gone) is None
    listed = checkpoints.handle_ListCheckpointsReq(ListCheckpointsReq(limit=10))
    assert [c.tinker_path for c in listed.checkpoints] == [keep] and listed.total_count == 1
    directory = tmp_path / "checkpoints" / RUN / "sampler_weights" / "gone"
    assert directory.exists()
    assert checkpoints.sweep() == 1
    assert not directory.exists() and store.expired_checkpoints() == []

    checkpoints.handle_SetCheckpointTtlReq(SetCheckpointTtlReq(tinker_path=keep, ttl_seconds=3600))
    assert store.checkpoint(keep)["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
    checkpoints.handle_DeleteCheckpointReq(DeleteCheckpointReq(tinker_path=keep))
    assert store.checkpoint(keep) is None and not (tmp_path / "checkpoints" / RUN / "weights" / "keep").exists()
    with pytest.raises(ApiError) as err:
        checkpoints.handle_DeleteCheckpointReq(DeleteCheckpointReq(tinker_path=keep))
    assert err.value.status == 404


def test_download_tokens_name_files_of_external_checkpoints_only(db_path, tmp_path):
    store = StateStore(db_path)
    checkpoints = CheckpointService(store)
    training = _checkpoint(store, tmp_path, "weights", "t")
    external = _checkpoint(store, tmp_path, "external_weights", "e")
    with pytest.raises(ApiError, match="external_weights"):
        checkpoints.handle_ExternalWeightsUrlsReq(ExternalWeightsUrlsReq(tinker_path=training))
    urls = checkpoints.handle_ExternalWeightsUrlsReq(ExternalWeightsUrlsReq(tinker_path=external))
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
        done, failed, pending = futures.create("ForwardBackwardReq"), futures.create("x"), futures.create("y")
        result = ForwardBackwardResult(lengths=np.array([2, 1]), logprobs=np.array([-1, -2, -3], np.float32),
                                       elementwise_loss=np.array([1, 2, 3], np.float32), metrics={"loss:sum": 6.0})
        futures.resolve(done, result)
        futures.fail(failed, "bad input", "user")
        store.close()

        store = StateStore(db_path)  # a new controller on the same state dir
        futures = FutureStore(store)
        assert futures.fail_orphans() == 1
        got = await futures.wait(done, 0)
        assert got.status == "done" and got.result.metrics == {"loss:sum": 6.0}
        np.testing.assert_array_equal(got.result.logprobs, result.logprobs)
        assert (await futures.wait(failed, 0)).error == "bad input"
        orphan = await futures.wait(pending, 0)
        assert (orphan.status, orphan.error, orphan.category) == ("error", RESTART_ERROR, "server")
        with pytest.raises(UnknownFuture):
            await futures.wait("req-nope", 0)

        futures.keep_s = 0.0
        time.sleep(0.01)
        futures.resolve(futures.create("z"), JsonResult(payload={}))
        time.sleep(0.01)
        futures.sweep()
        assert store.future(done) is None
        with pytest.raises(UnknownFuture):
            await futures.wait(done, 0)

    asyncio.run(scenario())
