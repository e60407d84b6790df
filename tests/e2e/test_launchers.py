"""Every documented way to start the server works: `python -m launch.cluster` (used by every
other e2e test), the script path `python launch/cluster.py`, and the `tinkerd` console script."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO_ROOT, launch_cluster

pytestmark = pytest.mark.e2e

LAUNCHERS = {
    "script": (sys.executable, str(REPO_ROOT / "launch" / "cluster.py")),
    # pip install -e puts it next to the interpreter
    "console-script": (str(Path(sys.executable).parent / "tinkerd"),),
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_starts_a_healthy_cluster(name, tmp_path, models_dir):
    with launch_cluster(tmp_path / "state", models_dir, launcher=LAUNCHERS[name]) as running:
        assert httpx.get(running.base_url + "/api/v1/healthz").json()["status"] == "ok"
