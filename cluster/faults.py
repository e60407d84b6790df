"""Test-only fault injection into worker handlers, through a real code path.

A worker process started with TINKERD_FAULT_DIR=DIR checks, at each hook, for a file
`DIR/<worker>.<point>` (worker: `engine0`, `trainer0`, …; point: the request's message
name, optionally followed by `.<tags>` for the engine's memory requests, e.g.
`engine0.EngineResumeMemoryReq.kv_cache`, and `.shared` for a trainer pass that holds
several runs' requests, `trainer1.TrainerForwardBackwardReq.shared`). A file that is there is removed (so the fault
fires once) and the handler raises InjectedFault, which the worker answers like any other
handler failure (a 500 naming the worker) — unless the file says `sigkill` or `sigstop`:
then the process sends itself that signal, a crash or a hang at a known point of a step
(the fault drills). Without the variable the hooks cost one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "TINKERD_FAULT_DIR"
SIGNALS = {"sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}


class InjectedFault(RuntimeError):
    pass


def inject_fault(worker: str, *points: str) -> None:
    """Raise InjectedFault once if a fault file for `worker` at any of `points` exists."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    for point in points:
        path = os.path.join(directory, f"{worker}.{point}")
        try:
            with open(path) as f:
                action = f.read().strip()
            os.remove(path)
        except FileNotFoundError:
            continue
        if action in SIGNALS:
            os.kill(os.getpid(), SIGNALS[action])
            return  # SIGSTOP: the process goes on here if it is ever continued
        raise InjectedFault(f"fault injected at {point} ({ENV})")
