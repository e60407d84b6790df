"""The launcher's command line: every flag, and the checks that refuse a bad combination before anything starts.

launch/cluster.py parses with `parse_args`; the multi-node flags come from launch/multinode.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cluster.backends import ENGINE_BACKENDS, TRAINER_BACKENDS, check_backend
from cluster.config import ControllerConfig, EngineConfig, TrainerConfig
from cluster.parallel import ParallelDims
from cluster.users import load_api_keys
from launch.multinode import add_multinode_args, plan_placement
from launch.sglang_env import default_env_dir
from launch.supervision import TRAINER_RESTART_WINDOW_S, TRAINER_RESTARTS


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tinkerd"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub id or local directory (default: the built-in tiny model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="API port (0 = pick a free one)")
    p.add_argument("--state-dir", type=Path, default=default_state_dir())
    p.add_argument("--trainer-ranks", type=int,
                   help="trainer ranks (torchrun world size); data parallel = ranks / (tp * pp) (default: tp * pp, "
                        "no data parallelism)")
    p.add_argument("--trainer-backend", default="torch", choices=sorted(TRAINER_BACKENDS),
                   help="torch: one transformers model per rank, data parallel only; megatron: megatron-core "
                        "with tensor and pipeline parallelism (pip install -e '.[megatron]')")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (megatron backend)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (megatron backend)")
    p.add_argument("--trainer-timeout", type=float, default=TrainerConfig.call_timeout_s, metavar="SECONDS",
                   help="the longest a trainer rank may take to answer one step before the controller fails it "
                        "(a hung collective); default %(default)g")
    p.add_argument("--engines", type=int, help="sampling engine processes (default: 1, or what --hostfile places)")
    p.add_argument("--engine-backend", default="torch", choices=sorted(ENGINE_BACKENDS),
                   help="torch: tinkerd's own engine (transformers model, LoRA slots); sglang: an SGLang engine "
                        "per engine process, run from SGLang's own virtualenv (--sglang-python)")
    p.add_argument("--sglang-python", type=Path, metavar="PATH",
                   help="the interpreter of SGLang's virtualenv (default: the one `python -m launch.sglang_env` "
                        "builds, if it exists)")
    p.add_argument("--max-loras-per-batch", type=int, default=8, metavar="N",
                   help="sglang: distinct adapters one batch may mix (default %(default)s)")
    p.add_argument("--prefix-cache-mb", type=float, default=EngineConfig.prefix_cache_bytes / 2**20, metavar="MB",
                   help="torch engine: memory per engine for the keys and values of prompts seen before, reused "
                        "when the same prompt comes again for the same adapter; 0 = off (default %(default)g; "
                        "SGLang keeps its own radix cache)")
    p.add_argument("--heartbeat-timeout", type=float, default=ControllerConfig.heartbeat_timeout_s,
                   metavar="SECONDS", help="an engine or trainer rank without a heartbeat for this long is dead: "
                                           "an engine's samples are re-queued on another engine or failed, a "
                                           "trainer group is restarted and its runs rebuilt (default %(default)g)")
    p.add_argument("--trainer-restarts", type=int, default=TRAINER_RESTARTS, metavar="N",
                   help=f"restarts of the whole trainer group allowed within {TRAINER_RESTART_WINDOW_S:.0f} s; past "
                        f"them training answers 503 and sampling goes on (default %(default)s)")
    p.add_argument("--snapshot-budget", type=float, default=ControllerConfig.snapshot_budget, metavar="FRACTION",
                   help="the share of a training run's trainer time its recovery snapshots may take; between "
                        "snapshots the controller keeps a replay log (README 'Surviving failures'; "
                        "default %(default)g)")
    p.add_argument("--max-adapters", type=int, default=8, help="LoRA training runs held at once")
    p.add_argument("--max-lora-rank", type=int, default=32)
    p.add_argument("--max-tokens-per-pass", type=int, default=TrainerConfig.max_tokens_per_pass, metavar="TOKENS",
                   help="padded tokens one trainer forward/backward may hold: each clock cycle packs the ready "
                        "forward_backward requests of every run up to it; a larger request runs in microbatches "
                        "(default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--api-keys-file", type=Path,
                   help="allowed keys, one `<key> [<user>] [admin]` per line (default: any tml- key, each its own "
                        "user)")
    p.add_argument("--max-adapters-per-user", type=int, metavar="N",
                   help="training runs one user may hold at once (default: no limit but --max-adapters)")
    p.add_argument("--session-timeout", type=float, default=ControllerConfig.session_timeout_s, metavar="SECONDS",
                   help="a session without a heartbeat for this long expires and frees its adapter slots "
                        "(the SDK heartbeats every 10 s; default %(default)g)")
    _add_colocation_args(p)
    add_multinode_args(p)
    return p


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    p = build_parser(description)
    args = p.parse_args(argv)
    args.placement = plan_placement(p, args)  # with a hostfile, it also fills in --trainer-ranks and --engines
    _check_colocation_args(p, args)
    if args.session_timeout <= 0:
        p.error("--session-timeout must be positive")
    if args.trainer_restarts < 0:
        p.error("--trainer-restarts must be >= 0")
    if not 0 < args.snapshot_budget <= 1:
        p.error("--snapshot-budget must be in (0, 1]")
    if args.max_adapters_per_user is not None and args.max_adapters_per_user < 1:
        p.error("--max-adapters-per-user must be at least 1")
    if args.trainer_timeout <= 0:
        p.error("--trainer-timeout must be positive")
    if args.max_tokens_per_pass < 1:
        p.error("--max-tokens-per-pass must be at least 1")
    _check_trainer_layout(p, args)
    _check_engine_backend(p, args)
    if args.api_keys_file is not None:
        try:
            load_api_keys(args.api_keys_file)  # the API process reads it again; refuse a bad one here, at once
        except ValueError as exc:
            p.error(str(exc))
    return args


def _add_colocation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--colocate", action="store_true",
                   help="trainer ranks and engines share the devices: the controller alternates a sampling and a "
                        "training phase, engines releasing their memory while the trainer runs (README 'Colocation')")
    p.add_argument("--training-linger-ms", type=float, default=ControllerConfig.training_linger_ms, metavar="MS",
                   help="--colocate: a training phase lasts until the training queue has been empty this long "
                        "(default %(default)g)")
    p.add_argument("--max-phase-ms", type=float, default=ControllerConfig.max_phase_ms, metavar="MS",
                   help="--colocate: while the other side waits, a phase ends after at most this long, once the "
                        "call in progress finishes (default %(default)g)")


def _check_colocation_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.training_linger_ms < 0:
        p.error("--training-linger-ms must be >= 0")
    if args.max_phase_ms <= 0:
        p.error("--max-phase-ms must be positive")
    if not args.colocate and (args.training_linger_ms != ControllerConfig.training_linger_ms
                              or args.max_phase_ms != ControllerConfig.max_phase_ms):
        p.error("--training-linger-ms and --max-phase-ms need --colocate")


def _check_trainer_layout(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything starts, a backend that cannot run or a layout that does not divide."""
    try:
        entry = check_backend("trainer", args.trainer_backend)
        dims = ParallelDims.for_world(args.trainer_ranks, args.tp, args.pp)
    except ValueError as exc:
        p.error(str(exc))
    if not entry.model_parallel and (dims.tp > 1 or dims.pp > 1):
        p.error(f"the {args.trainer_backend} trainer backend runs data parallel only; --tp/--pp need "
                f"--trainer-backend megatron")


def _check_engine_backend(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything starts, an engine backend that cannot run from its interpreter."""
    if args.max_loras_per_batch < 1:
        p.error("--max-loras-per-batch must be at least 1")
    if args.heartbeat_timeout <= 0:
        p.error("--heartbeat-timeout must be positive")
    if args.prefix_cache_mb < 0:
        p.error("--prefix-cache-mb must be >= 0")
    if args.engine_backend != "torch" and args.prefix_cache_mb != EngineConfig.prefix_cache_bytes / 2**20:
        p.error(f"--prefix-cache-mb is for --engine-backend torch; {args.engine_backend} manages its own cache")
    entry = ENGINE_BACKENDS[args.engine_backend]
    if not entry.own_python:
        if args.sglang_python is not None:
            p.error(f"--sglang-python is for --engine-backend sglang, not {args.engine_backend}")
        return
    if args.sglang_python is None:
        built = default_env_dir(cuda=args.device != "cpu") / "bin" / "python"
        if not built.exists():
            p.error(f"--engine-backend {args.engine_backend} needs SGLang's virtualenv: build it with "
                    f"`python -m launch.sglang_env{'' if args.device == 'cpu' else ' --cuda'}`, or pass "
                    f"--sglang-python")
        args.sglang_python = built
    try:
        check_backend("engine", args.engine_backend, python=str(args.sglang_python))
    except ValueError as exc:
        p.error(str(exc))
