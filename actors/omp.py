"""How the torch processes' OpenMP threads wait between parallel regions: passively, unless told otherwise.

With OMP_WAIT_POLICY unset, libgomp (torch's CPU thread pool) keeps every worker thread spinning for a
few milliseconds after each parallel region (3-7 ms of CPU measured here after one matmul). A trainer
rank or an engine is only one of the processes a request passes through (SDK, API, controller, the
other workers): on a machine with few cores the spinning threads hold the cores the others need, so
every hop waits for a time slice. Measured on the 2-core dev VM (torch 2.13, built-in model): a trainer
rank burnt 58 ms of CPU per 8-token round trip spinning vs 32 ms passive for the same wall time on an
idle machine, and under load from other processes the round trip took 3x and a sampling batch 8x as
long with spinning threads.

libgomp reads the variable once, when torch loads it: call this before the first `import torch`.
An OMP_WAIT_POLICY already in the environment wins (ACTIVE for a machine with cores to spare).
"""

from __future__ import annotations

import os


def prefer_passive_waits() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
