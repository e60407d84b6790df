"""TorchEngineBackend.release_memory / resume_memory on CPU: memory really goes back, and comes back.

The model is built here, large enough (~190 MB of float32 weights) that the drop in the
process's resident set size is unambiguous next to the rest of a pytest process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.builtin_model import build_tokenizer
from actors.engine.interface import KV_CACHE, WEIGHTS, EngineBusy, current_rss_bytes
from actors.engine.torch_backend import TorchEngineBackend
from cluster.config import ClusterConfig, EngineConfig, ModelConfig
from cluster.messages import EngineSampleReq, LoraSpec, SamplingParams
from actors.peft import expected_lora_shapes

SPEC = LoraSpec(rank=4, alpha=8.0)
MB = 2**20


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3Config

    directory = tmp_path_factory.mktemp("big-model")
    tokenizer = build_tokenizer(directory)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2304, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=128, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def engine(big_model_dir) -> TorchEngineBackend:
    config = ClusterConfig(model=ModelConfig(path=str(big_model_dir), name="big"),
                           engine=EngineConfig(max_adapters=2, max_lora_rank=8))
    return TorchEngineBackend(config)


def _weights_bytes(engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine._base_params().values())


def _adapter(engine) -> dict:
    rng = np.random.default_rng(0)
    shapes = expected_lora_shapes(SPEC, engine.slots.module_shapes())
    return {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes.items()}


def _greedy(engine, adapter_id) -> list[list[int]]:
    prompts = [engine.tokenizer.encode(t) for t in ("hello world banana", "the quick brown fox jumps")]
    reqs = [EngineSampleReq(adapter_id=adapter_id, prompt_tokens=np.array(p, dtype=np.int64), num_samples=1,
                            params=SamplingParams(temperature=0.0, max_tokens=8, stop_at_eos=False))
            for p in prompts]
    return [r.sequences[0].tokens.tolist() for r in engine.generate(reqs)]


def test_release_frees_rss_and_resume_restores_samples(engine):
    engine.load_adapter("a", SPEC, _adapter(engine))
    before = {"base": _greedy(engine, None), "lora": _greedy(engine, "a")}
    weights = _weights_bytes(engine)
    assert weights > 150 * MB
    rss_loaded = current_rss_bytes()
    engine.release_memory([KV_CACHE, WEIGHTS])
    rss_released = current_rss_bytes()
    engine.resume_memory([WEIGHTS])
    engine.resume_memory([KV_CACHE])
    rss_resumed = current_rss_bytes()
    after = {"base": _greedy(engine, None), "lora": _greedy(engine, "a")}
    rss_sampled = current_rss_bytes()
    print(f"weights {weights / MB:.0f} MB; RSS loaded {rss_loaded / MB:.0f} MB, released {rss_released / MB:.0f} MB "
          f"(-{(rss_loaded - rss_released) / MB:.0f}), resumed {rss_resumed / MB:.0f} MB, after sampling "
          f"{rss_sampled / MB:.0f} MB")
    assert rss_loaded - rss_released > 0.8 * weights  # the weights' memory went back to the OS
    assert rss_resumed - rss_released > 0.8 * weights  # and came back
    # one copy, not two (the reload's own is gone). Measured from the release, not from before it: the trim at
    # the release also hands back whatever earlier tests of this process left in the heap
    assert rss_sampled - rss_released < 1.5 * weights
    assert after == before
    assert before["lora"] != before["base"]  # the adapter matters, so the check above covers it


def test_released_engine_refuses_samples_but_takes_adapters(engine):
    engine.release_memory([KV_CACHE, WEIGHTS])
    try:
        with pytest.raises(EngineBusy, match="released"):
            _greedy(engine, None)
        assert not engine.has_work()
        engine.load_adapter("b", SPEC, _adapter(engine))  # LoRA slots are kept while released
        engine.release_memory([KV_CACHE, WEIGHTS])  # again: a no-op
    finally:
        engine.resume_memory([WEIGHTS, KV_CACHE])
    engine.resume_memory([WEIGHTS])  # not released: a no-op
    assert "b" in engine.loaded_adapters()
    assert _greedy(engine, "b")


def test_release_refused_while_busy(engine):
    req = EngineSampleReq(adapter_id=None, prompt_tokens=np.array(engine.tokenizer.encode("hello"), dtype=np.int64),
                          num_samples=1, params=SamplingParams(temperature=0.0, max_tokens=4, stop_at_eos=False))
    ticket = engine.submit(req)
    with pytest.raises(EngineBusy, match="in flight"):
        engine.release_memory([KV_CACHE])
    while engine.has_work():
        engine.step()
    assert ticket
    engine.release_memory([KV_CACHE])
    engine.resume_memory([KV_CACHE])


def test_memory_tags_are_checked(engine):
    with pytest.raises(ValueError, match="memory tags"):
        engine.release_memory(["optimizer"])
    with pytest.raises(ValueError, match="memory tags"):
        engine.resume_memory([])
