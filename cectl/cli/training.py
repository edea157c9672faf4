"""`cectl train`, `sweep`, `runs` and `pull`: runs in a store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cectl import render
from cectl.cli.app import (
    DEFAULT_STORE,
    AddressOption,
    GpusOption,
    JsonOption,
    StoreOption,
    app,
    ray_output_to_stderr,
)
from cectl.errors import BadInput
from cectl.render import err, out


@app.command(name="train")
def train_command(
    args: Annotated[list[str] | None, typer.Argument(help="[JOB.yaml] [KEY=VALUE ...]")] = None,
    data: Annotated[str | None, typer.Option(help="shards: path or s3://bucket/prefix")] = None,
    store: StoreOption = DEFAULT_STORE,
    name: Annotated[str | None, typer.Option(help="run name (default: JOB-date-time)")] = None,
    local: Annotated[bool, typer.Option("--local", help="train in this process (default)")] = False,
    nodes: Annotated[str | None, typer.Option(
        metavar="N|MIN:MAX", help="Ray Train DDP over N nodes, or an elastic group")] = None,
    gpus_per_node: GpusOption = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU workers with gloo")] = False,
    address: AddressOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue run --name")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a context encoder: in this process (--local) or on Ray workers (--nodes N)."""
    from cectl.runs import best_device, start_or_resume
    from cectl.shard_format import open_manifest
    from cectl.storage import open_store
    from cectl.train import describe_batch, train

    run_store = open_store(store)
    run_store.check(create=True)
    cfg, name = start_or_resume(run_store, args or [], data, name, resume)
    if local and nodes is not None:
        raise BadInput("--local and --nodes exclude each other")
    open_manifest(cfg.data.uri)  # bad shards fail here, before a progress bar or a worker
    # Ray runs print their batch with the worker count (a range, when elastic).
    batch = f"{describe_batch(cfg, 1)}, " if nodes is None else ""
    err.print(f"run {name}: {cfg.model.arch}, {cfg.mask.kind} masks, {cfg.loss.mode} loss, "
              f"{batch}{cfg.train.steps} steps")
    masks = None
    if cfg.mask.kind == "files":  # read here first: bad sources fail before any worker starts
        from cectl.mask_files import trained_mask_files

        with render.status(err, f"reading the masks of {cfg.mask.source}"):
            masks = trained_mask_files(cfg).report()
        render.mask_set(err, masks)
    start = time.perf_counter()
    if nodes is None:
        from cectl.train import Session

        # A world of one: the plain networks, no DDP (it would cost a GPU step ~25% for
        # nothing to reduce).
        with render.TrainProgress(err, cfg.train.steps) as progress:
            session = Session(device=best_device(), on_log=progress.update)
            summary = train(cfg, run_store, name, session, resume)
    else:
        from cectl.distributed import parse_nodes, train_on_ray

        with ray_output_to_stderr():
            summary = train_on_ray(cfg, run_store, name, parse_nodes(nodes), gpus_per_node,
                                   cpu, address, resume, err)
    summary["seconds"] = time.perf_counter() - start
    if masks:
        summary["masks"] = {key: masks[key] for key in ("source", "masks", "skipped")}
    if as_json:
        render.print_json(summary)
    else:
        render.train_summary(out, summary)


@app.command()
def sweep(
    args: Annotated[list[str] | None, typer.Argument(help="[SWEEP.yaml] [KEY=VALUE ...]; "
                                                     "KEY=uniform(a, b) adds a dimension")] = None,
    samples: Annotated[int | None, typer.Option(help="number of trials")] = None,
    data: Annotated[str | None, typer.Option(help="shards: path or s3://bucket/prefix")] = None,
    store: StoreOption = DEFAULT_STORE,
    cpu: Annotated[bool, typer.Option("--cpu", help="trials on CPUs")] = False,
    name: Annotated[str | None, typer.Option(help="sweep name (default: recipe name)")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="also write the best job config here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Search job settings with Ray Tune (ASHA); stores the best trial's job config."""
    from cectl.sweep import run_sweep

    with ray_output_to_stderr():
        result = run_sweep(args or [], data, store, samples, cpu, name, output, err)
    if as_json:
        render.print_json(result)
        return
    out.print(render.trials_table(result))
    hint = (f"cectl train {result['best']} --local" if "://" not in result["best"]
            else "-o BEST.yaml writes a local copy to train from")
    out.print(f"best config: {result['best']}  ({hint})")


@app.command()
def runs(store: StoreOption = DEFAULT_STORE,
         as_json: JsonOption = False,
         ) -> None:
    """List the runs in a store: steps, last metrics, state."""
    from cectl.runs import run_summaries
    from cectl.storage import open_store

    run_store = open_store(store)
    run_store.check()
    summaries = run_summaries(run_store)
    if as_json:
        render.print_json(summaries)
        return
    out.print(render.runs_table(summaries, run_store.uri))
    out.print(f"TensorBoard (losses, val metrics, sample grids): "
              f"tensorboard --logdir {run_store.url('runs')}", soft_wrap=True)


@app.command()
def pull(
    run: Annotated[str, typer.Argument(help="run name")],
    store: StoreOption = DEFAULT_STORE,
    dest: Annotated[Path, typer.Option(help="local folder")] = Path("checkpoints"),
    checkpoint: Annotated[str, typer.Option(help="latest | best | STEP")] = "latest",
) -> None:
    """Copy a checkpoint from the store to a local folder."""
    from cectl.runs import pull_checkpoint
    from cectl.storage import open_store

    run_store = open_store(store)
    run_store.check()
    source, target = pull_checkpoint(run_store, run, checkpoint, dest)
    out.print(f"{source} -> {target}")


