"""The engine backend interface: what an engine process drives, whatever does the sampling.

A backend (picked by name, cluster/backends.py) is constructed once per engine process
as `Backend(config)` and driven by that process's event loop (actors/engine/main.py)
from one thread. It may run its own scheduler (SGLang does); the loop only

- `submit`s a sample request and gets a ticket back at once (validation errors raise
  then: ValueError for a bad request, UnknownAdapterError for an adapter it lacks),
- calls `step()` while `has_work()`, which advances the work by a short quantum (one
  decode step, or a few milliseconds of the backend's own loop) and returns the
  requests that finished, each with its result or the exception it failed with alone
  (an exception out of `step` itself fails every request in flight),
- `abort`s one request (a cancelled sample) or all of them (a failed step, shutdown),
- loads adapters from PEFT-named arrays (pushed by trainer rank 0) or a PEFT directory,
  and unloads them; a load may raise AdapterSlotsBusy, and the loop retries it later,
- releases and resumes memory for colocated training (`release_memory` /
  `resume_memory`, tags from RESIDENCY_TAGS), only while it has no work.

Only numpy arrays and cluster/messages.py values cross it, so the engine process and
the controller never see the backend's tensors.
"""

from __future__ import annotations

import abc
import math
import resource

import numpy as np

from cluster.messages import EngineSampleReq, LoraSpec, SampleResult
from cluster.sample_options import check_sample_options

# what an engine can give back while colocated training runs: its KV cache (and CUDA
# graphs, which live with it), and its base weights
KV_CACHE = "kv_cache"
WEIGHTS = "weights"
RESIDENCY_TAGS = (KV_CACHE, WEIGHTS)


class UnknownAdapterError(KeyError):
    """Sampling an adapter this engine does not hold (never loaded, unloaded or evicted)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterSlotsBusy(RuntimeError):
    """Every adapter slot is pinned by requests in flight; retry the load once one finishes."""


class EngineBusy(RuntimeError):
    """Memory cannot be released while requests are queued or running (the controller drains first)."""


class EngineBackend(abc.ABC):
    @abc.abstractmethod
    def info(self) -> dict:
        """What the controller and the trainer need to know: vocab_size, max_lora_rank, eos_token_ids, …"""

    # -- sampling ------------------------------------------------------------------------

    @abc.abstractmethod
    def submit(self, req: EngineSampleReq) -> int:
        """Queue a request; return its ticket, which `step` reports when it is done."""

    @abc.abstractmethod
    def has_work(self) -> bool: ...

    @abc.abstractmethod
    def step(self) -> list[tuple[int, SampleResult | Exception]]:
        """Advance the work in flight by one quantum; return (ticket, result or error) of the requests it finished."""

    @abc.abstractmethod
    def abort(self, ticket: int) -> bool:
        """Drop one queued or running request; False if it is not here (finished already)."""

    @abc.abstractmethod
    def abort_all(self) -> list[int]:
        """Drop every queued and running request; return their tickets."""

    def generate(self, requests: list[EngineSampleReq]) -> list[SampleResult]:
        """Run `requests` to completion, batched together; results in request order.

        For exclusive use of the backend (tests, benchmarks): the engine process
        interleaves `submit` and `step` with its sockets instead.
        """
        tickets: list[int] = []
        results: dict[int, SampleResult] = {}
        try:
            tickets += [self.submit(r) for r in requests]
            while len(results) < len(tickets):
                results.update(self.step())
        except BaseException:
            self.abort_all()
            raise
        failed = next((r for r in results.values() if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        return [results[t] for t in tickets]

    def close(self) -> None:
        """Stop whatever the backend started (child processes); the engine process is about to exit."""

    # -- adapters ------------------------------------------------------------------------

    @abc.abstractmethod
    def load_adapter(self, adapter_id: str, spec: LoraSpec, tensors: dict) -> None:
        """Load an adapter from PEFT-named float arrays; ValueError for a bad one (nothing changes then)."""

    @abc.abstractmethod
    def load_adapter_from_disk(self, adapter_id: str, path: str) -> None:
        """Load a PEFT directory (adapter_model.safetensors + adapter_config.json)."""

    @abc.abstractmethod
    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; unknown ids are fine. Requests already accepted for it still finish."""

    @abc.abstractmethod
    def loaded_adapters(self) -> list[str]: ...

    # -- residency -----------------------------------------------------------------------

    @abc.abstractmethod
    def release_memory(self, tags: list[str]) -> None:
        """Give back the memory `tags` name (RESIDENCY_TAGS); raises EngineBusy while it has work."""

    @abc.abstractmethod
    def resume_memory(self, tags: list[str]) -> None:
        """Take back what release_memory gave up; sampling works again once every tag is resumed."""

    def memory_stats(self) -> dict[str, float]:
        """What this process holds now: resident set size, and device memory where there is a device."""
        return {"rss_bytes": float(current_rss_bytes())}


def current_rss_bytes() -> int:
    """The resident set size of this process now (not the peak that getrusage reports)."""
    return process_rss_bytes("self")


def process_rss_bytes(pid: int | str) -> int:
    """The resident set size of process `pid` now; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def check_sample_request(req: EngineSampleReq, vocab_size: int, max_context: int) -> None:
    """The engine's own check of a sample request (the API checked it first): ValueError names the field."""
    tokens, p = np.asarray(req.prompt_tokens), req.params
    if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError("prompt_tokens must be a non-empty 1-D array of token ids")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"prompt has token ids outside [0, {vocab_size})")
    if req.num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {req.num_samples}")
    if p.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {p.max_tokens}")
    if len(tokens) + p.max_tokens > max_context:
        raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                         f"model's context window of {max_context}")
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < -1:
        raise ValueError(f"top_k must be -1 (off), 0 (off) or positive, got {p.top_k}")
    if not 0 <= req.topk_prompt_logprobs <= vocab_size:
        raise ValueError(f"topk_prompt_logprobs must be in [0, {vocab_size}], got {req.topk_prompt_logprobs}")
    check_sample_options(req, vocab_size)


def check_residency_tags(tags: list[str]) -> list[str]:
    unknown = [t for t in tags if t not in RESIDENCY_TAGS]
    if unknown or not tags:
        raise ValueError(f"memory tags must be a non-empty subset of {list(RESIDENCY_TAGS)}, got {tags}")
    return list(tags)
