"""The Megatron backend on CUDA (gpu-marked; skipped without a GPU): TP = PP = 1, bf16.

A Qwen3-0.6B-shaped model with random weights (tests/bench/models.py's preset, bf16) is
trained three AdamW steps by both backends on the same GPU. megatron-core runs its real
CUDA paths here (no CPU shims), with bf16 parameters and float32 LoRA and optimizer state;
the torch backend keeps its LoRA in the model's dtype. They must agree within bf16
tolerance: per-token logprobs, losses and gradient norms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from cluster.config import ClusterConfig, ModelConfig, TrainerConfig  # noqa: E402
from cluster.messages import AdamParams, DatumBatch, LoraSpec  # noqa: E402

SPEC = LoraSpec(rank=16, alpha=32.0, seed=1)
ADAM = AdamParams(learning_rate=1e-4)
LENGTHS = [96, 64, 128, 32]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.bench.models import PRESETS, build_random

    directory = tmp_path_factory.mktemp("qwen3-0.6b")
    build_random(PRESETS["qwen3-0.6b"], directory, "bfloat16")
    return str(directory)


def _config(model_dir: str, backend: str) -> ClusterConfig:
    return ClusterConfig(model=ModelConfig(path=model_dir, name="qwen3-0.6b", max_context=1024),
                         trainer=TrainerConfig(backend=backend, max_adapters=1, max_lora_rank=16, dtype="bfloat16",
                                               device="cuda"))


def _batch(seed: int) -> DatumBatch:
    rng = np.random.default_rng(seed)
    total = sum(LENGTHS)
    return DatumBatch(tokens=rng.integers(0, 1000, total).astype(np.int64), lengths=np.array(LENGTHS),
                      loss_inputs={"target_tokens": rng.integers(0, 1000, total).astype(np.int64),
                                   "weights": np.ones(total, dtype=np.float32)})


def _train(backend) -> list[dict]:
    backend.create_adapter(1, SPEC)
    seen = []
    for _ in range(3):
        out = backend.forward_backward(1, "cross_entropy", {}, False, _batch(0))  # one batch: its loss falls
        metrics = backend.optim_step(1, ADAM)
        seen.append({"logprobs": out.logprobs, "loss": out.metrics["loss:sum"], "norm": metrics["grad_norm:mean"]})
    return seen


def test_megatron_on_cuda_agrees_with_the_torch_backend_in_bf16(model_dir):
    import torch.distributed as dist

    from actors.trainer.megatron.backend import MegatronTrainerBackend
    from actors.trainer.megatron.model import destroy_model_parallel
    from actors.trainer.torch_backend import TorchTrainerBackend

    torch.cuda.set_device(0)
    reference = _train(TorchTrainerBackend(_config(model_dir, "torch")))
    torch.cuda.empty_cache()
    try:
        megatron = MegatronTrainerBackend(_config(model_dir, "megatron"))
        assert next(megatron.model.parameters()).dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 and p.is_cuda for p in megatron.slots.named_slot_params().values())
        seen = _train(megatron)
    finally:
        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    for mine, theirs in zip(seen, reference):
        assert np.isfinite(mine["loss"]) and mine["loss"] == pytest.approx(theirs["loss"], rel=2e-2)
        assert np.abs(mine["logprobs"] - theirs["logprobs"]).mean() < 0.05
        assert mine["norm"] == pytest.approx(theirs["norm"], rel=0.1)
    assert seen[-1]["loss"] < seen[0]["loss"]
