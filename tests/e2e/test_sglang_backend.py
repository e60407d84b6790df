"""The SGLang engine backend, run for real from SGLang's virtualenv, against the torch engine.

One SGLang engine serves a whole scenario (tests/sglang_driver.py): LoRA adapters pushed
as arrays and loaded from disk (one on every target, lm_head included; one on lm_head
alone), greedy batches mixing the base model and both adapters, cold prompts of mixed
adapters in one prefill (what the fourth CPU shim fixes), every sampling field, refusals,
abort, adapter eviction and release/resume. The torch engine runs the same requests
in this process; the two must agree: greedy tokens exactly, logprobs within 1e-3 (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from actors.peft import expected_lora_shapes, hf_lora_module_shapes, target_module_names, write_peft_adapter
from cluster.codec import decode_blob, encode_blob
from cluster.messages import EngineSampleReq, LoraSpec, SamplingParams

pytestmark = pytest.mark.e2e
ATOL = 1e-3
ADAPTERS = {"full": LoraSpec(rank=8, alpha=16.0),
            "head": LoraSpec(rank=4, alpha=8.0, train_attn=False, train_mlp=False),
            "third": LoraSpec(rank=2, alpha=2.0, train_mlp=False),
            "fourth": LoraSpec(rank=2, alpha=2.0, train_attn=False),
            "too_big": LoraSpec(rank=32, alpha=32.0)}  # past the engine's max LoRA rank (16)


class _Config:
    def __init__(self, raw: dict):
        self.__dict__.update(raw)


def _write_adapters(model_dir, root) -> dict[str, str]:
    shapes = hf_lora_module_shapes(_Config(json.loads((model_dir / "config.json").read_text())))
    directories = {}
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        rng = np.random.default_rng(seed)
        tensors = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in expected_lora_shapes(spec, shapes).items()}
        directories[name] = str(root / name)
        write_peft_adapter(root / name, tensors, spec, target_module_names(spec, shapes), str(model_dir))
    return directories


def _req(adapter, prompt, n=1, **fields) -> EngineSampleReq:
    params = fields.pop("params", SamplingParams(max_tokens=6, temperature=0.0, stop_at_eos=False))
    return EngineSampleReq(adapter_id=adapter, prompt_tokens=np.asarray(prompt, dtype=np.int64), num_samples=n,
                           params=params, **fields)


def _batches(rng) -> list:
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [42, 17, 17, 99, 3, 250, 8]]
    greedy = [_req(a, p, n=2, prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=2)
              for p in prompts for a in (None, "full", "head")]
    cold = [_req(rng.choice([None, "full", "head"]), rng.integers(3, 900, size=rng.integers(4, 10)),
                 n=int(rng.integers(1, 3)), prompt_logprobs=bool(rng.integers(0, 2))) for _ in range(8)]
    greedy_params = {"max_tokens": 12, "temperature": 0.0}
    stops = [_req("full", prompts[0], params=SamplingParams(**greedy_params, stop_token_ids=[]))]
    filters = [_req(a, prompts[2], params=SamplingParams(max_tokens=8, temperature=1.0, **f))
               for a in ("full", "head") for f in ({"top_k": 1}, {"top_p": 1e-6})]
    target = np.full((len(prompts[2]) - 1, 3), -1, dtype=np.int64)
    target[2] = [5, 6, 700]
    target[5, 1] = 9
    scoring = [_req(a, prompts[2], params=SamplingParams(max_tokens=1, temperature=0.0), prompt_logprobs=True,
                    prompt_logprobs_last_n=3, topk_prompt_logprobs=2, target_prompt_token_ids=target)
               for a in (None, "full", "head")]
    return [("greedy", greedy), ("cold", cold), ("stops", stops), ("filters", filters), ("scoring", scoring)]


@pytest.fixture(scope="module")
def scenario(builtin_model_dir, tmp_path_factory):
    directories = _write_adapters(builtin_model_dir, tmp_path_factory.mktemp("adapters"))
    return {"model": str(builtin_model_dir), "max_adapters": 2, "directories": directories,
            "adapters": [["full", directories["full"], "tensors"], ["head", directories["head"], "disk"]],
            "batches": _batches(np.random.default_rng(0))}


def _stop_batches(torch_stops) -> list:
    """Stops at a token, and at a string, that the greedy run of `stops` is known to produce."""
    tokens = torch_stops[0].sequences[0].tokens
    base = SamplingParams(max_tokens=12, temperature=0.0)
    return [("stop_token", [_req("full", [5, 6, 7, 8, 9, 10], params=SamplingParams(
                max_tokens=12, temperature=0.0, stop_token_ids=[int(tokens[3])]))]),
            ("eos_off", [_req("full", [5, 6, 7, 8, 9, 10], params=SamplingParams(
                max_tokens=12, temperature=0.0, stop_at_eos=False))]),
            ("length", [_req("full", [5, 6, 7, 8, 9, 10], params=base)])]


@pytest.fixture(scope="module")
def torch_results(scenario):
    from actors.engine.torch_backend import TorchEngineBackend
    from cluster.config import ClusterConfig, EngineConfig, ModelConfig

    engine = TorchEngineBackend(ClusterConfig(model=ModelConfig(path=scenario["model"], name="tiny"),
                                              engine=EngineConfig(max_adapters=4, max_lora_rank=16)))
    for adapter_id, directory, _ in scenario["adapters"]:
        engine.load_adapter_from_disk(adapter_id, directory)
    results = {name: engine.generate(requests) for name, requests in scenario["batches"]}
    for name, requests in _stop_batches(results["stops"]):
        results[name] = engine.generate(requests)
    results["tokenizer"] = engine.tokenizer
    return results


@pytest.fixture(scope="module")
def sglang_results(scenario, torch_results, sglang_python, tmp_path_factory):
    work = tmp_path_factory.mktemp("sglang-driver")
    prompt = [5, 6, 7, 8, 9, 10]
    plan = dict(scenario, batches=scenario["batches"] + _stop_batches(torch_results["stops"]),
                refusals=[["seeded", _req(None, prompt, params=SamplingParams(temperature=1.0, seed=3))],
                          ["alt_tokens", _req(None, prompt, prompt_alt_tokens_k=2)],
                          ["evicted", _req("full", prompt)]],
                bad_loads=[["too_big", scenario["directories"]["too_big"]]],
                late_adapters=[["third", scenario["directories"]["third"], "disk"],
                               ["fourth", scenario["directories"]["fourth"], "tensors"]],
                abort=_req(None, prompt, params=SamplingParams(max_tokens=2000, temperature=0.0, stop_at_eos=False)))
    (work / "scenario.blob").write_bytes(encode_blob(plan))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([str(sglang_python), "-m", "tests.sglang_driver", str(work / "scenario.blob"),
                          str(work / "result.blob")], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    return decode_blob((work / "result.blob").read_bytes())


def _assert_same(sglang, torch_, what: str) -> None:
    assert len(sglang) == len(torch_)
    for i, (s, t) in enumerate(zip(sglang, torch_)):
        for j, (ss, ts) in enumerate(zip(s.sequences, t.sequences, strict=True)):
            where = f"{what}[{i}].sequences[{j}]"
            assert ss.tokens.tolist() == ts.tokens.tolist(), where
            assert ss.stop_reason == ts.stop_reason, where
            np.testing.assert_allclose(ss.logprobs, ts.logprobs, atol=ATOL, err_msg=where)
            if ts.topk_token_ids is not None:
                assert ss.topk_token_ids.tolist() == ts.topk_token_ids.tolist(), where
                np.testing.assert_allclose(ss.topk_logprobs, ts.topk_logprobs, atol=ATOL, err_msg=where)
        for field in ("prompt_logprobs", "topk_prompt_logprobs", "target_prompt_logprobs"):
            expected = getattr(t, field)
            if expected is None:
                assert getattr(s, field) is None, f"{what}[{i}].{field}"
            else:
                np.testing.assert_allclose(getattr(s, field), expected, atol=ATOL, err_msg=f"{what}[{i}].{field}")
        if t.topk_prompt_token_ids is not None:
            assert s.topk_prompt_token_ids.tolist() == t.topk_prompt_token_ids.tolist(), f"{what}[{i}]"


@pytest.mark.parametrize("batch", ["greedy", "cold", "stops", "filters", "scoring", "stop_token", "eos_off",
                                   "length"])
def test_sglang_equals_the_torch_engine(sglang_results, torch_results, batch):
    _assert_same(sglang_results["batches"][batch], torch_results[batch], batch)
    gaps = [np.nanmax(np.abs(getattr(s, f) - getattr(t, f)))
            for s, t in zip(sglang_results["batches"][batch], torch_results[batch])
            for f in ("prompt_logprobs", "target_prompt_logprobs") if getattr(t, f) is not None]
    gaps += [np.abs(ss.logprobs - ts.logprobs).max() for s, t in zip(sglang_results["batches"][batch],
                                                                    torch_results[batch])
             for ss, ts in zip(s.sequences, t.sequences)]
    print(f"{batch}: largest |sglang - torch engine| logprob gap {max(gaps):.2e}")  # shown with -s


def test_the_stops_and_lengths_the_fields_ask_for(torch_results):
    """What the parity above compares is what each field asks for (not two engines agreeing on nothing)."""
    greedy = torch_results["stops"][0].sequences[0].tokens.tolist()
    stopped = torch_results["stop_token"][0].sequences[0]
    stop_id = greedy[3]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens.tolist() == greedy[:greedy.index(stop_id) + 1]  # the stop token is kept
    assert torch_results["length"][0].sequences[0].stop_reason == "length"
    assert len(torch_results["eos_off"][0].sequences[0].tokens) == 12


def test_lm_head_lora_changes_what_is_sampled(sglang_results):
    """Sanity for the parity above: the adapters (lm_head included) do change the logprobs."""
    base, full, head = sglang_results["batches"]["greedy"][:3]
    for adapted in (full, head):
        assert np.abs(adapted.prompt_logprobs[1:] - base.prompt_logprobs[1:]).max() > 0.05


def test_what_sglang_cannot_honour_is_refused_by_name(sglang_results):
    refusals = sglang_results["refusals"]
    assert "seed is not supported by the sglang engine backend" in refusals["seeded"]
    assert "prompt_alt_tokens_k is not supported" in refusals["alt_tokens"]
    assert refusals["evicted"].startswith("UnknownAdapterError") and "'full'" in refusals["evicted"]
    assert sorted(sglang_results["loaded"]) == ["fourth", "third"]  # two slots: the late loads evicted both
    assert "LoRA rank 32 is outside [1, 16]" in sglang_results["bad_loads"]["too_big"]


def test_abort_and_release_resume(sglang_results):
    assert sglang_results["abort"] == {"aborted": True, "has_work": False, "again": False}
    memory = sglang_results["memory"]
    assert "released" in memory["submit_while_released"]
    assert memory["before"]["rss_bytes"] > 0 and memory["resumed"]["rss_bytes"] > 0
    first = sglang_results["batches"]["greedy"][0]
    assert sglang_results["after_resume"][0].sequences[0].tokens.tolist() == first.sequences[0].tokens.tolist()


def test_adapter_loads_from_arrays_and_from_disk_are_fast(sglang_results):
    assert set(sglang_results["load_ms"]) >= {"full", "head"}
    assert all(ms < 5000 for ms in sglang_results["load_ms"].values())
    sync = sglang_results["sync_ms"]  # the same adapter handed over both ways (printed with -s)
    print(f"weight sync into SGLang, median of 5: tensors {sync['tensors']:.1f} ms, "
          f"tmpfs PEFT dir (write + load) {sync['tmpfs_dir']:.1f} ms")
    assert set(sync) == {"tensors", "tmpfs_dir"} and all(0 < ms < 5000 for ms in sync.values())
