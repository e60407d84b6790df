"""The launcher's start-up wait: still starting (503) means wait, failed (500) means stop now.

A real HTTP server on loopback stands in for the API (the launcher only reads healthz).
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from cluster.config import ClusterConfig
from launch.cluster import Cluster, ClusterFailed


class _Healthz(http.server.BaseHTTPRequestHandler):
    answers: list[tuple[int, str]] = []

    def do_GET(self):
        status, detail = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        body = json.dumps({"detail": detail}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _cluster_polling(tmp_path, answers) -> Cluster:
    _Healthz.answers = list(answers)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = ClusterConfig(state_dir=str(tmp_path))
    config.api.port = server.server_address[1]
    return Cluster(config, tmp_path / "cluster.json")


def test_a_failed_cluster_stops_the_wait_with_its_cause(tmp_path):
    cluster = _cluster_polling(tmp_path, [(503, "cluster not ready"), (503, "cluster not ready"),
                                          (500, "cluster failed: trainer 1 reports coordinates ...")])
    with pytest.raises(ClusterFailed, match="trainer 1 reports coordinates"):
        cluster.wait_ready()


def test_a_starting_cluster_is_waited_for(tmp_path):
    cluster = _cluster_polling(tmp_path, [(503, "cluster not ready"), (503, "cluster not ready"), (200, "ok")])
    cluster.wait_ready()
