"""`lorapipe submit`: validate a config here, package the project as the job's working_dir, and
submit `lorapipe <command> <config> <overrides>` to a Ray cluster through the Ray Jobs API.

What goes to the cluster is explicit: the project tree minus PACKAGE_EXCLUDES (and .gitignore,
.rayignore, .git/info/exclude), the environment variables in FORWARDED_ENV that are set here (by
name; values are never printed), and metadata without secrets. A job's working_dir is a
temporary copy, so relative outputs would vanish with it: see `durable_placement`.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipelines.core.errors import UserError
from pipelines.core.meta import git_commit, lorapipe_version

# gitwildmatch patterns relative to the project root (Ray's runtime_env "excludes" syntax).
# No trailing slash on directory names: Ray matches a directory's own path without one, so
# "x/" would still walk (and hash) everything under x.
PACKAGE_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "build", "dist",
    "/runs", "/.demo", "/.lorapipe", "/mlruns", "/mlartifacts", "ray_results", "*.db", "*.db-journal",
    "/bench/results", ".cache", "cache-*.arrow", "*.whl", "/.whl", "/.gl",
]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LORAPIPE_HOME", "TRANSFORMERS_VERBOSITY")
COMMANDS = ("train", "tune", "pipeline")
OWN_PACKAGES = {"lora", "pipelines"}
FALLBACK_LIMIT = 100 * 2**20
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def project_root(start: Optional[Path] = None) -> Path:
    """The directory holding pyproject.toml, searched upwards from the current directory."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file():
            return d
    raise UserError(f"no pyproject.toml in {here} or above: run `lorapipe submit` inside the project")


def package_excludes(root: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Our excludes + the checkout's local git excludes (Ray reads .gitignore, not these) + --exclude."""
    local = root / ".git" / "info" / "exclude"
    git_local = [ln.strip() for ln in local.read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")] if local.is_file() else []
    return [*PACKAGE_EXCLUDES, *git_local, *extra]


def packaged_files(root: Path, excludes: list[str]) -> dict[str, int]:
    """{relative path: bytes} of exactly what Ray will upload: Ray's own directory walk with its
    default excludes, ours, and every .gitignore/.rayignore on the way."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.resolve()
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    files: dict[str, int] = {}

    def handler(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    _dir_travel(root, [_get_excludes(root, patterns)], handler, include_gitignore=include_gitignore,
                logger=logging.getLogger(__name__))  # Ray's default logger prints each ignore file
    return files


def package_limit_bytes() -> int:
    """The dashboard refuses request bodies over DASHBOARD_CLIENT_MAX_SIZE (100 MiB, HTTP 413) before
    the GCS limit on stored packages (512 MiB) applies; the smaller one binds."""
    try:
        from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    except ImportError:
        return FALLBACK_LIMIT
    return min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_package_size(files: dict[str, int], root: Path, limit: int) -> int:
    """Total bytes (Ray zips uncompressed, plus ~100 bytes a file), or a one-line refusal naming
    the five biggest top-level entries."""
    total = sum(files.values()) + 100 * len(files)
    if total < limit:
        return total
    by_top: dict[str, int] = {}
    for rel, size in files.items():
        top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
        by_top[top] = by_top.get(top, 0) + size
    biggest = sorted(by_top.items(), key=lambda kv: -kv[1])[:5]
    raise UserError(f"working_dir {root} is {_mib(total)}, over Ray's {_mib(limit)} upload limit; biggest: "
                    + ", ".join(f"{name} {_mib(size)}" for name, size in biggest)
                    + " (exclude with .rayignore or --exclude PATTERN, or move data to shared storage)")


def shadowing_modules(files: dict[str, int], root: Path) -> list[str]:
    """Top-level packages/modules in the upload that share a name with an installed one: Ray puts
    the working_dir first on PYTHONPATH, so inside the job they replace the real package."""
    import importlib.machinery

    names = {rel.split("/", 1)[0] for rel in files if rel.count("/") == 1 and rel.endswith("/__init__.py")}
    names |= {rel[:-3] for rel in files if "/" not in rel and rel.endswith(".py")}
    path = [p for p in sys.path if p and not Path(p).resolve().is_relative_to(root)]
    found = []
    for name in sorted(names - OWN_PACKAGES):
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found.append(name)
    return found


def config_in_project(config: str, root: Path) -> str:
    """The config's path relative to the project root (the job's working directory)."""
    p = Path(config).resolve()
    if not p.is_file():
        raise UserError(f"config file not found: {config}")
    if not p.is_relative_to(root):
        raise UserError(f"config {config} is outside the project {root}, so it would not reach the cluster; "
                        "copy it into the project (e.g. configs/)")
    return p.relative_to(root).as_posix()


def check_overrides_publishable(overrides: list[str]) -> None:
    """The entrypoint (and so every override) is visible to anyone who can list the cluster's jobs."""
    from pipelines.core.secrets import redact_uri

    for item in overrides:
        key, _, value = item.partition("=")
        if redact_uri(value) != value:
            raise UserError(f"override {key}=... carries a credential, and the job's entrypoint is visible to "
                            "anyone who can list jobs; pass it by environment variable (--env NAME)")


def forwarded_env(environ: dict, extra_names: tuple[str, ...] = ()) -> dict[str, str]:
    """Variables that reach the job, by name: FORWARDED_ENV and --env NAMEs that are set here."""
    for name in extra_names:
        if not ENV_NAME.match(name):
            raise UserError(f"--env {name.split('=', 1)[0]}=...: give variable names only; values are read "
                            "from your environment")
    return {name: environ[name] for name in (*FORWARDED_ENV, *extra_names) if environ.get(name)}


def job_metadata(config_name: str, config_rel: str, command: str, commit: Optional[str],
                 output_dir: Optional[str]) -> dict[str, str]:
    """What `lorapipe jobs list/status` shows: names, versions and paths, never secrets."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (some containers)
        user = "unknown"
    meta = {"lorapipe.config": config_name, "lorapipe.config_file": config_rel, "lorapipe.command": command,
            "lorapipe.user": user, "lorapipe.version": lorapipe_version()}
    if commit:
        meta["lorapipe.git_commit"] = commit
    if output_dir:
        meta["lorapipe.output_dir"] = output_dir
    return meta


# Run through a launcher that finds the cluster's Python (see the script); `exec` keeps the job
# supervisor its parent, which the launcher reads.
JOB_ENTRY = ["exec", "sh", "pipelines/cluster/job_entry.sh"]


def entrypoint(command: str, config_rel: str, overrides: list[str], force: bool = False) -> str:
    # Flags before the positionals: argparse cannot take an option between `config` and `overrides*`.
    flags = ["--no-progress", *(["--force"] if force else [])]
    return shlex.join([*JOB_ENTRY, command, *flags, config_rel, *overrides])


def effective_settings(config: str, overrides: list[str], cfg=None) -> dict:
    """name, output/storage paths, MLflow settings and whether builtin: assets are used, after the
    overrides: from the validated config, or (with --no-validate, where it may not validate) from
    the YAML with the schema's defaults."""
    from pipelines.config.load import apply_overrides, read_yaml
    from pipelines.config.schema import MlflowSection, PipelineConfig, RunSection

    if cfg is not None:
        run, mlflow, name = cfg.run.model_dump(), cfg.mlflow.model_dump(), cfg.name
        paths = [cfg.model.path, *(s.path for s in cfg.data.sources())]  # data.path or a mixture
    else:
        try:
            data = apply_overrides(read_yaml(config), overrides)
        except UserError:
            data = {}
        section = lambda key: data.get(key) if isinstance(data.get(key), dict) else {}  # noqa: E731
        run = {k: section("run").get(k, f.default) for k, f in RunSection.model_fields.items()}
        mlflow = {k: section("mlflow").get(k, f.default) for k, f in MlflowSection.model_fields.items()}
        name = data.get("name") or PipelineConfig.model_fields["name"].default
        paths = [str(section("model").get("path", "")), str(section("data").get("path", ""))]
    return {"name": str(name), "output_dir": str(run["output_dir"]), "storage_path": run["storage_path"],
            "tracking_uri": mlflow["tracking_uri"], "mlflow_enabled": mlflow["enabled"] is not False,
            "builtin": any(p.startswith("builtin:") for p in paths)}


@dataclass
class Placement:
    """Where a job's outputs go: overrides and environment added to the job, warnings to print."""

    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def durable_placement(settings: dict, root: Path, local: bool, environ: dict) -> Placement:
    """Inside a job, relative paths resolve in Ray's temporary copy of the project. On a cluster
    whose head is this machine, relative outputs, the default sqlite MLflow store and the builtin
    assets ($LORAPIPE_HOME, which later stages read the base model from) are pinned to this
    project; elsewhere the config is left as is and only shared storage survives (PITFALLS 6)."""
    out, storage, uri = settings["output_dir"], settings["storage_path"], settings["tracking_uri"]
    mlflow_default = settings["mlflow_enabled"] and not uri and not environ.get("MLFLOW_TRACKING_URI")
    place = Placement()
    if local:
        if not Path(out).expanduser().is_absolute():
            place.overrides.append(f"run.output_dir={root / out}")
        if storage and "://" not in storage and not Path(storage).expanduser().is_absolute():
            place.overrides.append(f"run.storage_path={root / storage}")
        if mlflow_default:
            place.overrides.append(f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}")
        elif uri and uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
            place.overrides.append(f"mlflow.tracking_uri=sqlite:///{root / uri[len('sqlite:///'):]}")
        if settings["builtin"]:
            place.env["LORAPIPE_HOME"] = str(Path(environ.get("LORAPIPE_HOME") or root / ".lorapipe").resolve())
        return place
    where = f"run.output_dir={out}, run.storage_path={storage or out + '/_ray'}"
    if not Path(out).is_absolute():
        place.warnings.append(f"warning: {where}: relative paths land in the job's temporary copy of the project "
                              "and are deleted with it; pass run.output_dir= (and run.storage_path=) on shared "
                              "storage every node and you can reach (an NFS/PVC mount)")
    else:
        place.warnings.append(f"warning: {where}: on a multi-node cluster these must be shared storage every node "
                              "sees (an NFS/PVC mount), not a node's local disk")
    if mlflow_default:
        place.warnings.append("warning: no MLFLOW_TRACKING_URI here and no mlflow.tracking_uri: the job would log "
                              "to a sqlite file in its temporary working dir; point it at an MLflow server")
    if settings["builtin"] and not environ.get("LORAPIPE_HOME"):
        place.warnings.append("warning: builtin: assets would be built in the job's temporary working dir and the "
                              "run would point at a base model that is later deleted; set LORAPIPE_HOME to "
                              "shared storage")
    return place


def cmd_submit(args) -> int:
    from pipelines.cluster.jobs import cluster_errors, connect, follow_logs, head_is_this_machine

    logging.getLogger("ray").setLevel(logging.WARNING)  # no per-request INFO lines from the SDK
    root = project_root()
    config_rel = config_in_project(args.config, root)
    check_overrides_publishable(args.overrides)
    env_vars = forwarded_env(dict(os.environ), tuple(args.env))
    cfg = None
    if not args.no_validate:
        from pipelines.config.load import load_config
        from pipelines.plan.verdict import fit_verdict

        cfg = load_config(args.config, args.overrides)  # a bad config stops here: nothing is submitted
        if args.command == "tune" and not cfg.tune:
            raise UserError(f"{args.config} has no tune: section, so --command tune has nothing to search")
        print(fit_verdict(cfg, force=args.force))  # the job checks again on the cluster, with --force if given
    excludes = package_excludes(root, tuple(args.exclude))
    files = packaged_files(root, excludes)
    size = check_package_size(files, root, package_limit_bytes())
    for name in shadowing_modules(files, root):
        print(f"warning: {name} in {root} shadows the installed package {name!r} inside the job "
              f"(working_dir comes first on PYTHONPATH); rename it or --exclude it", file=sys.stderr)

    client = connect(args.address)
    address = client.get_address()
    settings = effective_settings(args.config, args.overrides, cfg)
    place = durable_placement(settings, root, head_is_this_machine(address), os.environ)
    for line in place.warnings:
        print(line, file=sys.stderr)
    overrides = [*args.overrides, *place.overrides]
    env_vars.update(place.env)
    out_dir = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run.output_dir=")),
                   settings["output_dir"])
    commit = git_commit(root, mark_dirty=True)  # .git itself is not uploaded
    if commit:
        env_vars.setdefault("LORAPIPE_GIT_COMMIT", commit)
    command = entrypoint(args.command, config_rel, overrides, force=args.force)
    print(f"packaging {root}: {len(files)} files, {size / 2**20:.1f} MiB")
    if place.overrides or place.env:
        print("cluster head is this machine; outputs kept in this project: "
              + " ".join([*place.overrides, *(f"{k}={v}" for k, v in place.env.items())]))
    print("forwarding environment: " + (", ".join(sorted(env_vars)) or "(none)"))
    with cluster_errors(address):
        job_id = client.submit_job(
            entrypoint=command,
            runtime_env={"working_dir": str(root), "excludes": excludes, "env_vars": env_vars},
            metadata=job_metadata(settings["name"], config_rel, args.command, commit, out_dir))
    print(f"submitted job {job_id} to {address}: {command}")
    print(f"follow it:  lorapipe jobs logs {job_id} --follow --address {address}")
    return follow_logs(client, address, job_id) if args.follow else 0


SUBMIT_HELP = """\
Validates CONFIG with the overrides here first (a bad config is refused; nothing is submitted),
uploads the project (the directory holding pyproject.toml, without .venv, runs, mlruns, *.db,
.git, caches, wheels and whatever .gitignore/.rayignore/--exclude name; at most Ray's 100 MiB upload
limit) and runs `lorapipe COMMAND --no-progress CONFIG KEY=VALUE...` as a Ray job (after the plan's fit
verdict here: a config that does not fit is refused unless --force).

Environment: MLFLOW_TRACKING_URI (+ _TOKEN/_USERNAME/_PASSWORD), HF_TOKEN, HUGGING_FACE_HUB_TOKEN,
LORAPIPE_HOME, TRANSFORMERS_VERBOSITY and every --env NAME are passed to the job when set here; their
names are printed, never their values. Token auth: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN (or
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token).

Outputs: inside a job, relative paths resolve in a temporary copy of the project that Ray
deletes later. When the cluster's head is this machine (a 127.0.0.1/localhost address whose head
node has one of this machine's IPs; a tunnel or port-forward to a remote cluster does not count),
submit adds overrides so that a relative run.output_dir (and run.storage_path) lands in this
project (<project>/runs by default), MLflow, unless MLFLOW_TRACKING_URI or mlflow.tracking_uri is
set, in sqlite:///<project>/mlflow.db, and builtin: assets in $LORAPIPE_HOME (default
<project>/.lorapipe). On any other cluster the config is left as is and a warning says so:
run.output_dir and run.storage_path must be shared storage every node sees (an NFS/PVC mount),
MLflow a server, and LORAPIPE_HOME shared storage.

The job runs `python -m pipelines.cli COMMAND ...` through pipelines/cluster/job_entry.sh, with the
Python of the cluster's own Ray environment (found whatever PATH says there), else
$LORAPIPE_PYTHON (--env), python3 or python; a cluster without lorapipe's dependencies fails the
job with one line naming what is missing.
"""


def add_submit_commands(sub) -> None:
    """`lorapipe submit` and `lorapipe jobs ...` on the CLI's subparsers."""
    from pipelines.cluster.jobs import ADDRESS_HELP, add_jobs_command
    from pipelines.core.cliargs import add_config_parser

    sp = add_config_parser(sub, "submit", "run train/tune/pipeline as a Ray job on a cluster (Ray Jobs API)",
                           description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--address", help=ADDRESS_HELP)
    sp.add_argument("--command", default="train", choices=COMMANDS, help="what the job runs (default: train)")
    sp.add_argument("--env", action="append", default=[], metavar="NAME",
                    help="also forward this environment variable (by name; repeatable)")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="also leave out this gitignore-style pattern (repeatable)")
    sp.add_argument("--force", action="store_true",
                    help="submit (and start) even if `lorapipe plan` says it does not fit")
    sp.add_argument("--no-validate", action="store_true",
                    help="skip the local config check (the job then fails with the same one-line error)")
    sp.add_argument("--follow", action="store_true",
                    help="stream the job's logs until it ends; exit status 0 if it SUCCEEDED")
    sp.set_defaults(fn=cmd_submit)
    add_jobs_command(sub)
