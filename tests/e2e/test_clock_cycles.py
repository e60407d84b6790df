"""Clock cycles through the SDK: tenants share trainer passes, each gets what it would alone, none starves.

Three users train at once, each with its own loss (cross_entropy, ppo, importance_sampling),
LoRA rank and datum lengths, submitting together so the controller puts their
forward_backwards in shared passes and their optim_steps in one call (the admin probe's
`clock_cycles` counters show it did). Their losses and logprobs must equal those of the
same runs trained one at a time (1e-5 relative), and so must the norms of their summed
gradients (fp32 summation noise), and a fourth user's idle run keeps its adapter and Adam
state bit for bit. Then a heavy user queues big batches and a light user's request, sent after them,
still finishes before the heavy user's third.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster, probe_json, wait_until

pytestmark = pytest.mark.e2e

PASSES = 3
TENANTS = [  # (api key, LoRA rank, seed, loss, datum lengths)
    ("tml-cycles-ce", 4, 21, "cross_entropy", [9, 23, 5]),
    ("tml-cycles-ppo", 16, 22, "ppo", [14, 6]),
    ("tml-cycles-is", 8, 23, "importance_sampling", [11, 17, 3, 8]),
]
IDLE_KEY, HEAVY_KEY, LIGHT_KEY = "tml-cycles-idle", "tml-cycles-heavy", "tml-cycles-light"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    with launch_cluster(tmp_path_factory.mktemp("cycles"), models_dir, "--max-adapters", "8") as running:
        yield running


def _datums(loss: str, lengths: list[int], seed: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    datums = []
    for n in lengths:
        inputs = {"target_tokens": rng.integers(0, 900, n).tolist()}
        if loss == "cross_entropy":
            inputs["weights"] = rng.uniform(0.0, 1.0, n).astype(np.float32).tolist()
        else:
            inputs["logprobs"] = rng.uniform(-8.0, -0.5, n).astype(np.float32).tolist()
            inputs["advantages"] = rng.normal(size=n).astype(np.float32).tolist()
        datums.append(types.Datum(model_input=types.ModelInput.from_ints(rng.integers(0, 900, n).tolist()),
                                  loss_fn_inputs=inputs))
    return datums


def _train(client, rank: int, seed: int, loss: str, lengths: list[int], start=None) -> tuple[list, list, dict]:
    """PASSES forward_backwards on one adapter state, then an optim_step: each pass's loss and logprobs, and the
    optimizer's metrics (the norm of the summed gradient). One state, because Adam turns the fp32 noise of a
    gradient's near-zero elements into whole steps of the learning rate: trajectories part after a step."""
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=rank, seed=seed).result()
    if start is not None:
        start.wait(timeout=120)
    passes = [tc.forward_backward(_datums(loss, lengths, seed=100 * seed + i), loss) for i in range(PASSES)]
    optim = tc.optim_step(types.AdamParams(learning_rate=1e-2))
    results = [p.result() for p in passes]
    logprobs = [np.concatenate([out["logprobs"].to_numpy() for out in r.loss_fn_outputs]) for r in results]
    return [r.metrics["loss:sum"] for r in results], logprobs, optim.result().metrics


def _assert_same_training(together: tuple, alone: tuple) -> None:
    (losses, logprobs, metrics), (losses_alone, logprobs_alone, metrics_alone) = together, alone
    assert losses == pytest.approx(losses_alone, rel=1e-5, abs=1e-6)
    for shared, solo in zip(logprobs, logprobs_alone):
        np.testing.assert_allclose(shared, solo, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == metrics_alone.keys()
    for key, value in metrics_alone.items():  # grad_norm: the whole summed gradient, in one number
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _state_arrays(cluster, path: str) -> dict:
    model_id, _, name = path.removeprefix("tinker://").partition("/weights/")
    directory = cluster.state_dir / "checkpoints" / model_id / "weights" / name
    return {f"{f.name}:{k}": v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_tenants_sharing_passes_get_what_they_get_alone(cluster):
    clients = {key: cluster.service_client(key) for key, *_ in TENANTS}
    idle = cluster.service_client(IDLE_KEY)
    idle_tc = idle.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=24).result()
    idle_tc.forward_backward(_datums("cross_entropy", [12], seed=5), "cross_entropy").result()
    idle_tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    before = idle_tc.save_state("before").result().path

    alone = {key: _train(clients[key], *spec) for key, *spec in TENANTS}
    start = probe_json(cluster, "status")["info"]["clock_cycles"]
    barrier = threading.Barrier(len(TENANTS))
    together: dict[str, list] = {}
    threads = [threading.Thread(target=lambda k=key, s=spec: together.__setitem__(k, _train(clients[k], *s, barrier)))
               for key, *spec in TENANTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    cycles = probe_json(cluster, "status")["info"]["clock_cycles"]

    assert set(together) == set(alone), "a tenant's thread failed (see its traceback above)"
    assert cycles["shared_passes"] > start["shared_passes"], cycles  # or this test compared nothing
    assert cycles["most_runs_in_a_pass"] >= 2 and cycles["optim_steps"] - start["optim_steps"] == 3, cycles
    for key, *_ in TENANTS:
        _assert_same_training(together[key], alone[key])
    after = idle_tc.save_state("after").result().path
    expected = _state_arrays(cluster, before)
    for name, value in _state_arrays(cluster, after).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)  # the idle slot was never touched
    for client in [*clients.values(), idle]:
        client.close("success").result()


def test_a_heavy_tenant_delays_a_light_one_by_at_most_one_pass(cluster):
    heavy = cluster.service_client(HEAVY_KEY)
    light = cluster.service_client(LIGHT_KEY)
    heavy_tc = heavy.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=1).result()
    light_tc = light.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=2).result()
    big = _datums("cross_entropy", [192] * 48, seed=7)  # 9216 padded tokens: about half a pass each
    done: dict[str, float] = {}

    def finish(name: str, future) -> threading.Thread:
        thread = threading.Thread(target=lambda: (future.result(), done.__setitem__(name, time.monotonic())))
        thread.start()
        return thread

    waiting = [finish(f"heavy{i}", heavy_tc.forward_backward(big, "cross_entropy")) for i in range(4)]
    wait_until(lambda: probe_json(cluster, "status")["info"]["clock_cycles"]["queued"] >= 2, timeout_s=60,
               what="the heavy tenant's requests to queue")
    waiting.append(finish("light", light_tc.forward_backward(_datums("cross_entropy", [8], seed=8), "cross_entropy")))
    for thread in waiting:
        thread.join(timeout=300)
    assert len(done) == 5, done
    # round robin: the light request runs in the next pass (beside the heavy one's second), not after all four
    assert done["light"] < done["heavy2"], done
    for client in (heavy, light):
        client.close("success").result()
