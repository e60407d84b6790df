"""What SGLang 0.5.20 needs to run on a CPU-only machine, installed before sglang is imported.

Active only in a CPU SGLang engine process (and the scheduler and detokenizer processes
SGLang spawns from it: they inherit SHIMS_ENV and re-import the engine's main module
first, which installs these). Written for SGLANG_VERSION; `install` refuses another.

1. PyPI's torchvision is a CUDA build whose meta registrations name the ops
   `torchvision::nms` / `qnms` that its missing C++ library would define; sglang imports
   torchvision at top level. Defining the two schemas lets the import succeed (the ops
   are never called: no vision model is served).
2. With SGLANG_USE_CPU_ENGINE=1 sglang imports CPU kernels from `sgl_kernel` at module
   level, and no CPU build of sgl_kernel exists. A stand-in module implements the one
   that text generation calls (`assign_req_to_token_pool_cpu`) in plain torch; every
   other name raises NotImplementedError when called. `torch.ops.sgl_kernel` is left
   undefined, so `cpu_has_amx_support()` stays False and every layer runs `forward_native`.
3. sglang's LoRA code pins host memory unconditionally, which torch refuses without an
   accelerator; pinning becomes the identity when there is none.
4. The torch_native LoRA backend (the only one that runs on CPU) ignores the pruned
   lm_head segments the other backends build: in a prefill batch, the logits processor
   hands lm_head only the positions it needs (the last one of each sequence, or those
   whose logprobs were asked for), but lm_head's LoRA is applied with the segments of
   the full batch, so with several adapters in one prefill the rows get the wrong
   adapter's lm_head delta. Measured here: wrong logprobs and tokens for 16 of 60
   requests of random mixed batches (radix cache off; with it on, the batches that show
   it are rarer, not gone). The shim builds the pruned segments as the triton backend
   does (sglang's own `get_lm_head_pruned_lens` / `merge_and_chunk_segments`, per
   logprob chunk too) and runs lm_head's LoRA with them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import sys
import types

SGLANG_VERSION = "0.5.20"
SHIMS_ENV = "TINKERD_SGLANG_CPU_SHIMS"
_installed = False


def install_if_requested() -> None:
    """Install the shims if this process is (a child of) a CPU SGLang engine: its main module calls this."""
    if os.environ.get(SHIMS_ENV) == "1":
        install()


def install() -> None:
    global _installed
    if _installed:
        return
    version = importlib.metadata.version("sglang")
    if version != SGLANG_VERSION:
        raise RuntimeError(f"the CPU shims were written for sglang {SGLANG_VERSION}, but {version} is installed; "
                           f"rebuild its virtualenv with python -m launch.sglang_env")
    import torch

    _define_torchvision_schemas(torch)
    sys.modules.setdefault("sgl_kernel", _sgl_kernel_standin(torch))
    if not torch.cuda.is_available():
        _make_pinning_the_identity(torch)
    _segment_lm_head_lora_by_pruned_rows(torch)
    _installed = True


def _define_torchvision_schemas(torch) -> None:
    if "torchvision" in sys.modules:
        return
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 (kept alive below)
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _define_torchvision_schemas.library = library  # a Library deregisters its ops when collected


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len: int) -> None:
    """Write each request's new KV cache locations into its row of the request-to-token table.

    `out_cache_loc` holds the locations of every request of the batch back to back, request
    i's `end_offset[i] - start_offset[i]` of them going to `req_to_token[row_i, start:end]`.
    """
    del pool_len  # the CUDA kernel's bound; slicing checks it here
    position = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        count = end - start
        req_to_token[row, start:end] = out_cache_loc[position:position + count].to(req_to_token.dtype)
        position += count


def _sgl_kernel_standin(torch) -> types.ModuleType:
    module = types.ModuleType("sgl_kernel")
    module.__doc__ = "tinkerd's stand-in for sgl_kernel on CPU (actors/engine/sglang/cpu_shims.py)"
    module.assign_req_to_token_pool_cpu = assign_req_to_token_pool_cpu

    def missing(name: str):
        def kernel(*args, **kwargs):
            raise NotImplementedError(f"sgl_kernel.{name} has no CPU stand-in in tinkerd (only text generation "
                                      f"with torch_native attention runs on CPU)")
        kernel.__name__ = name
        return kernel

    module.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") \
        else missing(name)
    return module


def _make_pinning_the_identity(torch) -> None:
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like"):
        setattr(torch, name, _without_pinning(getattr(torch, name)))


def _without_pinning(factory):
    @functools.wraps(factory)
    def wrapped(*args, pin_memory: bool = False, **kwargs):
        return factory(*args, **kwargs)
    return wrapped


def _segment_lm_head_lora_by_pruned_rows(torch) -> None:
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend
    from sglang.srt.lora.utils import get_lm_head_pruned_lens, merge_and_chunk_segments

    prepare = TorchNativeLoRABackend.prepare_lora_batch

    def prepare_lora_batch(self, forward_batch, weight_indices, *args, **kwargs):
        prepare(self, forward_batch, weight_indices, *args, **kwargs)
        self.lm_head_batch_info, self.lm_head_pass_batch_infos = None, None
        pruned_lens = get_lm_head_pruned_lens(forward_batch)
        if pruned_lens is None:
            return
        total = sum(pruned_lens)
        segments = merge_and_chunk_segments(weight_indices, pruned_lens, chunk_size=total)
        self.lm_head_batch_info = _segment_info(torch, self.batch_info, *segments)
        passes = self._get_lm_head_pass_segments(weight_indices, pruned_lens)
        if passes is not None:
            self.lm_head_pass_batch_infos = [
                _segment_info(torch, self.batch_info, *merge_and_chunk_segments(wi, lens, chunk_size=sum(lens)))
                for wi, lens in passes]

    TorchNativeLoRABackend.prepare_lora_batch = prepare_lora_batch
    for name in ("run_lora_a_sgemm", "run_lora_b_sgemm"):
        setattr(TorchNativeLoRABackend, name, _with_pruned_batch_info(getattr(TorchNativeLoRABackend, name)))


def _segment_info(torch, batch_info, weight_indices: list[int], seg_lens: list[int]):
    """`batch_info` re-cut into the given segments (the pruned rows lm_head sees)."""
    lens = torch.tensor(seg_lens, dtype=torch.int32)
    indptr = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lens, dim=0)
    indices = torch.tensor(weight_indices, dtype=torch.int32)
    device = batch_info.seg_lens.device
    return dataclasses.replace(
        batch_info, use_cuda_graph=False, bs=len(seg_lens), num_segments=len(seg_lens), max_len=max(seg_lens),
        seg_lens=lens.to(device), seg_indptr=indptr.to(device), weight_indices=indices.to(device),
        seg_lens_cpu=lens, seg_indptr_cpu=indptr, weight_indices_cpu=indices, expected_tokens=sum(seg_lens))


def _with_pruned_batch_info(run):
    @functools.wraps(run)
    def wrapped(self, *args, pruned_batch_info=None, **kwargs):
        if pruned_batch_info is None:
            return run(self, *args, **kwargs)
        full, self.batch_info = self.batch_info, pruned_batch_info
        try:
            return run(self, *args, **kwargs)
        finally:
            self.batch_info = full
    return wrapped
