"""Start and stop a tinkerd cluster (`python -m launch.cluster`) for a benchmark."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = "tinkerd ready: base_url="


@dataclass
class LaunchSpec:
    """How to start tinkerd: `model` None = the built-in one (taken from `models_dir`)."""

    models_dir: Path  # holds tiny-qwen3/ (the built-in model, already built)
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 600.0


class Cluster:
    def __init__(self, proc: subprocess.Popen, base_url: str, model_name: str, launch_s: float,
                 state_dir: Path, output: collections.deque):
        self.proc, self.base_url, self.model_name = proc, base_url, model_name
        self.launch_s, self.state_dir, self.output = launch_s, state_dir, output

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(spec: LaunchSpec, state_dir: Path | None = None, attempts: int = 3) -> Cluster:
    """`_start_once`, again when a port the launcher picked was taken before it was bound.

    The launcher picks its free ports (API, ZMQ, torchrun) by binding port 0 and closing
    the socket; until a child binds it, any other process's outgoing connection may get
    that ephemeral port. That fails a start now and then on a busy machine; it says
    nothing about tinkerd's start-up time, so it is retried rather than reported.
    """
    for attempt in range(1, attempts):
        try:
            return _start_once(spec, state_dir)
        except PortTaken:
            print(f"bench: tinkerd start {attempt} lost a port race; starting again", file=sys.stderr, flush=True)
    return _start_once(spec, state_dir)


class PortTaken(RuntimeError):
    pass


def _start_once(spec: LaunchSpec, state_dir: Path | None = None) -> Cluster:
    """Start a cluster in `state_dir` (default: a fresh temporary one); return once it is healthy.

    `launch_s` is the wall time from starting the launcher to its ready line, which it
    prints once /api/v1/healthz says every trainer rank and engine is up.
    """
    temporary = state_dir is None
    if temporary:
        state_dir = Path(tempfile.mkdtemp(prefix="tinkerd-bench-state-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    if spec.model is None and not (state_dir / "models").exists():
        (state_dir / "models").symlink_to(spec.models_dir.resolve(), target_is_directory=True)
    cmd = [sys.executable, "-m", "launch.cluster", "--port", "0", "--state-dir", str(state_dir),
           "--device", spec.device, "--dtype", spec.dtype, *spec.extra_args]
    if spec.model is not None:
        cmd += ["--model", spec.model]
    env = dict(os.environ, **dict(spec.env))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    output: collections.deque = collections.deque(maxlen=200)
    ready = threading.Event()
    found: dict[str, str] = {}

    def read() -> None:  # keeps draining the pipe for the cluster's whole life
        for line in proc.stdout:
            output.append(line)
            if READY in line and not ready.is_set():
                found["base_url"] = line.split("base_url=")[1].split()[0]
                found["model"] = line.split(" model=")[1].split()[0] if " model=" in line else ""
                found["at"] = time.time()
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True, name="tinkerd-launcher-output").start()
    if not ready.wait(spec.timeout_s) or "base_url" not in found:
        proc.kill()
        proc.wait()
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)
        kind = PortTaken if any("address already in use" in line.lower() for line in output) else RuntimeError
        raise kind("tinkerd did not start:\n" + "".join(output))
    return Cluster(proc, found["base_url"], found["model"], found["at"] - t0, state_dir, output)


def remove_state(cluster: Cluster) -> None:
    shutil.rmtree(cluster.state_dir, ignore_errors=True)
