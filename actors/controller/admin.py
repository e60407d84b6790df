"""The admin probe's side of the controller: status, sessions, runs, futures, drain, kill-run, shutdown.

`python -m launch.probe` sends Admin*Req messages straight to the controller's API
socket (not through HTTP). Each carries the token the launcher wrote into
STATE_DIR/run/admin.token with mode 0600, so only who can read the state dir can send
them; a wrong or missing token is a 401. Every answer is an AdminResp: `info` (a few
facts) and `rows` (the table the command lists).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from actors.controller.errors import ApiError
from cluster.messages import (
    AdminDrainReq, AdminFuturesReq, AdminKillRunReq, AdminReq, AdminResp, AdminRunsReq, AdminSessionsReq,
    AdminShutdownReq, AdminStatusReq, AdminWorkerReportReq,
)

if TYPE_CHECKING:
    from actors.controller.controller import Controller

log = logging.getLogger(__name__)


def read_token(path: str) -> str:
    """The admin token; refused if others may read it (then anyone on the host could drive the cluster)."""
    if not path:
        return ""
    mode = os.stat(path).st_mode & 0o077
    if mode:
        raise PermissionError(f"{path} is readable by others (mode {oct(os.stat(path).st_mode & 0o777)}); "
                              f"it must be 0600")
    return Path(path).read_text().strip()


class AdminService:
    def __init__(self, controller: "Controller"):
        self.controller = controller
        self.token = read_token(controller.config.controller.admin_token_file)

    def _check(self, req: AdminReq) -> None:
        if not self.token or not hmac.compare_digest(req.token.encode(), self.token.encode()):
            raise ApiError(401, "wrong or missing admin token (the probe reads STATE_DIR/run/admin.token)")

    def handle_AdminStatusReq(self, req: AdminStatusReq) -> AdminResp:
        self._check(req)
        c = self.controller
        now = time.monotonic()
        rows = []
        states = c.workers.describe()
        for rank in range(c.workers.expected_trainers):
            beat = c.workers.group.beats.get(rank)
            state = states[f"trainer{rank}"]
            rows.append(_worker_row(f"trainer{rank}", "trainer", state, beat and beat.host, beat and beat.pid,
                                    beat and now - beat.at, beat.memory if beat else {}))
        for index in range(c.workers.expected_engines):
            engine = c.workers.engines.get(index)
            if engine is None:
                rows.append(_worker_row(f"engine{index}", "engine", "starting", None, None, None, {}))
            else:
                state = states[f"engine{index}"]
                rows.append(_worker_row(f"engine{index}", "engine", state, engine.host or None, engine.pid or None,
                                        now - engine.last_heartbeat, engine.memory))
        api_age = None if c.api_last_seen is None else now - c.api_last_seen
        rows.append(_worker_row("api", "api", "up" if api_age is not None else "no request yet", None, None,
                                api_age, {}))
        config = c.config
        info = {"uptime_s": round(time.time() - c.started_at, 1), "model": config.model.name,
                "trainer_backend": config.trainer.backend, "layout": c.workers.dims.describe(),
                "engine_backend": config.engine.backend, "engines": config.engine.count,
                "draining": c.draining, "failure": c.workers.failure, "engine_restarts": c.workers.engine_restarts,
                "trainer_group": self._trainer_group(), "degraded": c.workers.degraded,
                "residency": c.residency.describe(last=0),
                "clock_cycles": {**vars(c.training.cycles.stats), "queued": c.training.cycles.queued(),
                                 "max_tokens_per_pass": config.trainer.max_tokens_per_pass}}
        return AdminResp(info=info, rows=rows)

    def handle_AdminSessionsReq(self, req: AdminSessionsReq) -> AdminResp:
        self._check(req)
        c, now = self.controller, time.monotonic()
        rows = []
        for session in sorted(c.sessions.values(), key=lambda s: (s.user, s.session_id)):
            runs = [r for r in c.training.runs.values() if r.session_id == session.session_id]
            samplers = [s for s in c.sampling.sessions.values() if s.session_id == session.session_id]
            rows.append({"user": session.user, "session_id": session.session_id,
                         "state": "finished" if session.finished else "live",
                         "heartbeat_age_s": round(now - session.last_heartbeat, 1), "runs": len(runs),
                         "adapter_slots": sorted(r.slot for r in runs), "sampling_sessions": len(samplers),
                         "queue_depth": sum(c.training.queue_depth(r) for r in runs)})
        return AdminResp(info={"sessions": len(rows)}, rows=rows)

    def handle_AdminRunsReq(self, req: AdminRunsReq) -> AdminResp:
        self._check(req)
        c = self.controller
        rows = [{"user": run.user, "model_id": run.model_id, "session_id": run.session_id,
                 "adapter_slot": run.slot, "lora_rank": run.lora.rank if run.lora is not None else None,
                 "queue_depth": c.training.queue_depth(run), "seq_gaps": run.ledger.gaps,
                 "recovery": run.journal.describe()}
                for run in sorted(c.training.runs.values(), key=lambda r: (r.user, r.model_id))]
        info = {"runs": len(rows), "free_slots": len(c.training.free_slots),
                "max_adapters": c.config.trainer.max_adapters}
        return AdminResp(info=info, rows=rows)

    def handle_AdminFuturesReq(self, req: AdminFuturesReq) -> AdminResp:
        self._check(req)
        rows = self.controller.futures.describe(recent=max(0, req.recent))
        return AdminResp(info={"pending": sum(1 for r in rows if r["state"] == "pending")}, rows=rows)

    def handle_AdminDrainReq(self, req: AdminDrainReq) -> AdminResp:
        self._check(req)
        self.controller.draining = True
        log.warning("draining: new work is refused from now on; queued work finishes")
        rows = self.controller.futures.describe(recent=0)
        return AdminResp(info={"draining": True, "pending": len(rows)}, rows=rows)

    async def handle_AdminKillRunReq(self, req: AdminKillRunReq) -> AdminResp:
        self._check(req)
        run = self.controller.training.runs.get(req.model_id)
        if run is None:
            raise ApiError(404, f"no live training run {req.model_id!r}")
        self.controller.training.kill_run(run, "the run was dropped by an administrator")
        log.warning("run %s (user %s, slot %d) dropped by an administrator", run.model_id, run.user, run.slot)
        return AdminResp(info={"killed": run.model_id, "user": run.user, "adapter_slot": run.slot})

    def handle_AdminWorkerReportReq(self, req: AdminWorkerReportReq) -> AdminResp:
        """The launcher reports processes that exited or that it gave up on; answers what the controller sees."""
        self._check(req)
        workers = self.controller.workers
        if req.role == "trainer" and req.report == "exited":
            workers.trainer_group_died(req.detail or "its processes exited")
        elif req.role == "trainer" and req.report == "lost":
            workers.trainer_group_lost(req.detail or "the launcher could not restart it")
        elif req.role == "engine" and req.report == "exited":
            workers.engine_exited(req.index, req.detail or "its process exited")
        elif req.role == "engine" and req.report == "lost":
            workers.engine_lost(req.index, req.detail or "the launcher could not restart it")
        elif req.report:
            raise ApiError(400, f"unknown worker report {req.role!r}/{req.report!r}")
        deaths = {str(index): count for index, count in workers.engine_deaths.items()}
        return AdminResp(info={"trainer_group": self._trainer_group(), "engine_deaths": deaths})

    def _trainer_group(self) -> dict:
        group = self.controller.workers.group
        return {"state": group.state, "generation": group.generation, "deaths": group.deaths, "why": group.why}

    def handle_AdminShutdownReq(self, req: AdminShutdownReq) -> AdminResp:
        self._check(req)
        log.warning("shutdown requested by the admin probe")
        self.controller.request_shutdown()
        return AdminResp(info={"shutdown": True})


def _worker_row(name: str, role: str, state: str, host: str | None, pid: int | None, age_s: float | None,
                memory: dict) -> dict:
    rss = memory.get("rss_bytes")
    return {"name": name, "role": role, "state": state, "host": host, "pid": pid,
            "heartbeat_age_s": None if age_s is None else round(age_s, 1),
            "rss_mib": None if rss is None else round(rss / 2**20, 1)}
