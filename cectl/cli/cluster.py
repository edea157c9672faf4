"""`cectl cluster`: Ray clusters up and down, or a local multi-node one."""

from __future__ import annotations

from typing import Annotated

import typer

from cectl.cli.app import app
from cectl.render import err, out

cluster_app = typer.Typer(help="Bring Ray clusters up and down, or start one locally.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(config: Annotated[str, typer.Argument()] = "cluster/aws.yaml") -> None:
    """Start (or update) a cluster: `ray up CONFIG`."""
    from cectl.cluster import ray_cli

    ray_cli("up", config, "--yes")


@cluster_app.command("down")
def cluster_down(config: Annotated[str, typer.Argument()] = "cluster/aws.yaml") -> None:
    """Tear a cluster down: `ray down CONFIG`."""
    from cectl.cluster import ray_cli

    ray_cli("down", config, "--yes")


@cluster_app.command("status")
def cluster_status(config: Annotated[str | None, typer.Argument()] = None) -> None:
    """Nodes and resources: of the launcher cluster CONFIG, else of RAY_ADDRESS."""
    from cectl.cluster import ray_cli

    if config:
        ray_cli("exec", config, "ray status")
    else:
        ray_cli("status")


@cluster_app.command("local")
def cluster_local(
    nodes: Annotated[int, typer.Option(help="raylets (nodes) to start")] = 2,
    cpus: Annotated[int, typer.Option(help="CPUs each node offers")] = 2,
    join: Annotated[str | None, typer.Option(
        help="add the nodes to the local cluster at this address instead")] = None,
) -> None:
    """A multi-node Ray cluster on this machine, or more nodes for one, until Ctrl-C."""
    from cectl.cluster import run_local_cluster

    run_local_cluster(nodes, cpus, out, err, join)


