"""The launcher's multi-node side: its flags, the placement a hostfile asks for, and the layout it resolves to.

A hostfile (launch/hostfile.py) says which trainer ranks and engines run on which host. The controller and the
API always run on the launching node; the controller's worker socket binds on --advertise-addr, which every host
must reach. Before anything starts, each remote host is asked (launch/hostcheck.py, over the chosen spawner)
whether it sees the state directory at the same path and which of its addresses reaches the controller: its
engines bind their weights socket on that address (an ephemeral port, reported to the controller when ready),
and torchrun's static rendezvous uses the first trainer host's address and a port free there.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ClusterConfig
from launch.hostcheck import HostCheckFailed, HostInfo, check_host
from launch.hostfile import HostfileError, Placement, parse_hostfile
from launch.remote import REMOTE_SPAWNERS, HostSpawners, LocalSpawner, RemoteSettings, is_local_host, remote_env

REPO_ROOT = Path(__file__).resolve().parents[1]
_MULTINODE_ONLY = ("engines_per_host", "advertise_addr", "ssh_config", "remote_python", "remote_workdir")


def add_multinode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-node (README 'Multi-node (hostfile)')")
    g.add_argument("--hostfile", type=Path, metavar="FILE",
                   help="hosts to run trainer ranks and engines on, one `host slots=N [engines=M] [addr=A]` "
                        "(or `host:N`) per line; the controller and API run here")
    g.add_argument("--engines-per-host", type=int, metavar="N",
                   help="engines on each hostfile host without engines= on its line (default 0)")
    g.add_argument("--advertise-addr", metavar="ADDR",
                   help="an IPv4 address of this node every host can reach: the controller binds its worker "
                        "socket there (required when the hostfile names another host)")
    g.add_argument("--spawner", default="ssh", choices=sorted(REMOTE_SPAWNERS),
                   help="how processes start on other hosts: ssh, or srun inside a SLURM allocation "
                        "(launch/slurm/); a local host needs neither")
    g.add_argument("--srun-het-group", type=int, metavar="N",
                   help="--spawner srun in a heterogeneous SLURM job: start the hosts' steps in its component N "
                        "(srun --het-group=N; launch/slurm/tinkerd-hetjob.sbatch; default: the job's own, as in a "
                        "plain allocation)")
    g.add_argument("--ssh-config", type=Path, metavar="FILE", help="ssh -F FILE (host aliases, keys, users)")
    g.add_argument("--remote-python", metavar="PATH",
                   help=f"the Python interpreter on the other hosts (default: this one's path, {sys.executable})")
    g.add_argument("--remote-workdir", metavar="DIR",
                   help=f"this repository's checkout on the other hosts (default: {REPO_ROOT})")
    g.add_argument("--gloo-ifname", metavar="NAME",
                   help="network interface for gloo/NCCL on every host (sets GLOO_SOCKET_IFNAME and "
                        "NCCL_SOCKET_IFNAME; without it an unresolvable hostname makes gloo use loopback)")


def plan_placement(p: argparse.ArgumentParser, args: argparse.Namespace) -> Placement:
    """The placement the flags ask for; argparse errors for anything that does not add up."""
    if args.srun_het_group is not None and args.spawner != "srun":
        p.error(f"--srun-het-group is for --spawner srun, not {args.spawner}")
    if args.srun_het_group is not None and args.srun_het_group < 0:
        p.error("--srun-het-group must be >= 0")
    if args.hostfile is None:
        given = [f"--{name.replace('_', '-')}" for name in _MULTINODE_ONLY if getattr(args, name) is not None]
        if given or args.gloo_ifname is not None or args.spawner != "ssh":
            p.error(f"{', '.join(given) or '--spawner/--gloo-ifname'} need(s) --hostfile")
        args.engines = 1 if args.engines is None else args.engines
        if args.trainer_ranks is None:
            args.trainer_ranks = args.tp * args.pp  # no data parallelism unless asked for
        return Placement.single_node(args.trainer_ranks, args.engines)
    if args.engines_per_host is not None and args.engines_per_host < 0:
        p.error("--engines-per-host must be >= 0")
    try:
        text = args.hostfile.read_text()
    except OSError as exc:
        p.error(f"cannot read --hostfile: {exc}")
    try:
        placement = Placement.from_hosts(parse_hostfile(text, str(args.hostfile)), args.trainer_ranks,
                                         args.engines, args.engines_per_host)
    except HostfileError as exc:
        p.error(str(exc))
    args.trainer_ranks, args.engines = placement.trainer_ranks, len(placement.engine_hosts)
    _check_advertise_addr(p, args, placement)
    if args.ssh_config is not None and not args.ssh_config.is_file():
        p.error(f"--ssh-config {args.ssh_config}: no such file")
    return placement


def _check_advertise_addr(p: argparse.ArgumentParser, args: argparse.Namespace, placement: Placement) -> None:
    remote = [h.name for h in placement.hosts if not is_local_host(h.name)]
    if args.advertise_addr is None:
        if remote:
            p.error(f"--advertise-addr is required with remote hosts ({', '.join(remote)}): an address of this "
                    f"node they can all reach, where the controller listens")
        args.advertise_addr = "127.0.0.1"
        return
    try:
        address = ipaddress.IPv4Address(args.advertise_addr)
    except ValueError:
        p.error(f"--advertise-addr {args.advertise_addr!r} is not an IPv4 address")
    if remote and address.is_loopback:
        p.error(f"--advertise-addr {address} is a loopback address, which {', '.join(remote)} cannot reach: "
                f"give an address of this node on the network they share")


@dataclass
class HostLayout:
    """A placement resolved to processes: how each host is reached, and torchrun's rendezvous point."""

    placement: Placement
    spawners: HostSpawners
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free local port, picked afresh whenever the trainers start

    @classmethod
    def single_node(cls, placement: Placement, local_env: dict[str, str]) -> "HostLayout":
        return cls(placement, HostSpawners(LocalSpawner(local_env, str(REPO_ROOT)), sys.executable))


def multinode_layout(args: argparse.Namespace, placement: Placement, local_env: dict[str, str]) -> HostLayout:
    """The spawners for a hostfile cluster (nothing is started or asked yet)."""
    if args.gloo_ifname:
        local_env = {**local_env, "GLOO_SOCKET_IFNAME": args.gloo_ifname, "NCCL_SOCKET_IFNAME": args.gloo_ifname}
    workdir = args.remote_workdir or str(REPO_ROOT)
    settings = RemoteSettings(python=args.remote_python or sys.executable, workdir=workdir,
                              env=remote_env(dict(os.environ), workdir, args.gloo_ifname),
                              ssh_config=str(args.ssh_config) if args.ssh_config else None,
                              srun_het_group=args.srun_het_group)
    spawners = HostSpawners(LocalSpawner(local_env, str(REPO_ROOT)), sys.executable, args.spawner, settings)
    return HostLayout(placement, spawners)


def resolve_hosts(layout: HostLayout, config: ClusterConfig, config_path: Path, advertise_addr: str) -> None:
    """Ask every remote host whether it can take part and how it is reached; fill in the addresses that depend
    on it (engines' weights sockets, torchrun's rendezvous). HostCheckFailed names the first host that cannot."""
    infos: dict[str, HostInfo] = {}
    for host in layout.placement.hosts:
        entry_addr = host.addr
        if layout.spawners.is_remote(host.name):
            info = check_host(layout.spawners.for_host(host.name), host.name,
                              layout.spawners.python(host.name), config_path, advertise_addr)
        else:
            info = HostInfo(socket.gethostname(), advertise_addr, 0)
        infos[host.name] = HostInfo(info.hostname, entry_addr or info.address, info.free_port)
        print(f"tinkerd: host {host.name} ({infos[host.name].hostname}, {infos[host.name].address}): "
              f"{layout.placement.describe()[len(infos) - 1].split(': ', 1)[1]}", flush=True)
    config.engine.weights_addresses = [f"tcp://{infos[host].address}:*" for host in layout.placement.engine_hosts]
    first = layout.placement.trainer_nodes[0].host
    layout.master_addr = infos[first].address
    layout.master_port = infos[first].free_port or None


__all__ = ["HostCheckFailed", "HostLayout", "add_multinode_args", "multinode_layout", "plan_placement",
           "resolve_hosts"]
