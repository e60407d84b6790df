"""The Megatron backend's GPTModel computes what transformers computes, at TP1, TP2, PP2 and TP2xPP2.

Three tiny models, saved with save_pretrained: a Qwen3 with the built-in model's quirks
(tied, qk-norm, head_dim set apart from hidden/heads; 4 layers, so a PP2 stage holds two),
a Qwen2 (q/k/v bias, untied) and a Llama (tied, one kv head so TP2 has fewer kv groups than
ranks, Llama 3 RoPE scaling, a vocab of 251 that TP2 pads). Their weights are redrawn at
unit scale, because HF's 0.02 init (the built-in model's) makes attention nearly uniform,
which would hide RoPE or q/k mapping mistakes; and their norm weights away from 1, which
would hide a swapped norm.

Each layout is one torch.multiprocessing spawn over gloo that checks all three models:
starting processes and importing megatron.core costs seconds, so the work is grouped.
Every rank runs a right-padded batch through megatron's own schedule
(get_forward_backward_func, forward only, 2 microbatches), the last stage gathers the
vocab-parallel logits over TP, and every rank exports its stage back to HF names. The
parent compares the logits at the real positions with transformers' (float32, CPU) and the
union of the exports with the checkpoint, bit for bit.
"""

from __future__ import annotations

import json
import socket
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

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
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

def _rank(rank: int, world_size: int, port: int, tp: int, pp: int, cases: dict[str, dict[str, str]],
          out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)  # up to 4 ranks share the machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from transformers import AutoConfig

    from actors.trainer.megatron import model as megatron_model
    from actors.trainer.megatron.cpu_shims import apply_cpu_shims
    from actors.trainer.megatron.weights import export_hf_state_dict, load_hf_state_dict, read_hf_weights

    apply_cpu_shims()
    megatron_model.init_model_parallel(tp, pp)
    try:
        for name, case in cases.items():
            hf_config = AutoConfig.from_pretrained(case["model"])
            model = megatron_model.build_gpt_model(hf_config, torch.float32, "cpu")
            load_hf_state_dict(model, read_hf_weights(case["model"]), hf_config)
            tokens = torch.load(case["reference"])["tokens"]
            result = {"logits": _last_stage_logits(model, tokens, hf_config.vocab_size),
                      "exported": export_hf_state_dict(model, hf_config)}
            torch.save(result, f"{out_dir}/{name}.rank{rank}.pt")
    finally:
        megatron_model.destroy_model_parallel()
        dist.destroy_process_group()


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_logits_and_export_match_hf(cases, layout, tmp_path):
    tp, pp = LAYOUTS[layout]
    started = time.monotonic()
    mp.spawn(_rank, args=(tp * pp, _free_port(), tp, pp, cases, str(tmp_path)), nprocs=tp * pp, join=True)
    seconds = time.monotonic() - started
    diffs = {}
    for name, case in cases.items():
        results = [torch.load(tmp_path / f"{name}.rank{rank}.pt") for rank in range(tp * pp)]
        diffs[name] = _check_logits(results, torch.load(case["reference"]))
        _check_export(results, case["model"])
    print(json.dumps({"layout": layout, "spawn_seconds": round(seconds, 1), "max_rel_logit_diff": diffs}))


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
