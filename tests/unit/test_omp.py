"""The trainer rank's OpenMP threads spin briefly, then sleep, unless the environment says otherwise
(actors/omp.py), and the setting is made before torch loads libgomp, which reads it only then."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actors import omp

# the policy at the moment the trainer's entry module set it, whether torch was loaded by then, and after
_PROBE = """
import os, sys
import actors.omp as omp
def probe(original=omp.prefer_brief_spins):
    original()
    print(os.environ.get("OMP_WAIT_POLICY", "-"), os.environ.get("GOMP_SPINCOUNT", "-"), "torch" in sys.modules)
omp.prefer_brief_spins = probe
import actors.trainer.main
"""


@pytest.mark.parametrize("given, expected", [
    ({}, ["-", str(omp.BRIEF_SPINS)]),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "-"]),  # the operator's policy, with libgomp's own spin count
    ({"GOMP_SPINCOUNT": "100"}, ["-", "100"]),
], ids=["default", "policy-given", "spins-given"])
def test_the_trainer_sets_the_spin_count_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [*expected, "False"]
