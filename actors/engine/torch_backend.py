"""The torch engine backend: a transformers model, LoRA slots, batched generation.

It implements the engine backend interface (actors/engine/interface.py); its adapter
bookkeeping (which adapter is in which LoRA slot, LRU eviction) is
actors/engine/adapter_table.py.

Generation is continuous batching over one left-padded KV cache (actors/engine/kv_batch.py):
every sequence in flight (requests × samples, any adapters, any prompt lengths) shares
one forward per step, each row with its own LoRA slot (`LoraSlots.use(slots)`). A step
first admits queued requests while there is room (`max_batch_sequences`): their prompts
are prefilled together once per request, the cache rows are replicated per sample, and
the new rows join the running batch; then every running row decodes one token.
Finished rows leave the batch at once.

Numerics: logprobs are the raw model's (temperature 1, unfiltered), log_softmax in
float32 — the same function as the trainer's forward (actors/engine/sampling.py).
What a request asks about its prompt is computed from the same prefill, in
actors/engine/prompt_scores.py; the prefill keeps only the last position's logits
unless some request of the batch reads more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from actors.engine.adapter_table import AdapterTable
from actors.engine.interface import (
    KV_CACHE, WEIGHTS, EngineBackend, EngineBusy, check_residency_tags, check_sample_request,
)
from actors.engine.kv_batch import KvBatch, left_padded
from actors.engine.prompt_scores import prompt_logits_needed, record_prompt_scores, scores_prompt
from actors.engine.sampling import StopCondition, choose_tokens, raw_logprobs, sample_generator
from actors.lora import LoraSlots
from actors.model_loading import load_causal_lm, load_tokenizer, start_up_threads
from actors.peft import check_tensors, expected_lora_shapes, read_peft_adapter
from cluster.config import ClusterConfig
from cluster.messages import EngineSampleReq, LoraSpec, SampledSequence, SampleResult

log = logging.getLogger(__name__)

# Padded prompt tokens per prefill forward: bounds the activations (and the
# [rows, width, vocab] logits when a request scores its prompt) of one admission.
PREFILL_TOKEN_BUDGET = 8192


@dataclass
class _Request:
    ticket: int
    spec: EngineSampleReq
    slot: int
    prompt: torch.Tensor  # long [n] on the model's device
    stop: StopCondition
    sequences: list[SampledSequence | None]
    result: SampleResult = field(default_factory=SampleResult)
    admitted: int = 0  # samples that have entered the batch
    finished: int = 0

    @property
    def waiting_samples(self) -> int:
        return self.spec.num_samples - self.admitted

    @property
    def wants_prompt_logits(self) -> bool:
        return scores_prompt(self.spec)


@dataclass
class _Row:
    """One sequence (one sample of one request) in the running batch."""

    request: _Request
    sample_index: int
    generator: torch.Generator | None  # None for greedy rows
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_token_ids: list[np.ndarray] = field(default_factory=list)  # per token, when topk_sample_logprobs > 0
    topk_logprobs: list[np.ndarray] = field(default_factory=list)


class TorchEngineBackend(EngineBackend):
    def __init__(self, config: ClusterConfig):
        engine = config.engine
        self.model_path, self.dtype = config.model.path, engine.dtype
        if engine.max_batch_sequences < 1:
            raise ValueError("engine.max_batch_sequences must be at least 1")
        with start_up_threads():
            self.model = load_causal_lm(config.model.path, engine.dtype, engine.device)
            self.device = next(self.model.parameters()).device
            self.tokenizer = load_tokenizer(config.model.tokenizer_dir or config.model.path)
            self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])  # before slots wrap lm_head
            self.max_context = config.model.max_context or int(self.model.config.max_position_embeddings)
            self.max_batch_sequences = engine.max_batch_sequences
            self.slots = LoraSlots(self.model, engine.max_adapters + 1, engine.max_lora_rank)
        for p in self.slots.parameters():
            p.requires_grad_(False)  # the engine never trains
        self.adapters = AdapterTable(self.slots.num_slots)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self._active: dict[int, _Request] = {}  # ticket -> every accepted, undelivered request
        self._queue: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._batch: KvBatch | None = None
        self._tickets = itertools.count(1)
        self._released: set[str] = set()  # residency tags given back (release_memory)

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_slots": self.slots.num_slots,
                "max_lora_rank": self.slots.max_rank, "max_batch_sequences": self.max_batch_sequences,
                "eos_token_ids": sorted(self.eos_token_ids)}

    # -- adapters ------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, spec: LoraSpec, tensors: dict) -> None:
        """Load (or replace) an adapter given in PEFT layout; may evict the LRU idle adapter.

        Raises ValueError for a bad spec or tensors (nothing changes then), and
        AdapterSlotsBusy when every slot is pinned by requests in flight.
        """
        checked = self._checked_tensors(spec, tensors)
        slot = self.adapters.choose_slot(adapter_id)
        try:
            self.slots.load_slot(slot, spec, checked)
        except Exception:
            self.adapters.discard_slot(slot)
            self.slots.clear_slot(slot)
            raise
        for freed in self.adapters.assign(adapter_id, slot):
            self.slots.clear_slot(freed)
        log.info("adapter %s loaded in slot %d (rank %d)", adapter_id, slot, spec.rank)

    def load_adapter_from_disk(self, adapter_id: str, path: str) -> None:
        """Load a PEFT directory (adapter_model.safetensors + adapter_config.json)."""
        try:
            spec, tensors = read_peft_adapter(path)
        except FileNotFoundError as exc:
            raise ValueError(f"no PEFT adapter at {path!r}: {exc}") from exc
        self.load_adapter(adapter_id, spec, tensors)

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter (unknown ids are fine: unloading is idempotent).

        Requests already accepted for it still finish; its slot is freed after them.
        """
        for freed in self.adapters.remove(adapter_id):
            self.slots.clear_slot(freed)

    def loaded_adapters(self) -> list[str]:
        return self.adapters.loaded()

    # -- residency (colocated training) ----------------------------------------------------

    def release_memory(self, tags: list[str]) -> None:
        """Give back the KV cache and/or the base weights; only while idle (EngineBusy otherwise).

        The LoRA slot tensors stay, so adapters may be loaded (and unloaded) while released. KV_CACHE: the
        cache lives in the running batch, which an idle engine does not have; what is released is the memory
        the allocator kept (CUDA: empty_cache; CPU: glibc's malloc_trim). WEIGHTS on CUDA: the base weights
        move to (pinned) host memory; on CPU they are not backed up anywhere, so they are freed, and
        resume_memory reloads them from the model's files. Releasing what is released already is a no-op.
        """
        tags = check_residency_tags(tags)
        if self.has_work():
            raise EngineBusy(f"cannot release {tags} with {len(self._active)} requests in flight")
        if KV_CACHE in tags:
            self._rows, self._batch = [], None
        if WEIGHTS in tags and WEIGHTS not in self._released:
            self._release_weights()
        self._released.update(tags)
        _return_memory(self.device)
        log.info("released %s: %s", tags, self.memory_stats())

    def resume_memory(self, tags: list[str]) -> None:
        """Take back what release_memory gave up; resuming what is not released is a no-op."""
        tags = check_residency_tags(tags)
        if WEIGHTS in tags and WEIGHTS in self._released:
            self._resume_weights()
        self._released.difference_update(tags)
        log.info("resumed %s: %s", tags, self.memory_stats())

    def memory_stats(self) -> dict[str, float]:
        stats = super().memory_stats()
        if self.device.type == "cuda":
            stats["cuda_allocated_bytes"] = float(torch.cuda.memory_allocated(self.device))
            stats["cuda_reserved_bytes"] = float(torch.cuda.memory_reserved(self.device))
        return stats

    def _base_params(self) -> dict[str, torch.nn.Parameter]:
        """The model's own parameters by HF name (not the LoRA slots'), one entry per tensor (tied ones once)."""
        slot_ids = {id(p) for p in self.slots.parameters()}
        unwrap = [(f"{path}.base.", f"{path}.") for path in self.slots.modules]
        out = {}
        for name, param in self.model.named_parameters():
            if id(param) in slot_ids:
                continue
            for wrapped, plain in unwrap:
                if name.startswith(wrapped):
                    name = plain + name[len(wrapped):]
                    break
            out[name] = param
        return out

    @torch.no_grad()
    def _release_weights(self) -> None:
        for param in self._base_params().values():
            if self.device.type == "cuda":
                param.data = param.data.to("cpu").pin_memory()
            else:  # not backed up: freed, reloaded from the model's files on resume
                param.data = torch.empty(0, dtype=param.dtype)

    @torch.no_grad()
    def _resume_weights(self) -> None:
        params = self._base_params()
        if self.device.type == "cuda":
            for param in params.values():
                param.data = param.data.to(self.device)
            return
        fresh = dict(load_causal_lm(self.model_path, self.dtype, "cpu").named_parameters())
        missing = sorted(set(params) - set(fresh))
        if missing:
            raise RuntimeError(f"reloading the weights from {self.model_path}: no {missing[:3]}")
        for name, param in params.items():
            # copied out of the loaded model, whose tensors may map the safetensors files lazily: resident now,
            # not at the first sample
            param.data = fresh.pop(name).data.clone()
        del fresh
        gc.collect()
        _return_memory(self.device)  # the loaded copy's heap pages, which glibc would otherwise keep

    def _checked_tensors(self, spec: LoraSpec, tensors: dict) -> dict[str, torch.Tensor]:
        """Validate spec, names, shapes and values before any slot is touched."""
        self.slots.validate(spec)
        expected = expected_lora_shapes(spec, self.slots.module_shapes())
        check_tensors("adapter", tensors, expected)
        # np.array copies: wire arrays are read-only views of ZMQ frames
        return {name: torch.from_numpy(np.array(tensors[name], dtype=np.float32)) for name in expected}

    # -- generation ----------------------------------------------------------------------

    def submit(self, req: EngineSampleReq) -> int:
        """Queue a request; return its ticket, which `step` reports when it is done.

        Raises ValueError for an invalid request, UnknownAdapterError for an adapter
        this engine does not hold, EngineBusy while memory is released.
        """
        if self._released:
            raise EngineBusy(f"the engine's {sorted(self._released)} is released for training; resume it first")
        request = self._prepare(req)
        self._enqueue(request)
        return request.ticket

    def has_work(self) -> bool:
        return bool(self._active)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, SampleResult]]:
        """Admit what fits, decode one token for every running row; return finished requests."""
        finished: list[tuple[int, SampleResult]] = []
        self._admit(finished)
        if self._rows:
            self._decode(finished)
        # only now, so that after a failed step abort_all still finds (and unpins) them
        for ticket, _ in finished:
            self._release(self._active.pop(ticket))
        return finished

    def abort_all(self) -> list[int]:
        """Drop every queued and running request (after a failed step); return their tickets."""
        requests, self._active = self._active, {}
        self._queue.clear()
        self._rows, self._batch = [], None
        for request in requests.values():
            self._release(request)
        return sorted(requests)

    def abort(self, ticket: int) -> bool:
        """Drop one queued or running request (a cancelled sample); False if it is not here."""
        request = self._active.pop(ticket, None)
        if request is None:
            return False
        self._queue = deque(r for r in self._queue if r is not request)
        keep = [i for i, row in enumerate(self._rows) if row.request is not request]
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._batch = self._batch.select(torch.tensor(keep, device=self.device)) if keep else None
        self._release(request)
        return True

    def _prepare(self, req: EngineSampleReq) -> _Request:
        self._validate(req)
        slot = self.adapters.slot_for(req.adapter_id)
        prompt = torch.as_tensor(np.array(req.prompt_tokens, dtype=np.int64), device=self.device)
        return _Request(ticket=next(self._tickets), spec=req, slot=slot, prompt=prompt,
                        stop=StopCondition(req.params, self.eos_token_ids, self.tokenizer),
                        sequences=[None] * req.num_samples)

    def _enqueue(self, request: _Request) -> None:
        self.adapters.pin(request.slot)
        self._active[request.ticket] = request
        self._queue.append(request)

    def _release(self, request: _Request) -> None:
        freed = self.adapters.unpin(request.slot)
        if freed is not None:
            self.slots.clear_slot(freed)

    def _validate(self, req: EngineSampleReq) -> None:
        check_sample_request(req, self.vocab_size, self.max_context)

    # -- the batch -----------------------------------------------------------------------

    def _admit(self, finished: list) -> None:
        """Move queued samples into the batch while there is room, one prefill forward."""
        room = self.max_batch_sequences - len(self._rows)
        chunks: list[tuple[_Request, range]] = []
        width = 0
        while self._queue and room > 0:
            request = self._queue[0]
            width = max(width, len(request.prompt))
            if chunks and (len(chunks) + 1) * width > PREFILL_TOKEN_BUDGET:
                break
            count = min(request.waiting_samples, room)
            chunks.append((request, range(request.admitted, request.admitted + count)))
            request.admitted += count
            room -= count
            if request.waiting_samples:
                break  # the rest of its samples wait for rows to free up
            self._queue.popleft()
        if chunks:
            self._prefill(chunks, finished)

    def _prefill(self, chunks: list[tuple[_Request, range]], finished: list) -> None:
        """Prefill each chunk's prompt once, take every sample's first token, join the batch."""
        requests = [request for request, _ in chunks]
        input_ids, attention_mask, position_ids = left_padded([r.prompt for r in requests])
        slots = torch.tensor([r.slot for r in requests], device=self.device)
        scoring = [i for i, (r, samples) in enumerate(chunks) if samples.start == 0 and r.wants_prompt_logits]
        # left-padded, so the last m columns hold every row's last m positions
        keep = max((prompt_logits_needed(requests[i].spec) for i in scoring), default=1)
        cache = DynamicCache()
        with self.slots.use(slots):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, past_key_values=cache, use_cache=True,
                                logits_to_keep=keep).logits
        for i in scoring:
            record_prompt_scores(requests[i].spec, requests[i].prompt, logits[i], requests[i].result)
        counts = torch.tensor([len(samples) for _, samples in chunks], device=self.device)
        per_sample = torch.repeat_interleave(torch.arange(len(chunks), device=self.device), counts)
        rows = [_Row(request, i, _generator_for(request, i)) for request, samples in chunks for i in samples]
        tokens, keep = self._extend(rows, logits[:, -1].index_select(0, per_sample), finished)
        if not keep:
            return
        prompts = KvBatch(cache=cache, attention_mask=attention_mask,
                          positions=torch.tensor([len(r.prompt) for r in requests], device=self.device),
                          pending=torch.zeros(len(requests), dtype=torch.long, device=self.device), slots=slots)
        keep_index = torch.tensor(keep, device=self.device)
        joining = prompts.select(per_sample.index_select(0, keep_index))
        joining.pending = tokens.index_select(0, keep_index)
        self._rows += [rows[i] for i in keep]
        self._batch = joining if self._batch is None else KvBatch.concat(self._batch, joining)

    def _decode(self, finished: list) -> None:
        with self.slots.use(self._batch.slots):
            logits = self.model(**self._batch.advance()).logits[:, -1]
        tokens, keep = self._extend(self._rows, logits, finished)
        self._batch.pending = tokens
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._batch = self._batch.select(torch.tensor(keep, device=self.device)) if keep else None

    def _extend(self, rows: list[_Row], logits: torch.Tensor, finished: list) -> tuple[torch.Tensor, list[int]]:
        """Choose each row's next token; return the tokens and the indices of rows still running."""
        tokens = choose_tokens(logits, [r.request.spec.params for r in rows], [r.generator for r in rows])
        all_logprobs = raw_logprobs(logits)
        _record_sampled_topk(rows, all_logprobs)
        logprobs = all_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        keep = []
        for i, (row, token, logprob) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist())):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            reason = row.request.stop.reason(row.tokens)
            if reason is None:
                keep.append(i)
            else:
                self._finish(row, reason, finished)
        return tokens, keep

    def _finish(self, row: _Row, reason: str, finished: list) -> None:
        request = row.request
        sequence = SampledSequence(tokens=np.array(row.tokens, dtype=np.int32),
                                   logprobs=np.array(row.logprobs, dtype=np.float32), stop_reason=reason)
        if row.topk_token_ids:
            sequence.topk_token_ids = np.stack(row.topk_token_ids).astype(np.int32)
            sequence.topk_logprobs = np.stack(row.topk_logprobs)
        request.sequences[row.sample_index] = sequence
        request.finished += 1
        if request.finished == request.spec.num_samples:
            request.result.sequences = list(request.sequences)
            finished.append((request.ticket, request.result))


def _return_memory(device: torch.device) -> None:
    """Hand memory the allocators keep for reuse back to the device / the OS."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        log.info("no glibc malloc_trim: released CPU memory stays with the allocator")
        return None


_LIBC = _load_libc()


def _generator_for(request: _Request, sample_index: int) -> torch.Generator | None:
    if request.spec.params.temperature == 0:
        return None
    return sample_generator(request.spec.params.seed, sample_index)


def _record_sampled_topk(rows: list[_Row], logprobs: torch.Tensor) -> None:
    """Append the top-k raw logprobs of this step's distribution to the rows that ask for them."""
    wanting = [i for i, row in enumerate(rows) if row.request.spec.topk_sample_logprobs > 0]
    if not wanting:
        return
    width = max(rows[i].request.spec.topk_sample_logprobs for i in wanting)
    top = logprobs.index_select(0, torch.tensor(wanting, device=logprobs.device)).topk(width, dim=-1)
    ids, values = top.indices.cpu().numpy(), top.values.cpu().numpy()
    for j, i in enumerate(wanting):  # a top-width list is sorted: each row keeps its own first k
        k = rows[i].request.spec.topk_sample_logprobs
        rows[i].topk_token_ids.append(ids[j, :k])
        rows[i].topk_logprobs.append(values[j, :k])


def _eos_token_ids(model, tokenizer) -> set[int]:
    """Every id the model or tokenizer calls EOS (chat models often list several)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids
