"""The trainer rank's OpenMP threads wait passively unless the environment says otherwise (actors/omp.py),
and the policy is set before torch loads libgomp, which reads it only then."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# the policy at the moment the trainer's entry module set it, whether torch was loaded by then, and after
_PROBE = """
import os, sys
import actors.omp as omp
def probe(original=omp.prefer_passive_waits):
    original()
    print(os.environ["OMP_WAIT_POLICY"], "torch" in sys.modules)
omp.prefer_passive_waits = probe
import actors.trainer.main
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_trainer_sets_the_wait_policy_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [expected, "False"]
