"""A megatron-core GPTModel equal to a Hugging Face Qwen3, Qwen2 or Llama model, per TP/PP rank.

The process first joins a torch.distributed group (gloo on CPU, nccl on GPUs) and calls
`init_model_parallel(tp, pp)`; from then on megatron's parallel_state says which tensor-
parallel shard and pipeline stage this rank holds, and every function here reads the
sizes from it. On a CPU trainer, cpu_shims.apply_cpu_shims() must run before the model
is used.

`transformer_config_from_hf` turns an HF config into a TransformerConfig that computes the
same function as transformers: RMSNorm, gated SiLU MLP, RoPE with HF's rotate_half layout
(rotary_interleaved False), grouped-query attention, Qwen3's per-head q/k RMSNorm, Qwen2's
q/k/v bias. Everything mcore would do differently is switched off: dropouts (its defaults
are 0.1), fused kernels (CUDA-only or not bit-compatible). Configs this mapping cannot
reproduce exactly are refused with a ValueError naming the field: no approximation.

`build_gpt_model` builds this rank's stage from mcore's local (non-TransformerEngine)
layer spec with frozen base weights; weights.load_hf_state_dict fills them. Stage `s` of
`pp` holds global layers `s * L/pp ... (s+1) * L/pp - 1` (see `global_layer_index`).

Attention always gets the explicit mask of `causal_mask`: mcore would otherwise build its
default causal mask on "cuda". mcore's RoPE ignores position ids (positions are 0..s-1 of
each row), so batches must be right-padded; the padded positions' outputs are garbage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
# mcore's RoPE scaling (RotaryEmbedding._apply_scaling) is Llama 3's with these constants
# fixed; only the factor is a parameter.
_MCORE_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def init_model_parallel(tp: int, pp: int) -> None:
    """Split this process's torch.distributed world into TP and PP groups (world = dp * tp * pp).

    Call after dist.init_process_group. Calling it again with the same sizes does nothing;
    other sizes need destroy_model_parallel() first.
    """
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size())
        if current != (tp, pp):
            raise RuntimeError(f"model parallel already initialized as tp={current[0]}, pp={current[1]}; "
                               f"destroy_model_parallel() before initializing tp={tp}, pp={pp}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def destroy_model_parallel() -> None:
    """Forget the TP/PP groups (the torch.distributed process group itself stays)."""
    parallel_state.destroy_model_parallel()


def check_supported_config(hf_config, tp: int, pp: int) -> None:
    """Raise ValueError naming the field when `hf_config` cannot be built exactly at this tp/pp."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by the Megatron backend "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (only 'silu')")
    # Qwen2 always has q/k/v bias and no o_proj bias; mcore's add_qkv_bias is exactly that.
    # Qwen3/Llama's attention_bias also puts a bias on o_proj, which mcore only adds
    # together with MLP biases (add_bias_linear).
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is not supported (mcore cannot bias q/k/v/o without the MLP)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported (full attention only)")
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"layer_types {sorted(set(layer_types))} is not supported (full_attention only)")
    _rope_settings(hf_config)
    _check_divisible(hf_config, tp, pp)


def _check_divisible(hf_config, tp: int, pp: int) -> None:
    layers = hf_config.num_hidden_layers
    if layers % pp:
        raise ValueError(f"num_hidden_layers {layers} is not divisible by the pipeline size {pp}")
    for field in ("num_attention_heads", "intermediate_size"):
        if getattr(hf_config, field) % tp:
            raise ValueError(f"{field} {getattr(hf_config, field)} is not divisible by the tensor parallel size {tp}")
    groups = hf_config.num_key_value_heads
    if groups % tp and tp % groups:
        raise ValueError(f"num_key_value_heads {groups} must divide or be a multiple of the tensor parallel size {tp}")


def _rope_settings(hf_config) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None) of `hf_config`; refuses what mcore cannot match."""
    rope = getattr(hf_config, "rope_parameters", None)
    if not rope or "rope_theta" not in rope:
        raise ValueError("rope_parameters with a rope_theta is required (transformers >= 5 configs)")
    partial_rotary_factor = rope.get("partial_rotary_factor", 1.0)
    if partial_rotary_factor != 1.0:
        raise ValueError(f"rope_parameters.partial_rotary_factor {partial_rotary_factor} is not supported")
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return float(rope["rope_theta"]), None
    if rope_type == "llama3":
        for field, value in _MCORE_LLAMA3_ROPE.items():
            if float(rope[field]) != value:
                raise ValueError(f"rope_parameters.{field} {rope[field]} is not supported for llama3 RoPE "
                                 f"(mcore fixes it at {value})")
        return float(rope["rope_theta"]), float(rope["factor"])
    raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported (default or llama3)")


def head_dim(hf_config) -> int:
    """The attention head size, as transformers computes it (Qwen3 may set it apart from hidden/heads)."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """`vocab_size` rounded up to a multiple of `tp`, so the vocab-parallel shards are equal.

    Megatron-LM pads further, to a multiple of 128 * tp, for GEMM speed; a multiple of tp is
    all correctness needs and keeps the padded rows (at most tp - 1) rare. Padded rows are
    zero, so their logits are 0, not -inf: a softmax over the padded vocab must mask them.
    """
    return -(-vocab_size // tp) * tp


def transformer_config_from_hf(hf_config, params_dtype: torch.dtype, device: str | torch.device) -> TransformerConfig:
    """The TransformerConfig computing what transformers computes for `hf_config`, at the current tp/pp.

    `device` is only checked: weights are always initialised on the CPU
    (use_cpu_initialization) and build_gpt_model moves them, so the config is the same on
    both devices.
    """
    if torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported (cpu or cuda)")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_supported_config(hf_config, tp, pp)
    model_type = hf_config.model_type
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=model_type == "qwen3",
        add_bias_linear=False,
        add_qkv_bias=model_type == "qwen2",
        gated_linear_unit=True,
        activation_func=F.silu,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Allocate on the CPU (building needs no CUDA; build_gpt_model moves the model) and
        # skip mcore's random init: load_hf_state_dict overwrites every weight and checks it did.
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )


def build_gpt_model(hf_config, params_dtype: torch.dtype, device: str | torch.device) -> GPTModel:
    """This rank's TP shard of its PP stage of `hf_config`'s model, frozen, weights not yet loaded.

    The weights hold uninitialised memory until weights.load_hf_state_dict fills them.
    Logits stay vocab-parallel (parallel_output): [b, s, padded_vocab / tp] on this rank.
    """
    config = transformer_config_from_hf(hf_config, params_dtype, device)
    rope_theta, llama3_factor = _rope_settings(hf_config)
    # GPTModel hands the RoPE settings to RotaryEmbedding itself; TransformerConfig has no field for them.
    rope_scaling = {} if llama3_factor is None else {"rope_scaling": True, "rope_scaling_factor": llama3_factor}
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm"),
        vocab_size=padded_vocab_size(hf_config.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=rope_theta,
        **rope_scaling,
    )
    # torch's RMSNorm (the local spec's norm) ignores params_dtype; HF keeps norms in the model dtype.
    model.to(device=device, dtype=params_dtype)
    model.requires_grad_(False)
    return model


def causal_mask(seq_len: int, device: str | torch.device) -> torch.Tensor:
    """The attention mask for GPTModel.forward: [1, 1, s, s] bool, True where a query must not look."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)[None, None]


def layers_per_stage(num_layers: int) -> int:
    """How many decoder layers each pipeline stage holds at the current pp."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if num_layers % pp:
        raise ValueError(f"num_hidden_layers {num_layers} is not divisible by the pipeline size {pp}")
    return num_layers // pp


def global_layer_index(local: int, num_layers: int) -> int:
    """The HF layer index (`model.layers.N`) of this stage's `decoder.layers[local]`.

    `num_layers` is the whole model's (hf_config.num_hidden_layers). mcore records the same
    on each layer as `layer_number` (1-based): `model.decoder.layers[local].layer_number - 1`.
    """
    per_stage = layers_per_stage(num_layers)
    if not 0 <= local < per_stage:
        raise IndexError(f"local layer {local} is outside this stage's {per_stage} layers")
    return parallel_state.get_pipeline_model_parallel_rank() * per_stage + local
