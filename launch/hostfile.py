"""Hostfiles, and the placement they describe: which trainer ranks and engines run on which host.

One host per line, in the common `host slots=N` format (`host:N` too); `#` starts a comment:

    # trainer ranks (torchrun --nproc-per-node) per host, engines per host
    node1 slots=2 engines=1
    node2:2                     # engines: --engines-per-host (default 0)
    node3 slots=0 engines=2 addr=10.0.0.13

- `slots`: trainer ranks on that host. Ranks are numbered host by host in file order (node ranks of a static
  torchrun rendezvous), so `node1`'s ranks come first.
- `engines`: engine processes on that host (default: `--engines-per-host`); engines are numbered host by
  host in file order too.
- `addr`: the address the other hosts reach this one at (default: the source address this host uses to
  reach the controller's `--advertise-addr`, which the launcher asks it for).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HOST_COLON_SLOTS = re.compile(r"^(?P<host>[^\s:=#]+):(?P<slots>\d+)$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_KEYS = ("slots", "engines", "addr")


class HostfileError(ValueError):
    """A hostfile that cannot be read, or a placement that does not add up."""


@dataclass(frozen=True)
class HostEntry:
    name: str
    slots: int  # trainer ranks on this host
    engines: int | None = None  # None: --engines-per-host decides
    addr: str | None = None  # None: ask the host which address reaches the controller
    line: int = 0


def parse_hostfile(text: str, source: str = "hostfile") -> list[HostEntry]:
    """The hosts of a hostfile, in file order; HostfileError names the first bad line."""
    hosts: list[HostEntry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entry = _parse_line(line, number)
        except ValueError as exc:
            raise HostfileError(f"{source} line {number}: {exc}: {raw.strip()!r}") from None
        if entry.name in seen:
            raise HostfileError(f"{source} line {number}: host {entry.name!r} is already on line "
                                f"{seen[entry.name]}; give each host one line")
        seen[entry.name] = number
        hosts.append(entry)
    if not hosts:
        raise HostfileError(f"{source} names no host")
    return hosts


def _parse_line(line: str, number: int) -> HostEntry:
    first, *rest = line.split()
    fields: dict[str, str] = {}
    if (colon := _HOST_COLON_SLOTS.match(first)) is not None:
        name, fields["slots"] = colon["host"], colon["slots"]
    elif ":" in first or "=" in first or not _HOST_NAME.match(first):
        raise ValueError("expected `host slots=N` or `host:N`")
    else:
        name = first
    for token in rest:
        key, eq, value = token.partition("=")
        if not eq or not value:
            raise ValueError(f"expected key=value, got {token!r}")
        if key not in _KEYS:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(_KEYS)})")
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value
    if "slots" not in fields:
        raise ValueError("no slots: write `host slots=N` (N trainer ranks; 0 for an engines-only host)")
    slots = _count(fields["slots"], "slots")
    engines = _count(fields["engines"], "engines") if "engines" in fields else None
    return HostEntry(name=name, slots=slots, engines=engines, addr=fields.get("addr"), line=number)


def _count(value: str, key: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TrainerNode:
    """One torchrun on one host: its node rank and the global trainer ranks it runs."""

    host: str
    node_rank: int
    first_rank: int
    nproc: int

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.nproc)


@dataclass(frozen=True)
class Placement:
    hosts: tuple[HostEntry, ...]
    trainer_nodes: tuple[TrainerNode, ...]
    engine_hosts: tuple[str, ...]  # engine index -> the host it runs on

    @classmethod
    def single_node(cls, trainer_ranks: int, engines: int) -> "Placement":
        host = HostEntry(name="localhost", slots=trainer_ranks, engines=engines)
        return cls((host,), (TrainerNode(host.name, 0, 0, trainer_ranks),), (host.name,) * engines)

    @classmethod
    def from_hosts(cls, hosts: list[HostEntry], trainer_ranks: int | None = None, engines: int | None = None,
                   engines_per_host: int | None = None) -> "Placement":
        """Place ranks and engines as the hosts say; refuse totals that disagree with the flags."""
        slots = sum(h.slots for h in hosts)
        if trainer_ranks is not None and slots != trainer_ranks:
            raise HostfileError(f"the hostfile's slots add up to {slots} trainer ranks, but --trainer-ranks is "
                                f"{trainer_ranks}: make them agree (or leave --trainer-ranks out)")
        if slots == 0:
            raise HostfileError("the hostfile gives no host a slot: at least one trainer rank must run somewhere")
        nodes, first_rank = [], 0
        for host in (h for h in hosts if h.slots > 0):
            nodes.append(TrainerNode(host.name, len(nodes), first_rank, host.slots))
            first_rank += host.slots
        per_host = [h.engines if h.engines is not None else (engines_per_host or 0) for h in hosts]
        engine_hosts = tuple(h.name for h, n in zip(hosts, per_host) for _ in range(n))
        if not engine_hosts:
            raise HostfileError("no host runs an engine: add engines=N to a hostfile line, or pass "
                                "--engines-per-host N")
        if engines is not None and len(engine_hosts) != engines:
            raise HostfileError(f"the hostfile places {len(engine_hosts)} engine(s), but --engines is {engines}: "
                                f"make them agree (or leave --engines out)")
        return cls(tuple(hosts), tuple(nodes), engine_hosts)

    @property
    def trainer_ranks(self) -> int:
        return sum(n.nproc for n in self.trainer_nodes)

    def host(self, name: str) -> HostEntry:
        return next(h for h in self.hosts if h.name == name)

    def describe(self) -> list[str]:
        """One line per host: what runs there."""
        lines = []
        for host in self.hosts:
            node = next((n for n in self.trainer_nodes if n.host == host.name), None)
            ranks = f"trainer ranks {node.ranks.start}-{node.ranks.stop - 1}" if node else "no trainer ranks"
            engines = [str(i) for i, name in enumerate(self.engine_hosts) if name == host.name]
            lines.append(f"{host.name}: {ranks}, engines [{', '.join(engines)}]")
        return lines
