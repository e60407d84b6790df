"""Start a tinkerd cluster on this node and keep it alive until Ctrl-C.

    python -m launch.cluster                      # built-in tiny model on CPU
    python -m launch.cluster --model Qwen/Qwen3-0.6B --trainer-ranks 2 --port 8000
    python -m launch.cluster --hostfile hosts --advertise-addr 10.0.0.10   # README 'Multi-node (hostfile)'

Starts, as separate processes: the controller, the API front-end, the trainer ranks
(under torchrun; a lone rank by itself) and the engines; waits until the API reports every worker ready;
prints the base_url. Each process logs to STATE_DIR/logs/<name>.log. The API holds no
state, so when it dies it is started again (same port; clients retry meanwhile), at
most API_RESTARTS times in API_RESTART_WINDOW_S. A dead engine is started again too, at
most ENGINE_RESTARTS times in ENGINE_RESTART_WINDOW_S: the controller has noticed its
missing heartbeats and re-queued or failed its samples, and takes it back when it says
it is ready; past the limit it stays down and the others sample. When any trainer
process dies, or the controller finds the group hung, the whole trainer group is killed
and started again (launch/supervision.py), and the controller rebuilds every run
(actors/controller/recovery.py); past TRAINER_RESTARTS, training answers 503 and
sampling goes on. A controller that exits with code 0 was asked to by the admin probe
(launch/probe.py shutdown): everything stops and the launcher exits 0. If the
controller or the API (past its limit) dies, or on Ctrl-C / SIGTERM, everything is torn
down and the cause is named.
With --hostfile, trainer ranks and engines run on the hosts it names (launch/multinode.py),
started over ssh or srun (launch/remote.py), their logs streamed to the same log files here.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:
    # `python launch/cluster.py` puts launch/ first on sys.path, where this very file
    # would shadow the `cluster` package; the repository root belongs there instead
    sys.path[0] = str(REPO_ROOT)

# both torch-free: torch (to build the built-in model, to ask AutoConfig) only in a subprocess
from actors import builtin_model, model_info  # noqa: E402
from cluster.config import ClusterConfig, ModelConfig  # noqa: E402
from cluster.process import descendants  # noqa: E402
from launch import args as launcher_args  # noqa: E402
from launch.args import build_parser  # noqa: E402
from launch.hostfile import Placement, TrainerNode  # noqa: E402
from launch.multinode import HostCheckFailed, HostLayout, multinode_layout, resolve_hosts  # noqa: E402
from launch.supervision import TRAINER_RESTARTS, ControllerLink, WorkerWatch  # noqa: E402

STARTUP_TIMEOUT_S = 600.0
READY_WAIT_S = 1  # how long one healthz call may wait for the cluster to start (whole seconds)
API_RESTARTS = 5  # restarts of a dying API process allowed within API_RESTART_WINDOW_S
API_RESTART_WINDOW_S = 60.0
# a dead engine is started again (the controller re-queues or fails its samples meanwhile), at most
# ENGINE_RESTARTS times per engine in ENGINE_RESTART_WINDOW_S; an engine that keeps dying stays down
ADMIN_TOKEN_FILE = "admin.token"  # in STATE_DIR/run
ENGINE_RESTARTS = 3
REMOTE_KILL_GRACE_S = 2.0  # a remote worker being killed gets this long to be stopped through its spawner
ENGINE_RESTART_WINDOW_S = 600.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every flag, checked (launch/args.py); --help shows this module's usage."""
    return launcher_args.parse_args(argv, description=__doc__)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _python_module(module: str, *args: str) -> str:
    """Run a helper module (torch lives there, not here) and return what it printed."""
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=_child_env())
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def resolve_model(args: argparse.Namespace) -> ModelConfig:
    """Describe the served model; build the built-in one on first use."""
    if args.model is None:
        directory = args.state_dir / "models" / "tiny-qwen3"
        print(f"tinkerd: preparing the built-in model in {directory} ...", flush=True)
        # also installed into an HF cache, so clients that look the tokenizer up by name
        # (SamplingClient.get_tokenizer, tinker-cookbook) find it offline; building it takes torch, which
        # lives in a subprocess, while a model already built is read here (a cold start's ~0.2 s saved)
        hf_home = args.state_dir / "hf_home"
        built = builtin_model.built_model(directory)
        info = (builtin_model.installed(built, hf_home) if built is not None else
                json.loads(_python_module("actors.builtin_model", str(directory), "--hf-home", str(hf_home))))
        print(f"tinkerd: clients find {info['name']} offline with HF_HOME={info['hf_home']} HF_HUB_OFFLINE=1",
              flush=True)
        return ModelConfig(path=info["path"], name=info["name"], tokenizer_dir=info["path"], arch=info["arch"],
                           vocab_size=info["vocab_size"], max_context=4096)
    info = model_info.local_summary(args.model) or json.loads(_python_module("actors.model_info", args.model))
    local = Path(args.model).expanduser()
    path = str(local.resolve()) if local.is_dir() else args.model
    return ModelConfig(path=path, name=args.model, tokenizer_dir=path, arch=info["arch"],
                       vocab_size=info["vocab_size"], max_context=info["max_context"])


def build_config(args: argparse.Namespace, model: ModelConfig) -> ClusterConfig:
    config = ClusterConfig(state_dir=str(args.state_dir.resolve()), model=model)
    config.api.host, config.api.port = args.host, args.port or free_port()
    if args.api_keys_file:
        config.api.api_keys_file = str(args.api_keys_file.resolve())
    config.controller.api_address = f"tcp://127.0.0.1:{free_port()}"
    # remote ranks and engines connect here: with a hostfile, an address every host reaches
    worker_host = args.advertise_addr or "127.0.0.1"
    config.controller.worker_address = f"tcp://{worker_host}:{free_port(worker_host)}"
    config.controller.session_timeout_s = args.session_timeout
    config.controller.max_adapters_per_user = args.max_adapters_per_user
    config.controller.heartbeat_timeout_s = args.heartbeat_timeout
    config.controller.snapshot_budget = args.snapshot_budget
    config.controller.colocate = args.colocate
    config.controller.training_linger_ms, config.controller.max_phase_ms = args.training_linger_ms, args.max_phase_ms
    config.trainer.ranks, config.trainer.max_adapters = args.trainer_ranks, args.max_adapters
    config.trainer.backend, config.trainer.tp, config.trainer.pp = args.trainer_backend, args.tp, args.pp
    config.trainer.call_timeout_s = args.trainer_timeout
    config.trainer.max_tokens_per_pass = args.max_tokens_per_pass
    config.trainer.max_lora_rank = config.engine.max_lora_rank = args.max_lora_rank
    config.trainer.device = config.engine.device = args.device
    config.trainer.dtype = config.engine.dtype = args.dtype
    config.engine.count, config.engine.backend = args.engines, args.engine_backend
    config.engine.sglang_python = str(args.sglang_python or "")
    config.engine.max_loras_per_batch = args.max_loras_per_batch
    config.engine.prefix_cache_bytes = int(args.prefix_cache_mb * 2**20)
    config.engine.weights_addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(args.engines)]
    return config


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from a server process
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class Child:
    name: str
    proc: subprocess.Popen  # here, or the ssh client / srun standing for the process on its host
    log_path: Path
    host: str = "localhost"


class Cluster:
    def __init__(self, config: ClusterConfig, config_path: Path, layout: HostLayout | None = None,
                 trainer_restarts: int = TRAINER_RESTARTS):
        self.config = config
        self.config_path = config_path
        self.layout = layout or HostLayout.single_node(
            Placement.single_node(config.trainer.ranks, config.engine.count), _child_env())
        self.log_dir = Path(config.state_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.restarts: dict[str, list[float]] = {}  # child name -> when it was restarted (monotonic)
        self.trainer_starts = 0
        self.trainer_restarts = trainer_restarts  # per TRAINER_RESTART_WINDOW_S (--trainer-restarts)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.api.host}:{self.config.api.port}"

    def _engine_command(self, index: int) -> list[str]:
        host = self.layout.placement.engine_hosts[index]
        python = self.config.engine.sglang_python or self.layout.spawners.python(host)
        return [python, "-m", "actors.engine.main", "--config", str(self.config_path), "--index", str(index)]

    def spawn(self, name: str, cmd: list[str], host: str = "localhost") -> Child:
        """Start `cmd` on `host`; its output goes to STATE_DIR/logs/<name>.log here, whichever host runs it."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = self.layout.spawners.for_host(host).start(host, cmd, log_file)
        child = Child(name, proc, log_path, host)
        self.children.append(child)
        return child

    def _api_command(self) -> list[str]:
        return [sys.executable, "-m", "api.server", "--config", str(self.config_path)]

    def start(self) -> None:
        self.spawn("controller", [sys.executable, "-m", "actors.controller.controller", "--config",
                                  str(self.config_path)])
        self.spawn("api", self._api_command())
        for i in range(self.config.engine.count):
            self.start_engine(i)
        self.start_trainers()

    def start_engine(self, index: int) -> Child:
        return self.spawn(f"engine{index}", self._engine_command(index), self.layout.placement.engine_hosts[index])

    @property
    def trainer_names(self) -> list[str]:
        """One process per trainer host (torchrun, or the lone rank): `trainer` on a single host, `trainer@<host>`
        on several."""
        nodes = self.layout.placement.trainer_nodes
        return ["trainer"] if len(nodes) == 1 else [f"trainer@{node.host}" for node in nodes]

    def start_trainers(self) -> list[Child]:
        """The whole trainer group: every rank on every host (torch.distributed cannot take back one rank)."""
        nodes = self.layout.placement.trainer_nodes
        # a restarted group rendezvouses on the next port: the dead group's torchrun on the first host may still
        # hold the old one while it reaps its ranks (a port taken meanwhile fails that start, and the next one moves on)
        master_port = self.layout.master_port + self.trainer_starts if self.layout.master_port else free_port()
        self.trainer_starts += 1
        return [self.spawn(name, self._trainer_command(node, len(nodes), master_port), node.host)
                for name, node in zip(self.trainer_names, nodes)]

    def _trainer_command(self, node: TrainerNode, nnodes: int, master_port: int) -> list[str]:
        """A lone rank is started as itself: it needs no rendezvous, torchrun would only import torch once more
        on the way (seconds of a cold start), and the launcher then watches and kills the rank, not its parent.
        Several ranks, or ranks on several hosts, start under one torchrun per host."""
        python = self.layout.spawners.python(node.host)
        rank = ["-m", "actors.trainer.main", "--config", str(self.config_path)]
        if nnodes == 1 and node.nproc == 1:
            return [python, "-u", *rank]  # -u: unbuffered like a torchrun rank, so its log is never behind
        multi = ["--node-rank", str(node.node_rank)] if nnodes > 1 else []
        return [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), *multi, "--nproc-per-node",
                str(node.nproc), "--master-addr", self.layout.master_addr, "--master-port", str(master_port), *rank]

    def trainer_children(self) -> list[Child]:
        return [c for c in self.children if c.name in self.trainer_names]

    def stop_trainers(self) -> None:
        """Kill every trainer process on every host, ranks included (a stopped or hung rank heeds nothing
        gentler), and forget them: start_trainers starts the group again. A remote group goes with its ssh
        client: the remote terminal hangs up, and torchrun kills its ranks."""
        for child in self.trainer_children():
            self._kill(child)
            self.children.remove(child)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_ready(self) -> None:
        """Until healthz says every worker is ready. Each call waits up to READY_WAIT_S inside the controller,
        which answers the moment the last worker says hello (no poll interval lost), and a child that dies
        meanwhile is still noticed within that second."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if (dead := self.dead_child()) is not None:
                raise ChildDied(dead)
            try:
                with urllib.request.urlopen(f"{self.base_url}/api/v1/healthz?wait_s={READY_WAIT_S}",
                                            timeout=READY_WAIT_S + 5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 500:  # the controller knows a worker failed: waiting will not help
                    raise ClusterFailed(_detail_of(exc)) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)  # until the API listens; then the waits above set the pace
        raise TimeoutError(f"cluster not ready after {STARTUP_TIMEOUT_S:.0f} s; logs in {self.log_dir}")

    def supervise(self) -> None:
        """Wait for a child to die: restart the API (stateless), engines and the trainer group (bounded); give up
        on anything else. A trainer group or an engine the controller found hung is killed and restarted too."""
        self.link = ControllerLink(self.config.controller.api_address, self.config.controller.admin_token_file)
        self.watch = WorkerWatch(self.link, restarts=self.trainer_restarts)
        try:
            while True:
                dead = self._wait_for_death()
                if isinstance(dead, str):  # the controller declared the group dead while its processes still run
                    self._restart_trainers(f"the controller found it hung: {dead}")
                    continue
                if dead.name == "controller" and dead.proc.returncode == 0:
                    raise ShutdownRequested  # the controller exits cleanly only when the probe asks it to
                if dead in self.trainer_children():
                    why = f"{dead.name} exited with code {dead.proc.returncode} (log in {dead.log_path})"
                    self.watch.trainers_exited(why)
                    self._restart_trainers(why)
                    continue
                self._restart_other(dead)
        finally:
            self.link.close()

    def _wait_for_death(self) -> Child | str:
        """The first child found dead, or why the controller declared the running trainer group dead (a hung
        engine is killed here: it is found dead next)."""
        while (dead := self.dead_child()) is None:
            engines = {int(c.name.removeprefix("engine")): c for c in self.children if c.name.startswith("engine")}
            hung = self.watch.hung(bool(self.trainer_children()), sorted(engines))
            if hung is not None and hung[0] == "trainer":
                return hung[2]
            if hung is not None:
                print(f"tinkerd: engine{hung[1]} is hung ({hung[2]}); killing it", flush=True)
                self._kill(engines[hung[1]])
            time.sleep(0.2)
        return dead

    def _kill(self, child: Child) -> None:
        """SIGKILL, ranks and all: a stopped or hung process heeds nothing gentler. A remote one is asked through
        its spawner first (ssh: Ctrl-C on its terminal, torchrun kills its ranks; srun: SIGTERM, which SLURM
        passes on and follows with SIGKILL), then its ssh client or srun is killed (the terminal hangs up)."""
        if not self.layout.spawners.is_remote(child.host):
            _kill_tree(child.proc)
            return
        child.proc.terminate()
        try:
            child.proc.wait(timeout=REMOTE_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()

    def _restart_trainers(self, why: str) -> None:
        self.stop_trainers()
        watch = self.watch
        if not watch.may_restart():
            print(f"tinkerd: the trainer group died again ({why}); {watch.describe_restarts()} is past the "
                  f"limit, so training stays unavailable (503) while sampling goes on", flush=True)
            watch.give_up(f"it died {len(watch.restarted_at)} times within {watch.window_s:.0f} s; last: {why}")
            return
        print(f"tinkerd: the trainer group died ({why}); restarting it ({watch.describe_restarts()})", flush=True)
        self.start_trainers()

    def _restart_other(self, dead: Child) -> None:
        if dead.name.startswith("engine"):  # tell the controller now, not a heartbeat timeout later
            self.watch.engine_exited(int(dead.name.removeprefix("engine")),
                                     f"its process exited with code {dead.proc.returncode}")
        restart = self._restart_command(dead)
        if restart is None and dead.name.startswith("engine"):
            self.children.remove(dead)  # an engine that keeps dying: the others go on sampling
            why = f"it exited {len(self.restarts[dead.name]) - 1} time(s) after restarts (log in {dead.log_path})"
            print(f"tinkerd: {dead.name} keeps dying; not restarting it again ({why})", flush=True)
            self.link.report("engine", int(dead.name.removeprefix("engine")), "lost", why)
            return
        if restart is None:
            raise ChildDied(dead)
        self.children.remove(dead)
        print(f"tinkerd: {dead.name} exited with code {dead.proc.returncode}; restarting it "
              f"({len(self.restarts[dead.name])} restart(s) in the last {self._window(dead.name):.0f} s; "
              f"log in {dead.log_path})", flush=True)
        self.spawn(dead.name, restart, dead.host)

    def _restart_command(self, dead: Child) -> list[str] | None:
        """The command that starts `dead` again, or None if it may not be restarted (any more)."""
        if dead.name == "api":
            command, allowed = self._api_command(), API_RESTARTS
        elif dead.name.startswith("engine"):
            command, allowed = self._engine_command(int(dead.name.removeprefix("engine"))), ENGINE_RESTARTS
        else:
            return None
        now = time.monotonic()
        recent = [t for t in self.restarts.get(dead.name, []) if now - t < self._window(dead.name)] + [now]
        self.restarts[dead.name] = recent
        return command if len(recent) <= allowed else None

    @staticmethod
    def _window(name: str) -> float:
        return API_RESTART_WINDOW_S if name == "api" else ENGINE_RESTART_WINDOW_S

    def stop(self, grace_s: float = 10.0) -> None:
        _stop_children(self.children, grace_s)


def _stop_children(children: list[Child], grace_s: float) -> None:
    """Ask every child to stop at once (a remote one through its ssh or srun), then kill what is left."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class ShutdownRequested(Exception):
    """The admin probe asked the controller to stop (launch/probe.py shutdown)."""


def write_admin_token(path: Path) -> Path:
    """A fresh random token only this user may read (0600): what launch/probe.py presents to the controller."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


class ClusterFailed(RuntimeError):
    """The cluster reported a failure while starting (a worker that is alive but unusable)."""


def _detail_of(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["detail"]
    except (ValueError, KeyError, TypeError):
        return f"healthz answered {exc.code}"


class ChildDied(RuntimeError):
    def __init__(self, child: Child):
        tail = child.log_path.read_text(errors="replace").splitlines()[-25:]
        super().__init__(f"process {child.name!r} exited with code {child.proc.returncode}; "
                         f"last lines of {child.log_path}:\n" + "\n".join(tail))
        self.child = child


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = resolve_model(args)
    except RuntimeError as exc:
        print(f"tinkerd: {exc}", file=sys.stderr)
        return 1
    config = build_config(args, model)
    run_dir = Path(config.state_dir) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config.controller.admin_token_file = str(write_admin_token(run_dir / ADMIN_TOKEN_FILE))
    config_path = run_dir / "cluster.json"
    config.save(config_path)
    layout = None
    if args.hostfile is not None:
        layout = multinode_layout(args, args.placement, _child_env())
        try:
            resolve_hosts(layout, config, config_path, args.advertise_addr)
        except HostCheckFailed as exc:
            build_parser().error(str(exc))  # nothing has started yet: refused like a bad flag
        config.save(config_path)  # now with the addresses the hosts reported

    cluster = Cluster(config, config_path, layout, args.trainer_restarts)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # a shell starts background jobs with SIGINT ignored; we still want `kill -INT` to stop us
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
        cluster.wait_ready()
        print(f"tinkerd ready: base_url={cluster.base_url} model={model.name} (logs in {cluster.log_dir})",
              flush=True)
        cluster.supervise()
    except KeyboardInterrupt:
        print("tinkerd: shutting down", flush=True)
        return 0
    except ShutdownRequested:
        print("tinkerd: shut down by the admin probe", flush=True)
        return 0
    except (ChildDied, ClusterFailed, TimeoutError) as exc:
        print(f"tinkerd: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
