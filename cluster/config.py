"""Configuration: one small dataclass per component, composed into ClusterConfig.

launch/cluster.py fills a ClusterConfig, writes it as JSON into the run directory, and
every process reads its own part with `ClusterConfig.load(path)`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from cluster.parallel import ParallelDims


@dataclass
class ModelConfig:
    path: str = ""  # local directory with config.json + weights (+ tokenizer)
    name: str = ""  # the name clients pass as base_model and see in get_info
    tokenizer_dir: str = ""  # what get_info reports as tokenizer_id (a local dir)
    arch: str = ""
    max_context: int = 4096
    vocab_size: int = 0  # 0 = unknown: token ids are not range-checked at the API


@dataclass
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # `<key> [<user>] [admin]` per line (cluster/users.py); None = any key starting with
    # "tml-", each its own user (the local default)
    api_keys_file: str | None = None
    long_poll_s: float = 25.0


@dataclass
class ControllerConfig:
    api_address: str = ""  # ROUTER the API's DEALER connects to
    worker_address: str = ""  # ROUTER every trainer rank and engine connects to
    session_timeout_s: float = 600.0  # sessions without a heartbeat for this long expire
    max_adapters_per_user: int | None = None  # training runs one user may hold at once; None = no limit
    # colocated training and sampling (actors/controller/residency.py): trainer and engines share the devices,
    # and the controller switches between a sampling phase and a training phase with barriers
    colocate: bool = False
    # a training phase lasts until the training queue has been empty this long (so an SDK loop of
    # forward_backward + optim_step pays the barriers once, not per request) ...
    training_linger_ms: float = 50.0
    # ... or, while samples wait, until it has lasted this long (training cannot starve sampling, nor sampling
    # training: a sampling phase with training waiting lasts at most as long)
    max_phase_ms: float = 2000.0
    # an engine or trainer rank without a heartbeat (one a second) for this long is dead or hung; with the
    # watchdog's 1 s checks a hang is found within 9 s
    heartbeat_timeout_s: float = 8.0
    # the share of a run's trainer time its recovery snapshots may take (actors/controller/recovery.py)
    snapshot_budget: float = 0.05
    admin_token_file: str = ""  # what launch/probe.py must present (written by the launcher, mode 0600)


@dataclass
class TrainerConfig:
    backend: str = "torch"  # a name in cluster/backends.py's TRAINER_BACKENDS
    ranks: int = 1  # the world size: dp * tp * pp
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel stages
    # the longest the controller waits for a trainer rank's reply (a hung collective, a
    # lost frame); past it the call fails, and so does every later one
    call_timeout_s: float = 600.0
    max_adapters: int = 8  # adapter slots (LoRA training runs held at once)
    max_lora_rank: int = 32
    # padded tokens (rows x longest row) one forward/backward may hold: the controller fills each clock cycle's
    # pass up to it, and a request larger than it runs alone in microbatches (gradient accumulation)
    max_tokens_per_pass: int = 16384
    dtype: str = "float32"
    device: str = "cpu"

    def parallel_dims(self) -> ParallelDims:
        return ParallelDims.for_world(self.ranks, self.tp, self.pp)


@dataclass
class EngineConfig:
    backend: str = "torch"  # a name in cluster/backends.py's ENGINE_BACKENDS
    count: int = 1
    max_adapters: int = 16  # adapter slots per engine
    max_lora_rank: int = 32
    max_batch_sequences: int = 64
    # torch: memory for the keys/values of prompts seen before (actors/engine/prefix_cache.py); 0 turns it off
    prefix_cache_bytes: int = 256 * 2**20
    # batch formation: an idle engine that just got a request waits this long for another (each one that comes
    # restarts the wait), at most batch_gather_max_ms in all (actors/engine/main.py)
    batch_gather_quiet_ms: float = 0.5
    batch_gather_max_ms: float = 5.0
    weights_addresses: list[str] = field(default_factory=list)  # one per engine
    dtype: str = "float32"
    device: str = "cpu"
    heartbeat_interval_s: float = 1.0
    # the sglang backend: the interpreter of SGLang's own virtualenv (launch/sglang_env.py builds one)
    sglang_python: str = ""
    max_loras_per_batch: int = 8  # sglang: adapters one batch may mix
    # sglang: KV cache tokens; bounded, since on CPU SGLang would otherwise take a share of host RAM
    max_total_tokens: int = 16384


@dataclass
class ClusterConfig:
    state_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.state_dir) / "checkpoints"

    @property
    def database_path(self) -> Path:
        return Path(self.state_dir) / "tinkerd.sqlite3"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ClusterConfig":
        raw = json.loads(Path(path).read_text())
        parts = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in raw.items():
            sub = _SECTIONS.get(name)
            kwargs[name] = sub(**value) if sub else value
        unknown = set(kwargs) - set(parts)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        return cls(**kwargs)


_SECTIONS = {
    "model": ModelConfig,
    "api": ApiConfig,
    "controller": ControllerConfig,
    "trainer": TrainerConfig,
    "engine": EngineConfig,
}
