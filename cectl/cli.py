"""The `cectl` command line: parses arguments and calls the pipeline stages."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cectl import render
from cectl.config import JobConfig, ShardConfig, load_config, validate_job
from cectl.errors import BadInput, CectlError
from cectl.render import err, out

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Context Encoders at scale: shard, train, sweep, evaluate, inpaint.")
DEFAULT_STORE = "cectl-store"
StoreOption = Annotated[str, typer.Option("--store", help="runs live here (path or s3://)")]


def ray_output_to_stderr() -> contextlib.AbstractContextManager:
    """Ray and Tune print their own messages (tables, lost workers) on stdout: send them to
    stderr with the progress, so that stdout holds cectl's report alone (JSON with --json)."""
    return contextlib.redirect_stdout(sys.stderr)


@app.command()
def shard(
    src: Annotated[str, typer.Argument(help="image folder (local path or s3://bucket/prefix)")],
    dst: Annotated[str, typer.Argument(help="where shards go (local path or s3://bucket/prefix)")],
    layout: Annotated[str | None, typer.Option(help="auto | imagenet | paris | folder")] = None,
    recipe: Annotated[str | None, typer.Option(help="shards/NAME.yaml recipe")] = None,
    resize: Annotated[int | None, typer.Option(help="shorter side in px; 0 keeps bytes")] = None,
    quality: Annotated[int | None, typer.Option(help="JPEG quality")] = None,
    shard_size: Annotated[int | None, typer.Option(help="samples per shard")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="hold out this fraction")] = None,
    min_size: Annotated[int | None, typer.Option(help="skip images smaller than this")] = None,
    workers: Annotated[int | None, typer.Option(help="parallel processes")] = None,
    seed: Annotated[int | None, typer.Option(help="shuffle seed")] = None,
    label_from: Annotated[str | None, typer.Option(help="layout (ImageNet wnids) | folder "
                                                   "(top-level folder under SRC)")] = None,
) -> None:
    """Turn an image folder into WebDataset tar shards with a manifest (resumable)."""
    from cectl.shard import run_shard

    cfg = load_config(ShardConfig, recipe, flags=dict(
        layout=layout, resize=resize, quality=quality, shard_size=shard_size,
        val_fraction=val_fraction, min_size=min_size, workers=workers, seed=seed,
        label_from=label_from,
    ), recipe_folder="shards")
    manifest = run_shard(src, dst, cfg, err)
    render.shard_summary(out, manifest, dst)


@app.command()
def verify(dst: Annotated[str, typer.Argument(help="shard location with a manifest.json")]) -> None:
    """Re-read every shard: sha256, sample counts, every image decodes."""
    from cectl.verify import run_verify

    bad = run_verify(dst, err)
    if bad:
        for name, problems in bad.items():
            render.warning(err, "bad shard", f"{name}: {'; '.join(problems)}")
        raise CectlError(f"{len(bad)} shard(s) failed verification in {dst}")
    out.print(f"all shards in {dst} verified")


def job_config(args: list[str], data: str | None, run=None):
    """The job config from a recipe (or, to resume, `run`'s stored YAML) and KEY=VALUE
    arguments. Returns (config, recipe name or None)."""
    jobs = [a for a in args if "=" not in a]
    if len(jobs) > 1 or (jobs and run is not None):
        raise BadInput(f"unexpected arguments {', '.join(jobs)}: give one JOB.yaml (none "
                       "with --resume) and KEY=VALUE overrides")
    job = jobs[0] if jobs else None
    flags = {"data": {"uri": data}} if data else None
    stored = source = None
    if run is not None:
        stored = run.store.read_bytes("config.yaml").decode(errors="replace")
        source = run.store.url("config.yaml")
    cfg = load_config(JobConfig, job, [a for a in args if "=" in a], flags, stored=stored,
                      source=source or "")
    return validate_job(cfg), job


@app.command(name="train")
def train_command(
    args: Annotated[list[str] | None, typer.Argument(help="[JOB.yaml] [KEY=VALUE ...]")] = None,
    data: Annotated[str | None, typer.Option(help="shards: path or s3://bucket/prefix")] = None,
    store: StoreOption = DEFAULT_STORE,
    name: Annotated[str | None, typer.Option(help="run name (default: JOB-date-time)")] = None,
    local: Annotated[bool, typer.Option("--local", help="train in this process (default)")] = False,
    nodes: Annotated[str | None, typer.Option(
        metavar="N|MIN:MAX", help="Ray Train DDP over N nodes, or an elastic group")] = None,
    gpus_per_node: Annotated[int, typer.Option(help="workers (GPUs) per node")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU workers with gloo")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster (default: RAY_ADDRESS, "
                                                "else a local instance)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue run --name")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Train a context encoder: in this process (--local) or on Ray workers (--nodes N)."""
    from cectl.runs import best_device, default_run_name, new_run, run_to_resume
    from cectl.storage import open_store
    from cectl.train import describe_batch, train

    run_store = open_store(store)
    run_store.check(create=True)
    if resume:
        cfg, _ = job_config(args or [], data, run_to_resume(run_store, name))
    else:
        cfg, job = job_config(args or [], data)
        name = new_run(run_store, name or default_run_name(job)).name
    if local and nodes is not None:
        raise BadInput("--local and --nodes exclude each other")
    # Ray runs print their batch with the worker count (a range, when elastic).
    batch = f"{describe_batch(cfg, 1)}, " if nodes is None else ""
    err.print(f"run {name}: {cfg.model.arch}, {cfg.mask.kind} masks, {cfg.loss.mode} loss, "
              f"{batch}{cfg.train.steps} steps")
    start = time.perf_counter()
    if nodes is None:
        from cectl.distributed import local_session

        with (render.TrainProgress(err, cfg.train.steps) as progress,
              local_session(cfg, best_device(), progress.update) as session):
            summary = train(cfg, run_store, name, session, resume)
    else:
        from cectl.distributed import train_on_ray

        with ray_output_to_stderr():
            summary = train_on_ray(cfg, run_store, name, parse_nodes(nodes), gpus_per_node,
                                   cpu, address, resume, err)
    summary["seconds"] = time.perf_counter() - start
    if as_json:
        render.print_json(summary)
    else:
        render.train_summary(out, summary)


def parse_nodes(text: str) -> tuple[int, int]:
    """`--nodes N` or `--nodes MIN:MAX` as (min, max)."""
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise BadInput(f"--nodes {text}: give a number of nodes N or bounds MIN:MAX") from None


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
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
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
         as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
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


@app.command(name="eval")
def eval_command(
    ckpt: Annotated[str, typer.Argument(help="checkpoint folder (path or s3://)")],
    data: Annotated[str, typer.Option(help="shards: path or s3://bucket/prefix")],
    split: Annotated[str, typer.Option(help="split to score")] = "val",
    mask: Annotated[str | None, typer.Option(help="center | random-block | random-region "
                                             "(default: the one trained with)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Score a checkpoint on held-out images: L1 %, L2 %, PSNR dB on the hole."""
    from cectl.evaluate import evaluate_checkpoint
    from cectl.masks import KINDS
    from cectl.storage import open_store

    if mask is not None and mask not in KINDS:
        raise BadInput(f"--mask {mask!r} is not one of {', '.join(KINDS)}")
    with err.status(f"scoring the {split} split of {data}"):
        result = evaluate_checkpoint(open_store(ckpt), data, split, mask)
    if as_json:
        render.print_json(result)
        return
    out.print(render.score_table(result, f"{ckpt} (step {result['step']}) on {result['images']} "
                                  f"{split} images, {result['mask']} mask"))


@app.command(name="inpaint")
def inpaint_command(
    img: Annotated[Path, typer.Argument(help="image to fill")],
    ckpt: Annotated[str, typer.Option(help="checkpoint folder (path or s3://)")],
    mask: Annotated[str, typer.Option(help="center | random-block | random-region | "
                                      "MASK.png (white = hole)")] = "center",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="output PNG")] = None,
    seed: Annotated[int, typer.Option(help="seed for random masks")] = 0,
) -> None:
    """Fill a hole in an image of any size and mode."""
    from cectl.inpaint import inpaint

    if not img.is_file():
        raise BadInput(f"{img} does not exist")
    result = inpaint(img, ckpt, mask, output or img.with_name(f"{img.stem}-inpainted.png"), seed)
    out.print(f"wrote {result['out']} ({result['hole_pixels']:,} hole pixels filled)")


@app.command(name="export")
def export_command(
    ckpt: Annotated[str, typer.Argument(help="checkpoint folder (path or s3://)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .safetensors to write")],
    layers: Annotated[str | None, typer.Option(help="FIRST..LAST, e.g. conv1..conv3 "
                                               "(default: all)")] = None,
) -> None:
    """Write the encoder alone, BatchNorm folded, as safetensors with plain key names."""
    from cectl.export import export_encoder

    meta = export_encoder(ckpt, output, layers)
    out.print(f"wrote {meta['out']}: {meta['arch']} layers {meta['layers']} "
              f"({meta['parameters']:,} parameters, step {meta['step']})")


@app.command()
def probe(
    ckpt: Annotated[str, typer.Argument(help="checkpoint folder (path or s3://)")],
    data: Annotated[str, typer.Option(help="labelled shards with train and val splits")],
    layer: Annotated[str | None, typer.Option(help="pool5 | conv5 | ... (default: the "
                                              "encoder's last layer)")] = None,
    epochs: Annotated[int, typer.Option(help="passes of the linear classifier")] = 30,
    cache_dir: Annotated[Path, typer.Option(help="feature cache")] = Path(
        "~/.cache/cectl/features"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
    nodes: Annotated[int | None, typer.Option(help="extract features on Ray workers "
                                              "over N nodes")] = None,
    gpus_per_node: Annotated[int, typer.Option(help="workers (GPUs) per node")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU workers")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster (default: RAY_ADDRESS, "
                                                "else a local instance)")] = None,
) -> None:
    """Linear probe: top-1/top-5 on val of frozen features, next to a random encoder."""
    from cectl.probe import local_extractor, ray_extractor, run_probe

    if epochs < 1:
        raise BadInput("--epochs must be at least 1")
    with (ray_output_to_stderr(),
          contextlib.nullcontext(local_extractor) if nodes is None
          else ray_extractor(nodes, gpus_per_node, cpu, address) as extractor):
        result = run_probe(ckpt, data, layer, epochs, cache_dir.expanduser(), err,
                           extractor)
    if as_json:
        render.print_json(result)
        return
    render.probe_report(out, result)


@app.command()
def neighbors(
    ckpt: Annotated[str, typer.Argument(help="checkpoint folder (path or s3://)")],
    data: Annotated[str, typer.Option(help="shards to search (path or s3://)")],
    query: Annotated[list[Path], typer.Option(help="query image (repeat for several)")],
    k: Annotated[int, typer.Option("-k", help="neighbours per query")] = 8,
    output: Annotated[Path, typer.Option("-o", "--output", help="grid PNG")] = Path(
        "neighbors.png"),
    split: Annotated[str, typer.Option(help="split to search")] = "train",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Nearest neighbours by context features (hole dropped, Fig. 8), as a PNG grid."""
    from cectl.neighbors import find_neighbors, neighbor_grid

    if k < 1:
        raise BadInput("-k must be at least 1")
    for path in query:
        if not path.is_file():
            raise BadInput(f"query {path} does not exist")
    result = find_neighbors(ckpt, data, query, k, split, err)
    grid = neighbor_grid(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    if as_json:
        render.print_json({"grid": str(output), **{key: result[key] for key in (
            "checkpoint", "step", "layer", "split", "queries")}})
        return
    render.neighbors_report(out, result, str(output))


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("demo-out"),
         ) -> None:
    """The whole pipeline on generated facades: shard, train, evaluate, inpaint."""
    from cectl.demo import run_demo

    run_demo(out_dir, out, err)


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


def main() -> None:
    try:
        app()
    except CectlError as e:
        _print_error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: run the same command again to resume")
        sys.exit(130)
    except Exception as e:  # never a bare traceback, unless asked for
        if os.environ.get("CECTL_DEBUG"):
            raise
        _print_error(f"unexpected {type(e).__name__}: {e} (set CECTL_DEBUG=1 for the traceback)")
        sys.exit(1)


def _print_error(message: str) -> None:
    """The one way errors reach the user: credentials in URLs masked."""
    from cectl.storage import mask_userinfo

    render.error(err, mask_userinfo(message))
