"""The launcher's side of surviving dead and hung workers: when to restart the trainer group or an engine.

A torch.distributed group cannot be healed, so when any trainer process exits, or the
controller declares the group dead (a rank's heartbeats stopped: SIGSTOP, a hang; a call
past the trainer timeout), the launcher kills every trainer process on every host and
starts the group again on the same hosts, at most TRAINER_RESTARTS times in
TRAINER_RESTART_WINDOW_S. It tells the controller over the admin channel
(AdminWorkerReportReq): "exited" the moment it sees a trainer process gone (faster than
waiting for missed heartbeats), and "lost" when it gives up — the controller then answers
training with a 503 and keeps sampling. The controller's answer carries how many deaths
it has declared, which is how the launcher learns of a hung group it must kill. Engines
the same way: one the controller declared dead (its heartbeats stopped) while its
process still runs is killed, and then restarted like any engine that exited.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

TRAINER_RESTARTS = 3  # restarts of the trainer group allowed within TRAINER_RESTART_WINDOW_S
TRAINER_RESTART_WINDOW_S = 600.0
POLL_INTERVAL_S = 1.0  # how often the launcher asks the controller about the group
REPORT_TIMEOUT_MS = 5_000


class ControllerLink:
    """The launcher's DEALER to the controller's API socket, presenting the admin token."""

    def __init__(self, address: str, token_file: str):
        # zmq and the codec (numpy, every message class) are imported once the cluster is up, not with this
        # module: they would cost the launcher ~0.2 s before it starts its first process
        import zmq

        self.ctx = zmq.Context()
        self.address = address
        self.token = Path(token_file).read_text().strip()
        self.peer = None  # a BlockingPeer, made on the first report

    def report(self, role: str = "trainer", index: int = 0, report: str = "", detail: str = "") -> dict | None:
        """Send one report (or a poll); the controller's view of its workers, or None if it did not answer."""
        import zmq

        from cluster.messages import AdminWorkerReportReq
        from cluster.transport import BlockingPeer, RemoteError

        if self.peer is None:
            self.peer = BlockingPeer(self.ctx, zmq.DEALER, self.address, bind=False)
        req = AdminWorkerReportReq(token=self.token, role=role, index=index, report=report, detail=detail)
        try:
            return self.peer.call(req, timeout_ms=REPORT_TIMEOUT_MS).info
        except TimeoutError:
            # a reply may still come: a fresh socket keeps it from answering the next call
            self.peer.close()
            self.peer = None
            log.warning("the controller did not answer %s within %d ms", report or "a poll", REPORT_TIMEOUT_MS)
            return None
        except RemoteError as exc:
            log.warning("the controller refused a worker report: %s", exc)
            return None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.ctx.term()


class WorkerWatch:
    """Counts the trainer group's restarts and the deaths the controller declared; says what to restart or kill."""

    def __init__(self, link: ControllerLink, restarts: int = TRAINER_RESTARTS,
                 window_s: float = TRAINER_RESTART_WINDOW_S):
        self.link = link
        self.allowed, self.window_s = restarts, window_s
        self.restarted_at: list[float] = []
        self.handled_deaths = 0  # controller-declared trainer group deaths already answered with a restart
        self.handled_engine_deaths: dict[int, int] = {}  # engine index -> the same, per engine
        self.lost = ""  # why the launcher gave up on the trainer group, once it has
        self._next_poll = 0.0

    def trainers_exited(self, detail: str) -> None:
        """A trainer process exited: the group is dead whatever the controller has noticed yet."""
        view = self.link.report(report="exited", detail=detail)
        if view is not None:
            self.handled_deaths = view["trainer_group"]["deaths"]

    def engine_exited(self, index: int, detail: str) -> None:
        view = self.link.report("engine", index, "exited", detail)
        if view is not None:
            self.handled_engine_deaths[index] = view["engine_deaths"].get(str(index), 0)

    def hung(self, watch_trainers: bool, engines: list[int]) -> tuple[str, int, str] | None:
        """("trainer", 0, why) or ("engine", index, why) for a worker the controller declared dead while its
        process still runs (polled at most once per POLL_INTERVAL_S), else None."""
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_INTERVAL_S
        view = self.link.report()
        if view is None:
            return None
        group = view["trainer_group"]
        if watch_trainers and not self.lost and group["deaths"] > self.handled_deaths:
            self.handled_deaths = group["deaths"]
            return "trainer", 0, group["why"] or "the controller declared it dead"
        for index in engines:
            deaths = view["engine_deaths"].get(str(index), 0)
            if deaths > self.handled_engine_deaths.get(index, 0):
                self.handled_engine_deaths[index] = deaths
                return "engine", index, "the controller declared it dead (no heartbeat)"
        return None

    def may_restart(self) -> bool:
        now = time.monotonic()
        self.restarted_at = [t for t in self.restarted_at if now - t < self.window_s] + [now]
        return len(self.restarted_at) <= self.allowed

    def give_up(self, why: str) -> None:
        self.lost = why
        self.link.report(report="lost", detail=why)

    def describe_restarts(self) -> str:
        return f"{len(self.restarted_at)} restart(s) in the last {self.window_s:.0f} s"
