"""The SGLang engine backend: one in-process `sglang.Engine` per engine process.

Why in-process (`sglang.Engine`) and not `sglang.launch_server` as a child: token ids go
in and come out as Python lists with no HTTP/JSON hop, adapters pushed by the trainer
are handed over as tensors (`load_lora_adapter_from_tensors`), and there is one process
for the launcher to supervise: SGLang's scheduler runs in a child of this process and,
if it dies, SIGKILLs this process, which the launcher then restarts like any dead engine.

The engine runs its own scheduler (continuous batching, radix prefix cache, LoRA batches
of up to `max_loras_per_batch` adapters). The engine process drives it from its one
thread: `submit` starts an `async_generate` task on SGLang's own event loop, and `step`
runs that loop for at most STEP_QUANTUM_S, or until a request finishes, between the
engine process's socket polls.

Adapters: the bookkeeping is the torch engine's AdapterTable (actors/engine/adapter_table.py),
slot numbers standing for SGLang adapter names `<slot>:<adapter_id>`, so that an adapter
reloaded while requests still use its previous version keeps both until they finish, and
the least recently used idle adapter is unloaded when the table is full.

Runs from SGLang's own virtualenv (launch/sglang_env.py). On CPU the engine process sets
SGLANG_USE_CPU_ENGINE=1 and installs the shims of actors/engine/sglang/cpu_shims.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.engine.adapter_table import AdapterTable
from actors.engine.interface import (
    KV_CACHE, WEIGHTS, EngineBackend, EngineBusy, check_sample_request, current_rss_bytes, process_rss_bytes,
)
from actors.engine.sglang import cpu_shims
from actors.engine.sglang.requests import check_supported, generate_kwargs, sample_result, unsupported_options
from actors.peft import (
    ADAPTER_CONFIG_FILE, adapter_config, check_tensors, expected_lora_shapes, hf_lora_module_shapes,
    read_peft_adapter, target_module_names, write_peft_adapter,
)
from actors.lora import BASE_SLOT
from cluster.config import ClusterConfig
from cluster.messages import EngineSampleReq, LoraSpec, SampleResult

log = logging.getLogger(__name__)

IDLE_WAIT_S = 30.0  # how long a release waits for SGLang's scheduler to let go of aborted requests
STEP_QUANTUM_S = 0.005  # the longest one step runs SGLang's loop before the engine process polls its sockets
CHILD_POLL_S = 0.5  # how often the engine checks that SGLang's scheduler and detokenizer still run
SPOOL_DIR = "/dev/shm"  # tmpfs: where pushed adapters become PEFT files for SGLang to read
# what each of tinkerd's residency tags releases in SGLang (CUDA graphs live with the KV cache)
SGLANG_MEMORY_TAGS = {KV_CACHE: ["kv_cache", "cuda_graph"], WEIGHTS: ["weights"]}


@dataclass
class _Request:
    spec: EngineSampleReq
    slot: int
    rids: list[str]
    task: asyncio.Task


def server_args(config: ClusterConfig) -> dict:
    """The sglang.Engine arguments for this cluster's engine (CPU: the pure-torch paths)."""
    engine = config.engine
    cpu = engine.device == "cpu"
    args = dict(
        model_path=config.model.path, tokenizer_path=config.model.tokenizer_dir or config.model.path,
        device=engine.device, dtype=engine.dtype, max_total_tokens=engine.max_total_tokens,
        max_running_requests=engine.max_batch_sequences, context_length=config.model.max_context or None,
        enable_lora=True, max_lora_rank=engine.max_lora_rank, max_loras_per_batch=engine.max_loras_per_batch,
        lora_target_modules=["all"],  # a list: the string "all" would be split into letters
        # the overlap scheduler makes release_memory_occupation right after a generate fail now and then
        disable_overlap_schedule=True, log_level="warning", random_seed=0,
    )
    if cpu:
        args.update(attention_backend="torch_native", lora_backend="torch_native", disable_cuda_graph=True)
    else:  # seeded samples reproduce; released weights are backed up on the host, so they can come back
        args.update(enable_deterministic_inference=True, enable_memory_saver=True, enable_weights_cpu_backup=True)
    return args


class ChildrenWatch:
    """Ends this process the moment one of SGLang's processes (scheduler, detokenizer) is gone.

    SGLang notices a dead child itself, but acts on it in a SIGQUIT handler on its asyncio loop, which this
    process runs only in `step`; and that handler waits up to a minute for the children to be reaped. Until
    then the engine would keep heartbeating with no scheduler, its samples waiting forever. A thread here
    polls the children and SIGKILLs the rest and then this process, so the launcher restarts it at once."""

    def __init__(self, pids: list[int], interval_s: float = CHILD_POLL_S):
        import psutil  # SGLang's dependency: only its virtualenv runs this module

        if not pids:
            raise RuntimeError("SGLang reported no scheduler or detokenizer process to watch")
        self.children = {c: " ".join(c.cmdline()).strip() or c.name() for c in map(psutil.Process, pids)}
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, args=(interval_s,), daemon=True, name="sglang-children").start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self, interval_s: float) -> None:
        import psutil

        def gone(child) -> bool:
            try:
                return child.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        while not self._stopped.wait(interval_s):
            dead = [c for c in self.children if gone(c)]
            if dead and not self._stopped.is_set():
                log.error("SGLang's %s (pid %d) is gone; ending this engine process so the launcher restarts it",
                          self.children[dead[0]], dead[0].pid)
                for child in self.children:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)


def prepare_process(config: ClusterConfig) -> None:
    """What must hold before sglang is first imported in this process (and in those it spawns)."""
    os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"  # read at import: sampled logprobs at temperature 1
    if config.engine.device == "cpu":
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        os.environ[cpu_shims.SHIMS_ENV] = "1"  # for SGLang's spawned scheduler, which re-imports our main module
        cpu_shims.install()


class SglangEngineBackend(EngineBackend):
    def __init__(self, config: ClusterConfig):
        prepare_process(config)
        import sglang

        self.config = config
        self.seeds_reproduce = config.engine.device != "cpu"
        self.engine = sglang.Engine(**server_args(config))
        self._children_watch = ChildrenWatch(self.engine.get_all_child_pids())
        self.loop = self.engine.loop
        manager = self.engine.tokenizer_manager
        hf_config = manager.model_config.hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.max_context = int(manager.model_config.context_len)
        self.module_shapes = hf_lora_module_shapes(hf_config)
        self.eos_token_ids = _eos_token_ids(manager)
        self.adapters = AdapterTable(config.engine.max_adapters + 1)
        self.lora_names: dict[int, str] = {}  # slot -> the SGLang adapter name loaded there
        self._active: dict[int, _Request] = {}
        self._tickets = itertools.count(1)
        self._released: set[str] = set()

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_slots": self.adapters.num_slots,
                "max_lora_rank": self.config.engine.max_lora_rank,
                "max_batch_sequences": self.config.engine.max_batch_sequences,
                "max_loras_per_batch": self.config.engine.max_loras_per_batch,
                "eos_token_ids": sorted(self.eos_token_ids), "unsupported": unsupported_options(self.seeds_reproduce)}

    def close(self) -> None:
        self._children_watch.stop()  # shutdown ends SGLang's processes on purpose
        self.engine.shutdown()

    # -- sampling ------------------------------------------------------------------------

    def submit(self, req: EngineSampleReq) -> int:
        if self._released:
            raise EngineBusy(f"the engine has released its {sorted(self._released)} for training")
        self._validate(req)
        slot = self.adapters.slot_for(req.adapter_id)
        ticket = next(self._tickets)
        rids = [f"tinkerd-{ticket}-{i}" for i in range(req.num_samples)]
        kwargs = generate_kwargs(req, self.lora_names.get(slot), rids, self.seeds_reproduce)
        task = self.loop.create_task(self.engine.async_generate(**kwargs))
        self.adapters.pin(slot)
        self._active[ticket] = _Request(req, slot, rids, task)
        return ticket

    def has_work(self) -> bool:
        return bool(self._active)

    def step(self) -> list[tuple[int, SampleResult | Exception]]:
        pending = [r.task for r in self._active.values() if not r.task.done()]
        if pending:
            self.loop.run_until_complete(asyncio.wait(pending, timeout=STEP_QUANTUM_S,
                                                      return_when=asyncio.FIRST_COMPLETED))
        finished = []
        for ticket in [t for t, r in self._active.items() if r.task.done()]:
            request = self._active.pop(ticket)
            self._release(request)
            finished.append((ticket, self._result_of(request)))
        return finished

    def _result_of(self, request: _Request) -> SampleResult | Exception:
        try:
            outputs = request.task.result()
            return sample_result(request.spec, outputs if isinstance(outputs, list) else [outputs])
        except Exception as exc:  # this request failed alone; the engine goes on
            log.exception("sample request failed in SGLang")
            return exc

    def abort(self, ticket: int) -> bool:
        request = self._active.pop(ticket, None)
        if request is None:
            return False
        self._cancel([request])
        return True

    def abort_all(self) -> list[int]:
        requests, self._active = self._active, {}
        self._cancel(list(requests.values()))
        return sorted(requests)

    def _cancel(self, requests: list[_Request]) -> None:
        for request in requests:
            for rid in request.rids:
                self.engine.tokenizer_manager.abort_request(rid=rid)
            request.task.cancel()
            self._release(request)
        if requests:  # let the cancelled tasks unwind now, not at some later step
            self.loop.run_until_complete(asyncio.gather(*(r.task for r in requests), return_exceptions=True))

    def _release(self, request: _Request) -> None:
        freed = self.adapters.unpin(request.slot)
        if freed is not None:
            self._unload_slot(freed)

    def _validate(self, req: EngineSampleReq) -> None:
        check_sample_request(req, self.vocab_size, self.max_context)
        check_supported(req, self.seeds_reproduce)

    # -- adapters ------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, spec: LoraSpec, tensors: dict) -> None:
        """Arrays pushed by trainer rank 0, handed to SGLang through a PEFT directory on tmpfs: measured
        faster than `load_lora_adapter_from_tensors` (whose tensors cross to the scheduler by pickling)."""
        check_tensors("adapter", tensors, self._expected_shapes(spec))
        self._load(adapter_id, lambda name: self.load_via_tmpfs(name, spec, tensors))

    def load_via_tmpfs(self, name: str, spec: LoraSpec, tensors: dict):
        targets = target_module_names(spec, self.module_shapes)
        with tempfile.TemporaryDirectory(dir=SPOOL_DIR if os.path.isdir(SPOOL_DIR) else None) as directory:
            write_peft_adapter(directory, tensors, spec, targets, self.config.model.path)
            return self.engine.load_lora_adapter(name, directory)  # read into memory: the files can go

    def load_via_tensors(self, name: str, spec: LoraSpec, tensors: dict):
        import torch

        # np.array copies: wire arrays are read-only views of ZMQ frames
        named = {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in tensors.items()}
        config = adapter_config(spec, target_module_names(spec, self.module_shapes), self.config.model.path)
        return self.engine.load_lora_adapter_from_tensors(name, named, config)

    def load_adapter_from_disk(self, adapter_id: str, path: str) -> None:
        try:
            spec, tensors = read_peft_adapter(path)
        except FileNotFoundError as exc:
            raise ValueError(f"no PEFT adapter at {path!r}: {exc}") from exc
        check_tensors("adapter", tensors, self._expected_shapes(spec))
        if not (Path(path) / ADAPTER_CONFIG_FILE).exists():
            raise ValueError(f"no {ADAPTER_CONFIG_FILE} in {path!r}")
        self._load(adapter_id, lambda name: self.engine.load_lora_adapter(name, str(path)))

    def _expected_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, int]]:
        if not 1 <= spec.rank <= self.config.engine.max_lora_rank:
            raise ValueError(f"LoRA rank {spec.rank} is outside [1, {self.config.engine.max_lora_rank}] "
                             f"(--max-lora-rank)")
        return expected_lora_shapes(spec, self.module_shapes)

    def _load(self, adapter_id: str, load) -> None:
        slot = self.adapters.choose_slot(adapter_id)  # AdapterSlotsBusy when every slot is pinned
        if slot in self.lora_names:  # an idle adapter there: evicted (or this adapter's older version)
            self._unload_slot(slot)
            self.adapters.discard_slot(slot)
        name = f"{slot}:{adapter_id}"
        outcome = load(name)
        if not outcome.success:
            raise ValueError(f"SGLang refused adapter {adapter_id!r}: {outcome.error_message}")
        self.lora_names[slot] = name
        for freed in self.adapters.assign(adapter_id, slot):
            self._unload_slot(freed)
        log.info("adapter %s loaded as %s", adapter_id, name)

    def unload_adapter(self, adapter_id: str) -> None:
        for freed in self.adapters.remove(adapter_id):
            self._unload_slot(freed)

    def _unload_slot(self, slot: int) -> None:
        name = self.lora_names.pop(slot, None)
        if name is not None and slot != BASE_SLOT:
            outcome = self.engine.unload_lora_adapter(name)
            if not outcome.success:
                log.warning("SGLang could not unload %s: %s", name, outcome.error_message)

    def loaded_adapters(self) -> list[str]:
        return self.adapters.loaded()

    # -- residency -----------------------------------------------------------------------

    def release_memory(self, tags: list[str]) -> None:
        if self._active:
            raise EngineBusy(f"{len(self._active)} sample request(s) in flight; drain before releasing memory")
        fresh = [t for t in tags if t not in self._released]
        if fresh:
            self._wait_until_scheduler_idle()
            self.engine.release_memory_occupation(tags=[s for t in fresh for s in SGLANG_MEMORY_TAGS[t]])
            self._released.update(fresh)

    def _wait_until_scheduler_idle(self) -> None:
        """Aborted requests linger in SGLang's scheduler for a step or two, and a release while it holds
        any kills it (an assertion in the scheduler process): flush_cache succeeds only once it is idle."""
        deadline = time.monotonic() + IDLE_WAIT_S
        while not self.engine.flush_cache().success:
            if time.monotonic() > deadline:
                raise EngineBusy(f"SGLang's scheduler still holds requests after {IDLE_WAIT_S:g} s")
            time.sleep(0.01)

    def resume_memory(self, tags: list[str]) -> None:
        held = [t for t in tags if t in self._released]
        if held:
            self.engine.resume_memory_occupation(tags=[s for t in held for s in SGLANG_MEMORY_TAGS[t]])
            self._released.difference_update(held)

    def memory_stats(self) -> dict[str, float]:
        """This process and SGLang's (the scheduler holds the model and the KV cache)."""
        children = sum(process_rss_bytes(pid) for pid in self.engine.get_all_child_pids())
        return {"rss_bytes": float(current_rss_bytes() + children)}


def _eos_token_ids(manager) -> set[int]:
    """What SGLang stops at by itself: the model's and generation config's EOS, and the tokenizer's."""
    ids = set(manager.model_config.hf_eos_token_id or ())
    tokenizer = getattr(manager, "tokenizer", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
