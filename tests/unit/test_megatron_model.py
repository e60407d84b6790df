"""The Megatron backend's GPTModel computes what transformers computes, at TP1, TP2, PP2 and TP2xPP2.

Three tiny models, saved with save_pretrained: a Qwen3 with the built-in model's quirks
(tied, qk-norm, head_dim set apart from hidden/heads; 4 layers, so a PP2 stage holds two),
a Qwen2 (q/k/v bias, untied) and a Llama (tied, one kv head so TP2 has fewer kv groups than
ranks, Llama 3 RoPE scaling, a vocab of 251 that TP2 pads). Their weights are redrawn at
unit scale, because HF's 0.02 init (the built-in model's) makes attention nearly uniform,
which would hide RoPE or q/k mapping mistakes; and their norm weights away from 1, which
would hide a swapped norm.

All four layouts run in ONE torch.multiprocessing spawn of four gloo ranks: starting
processes and importing megatron.core costs seconds each, so the ranks stay and
re-initialise megatron-core's model-parallel groups per layout (destroy, then init):
dp4 (TP1), dp2 x tp2, dp2 x pp2 and tp2 x pp2. Each DP group is an independent replica of
its layout and is checked on its own. Every rank runs a right-padded batch through
megatron's own schedule (get_forward_backward_func, forward only, 2 microbatches), the
last stage gathers the vocab-parallel logits over TP, and every rank exports its stage
back to HF names. The parent compares, for every DP group, the logits at the real
positions with transformers' (float32, CPU) and the union of the group's exports with the
checkpoint, bit for bit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, MistralConfig, Qwen3Config  # noqa: E402

from actors.model_loading import load_causal_lm  # noqa: E402
from tests.megatron_cases import LLAMA3_ROPE, llama_config, qwen2_config, qwen3_config, save_randomized  # noqa: E402
from tests.numerics import assert_close_at_scale  # noqa: E402
from launch.cluster import free_port  # noqa: E402

WORLD_SIZE = 4
LAYOUTS = {"dp4": (1, 1), "dp2-tp2": (2, 1), "dp2-pp2": (1, 2), "tp2-pp2": (2, 2)}  # label -> (tp, pp)
LENGTHS = [7, 4, 6, 3]  # right-padded to 7; two microbatches of two rows each
MICROBATCHES = 2


def _padded_tokens(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        tokens[row, :length] = torch.randint(vocab_size, (length,), generator=generator)
    return tokens


def _attention_mask() -> torch.Tensor:
    return (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict[str, str]]:
    """name -> {"model": its directory, "reference": a file of the tokens and HF's logits}."""
    root = tmp_path_factory.mktemp("megatron-models")
    directories = {
        "qwen3": save_randomized(qwen3_config(), root / "qwen3"),
        "qwen2": save_randomized(qwen2_config(), root / "qwen2"),
        "llama": save_randomized(llama_config(kv_heads=1), root / "llama"),
    }
    found = {}
    for name, directory in directories.items():
        model = load_causal_lm(str(directory))
        tokens = _padded_tokens(model.config.vocab_size)
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=_attention_mask()).logits
        reference = root / f"{name}.reference.pt"
        torch.save({"tokens": tokens, "logits": logits}, reference)
        found[name] = {"model": str(directory), "reference": str(reference)}
    return found


# -- the ranks ---------------------------------------------------------------------------

def _rank(rank: int, port: int, cases: dict[str, dict[str, str]], out_dir: str) -> None:
    """Every layout in turn on this one process; what it computed goes to `out_dir/rank{rank}.pt`."""
    import os

    import torch.distributed as dist

    from actors.trainer.megatron import model as megatron_model
    from actors.trainer.megatron.cpu_shims import apply_cpu_shims

    torch.set_num_threads(1)  # the four ranks share the machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    apply_cpu_shims()
    measured = {}
    try:
        for label, (tp, pp) in LAYOUTS.items():
            started = time.monotonic()
            megatron_model.init_model_parallel(tp, pp)
            try:
                measured[label] = _run_layout(cases)
            finally:
                megatron_model.destroy_model_parallel()  # a different tp/pp needs fresh groups
            measured[label]["seconds"] = time.monotonic() - started
        torch.save(measured, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_layout(cases: dict[str, dict[str, str]]) -> dict:
    """This rank's DP group, and per model its last-stage logits (or None) and its stage's export."""
    from megatron.core import parallel_state
    from transformers import AutoConfig

    from actors.trainer.megatron.model import build_gpt_model
    from actors.trainer.megatron.weights import export_hf_state_dict, load_hf_state_dict, read_hf_weights

    models = {}
    for name, case in cases.items():
        hf_config = AutoConfig.from_pretrained(case["model"])
        model = build_gpt_model(hf_config, torch.float32, "cpu")
        load_hf_state_dict(model, read_hf_weights(case["model"]), hf_config)
        tokens = torch.load(case["reference"])["tokens"]
        models[name] = {"logits": _last_stage_logits(model, tokens, hf_config.vocab_size),
                        "exported": export_hf_state_dict(model, hf_config)}
    return {"dp_rank": parallel_state.get_data_parallel_rank(), "models": models}


def _last_stage_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """[b, s, vocab] logits through megatron's schedule on the last stage (gathered over TP); None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from actors.trainer.megatron.model import causal_mask

    rows, seq_len = tokens.shape
    micro_rows = rows // MICROBATCHES
    mask = causal_mask(seq_len, "cpu")
    positions = torch.arange(seq_len).expand(micro_rows, seq_len)

    def forward_step(data_iterator, stage):
        output = stage(next(data_iterator), positions, mask)
        # The schedule scales the first element in place as a loss; the logits ride in the dict.
        return output, lambda out: (out.new_zeros(()), {"logits": out.detach().clone()})

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(tokens.chunk(MICROBATCHES)), model=model,
        num_microbatches=MICROBATCHES, seq_length=seq_len, micro_batch_size=micro_rows, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = torch.cat([output["logits"] for output in outputs])
    shards = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :vocab_size]


# -- the checks --------------------------------------------------------------------------

def _check_logits(results: list[dict], reference: dict) -> float:
    """Every last-stage rank's logits equal HF's at the real positions; returns the max relative diff."""
    expected = torch.cat([reference["logits"][row, :length] for row, length in enumerate(LENGTHS)])
    last_stage = [result["logits"] for result in results if result["logits"] is not None]
    assert last_stage
    worst = 0.0
    for logits in last_stage:
        actual = torch.cat([logits[row, :length] for row, length in enumerate(LENGTHS)])
        # The two sum in different orders (TP partial sums, mcore's baddbmm attention vs
        # sdpa): float32 rounding at the logits' scale, measured <= 1.5e-6 of it.
        assert_close_at_scale(actual, expected)
        worst = max(worst, float((actual - expected).abs().max() / expected.abs().max()))
    return worst


def _check_export(results: list[dict], model_dir: str) -> None:
    """The ranks' exports together are the checkpoint, bit for bit, each tensor from one stage."""
    checkpoint = load_file(str(Path(model_dir) / "model.safetensors"))
    union: dict[str, torch.Tensor] = {}
    for result in results:
        for name, tensor in result["exported"].items():
            if name in union:  # another TP rank of the same stage: an identical copy
                assert torch.equal(union[name], tensor), name
            union[name] = tensor
    assert union.keys() == checkpoint.keys()
    for name, tensor in checkpoint.items():
        assert union[name].dtype == tensor.dtype and torch.equal(union[name], tensor), name


@pytest.fixture(scope="module")
def measured(cases, tmp_path_factory) -> list[dict]:
    """Each rank's results (layout -> its DP group, seconds, per model logits and export), from one spawn."""
    out_dir = tmp_path_factory.mktemp("megatron-model-ranks")
    started = time.monotonic()
    mp.spawn(_rank, args=(free_port(), cases, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    print(json.dumps({"spawn_seconds": round(time.monotonic() - started, 1), "ranks": WORLD_SIZE}))
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _dp_groups(measured: list[dict], layout: str) -> list[list[dict]]:
    """The layout's results split into its DP groups (independent replicas), each with all its tp*pp ranks."""
    tp, pp = LAYOUTS[layout]
    groups: dict[int, list[dict]] = {}
    for rank_results in measured:
        groups.setdefault(rank_results[layout]["dp_rank"], []).append(rank_results[layout])
    assert sorted(groups) == list(range(WORLD_SIZE // (tp * pp)))
    assert all(len(group) == tp * pp for group in groups.values())
    return [groups[dp_rank] for dp_rank in sorted(groups)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_logits_and_export_match_hf(cases, measured, layout):
    diffs = {}
    for group in _dp_groups(measured, layout):
        for name, case in cases.items():
            results = [rank_results["models"][name] for rank_results in group]
            diff = _check_logits(results, torch.load(case["reference"]))
            diffs[name] = max(diffs.get(name, 0.0), diff)
            _check_export(results, case["model"])
    seconds = max(rank_results[layout]["seconds"] for rank_results in measured)
    print(json.dumps({"layout": layout, "seconds_in_shared_spawn": round(seconds, 1),
                      "max_rel_logit_diff": diffs}))


# -- refusals ----------------------------------------------------------------------------

_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)


@pytest.mark.parametrize("config, tp, pp, field", [
    (Qwen3Config(**_SMALL, use_sliding_window=True, sliding_window=16), 1, 1, "use_sliding_window"),
    (LlamaConfig(**_SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), 1, 1,
     "rope_type"),
    (LlamaConfig(**_SMALL, rope_parameters={**LLAMA3_ROPE, "high_freq_factor": 2.0}), 1, 1, "high_freq_factor"),
    (LlamaConfig(**_SMALL, attention_bias=True), 1, 1, "attention_bias"),
    (MistralConfig(**_SMALL), 1, 1, "model_type"),
    (Qwen3Config(**_SMALL), 1, 3, "num_hidden_layers"),
    (Qwen3Config(**{**_SMALL, "num_key_value_heads": 3, "num_attention_heads": 3}), 2, 1, "num_attention_heads"),
])
def test_unsupported_configs_are_refused_naming_the_field(config, tp, pp, field):
    from actors.trainer.megatron.model import check_supported_config

    with pytest.raises(ValueError, match=field):
        check_supported_config(config, tp, pp)
