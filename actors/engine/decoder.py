"""One decode step of the whole running batch, written against the model's own modules.

Why not the transformers forward: at the sizes a CPU engine runs (the built-in model, 64
rows), a decode step is mostly per-op and Python overhead, and transformers' forward adds
a lot of both: a 4-D mask built every step, decorators and output dataclasses around
every module, its cache concatenating every layer's keys and values. This step calls the
very same modules (the LoRA-wrapped projections, so the adapter arithmetic is the
trainer's; the model's rotary embedding, so every RoPE scaling the model's config asks for
applies) and the same formulas (RMSNorm, rotary, grouped-query SDPA with one query per
row), over the preallocated batch cache of actors/engine/kv_batch.py. Measured on the
built-in model at 64 rows, one CPU thread: 10–14 ms a step against 17–19 ms for
transformers' forward over the same cache (and ~30 ms with its cache concatenation).

Supported decoder layouts: those of Qwen3 (q/k norms), Qwen2 (q/k/v biases, which live in
the projections) and Llama. Any other model type is refused when the engine starts, naming
these, rather than decoded by formulas that might not be its own. Prefill still runs the
transformers forward (once per admission; torch_backend.py gives it an explicit mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from actors.engine.kv_batch import KvBatch
from actors.lora import LoraSlots

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


def check_supported(config) -> None:
    """Refuse a model whose decoder this module would not reproduce exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the torch engine decodes {', '.join(SUPPORTED_MODEL_TYPES)} models, not "
                         f"model_type {model_type!r}")
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if getattr(config, "use_sliding_window", False) or set(layer_types) != {"full_attention"}:
        raise ValueError("the torch engine does not decode sliding-window attention layers")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError("the torch engine does not decode pretraining_tp > 1 (split projections)")


@dataclass
class _Layer:
    input_norm: nn.Module
    post_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module
    scaling: float


class Decoder:
    def __init__(self, model: nn.Module, slots: LoraSlots):
        config = model.config
        check_supported(config)
        inner = model.model
        self.slots = slots
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        first = inner.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = first.head_dim
        self.layers = [_layer(layer) for layer in inner.layers]

    def new_batch(self, dtype: torch.dtype, device: torch.device, max_rows: int) -> KvBatch:
        return KvBatch(len(self.layers), self.kv_heads, self.head_dim, dtype, device, max_rows)

    def step(self, batch: KvBatch) -> torch.Tensor:
        """Feed every live row's pending token; return the logits of what comes next, [rows, vocab]."""
        batch.ensure_column()
        rows, col = len(batch), batch.end
        batch.mask[:rows, col] = True
        single = batch.single_slot()
        with self.slots.use(single if single is not None else batch.slots[:rows]):
            x = self.embed(batch.pending[:rows])
            cos, sin = self.rotary(x, batch.positions[:rows, None])  # [rows, 1, D]
            rotary = (cos.unsqueeze(1), sin.unsqueeze(1))  # [rows, 1, 1, D]: every head, the one query
            mask = batch.mask[:rows, None, None, batch.start:col + 1]
            for layer, keys, values in zip(self.layers, batch.keys, batch.values, strict=True):
                x = x + self._attention(layer, _rms_norm(layer.input_norm, x), rotary, keys, values, mask, batch)
                h = _rms_norm(layer.post_norm, x)
                x = x + layer.down_proj(layer.act_fn(layer.gate_proj(h)) * layer.up_proj(h))
            logits = self.head(_rms_norm(self.norm, x))
        batch.advance()
        return logits

    def _attention(self, layer: _Layer, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, batch: KvBatch) -> torch.Tensor:
        rows, col, dim = len(batch), batch.end, self.head_dim
        q = layer.q_proj(h).view(rows, self.heads, 1, dim)
        k = layer.k_proj(h).view(rows, self.kv_heads, 1, dim)
        if layer.q_norm is not None:
            q, k = _rms_norm(layer.q_norm, q), _rms_norm(layer.k_norm, k)
        cos, sin = rotary
        keys[:rows, :, col:col + 1] = k * cos + _rotate_half(k) * sin
        values[:rows, :, col:col + 1] = layer.v_proj(h).view(rows, self.kv_heads, 1, dim)
        q = q * cos + _rotate_half(q) * sin
        # the query heads of one kv head side by side as that head's queries (transformers' pack_gqa): no repeat_kv
        out = F.scaled_dot_product_attention(q.view(rows, self.kv_heads, self.heads // self.kv_heads, dim),
                                             keys[:rows, :, batch.start:col + 1],
                                             values[:rows, :, batch.start:col + 1],
                                             attn_mask=mask, scale=layer.scaling)
        return layer.o_proj(out.reshape(rows, self.heads * dim))


def _layer(layer: nn.Module) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    return _Layer(input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
                  q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, o_proj=attn.o_proj,
                  q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                  gate_proj=mlp.gate_proj, up_proj=mlp.up_proj, down_proj=mlp.down_proj, act_fn=mlp.act_fn,
                  scaling=float(attn.scaling))


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (x * rsqrt(mean(x²) + eps) * weight) as one fused op; the weight is read each
    call, since releasing and resuming the engine's memory swaps it."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
