"""Starting a command on a host: here (a plain child), over ssh, or as a one-task SLURM step.

Every spawner gives back a `subprocess.Popen` of a process on the launching node (the command itself, the ssh
client, or srun) whose output goes to the caller's log file there, and whose exit status is the command's. Its
`terminate()` asks the command to stop, `kill()` stops it for sure:

- ssh runs the command on a remote pty (`ssh -tt`): when the connection drops (the launcher died, even by
  SIGKILL: the ssh client dies with its parent) the remote side gets SIGHUP, so nothing is orphaned there;
  `terminate()` types Ctrl-C on that pty (SIGINT, the command shuts down and ssh returns its status).
- srun: `terminate()` is SIGTERM to srun, which SLURM passes on to the step; a step whose srun is gone is
  killed by SLURM, and so is every step when the job ends (scancel). In a heterogeneous job the steps go to
  the component `srun_het_group` names (launch/slurm/tinkerd-hetjob.sbatch: the worker nodes).

ssh does not carry the environment over: the variables of `remote_env` are set on the command line.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from typing import IO

from cluster.process import die_with_parent

# passed on to remote hosts as they are set here (ranks read them); TINKERD_* go too
REMOTE_ENV_NAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "HF_HOME", "TINKERD_LOG_LEVEL")
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
               # a launching node that vanished without closing the connection is noticed within 15 s
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")
CTRL_C = b"\x03"


def is_local_host(name: str) -> bool:
    """A host this launcher reaches without ssh: loopback, or this machine's own name."""
    own = socket.gethostname()
    return name in {"localhost", "127.0.0.1", "::1", own, own.split(".")[0], socket.getfqdn()}


def remote_env(environ: dict[str, str], workdir: str, gloo_ifname: str | None = None) -> dict[str, str]:
    """What a process on another host needs in its environment (ssh passes nothing on by itself)."""
    env = {"PYTHONPATH": workdir, "HF_HUB_OFFLINE": environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": environ.get("TOKENIZERS_PARALLELISM", "false")}
    env.update({k: v for k, v in environ.items() if k.startswith("TINKERD_") or k in REMOTE_ENV_NAMES})
    if gloo_ifname:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = gloo_ifname
    return env


@dataclass(frozen=True)
class RemoteSettings:
    python: str  # the interpreter on every remote host
    workdir: str  # this repository's checkout on every remote host
    env: dict[str, str] = field(default_factory=dict)  # the remote environment (remote_env)
    ssh_config: str | None = None  # ssh -F
    srun_het_group: int | None = None  # srun --het-group: the component of a heterogeneous job the hosts are in


class LocalSpawner:
    """A child of the launcher on this node (its own session: a terminal's Ctrl-C reaches only the launcher)."""

    name = "local"

    def __init__(self, env: dict[str, str], cwd: str):
        self.env, self.cwd = env, cwd

    def start(self, host: str, argv: list[str], log_file: IO[bytes]) -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env,
                                preexec_fn=die_with_parent, start_new_session=True)

    def run(self, host: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, cwd=self.cwd, env=self.env, timeout=timeout_s)


class _SshProcess(subprocess.Popen):
    def terminate(self) -> None:
        try:  # Ctrl-C on the remote pty: SIGINT to the command, which stops and lets ssh return its status
            self.stdin.write(CTRL_C)
            self.stdin.flush()
        except (OSError, ValueError):
            super().terminate()


class SshSpawner:
    name = "ssh"

    def __init__(self, settings: RemoteSettings):
        self.settings = settings

    def _ssh(self, host: str, *options: str) -> list[str]:
        config = ("-F", self.settings.ssh_config) if self.settings.ssh_config else ()
        return ["ssh", *config, *SSH_OPTIONS, *options, host]

    def remote_command(self, argv: list[str], tty: bool = False) -> str:
        env = [f"{k}={v}" for k, v in sorted(self.settings.env.items())]
        # on a pty, newlines would reach the log as \r\n
        prefix = "stty -onlcr 2>/dev/null; " if tty else ""
        return (f"{prefix}cd {shlex.quote(self.settings.workdir)} && exec env "
                + " ".join(shlex.quote(part) for part in [*env, *argv]))

    def start(self, host: str, argv: list[str], log_file: IO[bytes]) -> subprocess.Popen:
        return _SshProcess([*self._ssh(host, "-tt"), self.remote_command(argv, tty=True)], stdin=subprocess.PIPE,
                           stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                           start_new_session=True)

    def run(self, host: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run([*self._ssh(host), self.remote_command(argv)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout_s)


class SrunSpawner:
    """A one-task step of the SLURM job the launcher runs in, pinned to the host (the sbatch scripts use it)."""

    name = "srun"

    def __init__(self, settings: RemoteSettings):
        self.settings = settings

    def command(self, host: str, argv: list[str]) -> list[str]:
        # --overlap: steps share the allocation's CPUs and memory instead of waiting for each other; in a
        # heterogeneous job a step runs in component 0 (the batch script's) unless --het-group names another
        group = self.settings.srun_het_group
        return ["srun", *([f"--het-group={group}"] if group is not None else []), "--nodes=1", "--ntasks=1",
                f"--nodelist={host}", "--overlap", "--export=ALL", "--kill-on-bad-exit=1",
                f"--chdir={self.settings.workdir}", *argv]

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.settings.env}

    def start(self, host: str, argv: list[str], log_file: IO[bytes]) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=self._env(), preexec_fn=die_with_parent,
                                start_new_session=True)

    def run(self, host: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=self._env(), timeout=timeout_s)


REMOTE_SPAWNERS = {"ssh": SshSpawner, "srun": SrunSpawner}


class HostSpawners:
    """The spawner and interpreter for each host: local hosts need no ssh, the others use the one named."""

    def __init__(self, local: LocalSpawner, local_python: str, remote_name: str = "ssh",
                 settings: RemoteSettings | None = None):
        self.local, self.local_python = local, local_python
        self.settings = settings
        self.remote = REMOTE_SPAWNERS[remote_name](settings) if settings is not None else None

    def is_remote(self, host: str) -> bool:
        return self.remote is not None and not is_local_host(host)

    def for_host(self, host: str):
        return self.remote if self.is_remote(host) else self.local

    def python(self, host: str) -> str:
        return self.settings.python if self.is_remote(host) else self.local_python
