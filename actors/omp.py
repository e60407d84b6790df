"""How the torch processes' OpenMP threads wait between parallel regions: a brief spin, then asleep.

libgomp (torch's CPU thread pool) lets a worker thread spin GOMP_SPINCOUNT times after a parallel region before
it sleeps on a futex. Its default (300,000 spins) held a core for up to 4-7 ms after each region, a core that
the other processes on a request's path (SDK, API, controller, the other workers) need on a small machine: on
the 2-core dev VM a trainer rank burnt 58 ms of CPU per 8-token round trip that way. Passive waits (no spin at
all) cost instead at every region of a large pass, which then wakes its peer thread through the kernel: a
32 x 256-token training step took 970-1,125 ms against 925-960 with the default spin (built-in model, 2
threads, 3-4 runs of each interleaved). BRIEF_SPINS keeps the peer awake across the gaps between the regions
of one pass (942-962 ms) and spins at most ~0.5 ms after the last one. Small passes run on one thread anyway
(actors/model_loading.compute_threads), so no peer waits for them.

libgomp reads both variables once, when torch loads it: call this before the first `import torch`. An
OMP_WAIT_POLICY or GOMP_SPINCOUNT already in the environment wins (ACTIVE for a machine with cores to spare).
"""

from __future__ import annotations

import os

BRIEF_SPINS = 5000


def prefer_brief_spins() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(BRIEF_SPINS))
