"""Colocation on a CUDA GPU (gpu-marked; skipped without one): the torch trainer and the torch engine
share the device, and torch.cuda.memory_allocated of each process is recorded at every barrier
(ClusterStatusResp.residency through /api/v1/healthz)."""

from __future__ import annotations

import pytest
import torch
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import chat_prompt, sft_batch, train_steps
from tests.e2e.test_residency import TO_SAMPLING, TO_TRAINING, _transitions, _wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _allocated(barrier: dict, worker: str) -> float:
    return barrier["memory"][worker]["cuda_allocated_bytes"]


def test_colocated_on_cuda_moves_device_memory(tmp_path_factory, models_dir):
    with launch_cluster(tmp_path_factory.mktemp("state"), models_dir, "--colocate", "--device", "cuda",
                        "--training-linger-ms", "200") as cluster:
        service = cluster.service_client()
        tc = service.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=3).result()
        tokenizer = tc.get_tokenizer()
        losses = train_steps(tc, sft_batch(tokenizer), steps=4)
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("hello"), add_special_tokens=False))
        result = sampler.sample(prompt=prompt, num_samples=2,
                                sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0)).result()
        assert losses[-1] < losses[0] and len(result.sequences) == 2
        state = _wait_phase(cluster, ("sampling",))
        service.close("success").result()
    groups = _transitions(state["barriers"])
    assert all(g == TO_TRAINING for g in groups["to_training"]) and groups["to_training"]
    assert all(g == TO_SAMPLING for g in groups["to_sampling"]) and groups["to_sampling"]
    assert all(b["ok"] for b in state["barriers"])
    by_name = {}
    for b in state["barriers"]:
        by_name.setdefault(b["name"], []).append(b)
    for b in state["barriers"]:
        memory = {w: round(m.get("cuda_allocated_bytes", 0) / 2**20, 1) for w, m in b["memory"].items()}
        print(f"{b['transition']:12} {b['name']:24} {b['duration_ms']:8.1f} ms  cuda_allocated MiB {memory}")
    start = by_name["trainer_offload"][0]  # the start: the trainer's model left the device
    onload, offload = by_name["trainer_onload"][-1], by_name["trainer_offload"][-1]
    release, weights = by_name["engine_release"][-1], by_name["engine_resume_weights"][-1]
    assert _allocated(onload, "trainer0") > _allocated(offload, "trainer0") + 1e6
    assert _allocated(start, "trainer0") < 1e6 + _allocated(offload, "trainer0")
    assert _allocated(release, "engine0") + 1e6 < _allocated(weights, "engine0")
