"""tinkerd checkpoints are real PEFT adapters: peft loads them and computes what tinkerd does.

The built-in model ties lm_head to embed_tokens, so the unembed case also checks that
a LoRA on the tied lm_head changes the output projection only (peft's behaviour
without `ensure_weight_tying`), exactly like tinkerd's MultiLoraLinear.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from actors.peft import target_module_names
from actors.trainer.torch_backend import TorchTrainerBackend
from cluster.config import ClusterConfig, ModelConfig, TrainerConfig
from cluster.messages import AdamParams, DatumBatch, LoraSpec

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

SLOT = 1
LENGTHS = [9, 4, 12]


def _config(model_dir) -> ClusterConfig:
    return ClusterConfig(model=ModelConfig(path=str(model_dir), name="tiny"),
                         trainer=TrainerConfig(max_adapters=2, max_lora_rank=8))


def _batch(seed: int) -> DatumBatch:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 900, n + 1) for n in LENGTHS]
    return DatumBatch(tokens=np.concatenate([s[:-1] for s in seqs]).astype(np.int64),
                      lengths=np.array(LENGTHS, dtype=np.int64),
                      loss_inputs={"target_tokens": np.concatenate([s[1:] for s in seqs]).astype(np.int64),
                                   "weights": np.ones(sum(LENGTHS), np.float32)})


def _padded(batch: DatumBatch) -> tuple[torch.Tensor, torch.Tensor]:
    width = int(batch.lengths.max())
    ids = torch.zeros(len(batch.lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, (lo, n) in enumerate(zip(batch.offsets()[:-1], batch.lengths)):
        ids[i, :n] = torch.tensor(batch.tokens[lo:lo + n])
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def backend(builtin_model_dir) -> TorchTrainerBackend:
    return TorchTrainerBackend(_config(builtin_model_dir))


def _peft_model(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        # expected: our extra `tinkerd` config key, and lm_head LoRA on a tied embedding
        warnings.simplefilter("ignore", UserWarning)
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    return model.eval()


def _tinkerd_logits(backend: TorchTrainerBackend, slot: int, ids, mask) -> torch.Tensor:
    with torch.no_grad(), backend.slots.use(slot):
        return backend.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _peft_logprobs(logits: torch.Tensor, batch: DatumBatch, mask: torch.Tensor) -> np.ndarray:
    logp = logits[mask.bool()].float().log_softmax(-1)
    return logp.gather(1, torch.tensor(batch.loss_inputs["target_tokens"])[:, None]).squeeze(1).numpy()


@pytest.mark.parametrize("spec", [
    LoraSpec(rank=8, alpha=16.0, seed=1),  # attn + mlp + unembed (the tied lm_head)
    LoraSpec(rank=4, alpha=6.0, train_unembed=False, seed=2),  # scaling 1.5
], ids=["all", "no-unembed"])
def test_saved_checkpoint_loads_in_peft_with_identical_outputs(backend, builtin_model_dir, tmp_path, spec):
    backend.create_adapter(SLOT, spec)
    for step in range(2):  # B != 0 everywhere it trains
        backend.forward_backward(SLOT, "cross_entropy", {}, False, _batch(step))
        backend.optim_step(SLOT, AdamParams(learning_rate=5e-2))
    _, tensors = backend.export_adapter(SLOT)
    assert all(abs(t).sum() > 0 for name, t in tensors.items() if "lora_B" in name)
    assert any("lm_head" in name for name in tensors) == spec.train_unembed
    directory = tmp_path / "weights" / "ckpt"
    backend.save_state(SLOT, directory, with_optimizer=True)  # the optimizer file must not bother peft

    model = _peft_model(builtin_model_dir, directory)
    config = model.peft_config["default"]
    assert config.r == spec.rank and config.lora_alpha == spec.alpha and not config.use_rslora
    lora_layers = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert lora_layers == set(target_module_names(spec, backend.module_shapes()))
    inner = model.get_base_model()
    assert not isinstance(inner.model.embed_tokens, peft.tuners.lora.LoraLayer)  # tied, but not adapted

    batch = _batch(7)
    ids, mask = _padded(batch)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    ours = _tinkerd_logits(backend, SLOT, ids, mask)
    base = _tinkerd_logits(backend, 0, ids, mask)
    real = mask.bool()
    assert (ours[real] - base[real]).abs().max() > 1e-2  # the adapter really changes the outputs
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)

    logprobs = backend.forward_backward(SLOT, "cross_entropy", {}, True, batch).logprobs
    np.testing.assert_allclose(_peft_logprobs(theirs, batch, mask), logprobs, rtol=0, atol=1e-5)
    with torch.no_grad():  # the embedding stayed the base model's, on both sides
        torch.testing.assert_close(inner.model.embed_tokens.weight, backend.model.model.embed_tokens.weight)
    backend.drop_adapter(SLOT)


def test_adapter_saved_by_peft_loads_into_tinkerd(backend, builtin_model_dir, tmp_path):
    """The other direction: an adapter trained elsewhere (no `tinkerd` config key) loads."""
    base = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                      init_lora_weights=False))  # random B: not a no-op
    model.eval()
    model.save_pretrained(str(tmp_path / "external"))

    spec = backend.load_state(SLOT, tmp_path / "external", with_optimizer=False)
    assert (spec.rank, spec.alpha, spec.train_attn, spec.train_mlp, spec.train_unembed) == (4, 16.0, True, True, False)
    batch = _batch(3)
    ids, mask = _padded(batch)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], _tinkerd_logits(backend, SLOT, ids, mask)[real], rtol=0, atol=1e-5)
    backend.drop_adapter(SLOT)
