"""Colocation (`--colocate`) through the real processes: the residency barriers, driven by the SDK.

One colocated cluster for the module, started with TINKERD_FAULT_DIR (cluster/faults.py) so a
test can make one residency handler of one worker fail once, through the handler's own path.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from tinker import types

from cluster.faults import ENV as FAULT_ENV
from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import chat_prompt, sft_batch, train_steps

pytestmark = pytest.mark.e2e

TO_TRAINING = ["drain", "engine_release", "trainer_onload"]
TO_SAMPLING = ["drain", "trainer_offload", "engine_resume_weights", "engine_resume_kv_cache"]
LINGER_MS = 300


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, models_dir):
    faults = tmp_path_factory.mktemp("faults")
    with launch_cluster(tmp_path_factory.mktemp("state"), models_dir, "--colocate", "--training-linger-ms",
                        str(LINGER_MS), "--max-phase-ms", "1000", "--max-adapters", "16",
                        env={FAULT_ENV: str(faults)}) as running:
        running.faults = faults
        yield running


@pytest.fixture(scope="module")
def client(colocated):
    service = colocated.service_client()
    yield service
    service.close("success").result()


def residency(cluster) -> dict:
    with urllib.request.urlopen(f"{cluster.base_url}/api/v1/healthz", timeout=10) as resp:
        return json.loads(resp.read())["residency"]


def _wait_phase(cluster, phases: tuple[str, ...], timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = residency(cluster)
        if state["phase"] in phases and state.get("admitting", True):
            return state
        time.sleep(0.005)
    raise AssertionError(f"residency never reached {phases}: {residency(cluster)}")


def _transitions(barriers: list[dict]) -> dict[str, list[list[str]]]:
    """Barrier names grouped into transitions, in order."""
    out: dict[str, list[list[str]]] = {"to_training": [], "to_sampling": []}
    for b in barriers:
        if b["transition"] in out:
            if b["name"] == "drain":
                out[b["transition"]].append([])
            out[b["transition"]][-1].append(b["name"])
    return out


def _tokenizer(models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models_dir / "tiny-qwen3"))


def _greedy(sampler, tokenizer, word: str) -> list[int]:
    prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt(word), add_special_tokens=False))
    params = types.SamplingParams(max_tokens=10, temperature=0.0)
    return list(sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result().sequences[0].tokens)


def test_starts_in_the_sampling_phase_with_the_trainer_offloaded(colocated):
    state = _wait_phase(colocated, ("sampling",))
    assert state["mode"] == "colocated" and state["failure"] is None
    start = [b for b in state["barriers"] if b["transition"] == "start"]
    assert [b["name"] for b in start] == ["trainer_offload"] and start[0]["ok"]
    assert state["training_linger_ms"] == LINGER_MS and state["max_phase_ms"] == 1000


def test_concurrent_training_and_sampling(colocated, client, models_dir):
    """Two trainers (same seed and data: the same losses) and two samplers at once; nothing fails."""
    base = client.create_sampling_client(base_model=BUILTIN_MODEL).result()
    tokenizer = _tokenizer(models_dir)
    reference = {w: _greedy(base, tokenizer, w) for w in ("hello", "banana")}
    before = residency(colocated)["switches"]
    losses, samples, errors = {}, {}, []

    def train(name):
        try:
            tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=5).result()
            losses[name] = train_steps(tc, sft_batch(tc.get_tokenizer()), steps=6)
            # a snapshot pushed during the training phase, sampled after the engines resumed
            sampler = tc.save_weights_and_get_sampling_client().result()
            samples[name] = _greedy(sampler, tokenizer, "hello")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {exc!r}")

    def sample(word):
        try:
            for _ in range(8):
                assert _greedy(base, tokenizer, word) == reference[word]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"sampler {word}: {exc!r}")

    threads = [threading.Thread(target=train, args=(f"t{i}",)) for i in range(2)]
    threads += [threading.Thread(target=sample, args=(w,)) for w in reference]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert losses["t0"] == pytest.approx(losses["t1"], rel=1e-5)  # the same run twice: interleaving changes nothing
    assert losses["t0"][-1] < 0.7 * losses["t0"][0], losses
    assert samples["t0"] == samples["t1"]
    state = _wait_phase(colocated, ("sampling",))
    assert state["switches"] > before
    groups = _transitions(state["barriers"])
    assert groups["to_training"] and groups["to_sampling"]
    assert all(g == TO_TRAINING for g in groups["to_training"]), groups
    assert all(g == TO_SAMPLING for g in groups["to_sampling"]), groups
    assert all(b["ok"] for b in state["barriers"])
    # fewer switches than training requests: the queue is batched into phases
    assert state["switches"] - before < 2 * 6 * 2
    for name in TO_TRAINING + TO_SAMPLING[1:]:
        took = [b["duration_ms"] for b in state["barriers"] if b["name"] == name and b["transition"] != "start"]
        print(f"{name}: n={len(took)} median {np.median(took):.1f} ms max {max(took):.1f} ms")
    print(f"switches: {state['switches'] - before} for 2 x 6 training steps + 2 saves")


def test_engine_memory_drops_on_release_and_returns_on_resume(colocated, models_dir):
    state = residency(colocated)
    weights = sum(f.stat().st_size for f in (models_dir / "tiny-qwen3").glob("*.safetensors"))
    barriers = state["barriers"]
    released = [b for b in barriers if b["name"] == "engine_release" and b["ok"]]
    resumed = [b for b in barriers if b["name"] == "engine_resume_kv_cache" and b["ok"]]
    assert released and resumed
    rss_released = released[-1]["memory"]["engine0"]["rss_bytes"]
    rss_resumed = resumed[-1]["memory"]["engine0"]["rss_bytes"]
    print(f"engine0 RSS released {rss_released / 2**20:.1f} MiB, resumed {rss_resumed / 2**20:.1f} MiB, "
          f"weights {weights / 2**20:.1f} MiB")
    assert rss_resumed - rss_released > 0.7 * weights


def _training_then_sample(colocated, client, tc, tokenizer):
    """A forward (makes the training phase) and a sample submitted while it runs (waits for the way back)."""
    data = sft_batch(tokenizer, ["hello"])
    forward = tc.forward_backward(data, "cross_entropy")
    _wait_phase(colocated, ("training",))
    base = client.create_sampling_client(base_model=BUILTIN_MODEL).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("apple"), add_special_tokens=False))
    sample = base.sample(prompt=prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=4))
    return forward, sample


@pytest.mark.parametrize("worker, point, barrier, fails", [
    ("engine0", "EngineReleaseMemoryReq", "engine_release", "training"),
    ("trainer0", "TrainerOnloadReq", "trainer_onload", "training"),
    ("trainer0", "TrainerOffloadReq", "trainer_offload", "sampling"),
    ("engine0", "EngineResumeMemoryReq.weights", "engine_resume_weights", "sampling"),
    ("engine0", "EngineResumeMemoryReq.kv_cache", "engine_resume_kv_cache", "sampling"),
])
def test_fault_in_each_barrier(colocated, client, worker, point, barrier, fails):
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=1).result()
    tokenizer = tc.get_tokenizer()
    _wait_phase(colocated, ("sampling",))
    (colocated.faults / f"{worker}.{point}").touch()
    if fails == "training":  # the switch to training fails: the training request that asked for it fails
        with pytest.raises(Exception, match=f"residency barrier '{barrier}'.*{worker[:-1]}.*InjectedFault"):
            tc.forward_backward(sft_batch(tokenizer, ["hello"]), "cross_entropy").result()
    else:  # the way back fails: the sample that waited for it fails; the training itself succeeded
        forward, sample = _training_then_sample(colocated, client, tc, tokenizer)
        assert forward.result().metrics["loss:sum"] > 0
        with pytest.raises(Exception, match=f"residency barrier '{barrier}'.*InjectedFault"):
            sample.result()
    assert not (colocated.faults / f"{worker}.{point}").exists()  # it fired
    state = _wait_phase(colocated, ("sampling",))  # recovered: everything resumed
    assert state["failure"] is None
    failed = [b for b in state["barriers"] if not b["ok"]]
    assert failed[-1]["name"] == barrier and worker[:-1] in failed[-1]["error"]
    recovery = [b["name"] for b in state["barriers"] if b["transition"] == "recover"][-3:]
    assert recovery == TO_SAMPLING[1:]
    # and the cluster works on: training, then sampling after it
    assert train_steps(tc, sft_batch(tokenizer, ["world"]), steps=1)[0] > 0
    base = client.create_sampling_client(base_model=BUILTIN_MODEL).result()
    assert len(_greedy(base, tokenizer, "world")) == 10


def test_a_colocated_trainer_that_dies_is_restarted_offloaded_and_its_run_rebuilt(colocated, client):
    """A rank that kills itself inside a training phase's forward_backward, then one SIGKILLed while the engines
    hold the devices: the run goes on with the losses of a run that never crashed, and the group that came back
    during a sampling phase was offloaded at once (barrier "trainer_offload" of transition "rejoin")."""
    import os
    import signal

    from tests.e2e.test_data_parallel import _trainer_rank_pid

    reference = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=5).result()
    data = sft_batch(reference.get_tokenizer(), ["apple", "banana", "cherry"])
    expected = train_steps(reference, data, steps=4, learning_rate=5e-3)
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=5).result()
    losses = train_steps(tc, data, steps=1, learning_rate=5e-3)
    (colocated.faults / "trainer0.TrainerForwardBackwardReq").write_text("sigkill")
    losses += train_steps(tc, data, steps=1, learning_rate=5e-3)  # dies in the step, rebuilt, run again
    assert not (colocated.faults / "trainer0.TrainerForwardBackwardReq").exists()
    _wait_phase(colocated, ("sampling",))
    rejoins_before = sum(1 for b in residency(colocated)["barriers"] if b["transition"] == "rejoin")
    os.kill(_trainer_rank_pid(colocated.state_dir, 0), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while sum(1 for b in residency(colocated)["barriers"]
              if b["transition"] == "rejoin" and b["name"] == "trainer_offload" and b["ok"]) <= rejoins_before:
        assert time.monotonic() < deadline, residency(colocated)
        time.sleep(0.2)
    losses += train_steps(tc, data, steps=2, learning_rate=5e-3)
    assert losses == expected
    tc.forward_backward(data, "cross_entropy").result()
    assert residency(colocated)["failure"] is None
