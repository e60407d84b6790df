"""PEFT adapters as files and as named arrays: the one layout every backend speaks.

An adapter leaves and enters tinkerd in Hugging Face PEFT layout, whatever the backend
that trained it: tensors `base_model.model.<hf module path>.lora_A.weight` `[r, in]` and
`.lora_B.weight` `[out, r]`, in `adapter_model.safetensors`, with `adapter_config.json`
beside it. peft, vLLM and SGLang load these files, and so do both trainer backends and
every engine, so a checkpoint written by one backend at any parallel layout loads into
any other. The module paths are the HF model's (`model.layers.3.self_attn.q_proj`,
`lm_head`), never a backend's internal names.

numpy only (no torch): the trainer backends hand arrays across their interface, and
this module is shared by all of them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import save_file

from cluster.messages import LoraSpec

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)


def module_kind(path: str) -> str | None:
    """"attn", "mlp" or "unembed" for a LoRA-targetable HF module path, else None."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ATTN_MODULES:
        return "attn"
    if leaf in MLP_MODULES:
        return "mlp"
    if leaf in UNEMBED_MODULES:
        return "unembed"
    return None


def trains_kind(spec: LoraSpec, kind: str) -> bool:
    return {"attn": spec.train_attn, "mlp": spec.train_mlp, "unembed": spec.train_unembed}[kind]


def lora_tensor_names(path: str) -> tuple[str, str]:
    """The PEFT names of a module's A and B tensors."""
    return peft_name(f"{path}.lora_A"), peft_name(f"{path}.lora_B")


def peft_name(slot_tensor: str) -> str:
    """`<hf path>.lora_A` (how the backends name a slot tensor) -> its PEFT tensor name."""
    return f"{PEFT_PREFIX}{slot_tensor}.weight"


def expected_lora_shapes(spec: LoraSpec, module_shapes: Mapping[str, tuple[int, int]]
                         ) -> dict[str, tuple[int, int]]:
    """PEFT name -> full shape of every tensor an adapter of `spec` has, given each
    targetable module's (in_features, out_features) in the HF model's order."""
    expected = {}
    for path, (in_features, out_features) in module_shapes.items():
        if trains_kind(spec, module_kind(path)):
            a_name, b_name = lora_tensor_names(path)
            expected[a_name] = (spec.rank, in_features)
            expected[b_name] = (out_features, spec.rank)
    return expected


def hf_lora_module_shapes(config) -> dict[str, tuple[int, int]]:
    """HF module path -> (in_features, out_features) of every LoRA target of a Llama-family decoder
    (Llama, Qwen2, Qwen3), in model order, from its HF config alone (any object with the config's
    fields as attributes): for a backend that holds no torch copy of the model to ask."""
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shapes = {}
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes[f"{attn}.q_proj"] = (hidden, heads * head_dim)
        shapes[f"{attn}.k_proj"] = (hidden, kv_heads * head_dim)
        shapes[f"{attn}.v_proj"] = (hidden, kv_heads * head_dim)
        shapes[f"{attn}.o_proj"] = (heads * head_dim, hidden)
        shapes[f"{mlp}.gate_proj"] = (hidden, config.intermediate_size)
        shapes[f"{mlp}.up_proj"] = (hidden, config.intermediate_size)
        shapes[f"{mlp}.down_proj"] = (config.intermediate_size, hidden)
    shapes["lm_head"] = (hidden, config.vocab_size)
    return shapes


def target_module_names(spec: LoraSpec, paths) -> list[str]:
    """PEFT's `target_modules`: the leaf names of the modules the adapter trains."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths if trains_kind(spec, module_kind(p))})


def check_tensors(where: str, tensors: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError naming the problem unless `tensors` has exactly the expected names and
    shapes, holding finite floats."""
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{where} tensors do not match this model's LoRA layout: "
                         f"missing {missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    for name, shape in expected.items():
        value = np.asarray(tensors[name])
        if tuple(value.shape) != tuple(shape) or not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{where} tensor {name} is {value.dtype} {list(value.shape)}, "
                             f"expected a float tensor of shape {list(shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"{where} tensor {name} holds NaN or inf")


def write_peft_adapter(directory: str | Path, tensors: Mapping[str, np.ndarray], spec: LoraSpec,
                       target_modules: list[str], base_model: str) -> int:
    """Write adapter_model.safetensors + adapter_config.json (float32); return bytes written.

    The config spells out every LoRA field whose default differs between loaders, so
    peft, vLLM and SGLang all read the same adapter: plain LoRA with scaling
    lora_alpha / r (no rsLoRA, DoRA, LoRA bias, per-layer patterns, modules_to_save).
    `lm_head` may be a target even when the model ties it to `embed_tokens`: the LoRA
    applies to the output projection only (what peft does without
    `ensure_weight_tying`), never to the input embedding.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (ADAPTER_WEIGHTS_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
    tmp.replace(directory / ADAPTER_WEIGHTS_FILE)
    config = adapter_config(spec, target_modules, base_model)
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return sum(f.stat().st_size for f in directory.iterdir())


def adapter_config(spec: LoraSpec, target_modules: list[str], base_model: str) -> dict:
    """The adapter_config.json of an adapter (what write_peft_adapter writes beside the tensors)."""
    alpha = float(spec.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        # an int where it is one: peft and vLLM declare lora_alpha as int
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": target_modules,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        # not PEFT fields: what tinkerd needs to rebuild the LoraSpec exactly
        "tinkerd": {"train_attn": spec.train_attn, "train_mlp": spec.train_mlp,
                    "train_unembed": spec.train_unembed},
    }


def read_peft_adapter(directory: str | Path) -> tuple[LoraSpec, dict[str, np.ndarray]]:
    """The LoraSpec and tensors of a PEFT adapter directory (tinkerd's or anyone's).

    Raises FileNotFoundError for a missing file and whatever the parsers raise for a
    corrupt one; the callers turn those into their own messages.
    """
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    tensors = read_float_safetensors(directory / ADAPTER_WEIGHTS_FILE)
    kinds = config.get("tinkerd") or {
        "train_attn": any(t in ATTN_MODULES for t in config["target_modules"]),
        "train_mlp": any(t in MLP_MODULES for t in config["target_modules"]),
        "train_unembed": any(t in UNEMBED_MODULES for t in config["target_modules"]),
    }
    spec = LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]), **kinds)
    return spec, tensors


# numpy has no bfloat16, so safetensors.numpy cannot read the bf16 adapters peft writes
# by default; this reader widens every float dtype to float32 itself
_FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_HEADER_LENGTH = struct.Struct("<Q")


def read_float_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file of float tensors, as float32 arrays."""
    data = Path(path).read_bytes()
    (header_length,) = _HEADER_LENGTH.unpack_from(data, 0)
    header = json.loads(data[_HEADER_LENGTH.size:_HEADER_LENGTH.size + header_length])
    body = memoryview(data)[_HEADER_LENGTH.size + header_length:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _FLOAT_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name} has dtype {entry['dtype']}; an adapter holds float tensors")
        start, stop = entry["data_offsets"]
        raw = np.frombuffer(body[start:stop], dtype=dtype).reshape(entry["shape"])
        if entry["dtype"] == "BF16":  # bf16 is the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32)
    return out
