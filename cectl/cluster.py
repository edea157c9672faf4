"""Ray clusters: joining one (`train --nodes`, `sweep`, `probe --nodes`), and `cectl cluster`:
thin wrappers over the Ray cluster launcher, and a local multi-node cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from cectl.errors import BadInput, Failure
from cectl.render import status

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def connect(address: str | None) -> None:
    """Join the cluster at `address` (default: RAY_ADDRESS, else a new local instance:
    never the cluster `ray start` last recorded on this machine, maybe someone else's)."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    on_this_machine = address == "local" or parsed.hostname in LOOPBACK
    if on_this_machine:
        use_loopback()
    import ray

    if address not in ("auto", "local") and not answers(address):
        raise BadInput(f"cannot reach a Ray cluster at {address}: check --address "
                       "(host:port of the head node) and that the cluster is up")
    # Workers get the driver's S3 settings (on a cloud cluster, instance roles do instead)
    # and its sample log, if any.
    from cectl.data import SAMPLE_LOG

    env = {key: os.environ[key] for key in (*AWS_VARS, SAMPLE_LOG) if key in os.environ}
    # Worker logs stay in Ray's log folder: the driver shows progress from the queue, and
    # a failure surfaces as TrainingFailedError.
    ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING",
             log_to_driver=False, _node_ip_address="127.0.0.1" if on_this_machine else None)


def answers(address: str) -> bool:
    """Whether something accepts connections at `address` (host:port or a URL; port 6379 if
    none) within 5 s. Ray itself would retry for minutes before saying the cluster is down."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=5):
            return True
    except (OSError, ValueError):
        return False


def use_loopback() -> None:
    """Keep a Ray instance that lives on this machine on 127.0.0.1.

    Otherwise Ray picks the address of the outward interface and talks to itself through
    it. Ray reads this when first imported, so call it before `import ray`.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def check_resources(workers: int, nodes: int, cpu: bool) -> None:
    """Fail with a clear sentence, not a hang, when the cluster cannot fit the job."""
    import ray

    kind = "CPU" if cpu else "GPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if have < workers:
        hint = " (add --cpu for CPU workers)" if not cpu and have == 0 else ""
        raise BadInput(f"{workers} {kind} workers asked for ({nodes} node(s) x "
                       f"{workers // nodes}), but the cluster has {have} {kind}s{hint}")


def join_cluster(nodes: tuple[int, int], gpus_per_node: int, cpu: bool,
                 address: str | None) -> tuple[int, int]:
    """Check the node bounds, join the cluster and check that it fits the smallest group;
    the (fewest, most) workers."""
    low, high = nodes
    if low < 1 or gpus_per_node < 1:
        raise BadInput("--nodes and --gpus-per-node must be at least 1")
    if low > high:
        raise BadInput(f"--nodes {low}:{high}: MIN must not exceed MAX")
    connect(address)  # first: it decides how Ray is imported
    try:
        check_resources(low * gpus_per_node, low, cpu)
    except BadInput:
        import ray

        ray.shutdown()
        raise
    return low * gpus_per_node, high * gpus_per_node


def ray_cli(*args: str) -> None:
    """Run the `ray` command of this environment; its output goes straight to the user."""
    if len(args) > 1 and args[0] in ("up", "down", "exec") and not Path(args[1]).is_file():
        raise BadInput(f"cluster config {args[1]} not found (see cluster/README.md)")
    ray = Path(sys.executable).with_name("ray")
    code = subprocess.call([str(ray), *args])
    if code:
        raise Failure(f"`ray {' '.join(args)}` failed with exit code {code}")


# Nodes on one machine answer health checks in microseconds: one silent for 3 s is dead.
# (Ray's defaults, ~15 s, suit real networks; a resize waits for the death to be seen.)
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                   "health_check_failure_threshold": 3}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_local_cluster(nodes: int, cpus: int, out: Console, err: Console,
                      join: str | None = None) -> None:
    """Start a head and nodes-1 worker raylets here (or, with `join`, `nodes` raylets that
    join the local cluster at that address), print the address, wait for Ctrl-C."""
    use_loopback()
    if nodes < 1 or cpus < 1:
        raise BadInput("--nodes and --cpus must be at least 1")
    head = _local_head(join) if join else None
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: the raylets are shut down
    if head:
        _join(head, nodes, cpus, err)
        return
    from ray.cluster_utils import Cluster

    with status(err, f"starting a local Ray cluster of {nodes} nodes"):
        node = {"num_cpus": cpus, "node_ip_address": "127.0.0.1"}
        cluster = Cluster(initialize_head=True,
                          head_node_args={**node, "_system_config": FAST_NODE_DEATH})
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
    try:
        out.print(f"RAY_ADDRESS={cluster.address}", highlight=False)
        err.print(f"{nodes} nodes x {cpus} CPUs up. In another shell:\n"
                  f"  cectl train jobs/demo.yaml --data SHARDS --nodes {nodes} --cpu "
                  f"--address {cluster.address}\n"
                  f"More nodes: cectl cluster local --join {cluster.address} --nodes N\n"
                  "Ctrl-C stops the cluster.")
        sys.stdout.flush()
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
        err.print("local cluster stopped")


def _local_head(address: str) -> str:
    """`--join`'s address as a local cluster listens, 127.0.0.1:PORT (given as 127.0.0.1,
    localhost or [::1]); BadInput unless something answers there, rather than Ray's wait."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") not in LOOPBACK or not port.isdigit():
        raise BadInput(f"--join takes the address `cectl cluster local` printed "
                       f"(127.0.0.1:PORT), not {address}")
    if not answers(head := f"127.0.0.1:{port}"):
        raise BadInput(f"nothing answers at {address}: is `cectl cluster local` running, and "
                       "is that the address it printed?")
    return head


def _join(address: str, nodes: int, cpus: int, err: Console) -> None:
    """`nodes` raylets join the local cluster at `address` until Ctrl-C, as machines that
    come back do. (`ray start --address` would swap 127.0.0.1 for this machine's outward
    address, where a local cluster does not listen: these start as `Cluster.add_node`
    starts its nodes.)"""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    started = []
    try:
        with status(err, f"starting {nodes} nodes for {address}"):
            for _ in range(nodes):
                params = RayParams(gcs_address=address, num_cpus=cpus, num_gpus=0,
                                   node_ip_address="127.0.0.1", node_manager_port=0,
                                   object_store_memory=150 * 2**20, min_worker_port=0,
                                   max_worker_port=0, include_log_monitor=False)
                params.dashboard_agent_listen_port = None  # not the head's port
                started.append(Node(params, head=False, shutdown_at_exit=True,
                                    spawn_reaper=True))
        err.print(f"{nodes} nodes x {cpus} CPUs joined {address}; Ctrl-C takes them away.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except Exception as e:  # Ray's own error when the address holds no cluster
        raise Failure(f"nodes could not join {address} ({e}): is `cectl cluster local` "
                      "running there?") from None
    finally:
        for node in started:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        if started:
            err.print("joined nodes stopped")
