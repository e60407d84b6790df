"""Drive the real SGLang engine backend from SGLang's virtualenv; the tests compare what it returns.

    <sglang python> -m tests.sglang_driver SCENARIO_BLOB RESULT_BLOB

The scenario (cluster/codec.py blob) names the model, the engine's adapter slots, the
adapters to load and how (PEFT-named arrays, as trainer rank 0 pushes them, or a PEFT
directory), batches of EngineSampleReq to run together, and requests that must be
refused. The result blob has every batch's SampleResults, each refusal's message, the
load times, what an aborted request left behind, and memory around release/resume.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from actors.engine.sglang import cpu_shims

cpu_shims.install_if_requested()  # this is the main module SGLang's spawned scheduler re-imports


def run(scenario: dict) -> dict:
    from actors.engine.interface import KV_CACHE, WEIGHTS
    from actors.engine.sglang.backend import SglangEngineBackend
    from actors.peft import read_peft_adapter
    from cluster.config import ClusterConfig, EngineConfig, ModelConfig

    config = ClusterConfig(model=ModelConfig(path=scenario["model"], name="tiny", max_context=4096),
                           engine=EngineConfig(max_adapters=scenario["max_adapters"], max_lora_rank=16))
    backend = SglangEngineBackend(config)
    out = {"info": backend.info(), "load_ms": {}, "batches": {}, "refusals": {}}
    def load(adapters: list) -> None:
        for adapter_id, directory, how in adapters:
            start = time.perf_counter()
            if how == "tensors":
                spec, tensors = read_peft_adapter(directory)
                backend.load_adapter(adapter_id, spec, tensors)
            else:
                backend.load_adapter_from_disk(adapter_id, directory)
            out["load_ms"][adapter_id] = (time.perf_counter() - start) * 1e3

    try:
        load(scenario["adapters"])
        for name, requests in scenario["batches"]:
            out["batches"][name] = backend.generate(requests)
        out["sync_ms"] = _time_weight_sync(backend, scenario["adapters"][0][1])
        load(scenario["late_adapters"])  # more than the slots hold: the least recently used go
        out["bad_loads"] = {}
        for adapter_id, directory in scenario["bad_loads"]:
            try:
                backend.load_adapter_from_disk(adapter_id, directory)
                out["bad_loads"][adapter_id] = ""
            except ValueError as exc:
                out["bad_loads"][adapter_id] = str(exc)
        for name, request in scenario["refusals"]:
            try:
                backend.generate([request])
                out["refusals"][name] = ""
            except (ValueError, KeyError) as exc:
                out["refusals"][name] = f"{type(exc).__name__}: {exc}"
        ticket = backend.submit(scenario["abort"])
        backend.step()
        out["abort"] = {"aborted": backend.abort(ticket), "has_work": backend.has_work(),
                        "again": backend.abort(ticket)}
        out["memory"] = {"before": backend.memory_stats()}
        backend.release_memory([KV_CACHE, WEIGHTS])
        try:
            backend.submit(scenario["abort"])
            out["memory"]["submit_while_released"] = ""
        except RuntimeError as exc:
            out["memory"]["submit_while_released"] = str(exc)
        out["memory"]["released"] = backend.memory_stats()
        backend.resume_memory([KV_CACHE, WEIGHTS])
        out["memory"]["resumed"] = backend.memory_stats()
        out["after_resume"] = backend.generate([scenario["batches"][0][1][0]])
        out["loaded"] = backend.loaded_adapters()
    finally:
        backend.close()
    return out


def _time_weight_sync(backend, directory: str, reps: int = 5) -> dict[str, float]:
    """Median ms to hand SGLang one adapter pushed as arrays, both ways the backend could."""
    import statistics

    from actors.peft import read_peft_adapter

    spec, tensors = read_peft_adapter(directory)
    timings: dict[str, list[float]] = {"tensors": [], "tmpfs_dir": []}
    for i in range(reps):
        for how, load in (("tensors", backend.load_via_tensors), ("tmpfs_dir", backend.load_via_tmpfs)):
            name = f"sync-{how}-{i}"
            start = time.perf_counter()
            outcome = load(name, spec, tensors)
            timings[how].append((time.perf_counter() - start) * 1e3)
            assert outcome.success, outcome.error_message
            backend.engine.unload_lora_adapter(name)
    return {how: statistics.median(ms) for how, ms in timings.items()}


def main() -> None:
    from cluster.codec import decode_blob, encode_blob

    scenario_path, result_path = sys.argv[1:3]
    result = run(decode_blob(Path(scenario_path).read_bytes()))
    Path(result_path).write_bytes(encode_blob(result))


if __name__ == "__main__":
    main()
