"""Ask a host, before anything starts there, whether it can run its share of the cluster, and how it is reached.

    python -m launch.hostcheck --config STATE_DIR/run/cluster.json --peer CONTROLLER_ADDR

Run on the host itself (over ssh or srun, with the remote interpreter and working directory): that it starts
at all proves the interpreter and the checkout; it then checks that the state directory is the launching
node's (the config file readable, the directory writable: trainer ranks write checkpoints and adapters there)
and prints one JSON line: its hostname, the address it reaches the controller from (an address of this host
the others can reach too, on any sane network) and a TCP port free on that address (torchrun's store, when
this host runs node rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    address: str
    free_port: int


class HostCheckFailed(RuntimeError):
    pass


def _route_source(peer: str) -> str:
    """The local address the kernel would send from to reach `peer` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def describe_this_host(config: Path, peer: str) -> dict:
    state_dir = config.parent.parent
    if not os.access(config, os.R_OK):
        raise HostCheckFailed(f"cannot read {config}: the state directory must be at the same path on every host "
                              f"(a shared filesystem), or pass --state-dir a path every host mounts")
    if not os.access(state_dir, os.W_OK):
        raise HostCheckFailed(f"cannot write to {state_dir}: trainer ranks write checkpoints there")
    address = _route_source(peer)
    return {"hostname": socket.gethostname(), "address": address, "free_port": _free_port(address)}


def check_host(spawner, host: str, python: str, config: Path, peer: str) -> HostInfo:
    """Run this module on `host` through `spawner`; HostCheckFailed says why the host cannot take part."""
    argv = [python, "-m", "launch.hostcheck", "--config", str(config), "--peer", peer]
    try:
        out = spawner.run(host, argv, timeout_s=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HostCheckFailed(f"host {host}: no answer within {CHECK_TIMEOUT_S:.0f} s ({spawner.name})") from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        detail = (out.stderr.strip() or out.stdout.strip())[-2000:]
        raise HostCheckFailed(f"host {host} ({spawner.name}, {python} -m launch.hostcheck) failed with code "
                              f"{out.returncode}: {detail}")
    try:
        return HostInfo(**json.loads(lines[-1]))
    except (ValueError, TypeError) as exc:
        raise HostCheckFailed(f"host {host}: unexpected answer {lines[-1]!r} ({exc})") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--peer", required=True, help="the controller's address (IPv4)")
    args = p.parse_args()
    try:
        print(json.dumps(describe_this_host(args.config, args.peer)), flush=True)
    except (HostCheckFailed, OSError) as exc:
        print(f"{socket.gethostname()}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
