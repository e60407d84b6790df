"""A real 2-node SLURM 22.05 cluster on the virtual hosts of tests/multinode/hosts.py, for testing tinkerd's
SLURM path with real sbatch/srun/scancel instead of mocks.

Layout: munged and slurmctld in the root network namespace (slurmctld in a private UTS+mount namespace, so it is
the host named in SlurmctldHost and binds only to the head address), one slurmd per node started inside the
node's namespaces the way hosts.VirtualHosts.enter_argv does it - never `ip netns exec`, which remounts /sys and
makes slurmd 22.05 die in its cgroup plugin. No cgroups, no systemd, no accounting: the slurm.conf keys come from
/work/shared/docs/multinode-testing.md. Everything (conf, munge socket and key, state, spool, logs, job output)
lives in one temp dir, so two clusters or a foreign munged/slurmctld on the machine never meet ours.

Clients run with `env` (SLURM_CONF=...); a job inherits it, so srun inside a batch script finds the cluster too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from tests.multinode.hosts import HarnessError, VirtualHosts, free_port, log_tail

MUNGED = "/usr/sbin/munged"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmCluster:
    """slurmctld + one slurmd per virtual host, all idle on entry; jobs cancelled and daemons killed on exit."""

    def __init__(self, hosts: VirtualHosts, cpus_per_node: int = 2, start_timeout: float = 30) -> None:
        self.hosts = hosts
        self.cpus_per_node = cpus_per_node
        self.start_timeout = start_timeout
        self.workdir = Path()
        self.conf = Path()
        self.jobs_dir = Path()
        self.env: dict[str, str] = {}
        self._munged: subprocess.Popen | None = None
        self._slurmctld: subprocess.Popen | None = None
        self._slurmd: dict[str, subprocess.Popen] = {}

    @property
    def nodes(self) -> list[str]:
        return self.hosts.nodes

    def __enter__(self) -> SlurmCluster:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"mnh-{self.hosts.suffix}-slurm-"))
        for sub in ("state", "spool", "jobs", "log", "munge"):
            (self.workdir / sub).mkdir()
        self.jobs_dir = self.workdir / "jobs"
        # mkdtemp makes 0700; a job run as another user (--uid) must still reach jobs_dir.
        os.chmod(self.workdir, 0o755)
        self._start_munged()
        self.conf = self.workdir / "slurm.conf"
        self.conf.write_text(self._slurm_conf())
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._start_slurmctld()
        for node in self.nodes:
            self._slurmd[node] = self.hosts.spawn_on(node, ["slurmd", "-D", "-f", str(self.conf), "-N", node],
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_idle()

    def _start_munged(self) -> None:
        munge_dir = self.workdir / "munge"
        key = munge_dir / "munge.key"
        if Path("/etc/munge/munge.key").exists():
            shutil.copy("/etc/munge/munge.key", key)
        else:
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = munge_dir / "munge.socket"
        log = self.workdir / "log" / "munged.log"
        # --force: munged refuses to run as root without it; our own socket keeps a system munged out of it.
        self._munged = subprocess.Popen(
            [MUNGED, "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir}/munged.pid", f"--log-file={log}", f"--seed-file={munge_dir}/seed"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while not self.munge_socket.exists():
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"munged did not create {self.munge_socket}\n{log_tail(log)}")
            time.sleep(0.02)

    def _slurm_conf(self) -> str:
        hosts, work = self.hosts, self.workdir
        self.slurmctld_port = free_port(hosts.head_address)
        lines = [
            f"ClusterName=mnh{hosts.suffix}", f"SlurmctldHost={hosts.head_name}({hosts.head_address})",
            f"SlurmctldPort={self.slurmctld_port}", "SlurmdPort=6818",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "ReturnToService=2", "PropagateResourceLimits=NONE",
            # Bind each daemon to the address its hostname resolves to, not 0.0.0.0: nothing listens outside.
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            # Fast tests: schedule at once (batch_sched_delay=0 takes sbatch-to-COMPLETED from ~3 s to ~1 s), give
            # cancelled jobs 2 s between SIGTERM and SIGKILL, keep finished jobs in `scontrol show job` for 10 min.
            # sched/backfill, not builtin: slurmctld refuses heterogeneous jobs without it, and only its backfill
            # pass starts them, every bf_interval seconds (default 30); other jobs still start at submit.
            "SchedulerType=sched/backfill", "SchedulerParameters=batch_sched_delay=0,bf_interval=1", "KillWait=2",
            "MinJobAge=600",
            "MessageTimeout=10",
            f"StateSaveLocation={work}/state", f"SlurmdSpoolDir={work}/spool/%n",
            f"SlurmctldPidFile={work}/slurmctld.pid", f"SlurmdPidFile={work}/slurmd-%n.pid",
            f"SlurmctldLogFile={work}/log/slurmctld.log", f"SlurmdLogFile={work}/log/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        lines += [f"NodeName={node} NodeAddr={hosts.address(node)} CPUs={self.cpus_per_node} RealMemory=1000"
                  for node in self.nodes]
        lines.append("PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _start_slurmctld(self) -> None:
        argv = self.hosts.head_argv(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._slurmctld = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)

    def logs(self) -> str:
        """Tails of every daemon log, for failure messages."""
        logs = ["slurmctld.log", *(f"slurmd-{node}.log" for node in self.nodes), "munged.log"]
        return "\n".join(log_tail(self.workdir / "log" / name, 15) for name in logs)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        states: dict[str, str] = {}
        while True:
            for name, proc in [("slurmctld", self._slurmctld), *self._slurmd.items()]:
                if proc is not None and proc.poll() is not None:
                    raise HarnessError(f"{name} exited with {proc.returncode} during start-up\n{self.logs()}")
            out = self.command(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
            states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"SLURM nodes not idle after {self.start_timeout} s: {states or out.stderr}\n"
                                   f"{self.logs()}")
            time.sleep(0.2)

    # ---- client commands ----------------------------------------------------------------------------------------
    def command(self, argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client (sbatch, squeue, scontrol, ...) against this cluster from the root namespace."""
        try:
            out = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout,
                                 cwd=self.jobs_dir)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{' '.join(argv)} did not finish in {timeout} s\n{self.logs()}") from exc
        if check and out.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}\n{self.logs()}")
        return out

    def sbatch(self, script: str | None, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit a batch script (its text; None with --wrap in args) and return the job id. Output goes to
        output_path(job_id) unless args name --output; the job runs in jobs_dir."""
        argv = ["sbatch", "--parsable", f"--chdir={self.jobs_dir}"]
        if not any(arg.startswith(("--output", "-o")) for arg in args):
            argv.append(f"--output={self.jobs_dir}/slurm-%j.out")
        argv += args
        if script is not None:
            path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.jobs_dir)[1])
            path.write_text(script)
            argv.append(str(path))
        try:
            out = subprocess.run(argv, capture_output=True, text=True, env={**self.env, **(env or {})},
                                 timeout=30, cwd=self.jobs_dir)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"sbatch did not answer in 30 s\n{self.logs()}") from exc
        if out.returncode != 0:
            raise HarnessError(f"sbatch {' '.join(args)} exited {out.returncode}: {out.stderr}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def output_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"slurm-{job_id}.out"

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, NodeList, ExitCode, ...); no accounting daemon needed. A
        heterogeneous job's id shows all its components (the last one's values win): name one as "JOBID+OFFSET"."""
        out = self.command(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_state(self, job_id: int, states: Iterable[str] | str, timeout: float = 30) -> str:
        """Wait until the job's state is one of states; fail at once if it ends in another terminal state."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = "?"
        while True:
            state = self.job_info(job_id).get("JobState", "?")
            if state in wanted:
                return state
            if state in TERMINAL_STATES or time.monotonic() > deadline:
                why = f"ended {state}" if state in TERMINAL_STATES else f"still {state} after {timeout} s"
                raise HarnessError(f"job {job_id} {why}, wanted {sorted(wanted)}\n"
                                   f"{log_tail(self.output_path(job_id))}\n{self.logs()}")
            time.sleep(0.2)

    def scancel(self, job_id: int, signal_name: str | None = None) -> None:
        self.command(["scancel", *([f"--signal={signal_name}"] if signal_name else []), str(job_id)])

    def job_ids(self) -> list[int]:
        """Jobs that are pending or running."""
        out = self.command(["squeue", "-h", "-o", "%i"], check=False)
        return [int(token) for token in out.stdout.split() if token.isdigit()]

    def job_processes(self, node: str) -> list[int]:
        """Processes on the node other than its sshd and slurmd: slurmstepd and whatever jobs started."""
        daemons = set(self.hosts.daemon_pids(node))
        if (slurmd := self._slurmd.get(node)) is not None:
            daemons.add(slurmd.pid)
        return [pid for pid in self.hosts.pids_on(node) if pid not in daemons]

    # ---- teardown -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged; the virtual hosts stay (their owner closes them)."""
        errors = []
        if self._slurmctld is not None and self._slurmctld.poll() is None:
            try:
                if ids := self.job_ids():
                    self.command(["scancel", *map(str, ids)], check=False, timeout=10)
                    deadline = time.monotonic() + 10
                    while self.job_ids() and time.monotonic() < deadline:
                        time.sleep(0.2)
            except HarnessError as exc:
                errors.append(str(exc))
        procs = [*self._slurmd.values(), self._slurmctld, self._munged]
        for proc in filter(None, procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in filter(None, procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._slurmd.clear()
        self._slurmctld = self._munged = None
        # slurmstepd and job processes left on a node are the virtual hosts' to kill (kill_node / close).
        if self.workdir != Path() and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise HarnessError("teardown of the SLURM cluster: " + "; ".join(errors))
