"""Hugging Face weights into and out of this rank's megatron-core GPTModel (local layer spec names).

One table, `_stage_entries`, says which HF tensors make each mcore parameter of this rank's
pipeline stage and how the tensor-parallel shards cut it:

| mcore (stage-local layer l)                 | HF (global layer L)                    | TP cut         |
|---------------------------------------------|----------------------------------------|----------------|
| embedding.word_embeddings.weight            | model.embed_tokens.weight              | rows, padded   |
| decoder.layers.l.input_layernorm.weight     | model.layers.L.input_layernorm.weight  | replicated     |
| ...self_attention.linear_qkv.weight / .bias | self_attn.{q,k,v}_proj, packed (below) | rows           |
| ...self_attention.{q,k}_layernorm.weight    | self_attn.{q,k}_norm.weight (Qwen3)    | replicated     |
| ...self_attention.linear_proj.weight        | self_attn.o_proj.weight                | columns        |
| ...pre_mlp_layernorm.weight                 | post_attention_layernorm.weight        | replicated     |
| ...mlp.linear_fc1.weight                    | mlp.gate_proj, mlp.up_proj             | rows, each     |
| ...mlp.linear_fc2.weight                    | mlp.down_proj.weight                   | columns        |
| decoder.final_layernorm.weight              | model.norm.weight                      | replicated     |
| output_layer.weight                         | lm_head.weight                         | rows, padded   |

L = l + stage * layers_per_stage. The qkv packing is mcore's: for each of the kv groups,
that group's query heads, then its key head, then its value head; TP cuts the packed rows
into equal contiguous blocks (whole groups when groups >= tp; with fewer groups than
ranks mcore gathers the rows back and picks its heads). fc1 is [gate; up] on every rank,
so gate and up are cut separately. Vocab rows are zero-padded to model.padded_vocab_size.

Tied embeddings (tie_word_embeddings): HF has no lm_head. At PP=1 the output layer reuses
the embedding; at PP>1 the last stage holds its own copy of the embedding as
output_layer.weight, which load fills from model.embed_tokens.weight and export leaves
out (the first stage exports the one HF tensor).

`load_hf_state_dict` refuses to leave a parameter unfilled or an HF weight unused, so a
mapping gap is an error here rather than a silently wrong model. `export_hf_state_dict`
gathers the TP shards back into full HF tensors, bit for bit (a collective over the TP
group: every rank of it must call it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import load_file

from actors.trainer.megatron.model import global_layer_index, head_dim, layers_per_stage, padded_vocab_size

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# Buffers some older checkpoints saved; transformers recomputes them.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

# How the TP ranks cut a parameter: the same on every rank, by rows (dim 0, column-parallel
# layers and the vocab), by columns (dim 1, row-parallel layers), or gate/up rows apart.
REPLICATED, ROWS, COLUMNS, GATE_UP = "replicated", "rows", "columns", "gate_up"


@dataclass(frozen=True)
class _Entry:
    """One mcore parameter of this stage and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    cut: str


def read_hf_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory: model.safetensors, or the shards its index names.

    Every rank reads the whole checkpoint (load_hf_state_dict keeps its part): fine for the
    models a CPU trainer runs; a large model would want each rank to read only its keys.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(model_dir / name)))
    return state


def _layer_entries(hf_config, local: int) -> list[_Entry]:
    mcore = f"decoder.layers.{local}."
    hf = f"model.layers.{global_layer_index(local, hf_config.num_hidden_layers)}."
    attn = hf + "self_attn."
    entries = [
        _Entry(mcore + "input_layernorm.weight", (hf + "input_layernorm.weight",), REPLICATED),
        _Entry(mcore + "self_attention.linear_qkv.weight",
               tuple(f"{attn}{p}_proj.weight" for p in "qkv"), ROWS),
        _Entry(mcore + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), COLUMNS),
        _Entry(mcore + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), REPLICATED),
        _Entry(mcore + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), GATE_UP),
        _Entry(mcore + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), COLUMNS),
    ]
    if hf_config.model_type == "qwen2":
        entries.append(_Entry(mcore + "self_attention.linear_qkv.bias",
                              tuple(f"{attn}{p}_proj.bias" for p in "qkv"), ROWS))
    if hf_config.model_type == "qwen3":
        entries += [_Entry(mcore + f"self_attention.{p}_layernorm.weight", (f"{attn}{p}_norm.weight",), REPLICATED)
                    for p in "qk"]
    return entries


def _stage_entries(model, hf_config) -> list[_Entry]:
    """Every parameter of this rank's stage of `model`, with its HF source tensors."""
    entries = []
    if model.pre_process:
        entries.append(_Entry("embedding.word_embeddings.weight", (EMBEDDING,), ROWS))
    for local in range(layers_per_stage(hf_config.num_hidden_layers)):
        entries += _layer_entries(hf_config, local)
    if model.post_process:
        entries.append(_Entry("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
        if not hf_config.tie_word_embeddings:
            entries.append(_Entry("output_layer.weight", (LM_HEAD,), ROWS))
        elif not model.pre_process:
            entries.append(_Entry("output_layer.weight", (EMBEDDING,), ROWS))
    return entries


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v (weights or biases) in mcore's order: per kv group, its q heads, its k head, its v head."""
    rest = q.shape[1:]
    per_group = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def _unpack_qkv(packed: torch.Tensor, hf_config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, size = hf_config.num_key_value_heads, head_dim(hf_config)
    q_per_group = hf_config.num_attention_heads // groups * size
    per_group = packed.reshape(groups, q_per_group + 2 * size, *packed.shape[1:])
    q, k, v = per_group.split([q_per_group, size, size], dim=1)
    return tuple(t.reshape(-1, *packed.shape[1:]) for t in (q, k, v))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _full_mcore_tensor(entry: _Entry, sources: list[torch.Tensor], hf_config) -> torch.Tensor:
    """The whole (TP=1) mcore tensor of `entry` from its HF tensors (not for fc1: see _shard)."""
    if entry.mcore.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return _pack_qkv(*sources, groups=hf_config.num_key_value_heads)
    if entry.hf[0] in (EMBEDDING, LM_HEAD):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return _pad_rows(sources[0], padded_vocab_size(hf_config.vocab_size, tp))
    return sources[0]


def _shard(entry: _Entry, sources: list[torch.Tensor], hf_config) -> torch.Tensor:
    """This TP rank's piece of `entry`, cut from its HF tensors."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if entry.cut == GATE_UP:
        return torch.cat([_split_evenly(t, tp, 0, entry)[rank] for t in sources])
    full = _full_mcore_tensor(entry, sources, hf_config)
    if entry.cut == REPLICATED:
        return full
    return _split_evenly(full, tp, 0 if entry.cut == ROWS else 1, entry)[rank]


def _split_evenly(tensor: torch.Tensor, parts: int, dim: int, entry: _Entry) -> tuple[torch.Tensor, ...]:
    if tensor.shape[dim] % parts:
        raise ValueError(f"{entry.mcore}: size {tensor.shape[dim]} of dim {dim} does not split into {parts} TP shards")
    return tensor.chunk(parts, dim=dim)


def load_hf_state_dict(model, hf_state: dict[str, torch.Tensor], hf_config) -> None:
    """Copy this rank's TP shard of its PP stage out of the full HF state dict `hf_state` into `model`.

    Every rank may pass the whole checkpoint; each takes its own part. Raises if an HF
    tensor is missing, if one of `hf_state` belongs to no stage, or if a parameter of
    `model` is left unfilled.
    """
    _check_no_foreign_weights(hf_state, hf_config)
    params = dict(model.named_parameters())
    entries = _stage_entries(model, hf_config)
    unfilled = params.keys() - {entry.mcore for entry in entries}
    if unfilled:
        raise ValueError(f"no HF weights map to these mcore parameters: {sorted(unfilled)}")
    with torch.no_grad():
        for entry in entries:
            missing = [name for name in entry.hf if name not in hf_state]
            if missing:
                raise KeyError(f"HF weights {missing} (for {entry.mcore}) are not in the checkpoint")
            shard = _shard(entry, [hf_state[name] for name in entry.hf], hf_config)
            param = params[entry.mcore]
            if shard.shape != param.shape:
                raise ValueError(f"{entry.mcore}: HF gives shape {tuple(shard.shape)}, model has {tuple(param.shape)}")
            param.copy_(shard)


def _check_no_foreign_weights(hf_state: dict[str, torch.Tensor], hf_config) -> None:
    """Refuse HF weights that no stage would load: they mean the model differs from what is built."""
    # lm_head also when tied: some tied checkpoints store it, a copy of the embedding (not loaded).
    expected = {EMBEDDING, "model.norm.weight", LM_HEAD}
    for layer in range(hf_config.num_hidden_layers):
        expected.update(_hf_layer_names(hf_config, layer))
    foreign = [name for name in hf_state if name not in expected and not name.endswith(_IGNORED_HF_SUFFIXES)]
    if foreign:
        raise ValueError(f"HF weights this model has no place for: {sorted(foreign)[:8]}"
                         f"{' ...' if len(foreign) > 8 else ''}")


def _hf_layer_names(hf_config, layer: int) -> set[str]:
    prefix = f"model.layers.{layer}."
    names = {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
    names.update(f"{prefix}self_attn.{p}_proj.weight" for p in "qkvo")
    names.update(f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
    if hf_config.model_type == "qwen2":
        names.update(f"{prefix}self_attn.{p}_proj.bias" for p in "qkv")
    if hf_config.model_type == "qwen3":
        names.update(f"{prefix}self_attn.{p}_norm.weight" for p in "qk")
    return names


def _gather_tp(local: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's copy of `local` (a collective over the TP group), in rank order."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [local]
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def _unshard(entry: _Entry, shards: list[torch.Tensor], hf_config) -> list[torch.Tensor]:
    """The HF tensors of `entry` from all TP ranks' shards (the inverse of _shard)."""
    if entry.cut == GATE_UP:
        halves = [shard.chunk(2) for shard in shards]
        return [torch.cat([gate for gate, _ in halves]), torch.cat([up for _, up in halves])]
    if entry.cut == REPLICATED:
        full = shards[0]
    else:
        full = torch.cat(shards, dim=0 if entry.cut == ROWS else 1)
    if entry.mcore.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return list(_unpack_qkv(full, hf_config))
    if entry.hf[0] in (EMBEDDING, LM_HEAD):
        return [full[:hf_config.vocab_size]]
    return [full]


def export_hf_state_dict(model, hf_config) -> dict[str, torch.Tensor]:
    """This rank's PP stage as full HF tensors (TP shards gathered): HF name -> tensor.

    A collective over the TP group. The union over stages is the HF state dict; with tied
    embeddings at PP>1 the last stage's copy of the embedding is not exported.
    """
    params = dict(model.named_parameters())
    exported: dict[str, torch.Tensor] = {}
    for entry in _stage_entries(model, hf_config):
        if entry.mcore == "output_layer.weight" and entry.hf == (EMBEDDING,):
            continue
        local = params[entry.mcore].detach()
        shards = [local] if entry.cut == REPLICATED else _gather_tp(local)
        tensors = _unshard(entry, shards, hf_config)
        exported.update((name, tensor.contiguous().clone()) for name, tensor in zip(entry.hf, tensors))
    return exported
