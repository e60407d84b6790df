"""End-to-end fixtures: the real cluster, started by launch/cluster.py, driven by the SDK."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_MODEL = "tinkerd/tiny-qwen3"
API_KEY = "tml-e2e-test"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


class RunningCluster:
    def __init__(self, proc: subprocess.Popen, base_url: str, state_dir: Path):
        self.proc = proc
        self.base_url = base_url
        self.state_dir = state_dir

    def service_client(self, api_key: str = API_KEY):
        import tinker

        return tinker.ServiceClient(base_url=self.base_url, api_key=api_key)

    def rest_client(self, api_key: str = API_KEY):
        import tinker

        return tinker.RestClient(base_url=self.base_url, api_key=api_key)

    def http_client(self, timeout_s: float = 60, api_key: str = API_KEY):
        """Raw HTTP to /api/v1, for what the SDK would not send (bad input, ids we pick)."""
        import httpx

        return httpx.Client(base_url=self.base_url + "/api/v1", headers={"X-API-Key": api_key}, timeout=timeout_s)


@contextlib.contextmanager
def launch_cluster(state_dir: Path, models_dir: Path, *extra: str, timeout_s: float = 300,
                   launcher: tuple[str, ...] = (sys.executable, "-m", "launch.cluster"), env: dict | None = None):
    """Start the launcher (`python -m launch.cluster` unless told otherwise), yield it once
    ready, then stop it and check for orphans. `env` adds to the launcher's environment."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if not (state_dir / "models").exists():
        (state_dir / "models").symlink_to(models_dir, target_is_directory=True)
    cmd = [*launcher, "--port", "0", "--state-dir", str(state_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env} if env else None)
    base_url, seen = None, []
    deadline = time.monotonic() + timeout_s
    while base_url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("cluster exited during start-up:\n" + "".join(seen))
        seen.append(line)
        if "tinkerd ready: base_url=" in line:
            base_url = line.split("base_url=")[1].split()[0]
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("cluster not ready:\n" + "".join(seen))
    try:
        yield RunningCluster(proc, base_url, state_dir)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        marker = str(state_dir / "run" / "cluster.json")
        deadline = time.monotonic() + 10
        while _processes_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = _processes_mentioning(marker)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left after shutdown: {leftovers}"


def probe(cluster, *args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """`python -m launch.probe` against the cluster, as an administrator would run it."""
    out = subprocess.run([sys.executable, "-m", "launch.probe", "--state-dir", str(cluster.state_dir), *args],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == expect_rc, out.stdout + out.stderr
    return out


def probe_json(cluster, *args: str) -> dict:
    return json.loads(probe(cluster, "--json", *args).stdout)


def assert_training_refused(cluster, model_id: str, detail: str) -> dict:
    """The trainer group is lost: healthz says "degraded" naming it, and training is a 503 with that detail."""
    import httpx

    health = httpx.get(cluster.base_url + "/api/v1/healthz", timeout=10).json()
    assert health["status"] == "degraded" and detail in health["detail"], health
    with cluster.http_client() as http:
        resp = http.post("/optim_step", json={"model_id": model_id, "seq_id": 999, "type": "optim_step",
                                               "adam_params": {"learning_rate": 1e-3}})
    assert resp.status_code == 503 and "training is unavailable" in resp.json()["detail"], resp.text
    return health


def wait_until(predicate, timeout_s: float, what: str) -> float:
    """Poll `predicate` until true; return when (monotonic). Fails naming `what` past the timeout."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The built-in model, built once per test session and shared by every cluster."""
    directory = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "actors.builtin_model", str(directory / "tiny-qwen3")],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    return directory


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, models_dir) -> RunningCluster:
    # one long-lived session makes many training clients: give it room
    with launch_cluster(tmp_path_factory.mktemp("state"), models_dir, "--max-adapters", "24") as running:
        yield running


@pytest.fixture(scope="session")
def service_client(cluster):
    client = cluster.service_client()
    yield client
    client.close("success").result()


@pytest.fixture(scope="session")
def cookbook_hf_home(tmp_path_factory, models_dir) -> Path:
    """An HF_HOME whose hub cache holds the served built-in model as `tinkerd/tiny-qwen3`."""
    from actors.builtin_model import install_into_hf_cache

    hf_home = tmp_path_factory.mktemp("hf_home")
    install_into_hf_cache(models_dir / "tiny-qwen3", hf_home)
    return hf_home
