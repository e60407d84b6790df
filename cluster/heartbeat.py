"""A worker's heartbeat: a thread with its own socket, so it beats while the worker's main thread computes.

The controller declares a worker dead when a heartbeat is late by its heartbeat timeout
(actors/controller/workers.py). The thread only proves the process is alive and
scheduling threads; a main thread stuck in a call is caught by the controller's call
deadlines instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

import zmq

from cluster.codec import encode
from cluster.messages import WorkerHeartbeatEvent

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, ctx: zmq.Context, address: str, role: str, rank: int, interval_s: float,
                 memory: Callable[[], dict[str, float]] = dict):
        self.ctx, self.address, self.role, self.rank = ctx, address, role, rank
        self.interval_s = interval_s
        self.memory = memory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"{role}{rank}-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.role}-{self.rank}-heartbeat".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a controller that is away gets the latest beats, not a backlog
        sock.connect(self.address)
        host = socket.gethostname()
        try:
            while not self._stop.is_set():
                try:
                    memory = self.memory()
                except Exception:  # a beat without numbers still says "alive"
                    log.exception("heartbeat: memory stats failed")
                    memory = {}
                event = WorkerHeartbeatEvent(role=self.role, rank=self.rank, pid=os.getpid(), host=host,
                                             memory=memory)
                try:
                    sock.send_multipart(encode(event), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self._stop.wait(self.interval_s)
        finally:
            sock.close()
