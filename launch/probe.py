"""The admin probe: ask a running tinkerd controller, over zmq (not HTTP), how it is, and steer it.

    python -m launch.probe [--state-dir DIR] [--json] status
    python -m launch.probe sessions | runs | futures [--recent N]
    python -m launch.probe drain                 # refuse new work (503); what is queued finishes
    python -m launch.probe kill-run MODEL_ID     # drop a training run now and free its adapter slot
    python -m launch.probe shutdown              # stop every process of the cluster

It reads the controller's address from STATE_DIR/run/cluster.json and the admin token
from STATE_DIR/run/admin.token (written by the launcher, mode 0600): whoever can read
the state dir can drive the cluster, nobody else. Exit code 0 on success, 1 with the
controller's reason (or "no answer") otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:
    sys.path[0] = str(REPO_ROOT)  # `python launch/probe.py`: the repository root, not launch/, goes first

import zmq  # noqa: E402

from cluster.config import ClusterConfig  # noqa: E402
from cluster.messages import (  # noqa: E402
    AdminDrainReq, AdminFuturesReq, AdminKillRunReq, AdminResp, AdminRunsReq, AdminSessionsReq, AdminShutdownReq,
    AdminStatusReq,
)
from cluster.transport import BlockingPeer, RemoteError  # noqa: E402
from launch.args import default_state_dir  # noqa: E402
from launch.cluster import ADMIN_TOKEN_FILE  # noqa: E402

TIMEOUT_MS = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", type=Path, default=default_state_dir(), help="the cluster's --state-dir")
    p.add_argument("--json", action="store_true", help="print the controller's answer as JSON")
    commands = p.add_subparsers(dest="command", required=True)
    for name, text in (("status", "layout, every worker's host, pid, state, heartbeat and memory; uptime"),
                       ("sessions", "live sessions per user, with their runs, adapter slots and queue depth"),
                       ("runs", "training runs per user, with adapter slot and queue depth"),
                       ("drain", "refuse new work from now on; queued work finishes"),
                       ("shutdown", "stop the whole cluster")):
        commands.add_parser(name, help=text)
    futures = commands.add_parser("futures", help="pending futures and the most recent settled ones")
    futures.add_argument("--recent", type=int, default=20, help="settled futures to list (default %(default)s)")
    kill = commands.add_parser("kill-run", help="drop a training run now and free its adapter slot")
    kill.add_argument("model_id")
    return p.parse_args(argv)


def request_for(args: argparse.Namespace, token: str):
    if args.command == "futures":
        return AdminFuturesReq(token=token, recent=args.recent)
    if args.command == "kill-run":
        return AdminKillRunReq(token=token, model_id=args.model_id)
    kinds = {"status": AdminStatusReq, "sessions": AdminSessionsReq, "runs": AdminRunsReq, "drain": AdminDrainReq,
             "shutdown": AdminShutdownReq}
    return kinds[args.command](token=token)


def ask(state_dir: Path, req) -> AdminResp:
    config = ClusterConfig.load(state_dir / "run" / "cluster.json")
    ctx = zmq.Context()
    peer = BlockingPeer(ctx, zmq.DEALER, config.controller.api_address, bind=False)
    try:
        return peer.call(req, timeout_ms=TIMEOUT_MS)
    finally:
        peer.close()
        ctx.term()


def render(resp: AdminResp) -> str:
    """The answer for a person: its facts, then its rows as an aligned table."""
    lines = [f"{key}: {value}" for key, value in resp.info.items() if not isinstance(value, (dict, list))]
    lines += [f"{key}: {json.dumps(value)}" for key, value in resp.info.items() if isinstance(value, (dict, list))]
    if resp.rows:
        columns = list(resp.rows[0])
        cells = [[_cell(row.get(c)) for c in columns] for row in resp.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines += ["", "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token_path = args.state_dir / "run" / ADMIN_TOKEN_FILE
    try:
        token = token_path.read_text().strip()
        resp = ask(args.state_dir, request_for(args, token))
    except FileNotFoundError as exc:
        print(f"tinkerd-probe: no running cluster in {args.state_dir}: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"tinkerd-probe: cannot read the admin token: {exc}", file=sys.stderr)
        return 1
    except RemoteError as exc:
        print(f"tinkerd-probe: the controller refused {args.command}: {exc.status} {exc.detail}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"tinkerd-probe: no answer from the controller in {TIMEOUT_MS / 1000:g} s", file=sys.stderr)
        return 1
    print(json.dumps({"info": resp.info, "rows": resp.rows}, indent=2) if args.json else render(resp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
