"""Ray start-up and joining for the training driver: RAY_ADDRESS's cluster, a `ray start` head
already running on this machine, or a private local Ray sized so the workers always fit."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from pipelines.core.errors import UserError


def ensure_ray(cfg) -> None:
    """Join RAY_ADDRESS's cluster, or start a local one sized so the workers always fit."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"RAY_ADDRESS={address} is a dashboard (Jobs API) address: use `lorapipe submit` to run on "
                        "that cluster, or unset RAY_ADDRESS to train on a local Ray")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    running = running_local_cluster()
    if running:
        # ray.init() would join it anyway, and refuses sizing arguments for a cluster it joins.
        print(f"ray: joining the cluster already running on this machine at {running} (`ray stop` ends it)")
        ray.init(log_to_driver=os.environ.get("LORAPIPE_WORKER_LOGS", "0") == "1",  # address found as above
                 configure_logging=True, logging_level="WARNING")
        return
    local_cluster_env_defaults()
    needed = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    # Logical CPUs may exceed physical cores: Ray then sets torch threads from the share.
    # The dashboard stays on: Ray Train's placement-group cleaner asks the state API (served by
    # it) whether a controller died; without it, a trial killed by ASHA leaks its workers' CPUs.
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=os.environ.get("LORAPIPE_WORKER_LOGS", "0") == "1",
             configure_logging=True, logging_level="WARNING")


def running_local_cluster() -> Optional[str]:
    """The address of a cluster started on this machine with `ray start --head` (the one Ray's own
    `ray.init()` joins when RAY_ADDRESS is unset), or None. Joining it skips Ray's start-up and
    reuses its long-lived helpers: the warm start a real cluster gives."""
    from ray._private import services  # the lookup ray.init() itself uses; no public equivalent

    try:
        address = services.canonicalize_bootstrap_address(None)
    except (ValueError, ConnectionError):
        return None
    # The address file outlives a head that was killed rather than stopped: require its GCS alive.
    return address if address and address in services.find_gcs_addresses() else None


def local_cluster_env_defaults() -> None:
    """Ray Train helpers a one-machine cluster that lorapipe starts and stops itself has no use for,
    each one more Python process started in series before the first step (about a second apiece
    on 2 cores): the preemption watcher (it polls for nodes being drained; this node is not) and
    Ray Train's Prometheus metrics export (nothing scrapes a throw-away cluster). Set either
    variable to 1 to keep it."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")


def warn_if_not_shared(cfg) -> None:
    """On a multi-node cluster, rank 0 may run on another node: a sqlite/file MLflow store or a
    storage path on the driver's local disk would silently split or lose state there."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    uri = cfg.tracking_uri()
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        print(f"warning: MLflow store {uri} is local to this node; on a {len(nodes)}-node cluster rank 0 "
              "logs from another node. Set MLFLOW_TRACKING_URI to a server.")
    fstype = filesystem_type(cfg.storage_path())
    if fstype not in SHARED_FILESYSTEMS and not fstype.startswith("fuse"):
        print(f"warning: run.storage_path {cfg.storage_path()} is on a local {fstype or 'unknown'} filesystem; "
              f"it must be shared storage visible to all {len(nodes)} nodes (an NFS/PVC mount)")


SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p"}


def filesystem_type(path: str) -> str:
    """The type of the filesystem `path` is (or would be) on: the mount with the longest matching
    prefix of its nearest existing parent."""
    import psutil

    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    target = str(existing.resolve())
    best = ("", "")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best[0]):
            best = (mount, part.fstype)
    return best[1]


def driver_node_label() -> dict:
    """Pin small helper actors to the driver's node, as Ray Train pins its controller: losing a
    worker node must not take them down with it."""
    import ray

    return {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
