"""Virtual hosts for multi-node tests: real network namespaces on one machine, each with its own eth0, hostname,
/etc/hosts and sshd, all joined by a bridge that also reaches the root namespace.

Why: the multi-node launcher and the SLURM path must be tested against something that behaves like separate
machines (separate addresses, hostnames, ssh, a node that can be lost) without leaving this machine. The recipe
and its pitfalls are in /work/shared/docs/multinode-testing.md; this module follows it.

Layout of one instance (suffix SFX is random per instance, so instances and stale runs never collide):

    root namespace  mnhSFXh 10.200.K.1 ("mn-head") --+
    mnh-SFX-sw      br0 <------------------------------+-- mnhSFXn1b -- eth0 10.200.K.11  mnh-SFX-node1 ("node1")
                                                       +-- mnhSFXn2b -- eth0 10.200.K.12  mnh-SFX-node2 ("node2")

K is 0 unless another live instance holds 10.200.0.0/24. Nodes have no default route, so their traffic cannot
leave the /24. The root namespace's /etc/hosts is never touched: from the root side use the ssh_config aliases for
ssh and IP addresses for everything else. Inside a node every node name and the head name resolve.

gloo inside a node: name resolution alone is enough (every hostname resolves to its eth0 address), and
GLOO_SOCKET_IFNAME=eth0 (see NODE_GLOO_ENV) pins the interface anyway; a process in the root namespace that takes
part needs GLOO_SOCKET_IFNAME=<head_interface> or it picks the machine's own hostname address.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "mnh"
REGISTRY_DIR = Path("/run/tinkerd-mnh")
NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
HEAD_NAME = "mn-head"
# What a process started on a node needs so gloo never falls back to loopback; the launcher should pass it too.
NODE_GLOO_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}


class HarnessError(RuntimeError):
    """Set-up or teardown of the virtual hosts failed; the message says which step and shows the relevant log."""


def sh(*argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    """Run a set-up command, turning a failure into a HarnessError that shows the command and its stderr."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{shlex.join(argv)} did not finish in {timeout} s") from exc
    if check and out.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} exited {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def log_tail(path: Path | str, lines: int = 25) -> str:
    """The end of a daemon's log, for error messages."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def netns_inode(path: Path | str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Every live process whose network namespace has this inode (zombies have none and are left out)."""
    wanted = f"net:[{inode}]"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == wanted:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_netns_processes(inode: int, timeout: float = 5) -> list[int]:
    """SIGKILL everything in the namespace until nothing is left; repeated because a dying parent may fork."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := pids_in_netns(inode):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} in net namespace {inode} survived SIGKILL for {timeout} s")
        time.sleep(0.02)
    return sorted(killed)


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a live owner from a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, what: str, log: Path | None = None,
                  proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts on host:port; fail at once if the daemon that should listen there exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise HarnessError(f"{what} exited with {proc.returncode} before listening on {host}:{port}\n"
                                   + (log_tail(log) if log else "")) from None
            if time.monotonic() > deadline:
                raise HarnessError(f"{what} not listening on {host}:{port} after {timeout} s\n"
                                   + (log_tail(log) if log else "")) from None
            time.sleep(0.05)


class Registry:
    """Which harness instances are alive (owner pid + start time), so a new one can remove what dead ones left and
    pick a /24 that no live one holds. A lock file serialises set-up across processes."""

    def __init__(self) -> None:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(REGISTRY_DIR / "lock", "w")  # noqa: SIM115 - held for the registry's lifetime

    def __enter__(self) -> Registry:
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    @staticmethod
    def entries() -> dict[str, dict]:
        found = {}
        for path in REGISTRY_DIR.glob("*.json"):
            try:
                found[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                found[path.stem] = {}
        return found

    def live(self) -> dict[str, dict]:
        return {sfx: entry for sfx, entry in self.entries().items()
                if entry and process_start_time(entry.get("owner_pid", -1)) == entry.get("owner_start")}

    @staticmethod
    def register(suffix: str, octet: int) -> None:
        entry = {"owner_pid": os.getpid(), "owner_start": process_start_time(os.getpid()), "octet": octet}
        (REGISTRY_DIR / f"{suffix}.json").write_text(json.dumps(entry))

    @staticmethod
    def unregister(suffix: str) -> None:
        (REGISTRY_DIR / f"{suffix}.json").unlink(missing_ok=True)


def suffix_of(name: str) -> str | None:
    """The instance suffix in a namespace (mnh-SFX-...), link (mnhSFX...) or directory name of ours."""
    if name.startswith(PREFIX + "-"):
        return name[len(PREFIX) + 1:].split("-", 1)[0]
    if name.startswith(PREFIX) and len(name) >= len(PREFIX) + 4:
        return name[len(PREFIX):len(PREFIX) + 4]
    return None


def clean_stale(live_suffixes: set[str]) -> list[str]:
    """Remove namespaces, links, /etc/netns entries, temp dirs and registry entries of dead instances."""
    removed = []
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if suffix_of(name) not in (None, *live_suffixes):
            inode = netns_inode(NETNS_DIR / name)
            if inode is not None:
                kill_netns_processes(inode)
            sh("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if suffix_of(name) not in (None, *live_suffixes):
            sh("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    stale_dirs = list(ETC_NETNS_DIR.glob(f"{PREFIX}-*")) + list(Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"))
    for path in stale_dirs:
        if suffix_of(path.name) not in (None, *live_suffixes):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
    for suffix in Registry.entries():
        if suffix not in live_suffixes:
            Registry.unregister(suffix)
    return removed


class VirtualHosts:
    """N virtual hosts (default node1, node2) with sshd, reachable from the root namespace at head_address.

    Use as a context manager; everything it made is removed on exit, also when set-up fails half-way."""

    def __init__(self, nodes: Sequence[str] = ("node1", "node2"), head_name: str = HEAD_NAME,
                 setup_timeout: float = 15) -> None:
        if os.geteuid() != 0:
            raise HarnessError("VirtualHosts needs root (network namespaces, veths, sshd)")
        self.nodes = list(nodes)
        self.head_name = head_name
        self.setup_timeout = setup_timeout
        self.suffix = ""
        self.octet = -1
        self.workdir = Path()
        self.ssh_config = Path()
        self._sshd: dict[str, subprocess.Popen] = {}
        self._netns_inodes: dict[str, int] = {}
        self._registered = False

    # ---- naming -------------------------------------------------------------------------------------------------
    def netns(self, node: str) -> str:
        return f"{PREFIX}-{self.suffix}-{node}"

    @property
    def switch_netns(self) -> str:
        return f"{PREFIX}-{self.suffix}-sw"

    @property
    def head_interface(self) -> str:
        """The root namespace's veth; a root-side gloo rank needs GLOO_SOCKET_IFNAME set to it."""
        return f"{PREFIX}{self.suffix}h"

    def _node_link(self, node: str) -> str:
        return f"{PREFIX}{self.suffix}n{self.nodes.index(node) + 1}"

    def address(self, node: str) -> str:
        return f"10.200.{self.octet}.{11 + self.nodes.index(node)}"

    @property
    def head_address(self) -> str:
        return f"10.200.{self.octet}.1"

    @property
    def subnet(self) -> str:
        return f"10.200.{self.octet}.0/24"

    def hosts_file(self, node: str) -> Path:
        return ETC_NETNS_DIR / self.netns(node) / "hosts"

    def hosts_text(self) -> str:
        """The /etc/hosts every node sees: each node name and the head name, never 127.0.1.1 for the node itself
        (gloo would then advertise loopback)."""
        lines = ["127.0.0.1 localhost", f"{self.head_address} {self.head_name}"]
        lines += [f"{self.address(node)} {node}" for node in self.nodes]
        return "\n".join(lines) + "\n"

    # ---- set-up -------------------------------------------------------------------------------------------------
    def __enter__(self) -> VirtualHosts:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        with Registry() as registry:
            live = registry.live()
            clean_stale(set(live))
            self.suffix = self._fresh_suffix(set(live))
            self.octet = self._free_octet({entry["octet"] for entry in live.values()})
            registry.register(self.suffix, self.octet)
            self._registered = True
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.suffix}-"))
        self._make_network()
        self._make_keys()
        for node in self.nodes:
            self._start_sshd(node)
        for node in self.nodes:
            wait_for_port(self.address(node), 22, self.setup_timeout, f"sshd of {node}", self._sshd_log(node),
                          self._sshd[node])
        self._check_ssh()

    @staticmethod
    def _fresh_suffix(taken: set[str]) -> str:
        while (suffix := secrets.token_hex(2)) in taken:
            pass
        return suffix

    @staticmethod
    def _free_octet(taken: set[int]) -> int:
        for octet in range(256):
            if octet in taken:
                continue
            # A route or address already in 10.200.K (a real network, a foreign tool) rules K out.
            if not sh("ip", "-4", "route", "show", "to", "match", f"10.200.{octet}.11").stdout.count("10.200."):
                return octet
        raise HarnessError("no free /24 in 10.200.0.0/16 for the virtual hosts")

    def _make_network(self) -> None:
        sw = self.switch_netns
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        head, head_peer = self.head_interface, self.head_interface + "b"
        sh("ip", "link", "add", head, "type", "veth", "peer", "name", head_peer, "netns", sw)
        sh("ip", "-n", sw, "link", "set", head_peer, "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.head_address}/24", "dev", head)
        sh("ip", "link", "set", head, "up")
        for node in self.nodes:
            self._make_node_network(node)
        route = sh("ip", "-4", "route", "get", self.address(self.nodes[0])).stdout
        if f"dev {head} " not in route:
            raise HarnessError(f"{self.subnet} must route only via {head}, but `ip route get` says: {route}")
        for node in self.nodes:
            hosts = self.hosts_file(node)
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(self.hosts_text())

    def _make_node_network(self, node: str) -> None:
        ns, link = self.netns(node), self._node_link(node)
        sh("ip", "netns", "add", ns)
        self._netns_inodes[node] = netns_inode(NETNS_DIR / ns)
        sh("ip", "link", "add", link, "netns", ns, "type", "veth", "peer", "name", link + "b", "netns",
           self.switch_netns)
        sh("ip", "-n", self.switch_netns, "link", "set", link + "b", "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", link, "name", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _make_keys(self) -> None:
        for key in ("host_key", "client_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{PREFIX}-{self.suffix}", "-f",
               str(self.workdir / key))
        shutil.copy(self.workdir / "client_key.pub", self.workdir / "authorized_keys")
        entries = [
            f"Host {node}\n  HostName {self.address(node)}\n  User root\n  BatchMode yes\n"
            f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  IdentityFile {self.workdir}/client_key\n"
            f"  IdentitiesOnly yes\n  LogLevel ERROR\n  ConnectTimeout 5\n"
            for node in self.nodes]
        self.ssh_config = self.workdir / "ssh_config"
        self.ssh_config.write_text("\n".join(entries))

    def _sshd_log(self, node: str) -> Path:
        return self.workdir / f"sshd-{node}.log"

    def _start_sshd(self, node: str) -> None:
        config = self.workdir / f"sshd-{node}.conf"
        config.write_text("\n".join([
            f"ListenAddress {self.address(node)}:22", f"HostKey {self.workdir}/host_key",
            f"PidFile {self.workdir}/sshd-{node}.pid", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {self.workdir}/authorized_keys", "StrictModes no", "UsePAM no", "UseDNS no",
            # The launcher may open one connection per rank at once; the default 10:30:100 drops some.
            "MaxStartups 200", "MaxSessions 200", "PrintMotd no", "AcceptEnv GLOO_* TINKERD_*", ""]))
        Path("/run/sshd").mkdir(exist_ok=True)
        self._sshd[node] = self.spawn_on(node, ["/usr/sbin/sshd", "-D", "-f", str(config), "-E",
                                                str(self._sshd_log(node))])

    def _check_ssh(self) -> None:
        procs = {node: self.popen_on(node, "hostname", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for node in self.nodes}
        for node, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=self.setup_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            if out.decode().strip() != node:
                raise HarnessError(f"ssh {node} hostname gave {out!r} (stderr {err.decode()!r}), expected {node!r}\n"
                                   + log_tail(self._sshd_log(node)))

    # ---- running things on nodes ----------------------------------------------------------------------------------
    def enter_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """argv that runs inside the node without ssh: its net namespace plus a fresh UTS and mount namespace with
        the node's hostname and /etc/hosts. Not `ip netns exec`: that remounts /sys and slurmd then dies."""
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net={NETNS_DIR / self.netns(node)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", script, str(self.hosts_file(node)), node, *argv]

    def head_argv(self, argv: Sequence[str]) -> list[str]:
        """argv that runs in the root network namespace but with the head's hostname and the nodes' /etc/hosts (a
        private UTS and mount namespace), for a daemon that must know itself by the head name (slurmctld)."""
        hosts = self.workdir / "hosts-head"
        if not hosts.exists():
            hosts.write_text(self.hosts_text())
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts),
                self.head_name, *argv]

    def spawn_on(self, node: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a daemon inside the node (see enter_argv); kill_node and teardown end it."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.enter_argv(node, argv), **popen_kwargs)

    def ssh_argv(self, node: str, command: str | Sequence[str]) -> list[str]:
        """ssh argv for a command on the node; a list is quoted for the remote shell, a string is passed as is."""
        remote = command if isinstance(command, str) else shlex.join(command)
        return ["ssh", "-F", str(self.ssh_config), node, remote]

    def run_on(self, node: str, command: str | Sequence[str], *, timeout: float = 30, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command on the node over ssh and wait for it (text output)."""
        argv = self.ssh_argv(node, command)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{shlex.join(argv)} did not finish in {timeout} s; output so far: "
                               f"{exc.stdout!r} {exc.stderr!r}") from exc
        if check and out.returncode != 0:
            raise HarnessError(f"on {node}: {argv[-1]} exited {out.returncode}\nstdout: {out.stdout[-2000:]}\n"
                               f"stderr: {out.stderr[-2000:]}")
        return out

    def popen_on(self, node: str, command: str | Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a command on the node over ssh without waiting; the caller waits (with a timeout) or kills."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.ssh_argv(node, command), **popen_kwargs)

    def pids_on(self, node: str) -> list[int]:
        """Every process whose network namespace is the node's."""
        return pids_in_netns(self._netns_inodes[node])

    def daemon_pids(self, node: str) -> list[int]:
        """The harness's own processes on the node (its sshd listener), to tell them from what a test started."""
        sshd = self._sshd.get(node)
        return [sshd.pid] if sshd is not None and sshd.poll() is None else []

    def kill_node(self, node: str, timeout: float = 5) -> list[int]:
        """Lose the node: SIGKILL every process in its namespace (sshd included), nothing outside it. The network
        stays, so connections to it are refused rather than hanging. Returns the killed pids."""
        killed = kill_netns_processes(self._netns_inodes[node], timeout)
        if (sshd := self._sshd.get(node)) is not None:
            sshd.wait(timeout=timeout)
        return killed

    def restart_sshd(self, node: str) -> None:
        """Bring a killed node's sshd back (a rebooted node)."""
        self._start_sshd(node)
        wait_for_port(self.address(node), 22, self.setup_timeout, f"sshd of {node}", self._sshd_log(node),
                      self._sshd[node])

    # ---- teardown -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process on the nodes, delete namespaces, veths, /etc/netns entries and the temp dir.
        Each step runs even if an earlier one failed; the first failure is raised at the end."""
        errors: list[str] = []
        for node, inode in self._netns_inodes.items():
            try:
                kill_netns_processes(inode)
            except HarnessError as exc:
                errors.append(str(exc))
        for proc in self._sshd.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"sshd pid {proc.pid} did not exit")
        if self.suffix:
            for ns in [self.netns(node) for node in self.nodes] + [self.switch_netns]:
                if (NETNS_DIR / ns).exists():
                    result = sh("ip", "netns", "del", ns, check=False)
                    if result.returncode:
                        errors.append(f"ip netns del {ns}: {result.stderr.strip()}")
                shutil.rmtree(ETC_NETNS_DIR / ns, ignore_errors=True)
            if sh("ip", "link", "show", self.head_interface, check=False).returncode == 0:
                sh("ip", "link", "del", self.head_interface, check=False)
        if self.workdir != Path() and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._registered:
            Registry.unregister(self.suffix)
            self._registered = False
        self._netns_inodes.clear()
        self._sshd.clear()
        if errors:
            raise HarnessError("teardown of the virtual hosts: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this instance still exists (empty after close): namespaces, links, dirs, sshd processes."""
        left = [ns for ns in sh("ip", "netns", "list").stdout.split() if suffix_of(ns) == self.suffix]
        for line in sh("ip", "-o", "link", "show").stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if suffix_of(name) == self.suffix:
                left.append(f"link {name}")
        left += [str(p) for p in ETC_NETNS_DIR.glob(f"{PREFIX}-{self.suffix}-*")]
        if self.workdir != Path() and self.workdir.exists():
            left.append(str(self.workdir))
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "sshd" in cmdline and f"{PREFIX}-{self.suffix}-" in cmdline:
                    left.append(f"process {entry}: {cmdline.strip()}")
        return left
