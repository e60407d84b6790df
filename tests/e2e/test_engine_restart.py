"""A dead engine, with another one beside it: its sample is re-queued and completes, and it comes back.

Two torch engines; engine 0 is SIGKILLed while computing a long sample. The launcher
sees the process exit and tells the controller, which re-queues the sample on engine 1 (the client sees a
normal result, not an error), the launcher starts engine 0 again, and the cluster takes
it back: healthz names its state throughout. Then engine 1 hangs (SIGSTOP): its heartbeats
stop, its sample moves to engine 0, and the launcher kills and restarts it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster

pytestmark = pytest.mark.e2e


def _engine_pids(state_dir: Path) -> dict[int, int]:
    marker = str(state_dir / "run" / "cluster.json")
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if "actors.engine.main" in words and marker in words:
            found[int(words[words.index("--index") + 1])] = int(entry.name)
    return found


def _workers(base_url: str) -> dict:
    return httpx.get(base_url + "/api/v1/healthz", timeout=10).json()["workers"]


def test_a_killed_engines_sample_moves_to_the_other_engine(tmp_path, models_dir):
    with launch_cluster(tmp_path / "state", models_dir, "--engines", "2", "--heartbeat-timeout", "2") as cluster:
        client = cluster.service_client()
        sampler = client.create_sampling_client(base_model=BUILTIN_MODEL)
        prompt = types.ModelInput.from_ints([5, 6, 7, 8])
        params = types.SamplingParams(max_tokens=2500, temperature=0.0, stop=[])
        expected = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
        pids = _engine_pids(cluster.state_dir)
        assert sorted(pids) == [0, 1]
        pending = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params)  # goes to engine 0
        time.sleep(0.5)
        os.kill(pids[0], signal.SIGKILL)
        result = pending.result()
        assert result.sequences[0].tokens == expected.sequences[0].tokens
        deadline = time.monotonic() + 120
        while _workers(cluster.base_url)["engine0"] != "ready":
            assert time.monotonic() < deadline, _workers(cluster.base_url)
            time.sleep(0.5)
        assert _engine_pids(cluster.state_dir)[0] != pids[0]
        log = (cluster.state_dir / "logs" / "controller.log").read_text()
        # the launcher saw the process exit and said so at once, before a heartbeat was even late
        assert "engine 0 died (its process exited with code -9)" in log and "re-queueing it" in log
        again = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result()
        assert [s.tokens for s in again.sequences] == [expected.sequences[0].tokens] * 2

        # a hang, not a death: engine 1 stops answering and heartbeating; the controller declares it dead after
        # the heartbeat timeout and re-queues its sample, and the launcher kills the stopped process and restarts it
        stopped = _engine_pids(cluster.state_dir)[1]
        first = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params)  # engine 0
        time.sleep(0.2)
        second = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params)  # engine 1
        time.sleep(0.5)
        os.kill(stopped, signal.SIGSTOP)
        assert [first.result().sequences[0].tokens, second.result().sequences[0].tokens] == \
            [expected.sequences[0].tokens] * 2
        deadline = time.monotonic() + 120
        while _engine_pids(cluster.state_dir).get(1) in (None, stopped) or _workers(cluster.base_url)["engine1"] != \
                "ready":
            assert time.monotonic() < deadline, _workers(cluster.base_url)
            time.sleep(0.5)
        assert not Path(f"/proc/{stopped}").exists()
        log = (cluster.state_dir / "logs" / "controller.log").read_text()
        assert "engine 1 died (no heartbeat for 2 s)" in log
        client.close("success").result()
