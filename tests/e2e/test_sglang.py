"""The SDK against a cluster whose engine is real SGLang (from its own virtualenv), end to end.

The sampling-option tests of test_sampling_options.py run here unchanged against the
SGLang engine (their fixtures are re-bound to this module's cluster): every number they
check is the trainer's `forward` logprob on the same weights, within 1e-3. Then the core
flow's sampling, snapshots that never drift, two tenants' adapters in one batch, and a
crash of SGLang's scheduler: the engine process dies with it, the controller fails the
sample in flight with the cause, the launcher starts the engine again, and sampling
from a saved checkpoint works again (its adapter reloaded from disk).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import chat_prompt, sft_batch, train_steps
from tests.e2e.test_core_flow import test_named_snapshot_does_not_drift  # noqa: F401 (runs here too)
from tests.e2e.test_sampling_options import (  # noqa: F401 (run here against SGLang)
    prompt,
    test_an_invalid_option_raises_with_the_servers_detail,
    test_prompt_logprobs_last_n_score_only_the_suffix,
    test_target_prompt_logprobs_equal_the_trainers,
    test_topk_sample_logprobs_equal_the_trainers,
    trained,
)

pytestmark = pytest.mark.e2e
HEARTBEAT_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir, sglang_python):
    with launch_cluster(tmp_path_factory.mktemp("sglang-state"), models_dir, "--engine-backend", "sglang",
                        "--sglang-python", str(sglang_python), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
                        "--max-adapters", "12") as running:
        yield running
    leftovers = _processes_of(sglang_python)
    assert not leftovers, f"SGLang processes left after shutdown: {leftovers}"


@pytest.fixture(scope="module")
def service_client(cluster):
    client = cluster.service_client()
    yield client
    client.close("success").result()


def _processes_of(python: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "exe") == os.path.realpath(python):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _unseeded(max_tokens: int, temperature: float = 1.0) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=[])


def _trainer_logprobs(tc, tokens: list[int]) -> np.ndarray:
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def test_sampled_logprobs_equal_the_trainers_with_lm_head_lora(trained):
    """Tinker trains lm_head by default (train_unembed): SGLang serves that adapter exactly."""
    tc, sampler, tokenizer = trained
    assert tc.get_info().lora_rank == 8
    prompt_tokens = tokenizer.encode(chat_prompt("python"), add_special_tokens=False)
    result = sampler.sample(prompt=types.ModelInput.from_ints(prompt_tokens), num_samples=3,
                            sampling_params=_unseeded(16)).result()
    assert len(result.sequences) == 3
    gap = 0.0
    for seq in result.sequences:
        assert len(seq.tokens) == 16 and seq.stop_reason == "length"
        trainer = _trainer_logprobs(tc, prompt_tokens + list(seq.tokens))[len(prompt_tokens) - 1:]
        np.testing.assert_allclose(np.asarray(seq.logprobs), trainer, atol=1e-3)
        gap = max(gap, float(np.abs(np.asarray(seq.logprobs) - trainer).max()))
    print(f"largest |sglang - trainer forward| logprob gap, LoRA with lm_head: {gap:.2e}")  # shown with -s


def test_greedy_samples_repeat_and_score_like_the_trainer(trained):
    """Greedy equals the torch engine token for token (test_sglang_backend.py); here, through the SDK."""
    tc, sampler, tokenizer = trained
    prompt_tokens = tokenizer.encode(chat_prompt("banana"), add_special_tokens=False)
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    first, again = (sampler.sample(prompt=types.ModelInput.from_ints(prompt_tokens), num_samples=1,
                                   sampling_params=params).result().sequences[0] for _ in range(2))
    assert first.tokens == again.tokens and first.stop_reason in ("stop", "length")
    trainer = _trainer_logprobs(tc, prompt_tokens + list(first.tokens))[len(prompt_tokens) - 1:]
    np.testing.assert_allclose(np.asarray(first.logprobs), trainer, atol=1e-3)


def test_seeds_and_alt_tokens_are_refused_with_the_reason(trained, prompt):
    _, sampler, _ = trained
    with pytest.raises(tinker.BadRequestError, match="seed is not supported by the sglang engine backend"):
        sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=2, temperature=1.0, seed=4)).result()
    with pytest.raises(tinker.BadRequestError, match="prompt_alt_tokens_k is not supported"):
        sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=_unseeded(1),
                       prompt_alt_tokens_k=2).result()


def test_two_tenants_adapters_share_batches(service_client):
    """Concurrent samples of two runs' snapshots (and the base model) each get their own weights."""
    runs = [service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=s).result()
            for s in (21, 22)]
    tokenizer = runs[0].get_tokenizer()
    for tc, words in zip(runs, (["hello", "world"], ["apple", "token"])):
        train_steps(tc, sft_batch(tokenizer, words), steps=2, learning_rate=2e-2)
    samplers = [tc.save_weights_and_get_sampling_client().result() for tc in runs]
    samplers.append(service_client.create_sampling_client(base_model=BUILTIN_MODEL))
    tokens = tokenizer.encode(chat_prompt("server") + "erversay", add_special_tokens=False)
    alone = [s.compute_logprobs(types.ModelInput.from_ints(tokens)).result() for s in samplers]
    assert alone[0] != alone[1] != alone[2]
    def score(i: int) -> list:
        return samplers[i % 3].compute_logprobs(types.ModelInput.from_ints(tokens)).result()

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        together = list(pool.map(score, range(9)))
    for i, logprobs in enumerate(together):
        np.testing.assert_allclose(np.array(logprobs[1:]), np.array(alone[i % 3][1:]), atol=1e-4)


def _engine_pid(cluster) -> int:
    marker = str(cluster.state_dir / "run" / "cluster.json")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "actors.engine.main" in cmdline and marker in cmdline:
            return int(entry.name)
    raise AssertionError("no engine process")


def _scheduler_of(engine: int) -> int:
    """SGLang's scheduler process, a child of the engine process (beside its detokenizer)."""
    for child in Path(f"/proc/{engine}/task/{engine}/children").read_text().split():
        if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sglang::scheduler"):
            return int(child)
    raise AssertionError(f"engine {engine} has no SGLang scheduler child")


def _log_tails(cluster, lines: int = 40) -> str:
    tails = []
    for log in sorted((cluster.state_dir / "logs").glob("*.log")):
        tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(tails)


def _health(cluster) -> dict:
    resp = httpx.get(cluster.base_url + "/api/v1/healthz", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_crashed_scheduler_fails_its_sample_and_the_engine_comes_back(cluster, service_client):
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=31).result()
    tokenizer = tc.get_tokenizer()
    train_steps(tc, sft_batch(tokenizer, ["model", "gradient"]), steps=1)
    path = tc.save_weights_for_sampler(name="before-crash").result().path
    saved = service_client.create_sampling_client(model_path=path)
    prompt_tokens = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("model"), add_special_tokens=False))
    before = saved.compute_logprobs(prompt_tokens).result()
    engine = _engine_pid(cluster)
    scheduler = _scheduler_of(engine)
    long_sample = saved.sample(prompt=prompt_tokens, num_samples=1, sampling_params=_unseeded(3000))
    time.sleep(1.0)
    os.kill(scheduler, signal.SIGKILL)
    started = time.monotonic()
    try:  # bounded: a hang here must fail with the logs, not wait for the suite's timeout
        long_sample.result(timeout=10 * HEARTBEAT_TIMEOUT_S)
        failure = None
    except Exception as exc:
        failure = exc
    assert failure is not None and "engine 0 died" in str(failure), f"{failure!r}\n{_log_tails(cluster)}"
    assert time.monotonic() - started < 10 * HEARTBEAT_TIMEOUT_S
    deadline = time.monotonic() + 180
    while (health := _health(cluster))["workers"]["engine0"] != "ready":  # "dead (restarting)" meanwhile
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert _engine_pid(cluster) != engine  # the launcher started a new one
    after = saved.compute_logprobs(prompt_tokens).result()  # the adapter comes back from disk
    np.testing.assert_allclose(np.array(after[1:]), np.array(before[1:]), atol=1e-5)


def test_colocated_sglang_runs_the_barriers_and_serves_both_phases(tmp_path, models_dir, sglang_python):
    """`--colocate` with SGLang engines: release/resume_memory_occupation run in the barrier order (on CPU
    SGLang's memory saver cannot load, so they free nothing: this is the control flow), and training and
    sampling both complete."""
    from tests.e2e.test_residency import TO_SAMPLING, TO_TRAINING, _transitions, residency

    with launch_cluster(tmp_path / "state", models_dir, "--engine-backend", "sglang", "--sglang-python",
                        str(sglang_python), "--colocate", "--training-linger-ms", "100") as running:
        client = running.service_client()
        tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=5).result()
        tokenizer = tc.get_tokenizer()
        losses = train_steps(tc, sft_batch(tokenizer, ["hello", "world"]), steps=2)
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = tokenizer.encode(chat_prompt("hello"), add_special_tokens=False)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            training = pool.submit(train_steps, tc, sft_batch(tokenizer, ["hello", "world"]), 2)
            sampled = sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=2,
                                     sampling_params=_unseeded(8)).result()
            more = training.result()
        assert all(np.isfinite(losses + more)) and len(sampled.sequences) == 2
        state = residency(running)
        assert state["mode"] == "colocated" and state["failure"] is None
        assert all(b["ok"] for b in state["barriers"]), state["barriers"]
        transitions = _transitions(state["barriers"])
        assert transitions["to_training"] and all(t == TO_TRAINING for t in transitions["to_training"])
        assert transitions["to_sampling"] and all(t == TO_SAMPLING for t in transitions["to_sampling"])
        client.close("success").result()
