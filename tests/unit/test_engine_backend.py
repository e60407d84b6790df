"""TorchEngineBackend on the built-in model, checked against the bare HF model.

References are deliberately naive: a greedy loop that runs a full forward over the
whole sequence at every step (no cache, no padding, no batching), and log_softmax of
one full forward for logprobs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from actors.engine.interface import AdapterSlotsBusy, UnknownAdapterError
from actors.engine.torch_backend import TorchEngineBackend
from actors.engine.prompt_scores import TOPK_SENTINEL_LOGPROB
from actors.peft import PEFT_PREFIX, module_kind, target_module_names, trains_kind, write_peft_adapter
from actors.model_loading import SMALL_PASS_TOKENS, load_causal_lm
from cluster.config import ClusterConfig, EngineConfig, ModelConfig
from cluster.messages import EngineSampleReq, LoraSpec, SamplingParams

TOL = 1e-4
SPEC = LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def backend(builtin_model_dir) -> TorchEngineBackend:
    config = ClusterConfig(model=ModelConfig(path=str(builtin_model_dir), name="tiny"),
                           engine=EngineConfig(max_adapters=2, max_lora_rank=8, max_batch_sequences=64))
    return TorchEngineBackend(config)


@pytest.fixture(scope="module")
def reference(builtin_model_dir):
    return load_causal_lm(str(builtin_model_dir))


@pytest.fixture(autouse=True)
def fresh_engine(backend):
    """Every test starts with no adapters loaded and the configured batch size."""
    yield
    for adapter_id in backend.loaded_adapters():
        backend.unload_adapter(adapter_id)
    backend.max_batch_sequences = 64
    assert not backend.has_work()


def _prompt(backend, text: str) -> np.ndarray:
    return np.array(backend.tokenizer.encode(text), dtype=np.int64)


def _request(prompt, adapter_id=None, num_samples=1, **params) -> EngineSampleReq:
    params.setdefault("temperature", 0.0)
    params.setdefault("stop_at_eos", False)
    return EngineSampleReq(adapter_id=adapter_id, prompt_tokens=np.asarray(prompt, dtype=np.int64),
                           num_samples=num_samples, params=SamplingParams(**params))


@torch.no_grad()
def _full_logprobs(model, tokens) -> torch.Tensor:
    """log_softmax of one plain forward over `tokens`: row t predicts tokens[t+1]."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).unsqueeze(0)
    return model(input_ids=ids).logits[0].float().log_softmax(dim=-1)


@torch.no_grad()
def _reference_greedy(model, prompt, steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(_full_logprobs(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def _continuation_logprobs(model, prompt, tokens) -> np.ndarray:
    """Reference logprob of each generated token given everything before it."""
    full = _full_logprobs(model, list(prompt) + list(tokens))
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return full[rows, torch.as_tensor(np.asarray(tokens, dtype=np.int64))].numpy()


def _random_adapter(backend, spec: LoraSpec, seed: int, std: float = 0.05) -> dict[str, np.ndarray]:
    """PEFT-named tensors with non-zero A and B, so the adapter changes the model."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in backend.slots.modules.items():
        if trains_kind(spec, module_kind(path)):
            a = std * torch.randn(spec.rank, module.base.in_features, generator=gen)
            b = std * torch.randn(module.base.out_features, spec.rank, generator=gen)
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.numpy()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.numpy()
    return tensors


@torch.no_grad()
def _merged_model(reference, spec: LoraSpec, tensors: dict[str, np.ndarray]):
    """A copy of the base model with W + scale·B·A folded into every adapted linear."""
    merged = copy.deepcopy(reference)
    if merged.lm_head.weight is merged.model.embed_tokens.weight:  # tied: merge into lm_head only
        merged.lm_head.weight = torch.nn.Parameter(merged.lm_head.weight.clone())
    scale = spec.alpha / spec.rank
    for name, a in tensors.items():
        if name.endswith("lora_A.weight"):
            path = name[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b = tensors[name.replace("lora_A", "lora_B")]
            merged.get_submodule(path).weight += scale * torch.from_numpy(b) @ torch.from_numpy(a)
    return merged


# -- greedy and numerics ----------------------------------------------------------------


def test_greedy_matches_a_plain_full_forward_loop(backend, reference):
    prompts = [_prompt(backend, "the quick brown fox"), _prompt(backend, "hello world banana apple string")]
    results = backend.generate([_request(p, max_tokens=12) for p in prompts])
    for prompt, result in zip(prompts, results):
        (seq,) = result.sequences
        assert seq.tokens.dtype == np.int32 and seq.logprobs.dtype == np.float32
        assert seq.tokens.tolist() == _reference_greedy(reference, prompt, 12)
        assert seq.stop_reason == "length"
        np.testing.assert_allclose(seq.logprobs, _continuation_logprobs(reference, prompt, seq.tokens), atol=TOL)


def test_sampled_and_prompt_logprobs_are_the_raw_models(backend, reference):
    """Logprobs are log_softmax of the unscaled logits, whatever temperature/top-k/top-p chose."""
    prompt = _prompt(backend, "question answer user assistant")
    req = _request(prompt, num_samples=3, max_tokens=10, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    req.prompt_logprobs = True
    (result,) = backend.generate([req])
    full = _full_logprobs(reference, prompt)
    expected_prompt = full[torch.arange(len(prompt) - 1), torch.as_tensor(prompt[1:])].numpy()
    assert result.prompt_logprobs.dtype == np.float32 and result.prompt_logprobs.shape == (len(prompt),)
    assert np.isnan(result.prompt_logprobs[0])
    np.testing.assert_allclose(result.prompt_logprobs[1:], expected_prompt, atol=TOL)
    assert len(result.sequences) == 3
    for seq in result.sequences:
        assert len(seq.tokens) == 10
        np.testing.assert_allclose(seq.logprobs, _continuation_logprobs(reference, prompt, seq.tokens), atol=TOL)


def test_topk_prompt_logprobs_have_a_sentinel_first_row(backend, reference):
    prompt = _prompt(backend, "one two three four five")
    req = _request(prompt, max_tokens=1)
    req.topk_prompt_logprobs = 4
    (result,) = backend.generate([req])
    ids, values = result.topk_prompt_token_ids, result.topk_prompt_logprobs
    assert result.prompt_logprobs is None
    assert ids.dtype == np.int32 and values.dtype == np.float32
    assert ids.shape == values.shape == (len(prompt), 4)
    assert (ids[0] == 0).all() and (values[0] == TOPK_SENTINEL_LOGPROB).all()
    top = _full_logprobs(reference, prompt)[:-1].topk(4, dim=-1)
    np.testing.assert_array_equal(ids[1:], top.indices.numpy())
    np.testing.assert_allclose(values[1:], top.values.numpy(), atol=TOL)


def test_batched_mixed_lengths_and_adapters_equal_each_run_alone(backend):
    backend.load_adapter("a", SPEC, _random_adapter(backend, SPEC, seed=1))
    backend.load_adapter("b", SPEC, _random_adapter(backend, SPEC, seed=2))
    requests = [
        _request(_prompt(backend, "the quick brown fox jumps"), None, num_samples=4, max_tokens=9),
        _request(_prompt(backend, "seven"), "a", num_samples=1, max_tokens=14),
        _request(_prompt(backend, "pig latin by moving the first consonant cluster"), "b", num_samples=2,
                 max_tokens=5),
        _request(_prompt(backend, "hello"), "a", num_samples=1, max_tokens=11),
    ]
    for r in requests:
        r.prompt_logprobs = True
    alone = [backend.generate([r])[0] for r in requests]
    # a batch of 3 rows splits request 0's 4 samples over two admissions, and makes later
    # requests join while earlier ones run
    backend.max_batch_sequences = 3
    together = backend.generate(requests)
    for solo, batched in zip(alone, together):
        np.testing.assert_allclose(batched.prompt_logprobs, solo.prompt_logprobs, atol=TOL)
        for s, b in zip(solo.sequences, batched.sequences, strict=True):
            assert b.tokens.tolist() == s.tokens.tolist()
            np.testing.assert_allclose(b.logprobs, s.logprobs, atol=TOL)
    (on_base,) = backend.generate([_request(requests[1].prompt_tokens, None, max_tokens=14)])
    assert on_base.sequences[0].tokens.tolist() != together[1].sequences[0].tokens.tolist()  # adapters matter


def test_abort_drops_one_request_queued_or_running_and_the_rest_finish_unchanged(backend):
    requests = [_request(_prompt(backend, text), num_samples=2, max_tokens=12)
                for text in ("hello there", "seven", "the quick brown fox")]
    alone = [backend.generate([r])[0] for r in requests]
    backend.max_batch_sequences = 4  # requests 0 and 1 run, request 2 waits in the queue
    tickets = [backend.submit(r) for r in requests]
    backend.step()
    assert backend.abort(tickets[1])  # running: its rows leave the batch
    assert backend.abort(tickets[2])  # queued: it never runs
    assert not backend.abort(tickets[2])  # gone already
    done = []
    while backend.has_work():
        done += backend.step()
    assert [ticket for ticket, _ in done] == [tickets[0]]
    assert [s.tokens.tolist() for s in done[0][1].sequences] == [s.tokens.tolist() for s in alone[0].sequences]


# -- seeds ------------------------------------------------------------------------------


def test_seed_makes_samples_reproducible(backend):
    prompt = _prompt(backend, "banana apple")

    def tokens(seed, company=0):
        others = [_request(_prompt(backend, "noise"), max_tokens=7, temperature=1.0) for _ in range(company)]
        results = backend.generate([_request(prompt, num_samples=3, max_tokens=16, temperature=1.0, seed=seed),
                                    *others])
        return [s.tokens.tolist() for s in results[0].sequences]

    first = tokens(42)
    assert tokens(42, company=2) == first  # the batch around it does not matter
    assert len({tuple(t) for t in first}) == 3  # each sample has its own stream
    assert tokens(43) != first
    assert tokens(None) != tokens(None)


# -- stopping ---------------------------------------------------------------------------


def test_max_tokens_stop_tokens_and_stop_strings(backend):
    prompt = _prompt(backend, "the lazy dog while")
    (free,) = backend.generate([_request(prompt, max_tokens=12)])
    tokens = free.sequences[0].tokens.tolist()

    stop_token = tokens[4]
    first = tokens.index(stop_token)
    (by_token,) = backend.generate([_request(prompt, max_tokens=12, stop_token_ids=[stop_token])])
    assert by_token.sequences[0].tokens.tolist() == tokens[:first + 1]
    assert by_token.sequences[0].stop_reason == "stop"

    text = backend.tokenizer.decode(tokens, skip_special_tokens=False)
    stop_string = backend.tokenizer.decode(tokens[5:7], skip_special_tokens=False)[:3]
    completes_at = next(i for i in range(len(tokens))
                        if stop_string in backend.tokenizer.decode(tokens[:i + 1], skip_special_tokens=False))
    assert stop_string in text
    (by_string,) = backend.generate([_request(prompt, max_tokens=12, stop_strings=["zzzz-never", stop_string])])
    assert by_string.sequences[0].tokens.tolist() == tokens[:completes_at + 1]
    assert by_string.sequences[0].stop_reason == "stop"

    (short,) = backend.generate([_request(prompt, max_tokens=3)])
    assert short.sequences[0].tokens.tolist() == tokens[:3] and short.sequences[0].stop_reason == "length"


@torch.no_grad()
def test_eos_stops_unless_stop_at_eos_is_off(backend, reference):
    """An unembedding-only adapter that pushes EOS to the top right after this prompt."""
    prompt = _prompt(backend, "thank you")
    (eos,) = backend.eos_token_ids
    captured = {}
    hook = reference.lm_head.register_forward_hook(lambda m, args, out: captured.update(x=args[0][0, -1]))
    reference(input_ids=torch.as_tensor(prompt).unsqueeze(0))
    hook.remove()
    spec = LoraSpec(rank=1, alpha=1.0, train_attn=False, train_mlp=False, train_unembed=True)
    a = (captured["x"] / captured["x"].norm()).unsqueeze(0)
    b = torch.zeros(backend.vocab_size, 1)
    b[eos] = 100.0
    backend.load_adapter("eos", spec, {f"{PEFT_PREFIX}lm_head.lora_A.weight": a.numpy(),
                                       f"{PEFT_PREFIX}lm_head.lora_B.weight": b.numpy()})

    (stops,) = backend.generate([_request(prompt, "eos", max_tokens=5, stop_at_eos=True)])
    assert stops.sequences[0].tokens.tolist() == [eos] and stops.sequences[0].stop_reason == "stop"
    (runs,) = backend.generate([_request(prompt, "eos", max_tokens=5, stop_at_eos=False)])
    assert runs.sequences[0].tokens.tolist()[0] == eos
    assert len(runs.sequences[0].tokens) == 5 and runs.sequences[0].stop_reason == "length"


# -- adapters ---------------------------------------------------------------------------


def test_adapter_output_matches_weights_merged_into_the_base(backend, reference, tmp_path):
    spec = LoraSpec(rank=8, alpha=16.0)
    tensors = _random_adapter(backend, spec, seed=11)
    merged = _merged_model(reference, spec, tensors)
    prompt = _prompt(backend, "weights adapter gradient")
    expected = _reference_greedy(merged, prompt, 10)
    assert expected != _reference_greedy(reference, prompt, 10), "the adapter should change the output"

    backend.load_adapter("pushed", spec, tensors)
    write_peft_adapter(tmp_path, tensors, spec, target_module_names(spec, backend.slots.modules), "tiny")
    backend.load_adapter_from_disk("from-disk", str(tmp_path))
    for adapter_id in ("pushed", "from-disk"):
        (result,) = backend.generate([_request(prompt, adapter_id, max_tokens=10)])
        assert result.sequences[0].tokens.tolist() == expected
        np.testing.assert_allclose(result.sequences[0].logprobs,
                                   _continuation_logprobs(merged, prompt, expected), atol=TOL)


def test_least_recently_used_idle_adapter_is_evicted(backend):
    prompt = _prompt(backend, "yes no maybe")
    backend.load_adapter("a", SPEC, _random_adapter(backend, SPEC, seed=1))
    backend.load_adapter("b", SPEC, _random_adapter(backend, SPEC, seed=2))
    backend.generate([_request(prompt, "a", max_tokens=2)])  # b is now the least recently used
    backend.load_adapter("c", SPEC, _random_adapter(backend, SPEC, seed=3))
    assert backend.loaded_adapters() == ["a", "c"]
    with pytest.raises(UnknownAdapterError, match="'b' is not loaded"):
        backend.submit(_request(prompt, "b"))


def test_adapters_in_use_are_never_evicted(backend):
    prompt = _prompt(backend, "yes no maybe")
    backend.load_adapter("a", SPEC, _random_adapter(backend, SPEC, seed=1))
    backend.load_adapter("b", SPEC, _random_adapter(backend, SPEC, seed=2))
    for adapter_id in ("a", "b"):
        backend.submit(_request(prompt, adapter_id, max_tokens=4))
    backend.step()
    with pytest.raises(AdapterSlotsBusy):
        backend.load_adapter("c", SPEC, _random_adapter(backend, SPEC, seed=3))
    # unloading an adapter in use hides it at once but lets its requests finish
    backend.unload_adapter("a")
    with pytest.raises(UnknownAdapterError):
        backend.submit(_request(prompt, "a"))
    done = []
    while backend.has_work():
        done += backend.step()
    assert len(done) == 2 and all(len(r.sequences[0].tokens) == 4 for _, r in done)
    backend.load_adapter("c", SPEC, _random_adapter(backend, SPEC, seed=3))
    assert backend.loaded_adapters() == ["b", "c"]


def test_bad_adapters_are_rejected_without_side_effects(backend):
    backend.load_adapter("a", SPEC, _random_adapter(backend, SPEC, seed=1))
    good = _random_adapter(backend, SPEC, seed=2)
    missing = dict(list(good.items())[1:])
    wrong_shape = {**good, next(iter(good)): np.zeros((3, 3), np.float32)}
    for tensors, message in ((missing, "missing"), (wrong_shape, "shape")):
        with pytest.raises(ValueError, match=message):
            backend.load_adapter("x", SPEC, tensors)
    with pytest.raises(ValueError, match="power of 2"):
        backend.load_adapter("x", LoraSpec(rank=3), good)
    with pytest.raises(ValueError, match="no PEFT adapter"):
        backend.load_adapter_from_disk("x", "/nonexistent/adapter")
    assert backend.loaded_adapters() == ["a"]


def test_invalid_requests_are_value_errors(backend):
    prompt = _prompt(backend, "hello")
    bad = [
        (_request(np.array([], dtype=np.int64)), "non-empty"),
        (_request([1, 100_000]), "outside"),
        (_request(prompt, num_samples=0), "num_samples"),
        (_request(prompt, max_tokens=0), "max_tokens"),
        (_request(prompt, max_tokens=5000), "context window"),
        (_request(prompt, temperature=-1.0), "temperature"),
        (_request(prompt, top_p=0.0), "top_p"),
    ]
    for req, message in bad:
        with pytest.raises(ValueError, match=message):
            backend.submit(req)
    assert not backend.has_work()


# -- SDK 0.38 sampling options ----------------------------------------------------------


def _with(req: EngineSampleReq, **options) -> EngineSampleReq:
    for name, value in options.items():
        setattr(req, name, value)
    return req


def _holey_target_ids(backend, prompt_len: int, k: int, seed: int) -> np.ndarray:
    """[prompt_len - 1, k] random ids, -1 in every cell of the first two rows and in some later ones."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, backend.vocab_size, size=(prompt_len - 1, k), dtype=np.int64)
    ids[rng.random(ids.shape) < 0.3] = -1
    ids[:2] = -1
    return ids


def test_topk_sample_logprobs_of_a_greedy_run_are_the_reference_top_k(backend, reference):
    prompt = _prompt(backend, "the quick brown fox")
    (result,) = backend.generate([_with(_request(prompt, max_tokens=8), topk_sample_logprobs=5)])
    (seq,) = result.sequences
    assert seq.topk_token_ids.dtype == np.int32 and seq.topk_logprobs.dtype == np.float32
    assert seq.topk_token_ids.shape == seq.topk_logprobs.shape == (8, 5)
    top = _full_logprobs(reference, list(prompt) + seq.tokens.tolist())[len(prompt) - 1:-1].topk(5, dim=-1)
    np.testing.assert_array_equal(seq.topk_token_ids, top.indices.numpy())
    np.testing.assert_allclose(seq.topk_logprobs, top.values.numpy(), atol=TOL)
    np.testing.assert_array_equal(seq.topk_token_ids[:, 0], seq.tokens)  # greedy takes the top one
    (plain,) = backend.generate([_request(prompt, max_tokens=8)])
    assert plain.sequences[0].topk_token_ids is None


def test_target_prompt_logprobs_gather_the_reference_at_named_cells(backend, reference):
    prompt = _prompt(backend, "pig latin by moving the first consonant cluster")
    ids = _holey_target_ids(backend, len(prompt), 3, seed=1)
    listed = ids != -1
    (result,) = backend.generate([_with(_request(prompt, max_tokens=2), target_prompt_token_ids=ids,
                                        target_prompt_listed=listed)])
    full = _full_logprobs(reference, prompt)[:-1]  # row i predicts prompt position i + 1
    expected = np.where(listed, full.gather(1, torch.as_tensor(np.maximum(ids, 0))).numpy(), 0.0)
    assert result.target_prompt_logprobs.dtype == np.float32 and result.target_prompt_logprobs.shape == ids.shape
    np.testing.assert_allclose(result.target_prompt_logprobs, expected, atol=TOL)
    assert (result.target_prompt_logprobs[~listed] == 0.0).all()
    assert result.target_prompt_listed is listed  # the layout travels with the result
    assert result.prompt_logprobs is None and result.prompt_alt_token_ids is None


def test_prompt_logprobs_last_n_scores_the_suffix_exactly_like_full_scoring(backend, reference):
    prompt = _prompt(backend, "one two three four five six seven")
    last_n = 3
    full_req = _with(_request(prompt, max_tokens=1), prompt_logprobs=True, topk_prompt_logprobs=4)
    suffix_req = _with(_request(prompt, max_tokens=1), prompt_logprobs=True, topk_prompt_logprobs=4,
                       prompt_logprobs_last_n=last_n)
    full, suffix = backend.generate([full_req, suffix_req])
    assert np.isnan(suffix.prompt_logprobs[:-last_n]).all()
    np.testing.assert_allclose(suffix.prompt_logprobs[-last_n:], full.prompt_logprobs[-last_n:], atol=TOL)
    reference_lp = _full_logprobs(reference, prompt)[:-1]
    expected = reference_lp[torch.arange(len(prompt) - 1), torch.as_tensor(prompt[1:])].numpy()
    np.testing.assert_allclose(suffix.prompt_logprobs[-last_n:], expected[-last_n:], atol=TOL)
    assert (suffix.topk_prompt_token_ids[:-last_n] == 0).all()
    assert (suffix.topk_prompt_logprobs[:-last_n] == TOPK_SENTINEL_LOGPROB).all()
    np.testing.assert_array_equal(suffix.topk_prompt_token_ids[-last_n:], full.topk_prompt_token_ids[-last_n:])
    np.testing.assert_allclose(suffix.topk_prompt_logprobs[-last_n:], full.topk_prompt_logprobs[-last_n:], atol=TOL)


def test_prompt_alt_tokens_are_seeded_draws_with_the_reference_logprobs(backend, reference):
    prompt = _prompt(backend, "question answer user assistant")
    full = _full_logprobs(reference, prompt)[:-1]

    def alt(seed, temperature=1.0, k=4, **params):
        req = _with(_request(prompt, max_tokens=6, temperature=temperature, seed=seed, **params),
                    prompt_alt_tokens_k=k)
        return backend.generate([req])[0]

    first = alt(seed=5)
    tokens, logprobs = first.prompt_alt_token_ids, first.prompt_alt_logprobs
    assert tokens.dtype == np.int64 and logprobs.dtype == np.float32
    assert tokens.shape == logprobs.shape == (len(prompt) - 1, 4)
    np.testing.assert_allclose(logprobs, full.gather(1, torch.as_tensor(tokens)).numpy(), atol=TOL)
    assert len(np.unique(tokens)) > 4  # draws, not a fixed choice
    again = alt(seed=5, top_k=1)  # top_k / top_p do not apply to the draws
    np.testing.assert_array_equal(again.prompt_alt_token_ids, tokens)
    assert not np.array_equal(alt(seed=6).prompt_alt_token_ids, tokens)
    # a stream of its own: the samples are those of the same seed without draws
    (no_draws,) = backend.generate([_request(prompt, max_tokens=6, temperature=1.0, seed=5)])
    assert first.sequences[0].tokens.tolist() == no_draws.sequences[0].tokens.tolist()
    greedy = alt(seed=None, temperature=0.0, k=3)
    np.testing.assert_array_equal(greedy.prompt_alt_token_ids, full.argmax(dim=-1, keepdim=True).repeat(1, 3).numpy())


def test_options_share_a_batch_with_plain_requests_without_changing_them(backend):
    plain = [
        _request(_prompt(backend, "the quick brown fox jumps"), num_samples=3, max_tokens=9),
        _request(_prompt(backend, "seven"), max_tokens=12, temperature=1.0, seed=4),
        _with(_request(_prompt(backend, "hello world banana"), num_samples=2, max_tokens=5, temperature=0.8,
                       seed=8), prompt_logprobs=True),
    ]
    long_prompt = _prompt(backend, "pig latin by moving the first consonant cluster to the end")
    with_options = [
        _with(_request(long_prompt, max_tokens=7, temperature=1.0, seed=3), topk_sample_logprobs=3,
              prompt_alt_tokens_k=2),
        _with(_request(long_prompt, num_samples=2, max_tokens=4), prompt_logprobs=True, prompt_logprobs_last_n=2,
              target_prompt_token_ids=_holey_target_ids(backend, len(long_prompt), 2, seed=2)),
    ]
    requests = [plain[0], with_options[0], plain[1], with_options[1], plain[2]]
    alone = [backend.generate([r])[0] for r in requests]
    backend.max_batch_sequences = 4  # admissions split requests and join a running batch
    together = backend.generate(requests)
    for solo, batched in zip(alone, together):
        for name in ("prompt_logprobs", "target_prompt_logprobs", "prompt_alt_logprobs"):
            if getattr(solo, name) is not None:
                np.testing.assert_allclose(getattr(batched, name), getattr(solo, name), atol=TOL)
        if solo.prompt_alt_token_ids is not None:
            np.testing.assert_array_equal(batched.prompt_alt_token_ids, solo.prompt_alt_token_ids)
        for s, b in zip(solo.sequences, batched.sequences, strict=True):
            assert b.tokens.tolist() == s.tokens.tolist()
            np.testing.assert_allclose(b.logprobs, s.logprobs, atol=TOL)
            assert (b.topk_token_ids is None) == (s.topk_token_ids is None)
            if s.topk_token_ids is not None:
                np.testing.assert_array_equal(b.topk_token_ids, s.topk_token_ids)
                np.testing.assert_allclose(b.topk_logprobs, s.topk_logprobs, atol=TOL)
    for result in (together[0], together[2], together[4]):
        assert result.target_prompt_logprobs is None and result.prompt_alt_token_ids is None
        assert all(s.topk_token_ids is None for s in result.sequences)


def test_invalid_sample_options_are_value_errors(backend):
    prompt = _prompt(backend, "hello there you")  # several tokens
    n = len(prompt)
    good_ids = np.zeros((n - 1, 2), dtype=np.int64)
    bad = [
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs"),
        ({"topk_sample_logprobs": backend.vocab_size + 1}, "topk_sample_logprobs"),
        ({"prompt_logprobs_last_n": 1}, "requires prompt_logprobs"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 0}, "prompt_logprobs_last_n"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": n}, "prompt_logprobs_last_n"),
        ({"target_prompt_token_ids": good_ids[1:]}, "rows"),
        ({"target_prompt_token_ids": good_ids[:, 0]}, "2-D"),
        ({"target_prompt_token_ids": good_ids.astype(np.float32)}, "int64"),
        ({"target_prompt_token_ids": good_ids - 1}, "no token id"),
        ({"target_prompt_token_ids": good_ids + backend.vocab_size}, "target_prompt_logprobs ids"),
        ({"target_prompt_token_ids": good_ids, "target_prompt_listed": np.ones(3, bool)}, "target_prompt_listed"),
        ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k"),
        ({"prompt_alt_tokens_k": 1 << 20}, "prompt_alt_tokens_k"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            backend.submit(_with(_request(prompt), **options))
    assert not backend.has_work()


def test_small_forwards_run_on_one_thread_and_a_long_prefill_on_all(backend):
    """actors/model_loading.compute_threads in the engine: a prefill of SMALL_PASS_TOKENS new tokens runs on the
    engine's threads, a decode step of one row on one; the thread count is as it was after each."""
    rng = np.random.default_rng(3)
    backend.cpu_threads, threads = 2, backend.cpu_threads
    before = torch.get_num_threads()
    seen = []
    hook = backend.model.get_output_embeddings().register_forward_hook(  # the decoder's steps skip forward()
        lambda *_: seen.append(torch.get_num_threads()))
    try:
        backend.submit(_request(rng.integers(0, 900, SMALL_PASS_TOKENS), max_tokens=2))
        while backend.has_work():
            backend.step()
            assert torch.get_num_threads() == before
    finally:
        hook.remove()
        backend.cpu_threads = threads
    assert seen == [2, 1]  # the prefill (and its first token), then one decode step for the second token
