"""Talking to a Ray cluster's Jobs API: the address, token auth, one-line errors, and the
`lorapipe jobs list|status|logs|stop` commands.

Address: --address, else $RAY_ADDRESS; it is the dashboard (http://HEAD:8265), not the GCS port
or a ray:// client address. Token auth is Ray's own (2.60): with RAY_AUTH_MODE=token, Ray's client
sends the token from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token. Tokens are never printed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import urlsplit

from pipelines.core.errors import UserError

ADDRESS_HELP = "Ray dashboard address, http://HEAD:8265 (default: $RAY_ADDRESS)"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 10


def dashboard_address(address: Optional[str]) -> str:
    """--address or $RAY_ADDRESS as an http(s) URL without a trailing slash."""
    addr = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not addr:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if addr == "auto" or addr.startswith("ray://"):
        raise UserError(f"address {addr!r} is not a dashboard address; the Jobs API needs http://HEAD:8265")
    if "://" not in addr:
        addr = f"http://{addr}"
    if urlsplit(addr).scheme not in ("http", "https"):
        raise UserError(f"address {addr!r} must be http:// or https:// (the Ray dashboard, port 8265 by default)")
    return addr.rstrip("/")


def is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_message(address: str, err: Exception) -> str:
    if "Authentication failed" in str(err):  # 403: a token was sent and refused
        return (f"the cluster at {address} refused the token (RAY_AUTH_TOKEN / ~/.ray/auth_token): "
                "wrong token for this cluster")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return (f"the cluster at {address} needs a token and none was found: set RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    return (f"the cluster at {address} needs a token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=... "
            "(or put the token in ~/.ray/auth_token)")


@contextmanager
def cluster_errors(address: str, job_id: Optional[str] = None) -> Iterator[None]:
    """Ray SDK failures a user can cause -> one-line UserError (no traceback, no token)."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise UserError(_auth_message(address, e)) from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise UserError(f"cannot reach the Ray dashboard at {address}: is the cluster up and is this its "
                        "dashboard address (port 8265 by default)?") from None
    except (RuntimeError, ValueError) as e:
        text = str(e).strip()
        if job_id and ("404" in text or "does not exist" in text):
            raise UserError(f"no job {job_id!r} on {address}; `lorapipe jobs list --address {address}` "
                            "lists its jobs") from None
        raise UserError(f"Ray Jobs API at {address}: {text.splitlines()[0] if text else type(e).__name__}") from None


def connect(address: Optional[str]):
    """A JobSubmissionClient for the cluster, after a bounded reachability probe (Ray's own
    requests have no timeout, so a black-holed address would hang)."""
    import requests

    url = dashboard_address(address)
    with cluster_errors(url):
        requests.get(f"{url}/api/version", timeout=PROBE_TIMEOUT_S)
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(url)


def head_is_this_machine(address: str) -> bool:
    """A loopback address can be a tunnel or port-forward to a remote cluster; it is this machine
    only if the head node's IP is one of this machine's addresses."""
    if not is_loopback(address):
        return False
    try:
        import psutil
        from ray.util.state import list_nodes

        heads = list_nodes(address=address, filters=[("is_head_node", "=", True)], timeout=PROBE_TIMEOUT_S)
        mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    except Exception:  # state API unavailable: be conservative, treat as remote
        return False
    return bool(heads) and all(h.node_ip in mine for h in heads)


def follow_logs(client, address: str, job_id: str) -> int:
    """Stream a job's logs until it ends; exit status 0 if it SUCCEEDED, else 1."""
    import aiohttp

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    with cluster_errors(address, job_id):
        client.get_job_info(job_id)  # an unknown id: one line here, not a websocket handshake error
        try:
            asyncio.run(tail())
        except aiohttp.ClientError as e:
            raise UserError(f"lost the log stream of job {job_id} ({type(e).__name__}); "
                            f"`lorapipe jobs logs {job_id} --follow --address {address}` picks it up again") from None
        info = client.get_job_info(job_id)
        while str(info.status) not in TERMINAL:  # the log stream can close a moment before the status moves
            time.sleep(1)
            info = client.get_job_info(job_id)
    status = str(info.status)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
          file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_jobs_list(args) -> int:
    client = connect(args.address)
    with cluster_errors(client.get_address()):
        jobs = [j for j in client.list_jobs() if j.submission_id]
    if not jobs:
        print(f"no jobs on {client.get_address()}")
        return 0
    rows = [("JOB ID", "STATUS", "CONFIG", "USER", "SUBMITTED", "ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        meta = j.metadata or {}
        rows.append((j.submission_id, str(j.status), meta.get("lorapipe.config", "-"), meta.get("lorapipe.user", "-"),
                     _when(j.start_time), j.entrypoint))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    return 0


def cmd_jobs_status(args) -> int:
    client = connect(args.address)
    with cluster_errors(client.get_address(), args.job_id):
        info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    for key, value in sorted((info.metadata or {}).items()):
        print(f"  {key}: {value}")
    return 0


def cmd_jobs_logs(args) -> int:
    client = connect(args.address)
    if args.follow:
        return follow_logs(client, client.get_address(), args.job_id)
    with cluster_errors(client.get_address(), args.job_id):
        print(client.get_job_logs(args.job_id), end="")
    return 0


def cmd_jobs_stop(args) -> int:
    client = connect(args.address)
    with cluster_errors(client.get_address(), args.job_id):
        stopped = client.stop_job(args.job_id)
        status = client.get_job_status(args.job_id)
    print(f"stop requested for job {args.job_id}" if stopped else f"job {args.job_id} is not running ({status})")
    return 0


def add_jobs_command(sub) -> None:
    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="action", required=True)

    def action(name: str, help: str, fn, with_id: bool = True):
        sp = actions.add_parser(name, help=help)
        if with_id:
            sp.add_argument("job_id", help="the submission id `lorapipe submit` printed (raysubmit_...)")
        sp.add_argument("--address", help=ADDRESS_HELP)
        sp.set_defaults(fn=fn)
        return sp

    action("list", "the cluster's submitted jobs", cmd_jobs_list, with_id=False)
    action("status", "a job's status, times and metadata", cmd_jobs_status)
    logs = action("logs", "a job's output so far", cmd_jobs_logs)
    logs.add_argument("--follow", action="store_true",
                      help="stream until the job ends; exit status 0 if it SUCCEEDED, 1 otherwise")
    action("stop", "stop a running job", cmd_jobs_stop)
