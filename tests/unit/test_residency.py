"""The residency state machine (actors/controller/residency.py), with fake fan-outs.

Pure asyncio: the engines and trainer ranks are callables that record what they were
sent (and can fail), so the order of barriers and what waits on them is checked exactly.
"""

from __future__ import annotations

import asyncio

import pytest

from actors.controller.residency import FAILED, SAMPLING, TRAINING, Residency, ResidencyError
from cluster.config import ControllerConfig
from cluster.messages import EngineMemoryResp, TrainerMemoryResp
from cluster.transport import RemoteError

TRANSITION = ["drain", "engine_release", "trainer_onload"]
BACK = ["drain", "trainer_offload", "engine_resume_weights", "engine_resume_kv_cache"]


class Cluster:
    """Two engines and two trainer ranks that log each request; `faults` names steps that fail once."""

    def __init__(self):
        self.log: list[str] = []
        self.faults: dict[str, int] = {}  # step -> failures left

    def _step(self, req) -> str:
        name = type(req).__name__
        return f"{name}:{'+'.join(req.tags)}" if hasattr(req, "tags") else name

    def _maybe_fail(self, step: str, worker: str) -> None:
        if self.faults.get(step, 0) > 0:
            self.faults[step] -= 1
            raise RemoteError(500, f"{worker}: InjectedFault: fault injected at {step}")

    async def engines(self, make_req):
        req = make_req()
        self.log.append(self._step(req))
        await asyncio.sleep(0.001)
        self._maybe_fail(self._step(req), "engine 1")
        return {f"engine{i}": EngineMemoryResp(memory={"rss_bytes": 1.0}) for i in range(2)}

    async def trainers(self, make_req):
        req = make_req()
        self.log.append(self._step(req))
        await asyncio.sleep(0.001)
        self._maybe_fail(self._step(req), "trainer rank 0")
        return {f"trainer{r}": TrainerMemoryResp(moved=False) for r in range(2)}


def _residency(cluster: Cluster, linger_ms: float = 20, max_phase_ms: float = 200) -> Residency:
    config = ControllerConfig(colocate=True, training_linger_ms=linger_ms, max_phase_ms=max_phase_ms)
    return Residency(config, cluster.engines, cluster.trainers, barrier_timeout_s=5)


async def _op(residency: Residency, side: str, log: list, name: str, seconds: float = 0.01):
    gate = residency.training() if side == TRAINING else residency.sampling()
    async with gate:
        assert residency.phase == side
        log.append(f"{name}+")
        await asyncio.sleep(seconds)
        log.append(f"{name}-")
    return name


async def _started(residency: Residency) -> asyncio.Task:
    task = asyncio.create_task(residency.run())
    while not residency.barriers:
        await asyncio.sleep(0.001)
    return task


def _names(residency: Residency, transition: str | None = None) -> list[str]:
    return [b["name"] for b in residency.barriers if transition is None or b["transition"] == transition]


async def _settle(residency: Residency, phase: str) -> None:
    for _ in range(2000):
        if residency.phase == phase and residency.admitting:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never reached {phase}: {residency.describe()}")


def test_dedicated_mode_gates_nothing():
    async def main():
        residency = Residency(ControllerConfig())
        await residency.run()  # returns at once
        async with residency.training():
            async with residency.sampling():
                pass
        assert residency.describe() == {"mode": "dedicated"}
    asyncio.run(main())


def test_barrier_order_drain_and_waiting_samples():
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster, max_phase_ms=15)
        task = await _started(residency)
        assert cluster.log == ["TrainerOffloadReq"]  # the start: the trainer loaded onto the device
        samples = [asyncio.create_task(_op(residency, SAMPLING, ops, f"s{i}", 0.08)) for i in range(3)]
        await asyncio.sleep(0.01)
        cluster.log.append("training arrives")
        train = asyncio.create_task(_op(residency, TRAINING, ops, "t0"))
        early = asyncio.create_task(_op(residency, SAMPLING, ops, "early"))  # the phase still admits samples
        await asyncio.sleep(0.04)  # past max_phase_ms since training started waiting: the phase ends
        assert not residency.admitting
        late = asyncio.create_task(_op(residency, SAMPLING, ops, "late"))  # arrives while draining: waits
        assert await train == "t0" and await late == "late"
        await asyncio.gather(*samples, early)
        # the in-flight samples finished before the engines released; the training ran between the barriers;
        # the late sample ran only after every engine had resumed
        assert cluster.log == ["TrainerOffloadReq", "training arrives", "EngineReleaseMemoryReq:kv_cache+weights",
                               "TrainerOnloadReq", "TrainerOffloadReq", "EngineResumeMemoryReq:weights",
                               "EngineResumeMemoryReq:kv_cache"]
        assert ops.index("early+") < ops.index("s2-") < ops.index("t0+") < ops.index("t0-") < ops.index("late+")
        assert _names(residency, "to_training") == TRANSITION and _names(residency, "to_sampling") == BACK
        assert all(b["ok"] for b in residency.barriers)
        described = residency.describe()
        assert described["mode"] == "colocated" and described["phase"] == SAMPLING
        assert described["barriers"][2]["memory"] == {"engine0": {"rss_bytes": 1.0}, "engine1": {"rss_bytes": 1.0}}
        task.cancel()
    asyncio.run(main())


def test_nothing_is_admitted_before_the_starting_offload():
    """The trainer holds the devices from its start until the first offload: a sample that comes sooner waits."""
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster)
        offloaded = asyncio.Event()
        trainers = cluster.trainers

        async def slow_offload(make_req):
            await offloaded.wait()
            return await trainers(make_req)

        residency._trainers = slow_offload
        task = asyncio.create_task(residency.run())
        sample = asyncio.create_task(_op(residency, SAMPLING, ops, "s0"))
        await asyncio.sleep(0.02)
        described = residency.describe()
        assert (described["phase"], described["admitting"], described["waiting"][SAMPLING]) == ("to_sampling",
                                                                                               False, 1)
        assert ops == [] and not residency.barriers
        offloaded.set()
        assert await sample == "s0"
        assert _names(residency, "start") == ["trainer_offload"] and residency.phase == SAMPLING
        task.cancel()
    asyncio.run(main())


def test_training_queue_is_batched_within_linger():
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster, linger_ms=50)
        task = await _started(residency)
        for i in range(10):  # an SDK loop: one op at a time, short gaps between them
            await _op(residency, TRAINING, ops, f"t{i}", 0.002)
            await asyncio.sleep(0.005)
        await _settle(residency, SAMPLING)
        assert residency.switches == 2  # one phase for all ten
        assert cluster.log.count("TrainerOnloadReq") == 1
        task.cancel()
    asyncio.run(main())


def test_waiting_samples_end_a_long_training_phase():
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster, linger_ms=1000, max_phase_ms=60)
        task = await _started(residency)

        async def training_loop():
            for i in range(40):
                await _op(residency, TRAINING, ops, f"t{i}", 0.005)

        trainer = asyncio.create_task(training_loop())
        await _settle(residency, TRAINING)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _op(residency, SAMPLING, ops, "sample")  # waits at most ~max_phase_ms, then runs
        waited = loop.time() - started
        await trainer
        assert 0.04 < waited < 0.5, waited
        assert ops.index("sample+") < ops.index("t39+")  # sampling got in between
        task.cancel()
    asyncio.run(main())


@pytest.mark.parametrize("step, barrier, side", [
    ("EngineReleaseMemoryReq:kv_cache+weights", "engine_release", TRAINING),
    ("TrainerOnloadReq", "trainer_onload", TRAINING),
    ("TrainerOffloadReq", "trainer_offload", SAMPLING),
    ("EngineResumeMemoryReq:weights", "engine_resume_weights", SAMPLING),
    ("EngineResumeMemoryReq:kv_cache", "engine_resume_kv_cache", SAMPLING),
])
def test_a_failed_barrier_fails_its_waiters_and_recovers(step, barrier, side):
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster)
        task = await _started(residency)
        cluster.faults[step] = 1
        train = asyncio.create_task(_op(residency, TRAINING, ops, "t0"))
        await asyncio.sleep(0.005)
        sample = asyncio.create_task(_op(residency, SAMPLING, ops, "s0"))  # waits for the way back
        results = await asyncio.gather(train, sample, return_exceptions=True)
        failed = results[0] if side == TRAINING else results[1]
        assert isinstance(failed, ResidencyError), results
        assert f"residency barrier {barrier!r}" in failed.detail and "InjectedFault" in failed.detail
        assert ("engine 1" if "Engine" in step else "trainer rank 0") in failed.detail
        ok = results[1] if side == TRAINING else results[0]
        assert ok in ("t0", "s0")
        await _settle(residency, SAMPLING)  # recovered: everything resumed
        assert [b for b in residency.barriers if not b["ok"]][0]["name"] == barrier
        assert _names(residency, "recover") == BACK[1:]
        assert cluster.log[-3:] == ["TrainerOffloadReq", "EngineResumeMemoryReq:weights",
                                    "EngineResumeMemoryReq:kv_cache"]
        assert await _op(residency, TRAINING, ops, "t1") == "t1"  # and the next phases work
        assert await _op(residency, SAMPLING, ops, "s1") == "s1"
        task.cancel()
    asyncio.run(main())


def test_failed_recovery_fails_everything_fast():
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster)
        task = await _started(residency)
        cluster.faults["TrainerOnloadReq"] = 1
        cluster.faults["EngineResumeMemoryReq:weights"] = 1  # the recovery's step fails too
        waiting_sample = None
        train = asyncio.create_task(_op(residency, TRAINING, ops, "t0"))
        await asyncio.sleep(0.005)
        waiting_sample = asyncio.create_task(_op(residency, SAMPLING, ops, "s0"))
        results = await asyncio.gather(train, waiting_sample, return_exceptions=True)
        assert all(isinstance(r, ResidencyError) for r in results), results
        assert "residency failed" in results[1].detail and "engine_resume_weights" in results[1].detail
        await task  # the driver stops
        assert residency.phase == FAILED and residency.describe()["failure"]
        with pytest.raises(ResidencyError, match="must be restarted"):
            await _op(residency, SAMPLING, ops, "s1")
    asyncio.run(main())


def test_a_cancelled_waiter_does_not_block_the_phase():
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster)
        task = await _started(residency)
        long_sample = asyncio.create_task(_op(residency, SAMPLING, ops, "s0", 0.05))
        await asyncio.sleep(0.005)
        train = asyncio.create_task(_op(residency, TRAINING, ops, "t0"))
        await asyncio.sleep(0.005)
        waiting = asyncio.create_task(_op(residency, SAMPLING, ops, "s1"))
        await asyncio.sleep(0.005)
        waiting.cancel()
        assert await train == "t0" and await long_sample == "s0"
        await _settle(residency, SAMPLING)
        assert residency.describe()["active"] == {SAMPLING: 0, TRAINING: 0}
        task.cancel()
    asyncio.run(main())


def test_launcher_flags():
    from launch.cluster import build_config, parse_args
    from cluster.config import ModelConfig

    args = parse_args(["--colocate", "--training-linger-ms", "10", "--max-phase-ms", "500"])
    controller = build_config(args, ModelConfig(name="m", path="/m")).controller
    assert (controller.colocate, controller.training_linger_ms, controller.max_phase_ms) == (True, 10, 500)
    assert not build_config(parse_args([]), ModelConfig(name="m", path="/m")).controller.colocate
    for bad in (["--max-phase-ms", "5"], ["--colocate", "--max-phase-ms", "0"],
                ["--colocate", "--training-linger-ms", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_an_engine_that_rejoins_during_training_releases_at_once():
    """A restarted engine comes back holding its memory; while the trainer holds the devices it gives it back."""
    async def main():
        cluster, ops = Cluster(), []
        residency = _residency(cluster, linger_ms=200)
        task = await _started(residency)
        residency.engine_joined(cluster.engines)  # sampling phase: it may keep its memory
        await asyncio.sleep(0.01)
        assert cluster.log == ["TrainerOffloadReq"]
        training = asyncio.create_task(_op(residency, TRAINING, ops, "t0", 0.05))
        await _settle(residency, TRAINING)
        residency.engine_joined(cluster.engines)
        await training
        await asyncio.sleep(0.01)
        assert cluster.log.count("EngineReleaseMemoryReq:kv_cache+weights") == 2
        assert ("rejoin", "engine_release") in [(b["transition"], b["name"]) for b in residency.barriers]
        task.cancel()
    asyncio.run(main())
