"""TorchEngineBackend's batch machinery: the preallocated batch cache, num_samples forks, the prefix cache,
and the decode step on every supported architecture.

References are those of tests/unit/test_engine_backend.py (a plain full forward per step, no cache). Two
engines on the built-in model, one with the prefix cache and one without, must agree within float32
rounding (tests/numerics.py): the cached keys, values and logits were computed in other batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MistralConfig

from actors.engine.decoder import check_supported
from actors.engine.prefix_cache import PrefixCache
from actors.engine.torch_backend import TorchEngineBackend
from cluster.config import ClusterConfig, EngineConfig, ModelConfig
from cluster.messages import LoraSpec
from tests.megatron_cases import llama_config, qwen2_config, save_randomized
from tests.numerics import assert_close_at_scale
from tests.unit.test_engine_backend import (
    _continuation_logprobs, _full_logprobs, _holey_target_ids, _prompt, _random_adapter, _reference_greedy, _request,
    _with,
)

SPEC = LoraSpec(rank=4, alpha=8.0)


def _engine(model_dir, prefix_cache_bytes: int, tokenizer_dir=None, **engine) -> TorchEngineBackend:
    config = ClusterConfig(model=ModelConfig(path=str(model_dir), name="tiny", tokenizer_dir=str(tokenizer_dir or "")),
                           engine=EngineConfig(max_adapters=2, max_lora_rank=8, max_batch_sequences=64,
                                               prefix_cache_bytes=prefix_cache_bytes, **engine))
    return TorchEngineBackend(config)


@pytest.fixture(scope="module")
def cached(builtin_model_dir) -> TorchEngineBackend:
    return _engine(builtin_model_dir, 64 << 20)


@pytest.fixture(scope="module")
def uncached(builtin_model_dir) -> TorchEngineBackend:
    return _engine(builtin_model_dir, 0)


@pytest.fixture(scope="module")
def reference(builtin_model_dir):
    from actors.model_loading import load_causal_lm
    return load_causal_lm(str(builtin_model_dir))


@pytest.fixture(autouse=True)
def fresh(cached, uncached):
    yield
    for engine in (cached, uncached):
        for adapter_id in engine.loaded_adapters():
            engine.unload_adapter(adapter_id)
        engine.max_batch_sequences = 64
        engine.prefix_cache.clear()
        assert not engine.has_work()


def _assert_same_results(actual, expected) -> None:
    """Same tokens; every logprob the same up to float32 rounding."""
    for name in ("prompt_logprobs", "topk_prompt_logprobs", "target_prompt_logprobs", "prompt_alt_logprobs"):
        if getattr(expected, name) is not None:
            got, want = getattr(actual, name), getattr(expected, name)
            unscored = np.isnan(want)  # prompt logprobs: the first entry, and those before the last N
            np.testing.assert_array_equal(np.isnan(got), unscored)
            assert_close_at_scale(got[~unscored], want[~unscored], msg=name)
    for name in ("topk_prompt_token_ids", "prompt_alt_token_ids"):
        if getattr(expected, name) is not None:
            np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name))
    for a, e in zip(actual.sequences, expected.sequences, strict=True):
        assert a.tokens.tolist() == e.tokens.tolist()
        assert_close_at_scale(a.logprobs, e.logprobs)
        if e.topk_logprobs is not None:
            np.testing.assert_array_equal(a.topk_token_ids, e.topk_token_ids)
            assert_close_at_scale(a.topk_logprobs, e.topk_logprobs)


def _assert_greedy_continuation(reference, prompt, seq) -> None:
    """Each token is an argmax of the reference's full forward (up to rounding: near-ties may go either way
    on another CPU), and its logprob is the reference's."""
    full = _full_logprobs(reference, list(prompt) + seq.tokens.tolist())[len(prompt) - 1:-1]
    chosen = full.gather(1, torch.as_tensor(seq.tokens, dtype=torch.long).unsqueeze(1)).squeeze(1)
    assert_close_at_scale(seq.logprobs, chosen)
    assert (full.max(dim=1).values - chosen).max() <= 1e-4


# -- num_samples forks one prefill --------------------------------------------------------


def test_num_samples_prefill_the_prompt_once_and_fork_its_cache(uncached, cached, reference):
    prompt = _prompt(uncached, "the quick brown fox jumps")
    before = uncached.prefill_tokens
    (greedy,) = uncached.generate([_request(prompt, num_samples=4, max_tokens=7)])
    assert uncached.prefill_tokens - before == len(prompt)  # one prefill for four rows
    expected = _reference_greedy(reference, prompt, 7)
    for seq in greedy.sequences:  # every fork continues the same cache
        assert seq.tokens.tolist() == expected
        np.testing.assert_allclose(seq.logprobs, _continuation_logprobs(reference, prompt, expected), atol=1e-4)
    before = uncached.prefill_tokens
    (sampled,) = uncached.generate([_request(prompt, num_samples=4, max_tokens=9, temperature=1.0, seed=7)])
    assert uncached.prefill_tokens - before == len(prompt)
    assert len({tuple(s.tokens.tolist()) for s in sampled.sequences}) == 4  # own streams from one cache
    for seq in sampled.sequences:
        np.testing.assert_allclose(seq.logprobs, _continuation_logprobs(reference, prompt, seq.tokens), atol=1e-4)
    # admitted in two chunks of two rows: without the prefix cache the second chunk prefills again, with it not
    for engine, prefills in ((uncached, 2), (cached, 1)):
        engine.max_batch_sequences = 2
        before = engine.prefill_tokens
        (split,) = engine.generate([_request(prompt, num_samples=4, max_tokens=9, temperature=1.0, seed=7)])
        assert engine.prefill_tokens - before == prefills * len(prompt)
        _assert_same_results(split, sampled)


# -- the batch cache grows, and rows join a window narrower than their prompt ----------------


def test_long_generations_and_late_long_prompts_equal_each_run_alone(uncached, reference):
    short, long = _prompt(uncached, "seven"), _prompt(uncached, "pig latin by moving the first consonant cluster")
    assert len(long) > 2 * len(short)
    tickets = [uncached.submit(_request(short, num_samples=2, max_tokens=150))]
    done = dict(uncached.step())
    uncached.step()  # the window is now a few columns wide: the long prompt must widen it to join
    tickets += [uncached.submit(_request(long, max_tokens=90)), uncached.submit(_request(short, max_tokens=5))]
    while uncached.has_work():
        done.update(uncached.step())
    for ticket, prompt, steps in zip(tickets, (short, long, short), (150, 90, 5)):
        for seq in done[ticket].sequences:
            assert len(seq.tokens) == steps
            _assert_greedy_continuation(reference, prompt, seq)


# -- the prefix cache -------------------------------------------------------------------------


def _scoring_requests(engine) -> list:
    prompt = _prompt(engine, "one two three four five six seven")
    other = _prompt(engine, "question answer user assistant")
    return [
        _request(prompt, num_samples=3, max_tokens=8, temperature=0.8, seed=11),
        _with(_request(other, max_tokens=6), topk_sample_logprobs=4),
        _with(_request(prompt, max_tokens=3), prompt_logprobs=True, topk_prompt_logprobs=3),
        _with(_request(prompt, max_tokens=3), prompt_logprobs=True, prompt_logprobs_last_n=3),
        _with(_request(other, max_tokens=2), target_prompt_token_ids=_holey_target_ids(engine, len(other), 2, 1)),
        _with(_request(other, max_tokens=4, temperature=1.0, seed=5), prompt_alt_tokens_k=2),
    ]


def test_prefix_cache_hits_give_the_logprobs_of_a_fresh_prefill(cached, uncached):
    requests = _scoring_requests(cached)
    prompt, other = len(requests[0].prompt_tokens), len(requests[1].prompt_tokens)
    without = uncached.generate(requests)
    cached.generate(requests[:2])  # fills the cache with both prompts
    hits, prefilled = cached.prefix_cache.hits, cached.prefill_tokens
    again = cached.generate(requests)
    for actual, expected in zip(again, without, strict=True):
        _assert_same_results(actual, expected)
    # every prompt was in the cache: the plain requests prefilled nothing, the prompt scorers only the positions
    # whose logits they read (3 + 1 for the last 3; from the first target row on), and full prompt logprobs and
    # prompt_alt_tokens_k read every position (no shortcut, counted as misses)
    assert cached.prefix_cache.hits - hits == 4
    first_target = int(np.flatnonzero((requests[4].target_prompt_token_ids != -1).any(axis=1))[0])
    assert cached.prefill_tokens - prefilled == prompt + 4 + (other - first_target) + other
    stats = cached.memory_stats()
    assert stats["prefix_cache_entries"] == 2 and stats["prefix_cache_hits"] == cached.prefix_cache.hits
    assert 0 < stats["prefix_cache_bytes"] <= cached.prefix_cache.max_bytes


def test_prefix_cache_serves_mixed_batches_split_over_admissions(cached, uncached):
    requests = _scoring_requests(cached)
    cached.generate(requests[::2])
    for engine in (cached, uncached):
        engine.max_batch_sequences = 3  # hits, misses and partial prefills join a running batch
    for actual, expected in zip(cached.generate(requests), uncached.generate(requests), strict=True):
        _assert_same_results(actual, expected)


def test_reloading_an_adapter_under_the_same_id_invalidates_its_entries(cached, uncached):
    prompt = _prompt(cached, "weights adapter gradient")
    first, second = _random_adapter(cached, SPEC, seed=1), _random_adapter(cached, SPEC, seed=2)
    cached.load_adapter("a", SPEC, first)
    hits = cached.prefix_cache.hits
    (old,) = cached.generate([_request(prompt, "a", max_tokens=8)])
    (hit,) = cached.generate([_request(prompt, "a", max_tokens=8)])
    assert cached.prefix_cache.hits == hits + 1 and len(cached.prefix_cache) == 1
    _assert_same_results(hit, old)
    cached.load_adapter("a", SPEC, second)
    assert len(cached.prefix_cache) == 0  # the old weights' entries are gone at once
    (new,) = cached.generate([_request(prompt, "a", max_tokens=8)])
    assert cached.prefix_cache.hits == hits + 1  # a miss: prefilled with the new weights
    uncached.load_adapter("a", SPEC, second)
    (expected,) = uncached.generate([_request(prompt, "a", max_tokens=8)])
    _assert_same_results(new, expected)
    assert new.sequences[0].tokens.tolist() != old.sequences[0].tokens.tolist()
    cached.unload_adapter("a")
    assert len(cached.prefix_cache) == 0


def test_a_request_queued_before_a_reload_keeps_its_weights_and_fills_no_entry(cached):
    prompt = _prompt(cached, "yes no maybe")
    cached.load_adapter("a", SPEC, _random_adapter(cached, SPEC, seed=1))
    (expected,) = cached.generate([_request(prompt, "a", max_tokens=6)])
    cached.prefix_cache.clear()
    ticket = cached.submit(_request(prompt, "a", max_tokens=6))  # pins the slot of the first weights
    cached.load_adapter("a", SPEC, _random_adapter(cached, SPEC, seed=2))  # goes to another slot
    done = {}
    while cached.has_work():
        done.update(cached.step())
    _assert_same_results(done[ticket], expected)
    assert len(cached.prefix_cache) == 0  # its prefill belongs to weights no longer loaded


def test_releasing_the_kv_cache_empties_the_prefix_cache(cached):
    cached.generate([_request(_prompt(cached, "hello world"), max_tokens=2)])
    assert len(cached.prefix_cache) == 1
    cached.release_memory(["kv_cache"])
    cached.resume_memory(["kv_cache"])
    assert len(cached.prefix_cache) == 0 and cached.memory_stats()["prefix_cache_bytes"] == 0


def test_prefix_cache_evicts_the_least_recently_used_within_its_byte_budget():
    def entry(n: int):
        return [torch.zeros(2, n, 4)], [torch.zeros(2, n, 4)], torch.zeros(10)

    size = 2 * (2 * 3 * 4 * 4) + 10 * 4  # keys + values of 3 tokens, and the logits
    cache = PrefixCache(2 * size)
    for tokens in ((1, 2, 3), (4, 5, 6)):
        cache.insert((None, 0, tokens), *entry(3))
    assert cache.lookup((None, 0, (1, 2, 3))) is not None  # now the most recently used
    cache.insert(("a", 1, (7, 8, 9)), *entry(3))
    assert cache.lookup((None, 0, (4, 5, 6))) is None and len(cache) == 2 and cache.nbytes == 2 * size
    cache.insert((None, 0, tuple(range(100))), *entry(100))  # larger than the whole budget: not kept
    assert len(cache) == 2
    cache.drop_adapter("a")
    assert len(cache) == 1 and cache.nbytes == size
    with pytest.raises(ValueError, match=">= 0"):
        PrefixCache(-1)
    off = PrefixCache(0)
    off.insert((None, 0, (1,)), *entry(1))
    assert not off.enabled and len(off) == 0


# -- the decode step on every supported architecture ------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_other_architectures_decode_like_their_plain_forward(arch, builtin_model_dir, tmp_path):
    config = {"qwen2": qwen2_config, "llama": llama_config}[arch]()
    model_dir = save_randomized(config, tmp_path / arch)
    engine = _engine(model_dir, 64 << 20, tokenizer_dir=builtin_model_dir)
    from actors.model_loading import load_causal_lm
    reference = load_causal_lm(str(model_dir))
    prompts = [np.array([5, 17, 42, 99, 3], dtype=np.int64), np.array([7, 8], dtype=np.int64)]
    results = engine.generate([_request(p, num_samples=2, max_tokens=12) for p in prompts])
    for prompt, result in zip(prompts, results):
        first, second = result.sequences
        assert first.tokens.tolist() == second.tokens.tolist()  # forks of one greedy prefill
        _assert_greedy_continuation(reference, prompt, first)


def test_unsupported_model_types_are_refused_by_name():
    with pytest.raises(ValueError, match="qwen3, qwen2, llama models, not model_type 'mistral'"):
        check_supported(MistralConfig())


def test_the_launcher_sizes_the_prefix_cache_and_refuses_it_where_it_would_be_ignored(capsys):
    import sys

    from launch.args import parse_args
    from launch.cluster import build_config

    config = build_config(parse_args(["--prefix-cache-mb", "16"]), ModelConfig(path="/m", name="m"))
    assert config.engine.prefix_cache_bytes == 16 * 2**20
    assert build_config(parse_args([]), ModelConfig(path="/m", name="m")).engine.prefix_cache_bytes == 256 * 2**20
    for argv, message in ((["--prefix-cache-mb", "-1"], "must be >= 0"),
                          (["--engine-backend", "sglang", "--sglang-python", sys.executable, "--prefix-cache-mb", "16"],
                           "--prefix-cache-mb is for --engine-backend torch")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
