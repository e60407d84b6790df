"""One cached virtualenv per old tinker SDK version, for the SDK compatibility test.

Each venv lives in `$TINKERD_COMPAT_CACHE/<version>` (default
`~/.cache/tinkerd/sdk-venvs/<version>`) and is made with `python -m venv` and
`pip install tinker==<version>`. A venv is complete once its marker file exists; the
marker records what was installed, how long it took and the venv's size, and a venv
whose marker is missing or names other requirements is rebuilt from scratch.

Torch is installed only where an SDK cannot be imported without it: 0.6.3's
training_client does a bare `import torch` (later versions guard it with try/except).
It is pinned to the CPU build this project uses, so pip can take it from a local wheel.

Run `python -m tests.compat.venvs [VERSION ...]` to build (or check) them by hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SDK_VERSIONS = ("0.6.3", "0.16.1", "0.20.0", "0.25.0", "0.30.4", "0.38.0")
TORCH_REQUIREMENT = "torch==2.13.0"
# versions whose `import tinker` fails without torch (a bare `import torch` at module level)
_NEEDS_TORCH = frozenset({"0.6.3"})
MARKER = "tinkerd-compat-complete.json"
INSTALL_TIMEOUT_S = 900


def cache_root() -> Path:
    configured = os.environ.get("TINKERD_COMPAT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "tinkerd" / "sdk-venvs"


def requirements(version: str) -> list[str]:
    reqs = [f"tinker=={version}"]
    if version in _NEEDS_TORCH:
        reqs.append(TORCH_REQUIREMENT)
    return reqs


@dataclass
class SdkVenv:
    version: str
    path: str
    python: str
    requirements: list[str]
    created: bool  # built by this call (False: reused from the cache)
    install_s: float  # time to build it, measured when it was built
    size_bytes: int

    @property
    def size_mib(self) -> float:
        return self.size_bytes / 2**20


def venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _read_marker(path: Path, reqs: list[str]) -> dict | None:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("requirements") != reqs or not venv_python(path).exists():
        return None
    return marker


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise builders of the same venv (parallel test workers, two checkouts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if proc.returncode:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{cmd[0]} … failed with exit code {proc.returncode}; log {log}:\n{tail}")


def ensure_venv(version: str, base_python: str | None = None) -> SdkVenv:
    """The venv for `version`, built now unless a complete one is cached."""
    root = cache_root()
    path = root / version
    reqs = requirements(version)
    with _locked(path):
        marker = _read_marker(path, reqs)
        if marker is not None:
            return SdkVenv(version, str(path), str(venv_python(path)), reqs, created=False,
                           install_s=marker["install_s"], size_bytes=marker["size_bytes"])
        if path.exists():
            shutil.rmtree(path)
        log = root / f"{version}.install.log"
        log.unlink(missing_ok=True)
        start = time.monotonic()
        _run([base_python or sys.executable, "-m", "venv", str(path)], log)
        _run([str(venv_python(path)), "-m", "pip", "install", "--quiet", *reqs], log)
        # the import is the real check: 0.6.3 without torch would install fine and fail here
        _run([str(venv_python(path)), "-c", "import tinker; print(tinker.__version__)"], log)
        install_s = time.monotonic() - start
        size = _dir_size(path)
        (path / MARKER).write_text(json.dumps({"version": version, "requirements": reqs,
                                               "install_s": round(install_s, 1), "size_bytes": size,
                                               "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return SdkVenv(version, str(path), str(venv_python(path)), reqs, created=True,
                       install_s=install_s, size_bytes=size)


def ensure_venvs(versions=SDK_VERSIONS, parallel: int = 3) -> dict[str, SdkVenv | Exception]:
    """Every venv, built concurrently (pip spends most of its time waiting on downloads)."""
    results: dict[str, SdkVenv | Exception] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(ensure_venv, v): v for v in versions}
        for future in concurrent.futures.as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except Exception as exc:  # reported per version by the caller
                results[futures[future]] = exc
    return {v: results[v] for v in versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("versions", nargs="*", default=list(SDK_VERSIONS))
    parser.add_argument("--parallel", type=int, default=3)
    args = parser.parse_args()
    start = time.monotonic()
    failed = False
    for version, venv in ensure_venvs(args.versions, args.parallel).items():
        if isinstance(venv, Exception):
            failed = True
            print(f"{version}: FAILED {venv}")
        else:
            print(json.dumps({**asdict(venv), "install_s": round(venv.install_s, 1),
                              "size_mib": round(venv.size_mib, 1)}))
    print(f"total {time.monotonic() - start:.1f} s, cache {cache_root()}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
