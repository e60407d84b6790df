"""Make megatron-core 0.16.1 run on CPU (gloo): every CUDA-assuming spot it reaches, handled here.

megatron-core targets CUDA and reaches for it in a few places even when every tensor is on
the CPU. `apply_cpu_shims()` patches exactly those places, and only they; the caller applies
it once per process, and only when the trainer's device is cpu (on a GPU the real CUDA
calls are wanted). It is idempotent. What it patches, and why:

- `torch.cuda.current_device` answers the CPU device. mcore allocates on it when it moves
  RoPE's `inv_freq` (rotary_pos_embedding.py, every forward), builds TP gather buffers
  (tensor_parallel/mappings.py, utils.py), the attention score buffer (utils.py
  GlobalMemoryBuffer) and the pipeline receive buffers (p2p_communication.py).
- `torch.cuda.synchronize` does nothing: p2p_communication.py calls it after each batched
  send/recv with PP>1, and gloo's wait() has already completed the transfer.
- `torch.Tensor.cuda` returns the tensor itself: with tied embeddings and PP>1,
  language_module.py moves the shared embedding to CUDA before all-reducing the first and
  last stages' copies.
- The schedules (`forward_backward_no_pipelining` and both pipelined ones, which
  `get_forward_backward_func` hands out) run inside a TorchFunctionMode that rewrites a
  cuda `device=` to cpu: schedules.py counts tokens in `torch.zeros(..., device="cuda")`,
  even at PP=1. The mode applies only while a schedule runs, not to the whole process.
- The RNG tracker becomes mcore's inference tracker, whose `add`/`fork` do nothing: its
  training tracker forks CUDA RNG states around attention dropout. Dropout is 0 in this
  backend (model.py), so no RNG stream is needed there; do not call
  `model_parallel_cuda_manual_seed` on CPU, seed with the same `torch.manual_seed` on every
  rank instead.

Sites that are avoided rather than patched: the default causal mask built on "cuda"
(transformer/utils.py) is never built because model.causal_mask is always passed; mcore's
optimizer (clip_grads.py asserts torch.cuda.FloatTensor) is not used; fused kernels are off
in the TransformerConfig.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_SCHEDULES = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)
_applied = False


class CudaDeviceToCpu(TorchFunctionMode):
    """Rewrite a `device=` keyword naming CUDA (a string, an index or a torch.device) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


def _in_cpu_device_mode(schedule):
    @functools.wraps(schedule)
    def run_on_cpu(*args, **kwargs):
        with CudaDeviceToCpu():
            return schedule(*args, **kwargs)

    return run_on_cpu


def apply_cpu_shims() -> None:
    """Patch megatron-core's CUDA-only spots for a CPU trainer (see the module docstring). Idempotent."""
    global _applied
    if _applied:
        return
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # get_forward_backward_func looks these names up in the module when called, so it hands
    # out the wrapped schedules; code that imported a schedule by name before this call did not.
    for name in _SCHEDULES:
        setattr(schedules, name, _in_cpu_device_mode(getattr(schedules, name)))
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _applied = True
