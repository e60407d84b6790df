"""The tenants workload: N client processes train at once against one server.

Each tenant is its own OS process with its own tinker ServiceClient (session) and LoRA
training client, as N users of one server would be. All max(N) processes are started
once, import the SDK, create their session and training client and take one unmeasured
step (first-call costs: connections, the adapter's first use), then report ready; none
of that is timed. A run tells the first N of them to start at the same instant (a start
time on CLOCK_MONOTONIC, which every process on the machine shares) and each does
tenant_steps x (forward_backward + optim_step on tenant_batch x tenant_seq). The figure
is the aggregate: every tenant's tokens over the time from that start to the last
tenant's last result. Counts are interleaved run by run (1, 4, 8, 1, 4, 8, ...) so drift
on a busy machine hits all of them alike.

    python -m tests.bench.tenants --child ...   # one tenant (internal: the benchmark starts these)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from cluster.process import die_with_parent
from tests.bench import spec

REPO_ROOT = Path(__file__).resolve().parents[2]
TAG = "tenant: "  # the protocol's lines on a child's stdout (anything else there is ignored)
START_LEAD_S = 0.05  # the start time is this far ahead, so every child has read its command by then
READY_TIMEOUT_S = 600.0  # 8 processes importing the SDK on 2 busy cores take a while
RUN_TIMEOUT_S = 600.0


class Tenant:
    """One child process and the thread that reads its replies."""

    def __init__(self, index: int, cmd: list[str], api_key: str):
        self.index = index
        self.stderr = tempfile.TemporaryFile(mode="w+")  # the SDK's logs; shown when the tenant fails
        # the key goes by environment (the SDK reads TINKER_API_KEY), not where `ps` shows it
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1,
                                     env=dict(os.environ, TINKER_API_KEY=api_key))
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"tenant-{index}").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.replies.put(json.loads(line[len(TAG):]))
        self.replies.put({"error": f"exited with code {self.proc.wait()}"})

    def send(self, command: dict) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float) -> dict:
        try:
            message = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            message = {"error": f"no answer within {timeout_s:.0f} s"}
        if "error" in message:
            self.stderr.seek(0)
            raise RuntimeError(f"tenant {self.index}: {message['error']}\n{self.stderr.read()[-3000:]}")
        return message

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class Tenants:
    """max(tenant counts) tenants, started and made ready once."""

    def __init__(self, base_url: str, base_model: str, sizes: spec.Sizes, api_key: str):
        self.sizes = sizes
        cmd = [sys.executable, "-m", "tests.bench.tenants", "--child", "--base-url", base_url,
               "--base-model", base_model, *spec.sizes_to_argv(sizes)]
        self.tenants: list[Tenant] = []
        try:
            for i in range(max(sizes.tenant_list)):
                self.tenants.append(Tenant(i, [*cmd, "--index", str(i)], api_key))
            for tenant in self.tenants:
                tenant.reply(READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.start_lags_ms: list[float] = []

    def run(self, n: int) -> float:
        """One run of the first n tenants at once: aggregate training tokens/s."""
        start = time.monotonic() + START_LEAD_S
        for tenant in self.tenants[:n]:
            tenant.send({"op": "run", "at": start})
        replies = [tenant.reply(RUN_TIMEOUT_S) for tenant in self.tenants[:n]]
        # how late the last tenant began: large lags mean the start signal was not simultaneous
        self.start_lags_ms.append((max(r["began"] for r in replies) - start) * 1e3)
        return sum(r["tokens"] for r in replies) / (max(r["end"] for r in replies) - start)

    def close(self) -> None:
        for tenant in self.tenants:
            tenant.close()


def measure(base_url: str, base_model: str, sizes: spec.Sizes, api_key: str) -> tuple[dict[str, list[float]], str]:
    """({figure key: aggregate tokens/s per measured run}, a note on the start signal's spread)."""
    tenants = Tenants(base_url, base_model, sizes, api_key)
    samples: dict[str, list[float]] = {spec.tenants_key(n): [] for n in sizes.tenant_list}
    try:
        for i in range(sizes.warmup + sizes.reps):
            for n in sizes.tenant_list:
                value = tenants.run(n)
                if i >= sizes.warmup:
                    samples[spec.tenants_key(n)].append(value)
    finally:
        tenants.close()
    lags = sorted(tenants.start_lags_ms)
    note = (f"{max(sizes.tenant_list)} tenant processes; the last tenant began at most {max(lags):.1f} ms "
            f"after the start signal (median of runs {statistics.median(lags):.1f} ms)")
    return samples, note


# -- one tenant (a child process) --------------------------------------------------------


def emit(message: dict) -> None:
    print(TAG + json.dumps(message), flush=True)


def child(args) -> None:
    import tinker
    from tinker import types

    from tests.bench.sdk import _datums, close_quietly, train_step

    die_with_parent()  # a benchmark that dies must not leave its tenants training
    sizes = spec.sizes_from_args(args)
    service = tinker.ServiceClient(base_url=args.base_url)  # the key: TINKER_API_KEY
    try:
        training = service.create_lora_training_client(base_model=args.base_model, rank=sizes.rank,
                                                       seed=args.index).result()
        data = _datums(spec.train_batch(sizes, batch=sizes.tenant_batch, seq=sizes.tenant_seq,
                                        seed=100 + args.index))
        adam = types.AdamParams(learning_rate=spec.LR)
        train_step(training, data, adam)  # unmeasured: first-call costs stay out of every run
        emit({"ready": True})
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "quit":
                break
            time.sleep(max(0.0, command["at"] - time.monotonic()))
            began = time.monotonic()
            for _ in range(sizes.tenant_steps):
                train_step(training, data, adam)
            emit({"began": began, "end": time.monotonic(),
                  "tokens": sizes.tenant_steps * sizes.tenant_batch * sizes.tenant_seq})
    except Exception as exc:
        traceback.print_exc()
        emit({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        close_quietly(service)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--index", type=int, required=True)
    spec.add_size_args(p)
    child(p.parse_args(argv))


if __name__ == "__main__":
    main()
