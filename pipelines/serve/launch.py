"""Starting and stopping `lorapipe serve`: everything a user can get wrong is checked before Ray
starts (port, REFs, bases), then Serve's HTTP proxy binds the given host (127.0.0.1 by default)
and the process waits; Ctrl-C, SIGTERM or `lorapipe serve --stop` leave no Serve app behind.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import yaml

from pipelines.core.errors import UserError
from pipelines.core.files import write_text_atomic
from pipelines.serve.app import ServeSettings
from pipelines.serve.catalog import Catalog, build_catalog


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            why = "in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise UserError(f"cannot serve on {host}:{port}: port {why}; choose another with --port") from None


def state_file(port: int) -> Path:
    """Where a running server records its process id, for `lorapipe serve --stop --port N`."""
    root = Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe"))
    return root / "serve" / f"{port}.json"


def describe(catalog: Catalog) -> list[str]:
    lines = [f"base: {catalog.base_name} ({catalog.base_path})"] if catalog.base_name else []
    for m in catalog.models:
        r = m.resolved
        where = f"{r.name} v{r.version}" if r.name else str(r.run_dir)
        lines.append(f"{r.kind}: {m.name} = {where}" + (f", rank {m.rank}" if m.rank else "")
                     + (f", follows {m.ref}" if m.follows_alias else ""))
    return lines


def owns_ray() -> bool:
    """True when serving would start a private Ray (no RAY_ADDRESS, no `ray start` head here)."""
    import ray

    from pipelines.train.ray_cluster import running_local_cluster

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS") and running_local_cluster() is None


def start_serve(settings: ServeSettings) -> None:
    """Serve's HTTP proxy on host:port (127.0.0.1 unless --host says otherwise)."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "request_timeout_s": settings.request_timeout_s})


def deploy(app, name: str) -> None:
    """Deploy and wait until ready (base and adapters loaded), or one line saying why not."""
    from ray import serve

    try:
        serve.run(app, name=name, route_prefix="/", blocking=False)
    except Exception as e:  # the replica's start-up error, as Serve reports it
        last = [line for line in str(e).strip().splitlines() if line.strip()]
        raise UserError(f"the server did not start: {last[-1] if last else type(e).__name__}") from None


def stop_serving(name: str, private_ray: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if private_ray:  # everything goes with our own Ray
        serve.shutdown()
        ray.shutdown()
    else:  # a shared cluster keeps Serve running for others; our app goes
        serve.delete(name)


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT, also when started as a background job, which ignores it by default) and
    SIGTERM both take the clean-shutdown path."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)


def serve_until_stopped(build: Callable[[], object], name: str, settings: ServeSettings, ray_cfg,
                        refs: list[str]) -> int:
    """Ray (joined or private), Serve, the application `build()` returns; then wait for Ctrl-C/--stop."""
    from pipelines.train.ray_cluster import ensure_ray

    private = owns_ray()
    try:
        ensure_ray(ray_cfg)
        _stop_on_signals()  # after ray.init, which installs its own SIGTERM handler
        start_serve(settings)
        deploy(build(), name)
        write_text_atomic(state_file(settings.port), json.dumps({"pid": os.getpid(), "host": settings.host,
                                                                  "app": name, "refs": refs}))
        print(f"serving on http://{settings.host}:{settings.port}/v1 (OpenAI-compatible); "
              f"Ctrl-C or `lorapipe serve --stop --port {settings.port}` stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("lorapipe serve: stopping", flush=True)
        return 0
    finally:
        stop_serving(name, private)
        state_file(settings.port).unlink(missing_ok=True)


def run_server(refs: list[str], settings: ServeSettings, tracking_uri: str) -> int:
    """`lorapipe serve REF...` with the PEFT engine: checks first, then serve until stopped."""
    from pipelines.serve.app import APP_NAME, build_app

    check_port_free(settings.host, settings.port)
    catalog = build_catalog(refs, tracking_uri)
    for line in describe(catalog):
        print(line)
    return serve_until_stopped(lambda: build_app(catalog, settings), APP_NAME, settings,
                               catalog.models[0].resolved.config, refs)


def run_vllm(refs: list[str], settings: ServeSettings, tracking_uri: str, lora_path: str, out: Path,
             run: bool) -> int:
    """`lorapipe serve --engine vllm`: write the Ray Serve LLM config (+ staged adapters); with
    --run, upload the adapters to --lora-path and deploy it here."""
    from pipelines.serve import vllm

    if run:
        check_port_free(settings.host, settings.port)
    catalog = build_catalog(refs, tracking_uri)
    config, staged = vllm.write_llm_config(catalog, lora_path, settings, out)
    print(f"wrote {config}" + (f"; adapters staged in {staged} (copy them to {lora_path})" if staged else ""))
    if not run:
        print(f"deploy it on a GPU cluster: serve deploy {config}   (or: serve run {config})")
        return 0
    app = vllm.build_llm_app(yaml.safe_load(config.read_text()))  # one line without vLLM, before any upload
    if staged:
        vllm.upload_adapters(staged, lora_path)
    return serve_until_stopped(lambda: app, vllm.LLM_APP, settings, catalog.models[0].resolved.config, refs)


def _alive(pid: int) -> bool:
    """Running (an exited child its parent has not reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def stop_server(port: int, timeout_s: float = 60.0) -> int:
    """Ask the `lorapipe serve` on `port` to stop (SIGINT, as Ctrl-C does) and wait until it has."""
    f = state_file(port)
    if not f.is_file():
        raise UserError(f"no `lorapipe serve` is running on port {port} (no {f})")
    pid = json.loads(f.read_text())["pid"]
    if not _alive(pid):
        f.unlink(missing_ok=True)
        raise UserError(f"the `lorapipe serve` on port {port} (pid {pid}) is not running any more; removed {f}")
    os.kill(pid, signal.SIGINT)  # its Ctrl-C path
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        raise UserError(f"the `lorapipe serve` on port {port} (pid {pid}) did not stop within {timeout_s:.0f} s")
    print(f"stopped the `lorapipe serve` on port {port} (pid {pid})")
    return 0
