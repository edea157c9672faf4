"""`cectl cluster`: thin wrappers over the Ray cluster launcher, and a local multi-node cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from cectl.errors import BadInput, Failure
from cectl.render import status


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
    from cectl.distributed import use_loopback

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
    from cectl.distributed import LOOPBACK, answers

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
