"""The torch engine backend: a transformers model, LoRA slots, batched generation.

It implements the engine backend interface (actors/engine/interface.py); its adapter
bookkeeping (which adapter is in which LoRA slot, LRU eviction) is
actors/engine/adapter_table.py.

Generation is continuous batching over one preallocated batch cache (actors/engine/kv_batch.py):
every sequence in flight (requests × samples, any adapters, any prompt lengths) shares
one forward per step, each row with its own LoRA slot (`LoraSlots.use(slots)`). A step
first admits queued requests while there is room (`max_batch_sequences`), then every
running row decodes one token (actors/engine/decoder.py: the model's own modules over
the batch cache, without the transformers forward around them). Finished rows leave the
batch at once; an engine with no work left drops the batch cache.

Admission, per request: its prompt is prefilled once, whatever its num_samples, and the
prompt's keys and values are copied into one batch row per sample (forks of one prefill;
each sample then draws from its own seeded generator). The exact prefix cache
(actors/engine/prefix_cache.py) is asked first, under (adapter id, adapter version, token ids):
- a hit, for a request that reads no prompt logits, runs no forward at all: the entry's
  keys and values join the batch and its cached last-position logits pick the first tokens;
- a hit, for a request that scores its prompt (`prompt_logprobs`, `prompt_logprobs_last_n`,
  target ids, ...), prefills only the last `prompt_logits_needed` positions, on top of the
  entry's keys and values of the positions before them: exactly the logits it reads;
- a miss prefills the whole prompt, and the result becomes an entry (unless the request's
  adapter was reloaded meanwhile: then the prefill belongs to weights no longer loaded).
All of an admission's prefills share one forward (actors/engine/prefill.py), one row per
distinct prompt; requests for the same prompt in one admission share its row.

Numerics: logprobs are the raw model's (temperature 1, unfiltered), log_softmax in
float32 — the same function as the trainer's forward (actors/engine/sampling.py).
What a request asks about its prompt is computed from the same prefill, in
actors/engine/prompt_scores.py; the prefill keeps only the last position's logits
unless some request of the batch reads more. With the prefix cache, results equal those
without it up to float32 rounding (tests/unit/test_engine_batching.py).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.engine.adapter_table import AdapterTable
from actors.engine.allocator import return_memory
from actors.engine.decoder import Decoder
from actors.engine.interface import (
    KV_CACHE, WEIGHTS, EngineBackend, EngineBusy, check_residency_tags, check_sample_request,
)
from actors.engine.kv_batch import KvBatch
from actors.engine.prefill import PromptBatch, PromptRow, cache_kwarg, prompt_forward
from actors.engine.prefix_cache import CachedPrompt, Key, PrefixCache
from actors.engine.prompt_scores import prompt_logits_needed, record_prompt_scores, scores_prompt
from actors.engine.sampling import StopCondition, choose_tokens, raw_logprobs, sample_generator
from actors.lora import LoraSlots
from actors.model_loading import compute_threads, load_causal_lm, load_tokenizer, start_up_threads
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
    cache_key: Key
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
class _Plan:
    """How one admitted chunk of a request gets its prompt's keys, values and logits."""

    request: _Request
    samples: range
    needed: int  # trailing prompt positions whose logits it reads (1: only the last, for the first token)
    entry: CachedPrompt | None = None
    past: int = 0  # leading prompt tokens whose keys/values come from `entry`; a prefill computes the rest
    logits: torch.Tensor | None = None  # [>= needed, V]: its last rows are the prompt's last positions
    row: int | None = None  # its row in the prompt forward; None when the cache serves it whole
    duplicate: bool = False  # it shares the row of the same prompt earlier in this admission


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
        self.cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else None
        self.adapters = AdapterTable(self.slots.num_slots)
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self._active: dict[int, _Request] = {}  # ticket -> every accepted, undelivered request
        self._queue: deque[_Request] = deque()
        self.decoder = Decoder(self.model, self.slots)  # refuses a model type it cannot decode
        self._dtype = next(self.model.parameters()).dtype
        self._cache_arg = cache_kwarg(self.model)
        self._rows: list[_Row] = []
        self._batch: KvBatch | None = None
        self._tickets = itertools.count(1)
        self._released: set[str] = set()  # residency tags given back (release_memory)
        self.prefix_cache = PrefixCache(engine.prefix_cache_bytes)
        self._versions: dict[str, int] = {}  # adapter id -> the version its prefix-cache entries carry
        self._version_numbers = itertools.count(1)
        self.prefill_tokens = 0  # prompt tokens run through a prefill forward
        self.prefill_forwards = 0
        self.decode_steps = 0

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
        self._forget_version(adapter_id)  # whatever happens next, the old weights' cache entries are stale
        try:
            self.slots.load_slot(slot, spec, checked)
        except Exception:
            self.adapters.discard_slot(slot)
            self.slots.clear_slot(slot)
            raise
        for freed in self.adapters.assign(adapter_id, slot):
            self.slots.clear_slot(freed)
        self._versions[adapter_id] = next(self._version_numbers)
        for evicted in set(self._versions) - set(self.adapters.loaded()):
            self._forget_version(evicted)
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
        self._forget_version(adapter_id)

    def _forget_version(self, adapter_id: str) -> None:
        """Requests queued for it keep the version they were submitted with; new entries need the current one."""
        self._versions.pop(adapter_id, None)
        self.prefix_cache.drop_adapter(adapter_id)

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
        # the prefix cache is KV memory too; and weights reloaded from disk are not proven identical to these
        self.prefix_cache.clear()
        if WEIGHTS in tags and WEIGHTS not in self._released:
            self._release_weights()
        self._released.update(tags)
        return_memory(self.device)
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
        batch = self._batch  # the heartbeat thread asks while the main loop may drop the batch
        stats["kv_cache_bytes"] = float(batch.nbytes()) if batch is not None else 0.0
        stats.update(self.prefix_cache.stats())
        stats["prefill_tokens"] = float(self.prefill_tokens)
        stats["prefill_forwards"] = float(self.prefill_forwards)
        stats["decode_steps"] = float(self.decode_steps)
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
        return_memory(self.device)  # the loaded copy's heap pages, which glibc would otherwise keep

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
        if not self._active:
            self._batch = None  # an idle engine holds no batch cache
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
            self._keep_rows(keep)
        self._release(request)
        if not self._active:
            self._batch = None
        return True

    def _prepare(self, req: EngineSampleReq) -> _Request:
        self._validate(req)
        slot = self.adapters.slot_for(req.adapter_id)
        tokens = np.array(req.prompt_tokens, dtype=np.int64)
        prompt = torch.as_tensor(tokens, device=self.device)
        version = 0 if req.adapter_id is None else self._versions[req.adapter_id]
        return _Request(ticket=next(self._tickets), spec=req, slot=slot, prompt=prompt,
                        stop=StopCondition(req.params, self.eos_token_ids, self.tokenizer),
                        sequences=[None] * req.num_samples, cache_key=(req.adapter_id, version, tuple(tokens.tolist())))

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
        """Prefill each chunk's prompt once (or take it from the prefix cache), take every sample's first
        token, and let the samples that go on join the batch, each prompt's cache replicated per sample."""
        plans = [self._plan(request, samples) for request, samples in chunks]
        prompts = self._prompt_forward(plans)
        for plan in plans:
            if plan.request.wants_prompt_logits and plan.samples.start == 0:
                record_prompt_scores(plan.request.spec, plan.request.prompt, plan.logits, plan.request.result)
        samples = [(plan, i) for plan in plans for i in plan.samples]
        new_rows = [_Row(plan.request, i, _generator_for(plan.request, i)) for plan, i in samples]
        tokens, going_on = self._extend(new_rows, torch.stack([plan.logits[-1] for plan, _ in samples]), finished)
        if going_on:
            self._join_admitted([samples[j][0] for j in going_on], [new_rows[j] for j in going_on], tokens[going_on],
                                prompts)

    def _prompt_forward(self, plans: list[_Plan]) -> PromptBatch | None:
        """One forward for every prompt the cache does not serve whole (None if it serves them all)."""
        rows = _forward_rows(plans)
        if not rows:
            return None
        keep = max(p.needed for p in plans if p.row is not None)
        new_tokens = sum(len(r.tokens) - r.past for r in rows)
        with compute_threads(new_tokens, self.cpu_threads):
            prompts = prompt_forward(self.model, self.slots, rows, keep, self._cache_arg)
        self.prefill_tokens += new_tokens
        self.prefill_forwards += 1
        for plan in plans:
            if plan.row is not None:
                plan.logits = prompts.logits[plan.row]
                self._remember(plan, prompts)
        return prompts

    def _join_admitted(self, plans: list[_Plan], rows: list[_Row], tokens: torch.Tensor,
                       prompts: PromptBatch | None) -> None:
        """Rows (with the plan of their chunk each) join the batch: from the prompt forward, or from their
        cache entry; the batch grows once for all of them."""
        if self._batch is None:
            self._batch = self.decoder.new_batch(self._dtype, self.device, self.max_batch_sequences)
        widths = [prompts.real.shape[1] if p.row is not None else len(p.request.prompt) for p in plans]
        self._batch.reserve(len(self._rows) + len(rows), max(widths),
                            max(row.request.spec.params.max_tokens - 1 for row in rows))
        computed = [i for i, plan in enumerate(plans) if plan.row is not None]
        if computed:
            self._join(prompts.keys, prompts.values, prompts.real, [plans[i].row for i in computed],
                       [rows[i] for i in computed], tokens[computed])
        for plan in {id(p): p for p in plans if p.row is None}.values():
            served = [i for i, p in enumerate(plans) if p is plan]
            real = torch.ones(1, len(plan.request.prompt), dtype=torch.bool, device=self.device)
            self._join([k.unsqueeze(0) for k in plan.entry.keys], [v.unsqueeze(0) for v in plan.entry.values], real,
                       [0] * len(served), [rows[i] for i in served], tokens[served])

    def _plan(self, request: _Request, samples: range) -> _Plan:
        """How one chunk's prompt gets its keys, values and logits: from the cache, a shorter prefill, or a
        whole one."""
        scores = samples.start == 0 and request.wants_prompt_logits
        needed = prompt_logits_needed(request.spec) if scores else 1
        entry = self.prefix_cache.lookup(request.cache_key) if self.prefix_cache.enabled else None
        if entry is not None and needed == 1:
            self.prefix_cache.count(hit=True, reused_tokens=len(request.prompt))
            return _Plan(request, samples, needed, entry=entry, logits=entry.last_logits.unsqueeze(0))
        # a prompt scored from its cached keys and values still needs its last `needed` positions' logits
        past = len(request.prompt) - needed if entry is not None else 0
        if self.prefix_cache.enabled:
            self.prefix_cache.count(hit=past > 0, reused_tokens=past)
        return _Plan(request, samples, needed, entry=entry, past=past)

    def _remember(self, plan: _Plan, prompts) -> None:
        """Put a freshly prefilled prompt into the prefix cache, unless its adapter has been reloaded since."""
        request = plan.request
        if plan.past or not self.prefix_cache.enabled or plan.duplicate:
            return
        adapter_id, version, _ = request.cache_key
        if adapter_id is not None and self._versions.get(adapter_id) != version:
            return
        n = len(request.prompt)
        self.prefix_cache.insert(request.cache_key, [k[plan.row, :, -n:] for k in prompts.keys],
                                 [v[plan.row, :, -n:] for v in prompts.values], plan.logits[-1])

    def _join(self, keys: list[torch.Tensor], values: list[torch.Tensor], real: torch.Tensor, source: list[int],
              rows: list[_Row], tokens: torch.Tensor) -> None:
        room = max(row.request.spec.params.max_tokens - len(row.tokens) for row in rows)
        self._batch.join(keys, values, real, source, positions=[len(row.request.prompt) for row in rows],
                         pending=tokens, slots=[row.request.slot for row in rows], room=room)
        self._rows += rows

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._batch = [], None
            return
        order = self._batch.keep(keep)
        self._rows = [self._rows[i] for i in order]

    def _decode(self, finished: list) -> None:
        with compute_threads(len(self._rows), self.cpu_threads):
            logits = self.decoder.step(self._batch)
            self.decode_steps += 1
            tokens, keep = self._extend(self._rows, logits, finished)
        self._batch.pending[:len(tokens)] = tokens
        if len(keep) < len(self._rows):
            self._keep_rows(keep)

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


def _forward_rows(plans: list[_Plan]) -> list[PromptRow]:
    """The rows of the prompt forward: one per distinct (prompt, cached part) the cache does not serve whole."""
    rows: list[PromptRow] = []
    seen: dict[tuple[Key, int], int] = {}
    for plan in plans:
        if plan.logits is not None:
            continue
        key = (plan.request.cache_key, plan.past)
        if key in seen:
            plan.row, plan.duplicate = seen[key], True
            continue
        plan.row = seen[key] = len(rows)
        entry = plan.entry
        rows.append(PromptRow(tokens=plan.request.prompt, slot=plan.request.slot, past=plan.past,
                              past_keys=entry and entry.keys, past_values=entry and entry.values))
    return rows


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
