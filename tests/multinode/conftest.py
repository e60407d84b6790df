"""Fixtures for the multi-node tests: virtual hosts (network namespaces with sshd) and a 2-node SLURM cluster on
them. Missing system packages are installed with apt-get (root on Debian, as CI is), so the README's single test
command needs nothing else; if that is impossible the fixture fails and says why - it never skips."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multinode.hosts import VirtualHosts
from tests.multinode.slurm import SlurmCluster

# The binaries the harness runs, and the Debian package that brings each one.
REQUIRED_BINARIES = {
    "/usr/sbin/sshd": "openssh-server", "/usr/bin/ssh": "openssh-client", "/usr/bin/ssh-keygen": "openssh-client",
    "/usr/sbin/munged": "munge", "/usr/sbin/slurmctld": "slurmctld", "/usr/sbin/slurmd": "slurmd",
    "/usr/bin/sbatch": "slurm-client", "/usr/bin/scontrol": "slurm-client", "/usr/bin/sinfo": "slurm-client",
    "/usr/bin/srun": "slurm-client", "/usr/bin/nsenter": "util-linux", "/usr/bin/unshare": "util-linux",
}
APT_PACKAGES = ["iproute2", "openssh-server", "munge", "slurmctld", "slurmd", "slurm-client"]
HERE = Path(__file__).resolve().parent


def missing_binaries() -> list[str]:
    found_ip = shutil.which("ip") or Path("/usr/sbin/ip").exists() or Path("/sbin/ip").exists()
    missing = [path for path in REQUIRED_BINARIES if not Path(path).exists()]
    return missing + ([] if found_ip else ["ip"])


@functools.cache
def ensure_packages() -> None:
    """Install the harness's system packages once per session if any binary is missing; pytest.fail otherwise."""
    if not (missing := missing_binaries()):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"the multinode tests need {missing}; install as root: apt-get install -y "
                    f"--no-install-recommends {' '.join(APT_PACKAGES)}", pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(argv)} did not finish in 600 s", pytrace=False)
        if out.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}",
                        pytrace=False)
    if still_missing := missing_binaries():
        pytest.fail(f"apt-get installed {APT_PACKAGES} but {still_missing} are still missing", pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only the ones in this package.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.multinode)


@pytest.fixture(scope="session", autouse=True)
def system_packages() -> None:
    """Every test here needs them, also those that build their own VirtualHosts instead of using a fixture."""
    ensure_packages()


@pytest.fixture(scope="module")
def virtual_hosts() -> Iterator[VirtualHosts]:
    """node1 and node2 with sshd, torn down after the module. Tests that lose a node (kill_node) should make their
    own VirtualHosts instead, so later tests in the module still have both."""
    with VirtualHosts() as hosts:
        yield hosts


@pytest.fixture(scope="module")
def slurm_cluster(virtual_hosts: VirtualHosts) -> Iterator[SlurmCluster]:
    """A 2-node SLURM 22.05 cluster (slurmd on node1 and node2, slurmctld and munged in the root namespace) on the
    module's virtual hosts."""
    with SlurmCluster(virtual_hosts) as cluster:
        yield cluster
