"""The `cectl` command line: parses arguments and calls the pipeline stages."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cectl.config import JobConfig, ShardConfig, load_config, validate_job
from cectl.errors import BadInput, CectlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Context Encoders at scale: shard, train, sweep, evaluate, inpaint.")
out = Console()
err = Console(stderr=True)
DEFAULT_STORE = "cectl-store"
StoreOption = Annotated[str, typer.Option("--store", help="runs live here (path or s3://)")]


def ray_output_to_stderr() -> contextlib.AbstractContextManager:
    """Ray and Tune print their own messages (tables, lost workers) on stdout: send them to
    stderr with the progress, so that stdout holds cectl's report alone (JSON with --json)."""
    return contextlib.redirect_stdout(sys.stderr)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_shard_summary(manifest: dict) -> None:
    table = Table(title=f"shards in {manifest.get('dst', '')}".strip())
    for column in ("split", "images", "shards", "bytes"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in manifest["splits"].items():
        table.add_row(split, f"{info['samples']:,}", str(len(info["shards"])), _mb(info["bytes"]))
    totals = manifest["totals"]
    table.add_row("total", f"{totals['samples']:,}", str(totals["shards"]), _mb(totals["bytes"]),
                  style="bold")
    out.print(table)
    skipped = ", ".join(f"{n} {reason}" for reason, n in manifest["skipped"].items()) or "none"
    out.print(f"skipped: {skipped}")
    stats = manifest["stats"]
    out.print(f"{stats['processed']:,} images processed in {stats['seconds']:.1f} s "
              f"({stats['images_per_s']:,.0f} images/s); {stats['kept_shards']} shards kept "
              "from an earlier run")


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
    manifest["dst"] = dst
    print_shard_summary(manifest)


@app.command()
def verify(dst: Annotated[str, typer.Argument(help="shard location with a manifest.json")]) -> None:
    """Re-read every shard: sha256, sample counts, every image decodes."""
    from cectl.verify import run_verify

    bad = run_verify(dst, err)
    if bad:
        for name, problems in bad.items():
            err.print(f"[red]bad shard[/] {escape(name)}: {escape('; '.join(problems))}")
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
    import torch

    from cectl.checkpoint import Run
    from cectl.storage import open_store
    from cectl.train import TrainProgress, describe_batch, train

    run_store = open_store(store)
    run_store.check(create=True)
    if resume:
        if not name:
            raise BadInput("--resume needs --name RUN (see `cectl runs`)")
        run = Run(run_store, name)
        if not run.store.exists("config.yaml"):
            raise BadInput(f"no run {name!r} in {run_store.uri} to resume")
        cfg, _ = job_config(args or [], data, run)
    else:
        cfg, job = job_config(args or [], data)
        name = name or f"{Path(job).stem if job else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        if Run(run_store, name).exists():
            raise BadInput(f"run {name!r} already exists in {run_store.uri}: add --resume to "
                           "continue it, or pick another --name")
    if local and nodes is not None:
        raise BadInput("--local and --nodes exclude each other")
    # Ray runs print their batch with the worker count (a range, when elastic).
    batch = f"{describe_batch(cfg, 1)}, " if nodes is None else ""
    err.print(f"run {name}: {cfg.model.arch}, {cfg.mask.kind} masks, {cfg.loss.mode} loss, "
              f"{batch}{cfg.train.steps} steps")
    start = time.perf_counter()
    if nodes is None:
        from cectl.distributed import local_session

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with (TrainProgress(err, cfg.train.steps) as progress,
              local_session(cfg, device, progress.update) as session):
            summary = train(cfg, run_store, name, session, resume)
    else:
        from cectl.distributed import train_on_ray

        with ray_output_to_stderr():
            summary = train_on_ray(cfg, run_store, name, parse_nodes(nodes), gpus_per_node,
                                   cpu, address, resume, err)
    summary["seconds"] = time.perf_counter() - start
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_train_summary(summary)


def parse_nodes(text: str) -> tuple[int, int]:
    """`--nodes N` or `--nodes MIN:MAX` as (min, max)."""
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise BadInput(f"--nodes {text}: give a number of nodes N or bounds MIN:MAX") from None


def print_train_summary(summary: dict) -> None:
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in summary["metrics"].items())
    workers = summary["workers"]
    out.print(f"run {summary['run']} reached step {summary['step']} on {workers} "
              f"worker{'s' if workers > 1 else ''} in {summary['seconds']:.1f} s "
              f"({summary['resumes']} resume(s) from a checkpoint, "
              f"{summary['resizes']} resize(s))")
    out.print(f"last metrics: {metrics}")
    out.print(f"checkpoints: {summary['checkpoints']}")


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
    from cectl.sweep import run_sweep, trials_table

    with ray_output_to_stderr():
        result = run_sweep(args or [], data, store, samples, cpu, name, output, err)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(trials_table(result))
    hint = (f"cectl train {result['best']} --local" if "://" not in result["best"]
            else "-o BEST.yaml writes a local copy to train from")
    out.print(f"best config: {result['best']}  ({hint})")


@app.command()
def runs(store: StoreOption = DEFAULT_STORE,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
         ) -> None:
    """List the runs in a store: steps, last metrics, state."""
    from cectl.checkpoint import Run, list_runs
    from cectl.storage import open_store

    run_store = open_store(store)
    run_store.check()
    summaries = []
    for name in list_runs(run_store):
        run = Run(run_store, name)
        summaries.append(run.summary() if run.steps() else {"run": name, "step": None})
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    table = Table(title=f"runs in {run_store.uri}")
    for column in ("run", "step", "of", "state", "loss_rec", "val_psnr_db"):
        table.add_column(column)
    for summary in summaries:
        if summary["step"] is None:
            table.add_row(summary["run"], "-", "-", "no checkpoint yet", "", "")
            continue
        metrics = summary["metrics"]
        table.add_row(summary["run"], str(summary["step"]), str(summary["target_steps"]),
                      "finished" if summary["step"] >= summary["target_steps"]
                      else "stopped or running",
                      f"{metrics.get('loss_rec', float('nan')):.4f}",
                      f"{metrics.get('val_psnr_db', float('nan')):.2f}")
    out.print(table)


@app.command()
def pull(
    run: Annotated[str, typer.Argument(help="run name")],
    store: StoreOption = DEFAULT_STORE,
    dest: Annotated[Path, typer.Option(help="local folder")] = Path("checkpoints"),
    checkpoint: Annotated[str, typer.Option(help="latest | best | STEP")] = "latest",
) -> None:
    """Copy a checkpoint from the store to a local folder."""
    from cectl.checkpoint import Run
    from cectl.storage import open_store

    run_store = open_store(store)
    run_store.check()
    source = Run(run_store, run).checkpoint(checkpoint)
    target = dest / run / source.uri.rstrip("/").rsplit("/", 1)[-1]
    for key in source.list():
        source.get_file(key, target / key)
    out.print(f"{source.uri} -> {target}")


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
    from cectl.evaluate import evaluate_checkpoint, score_table
    from cectl.masks import KINDS
    from cectl.storage import open_store

    if mask is not None and mask not in KINDS:
        raise BadInput(f"--mask {mask!r} is not one of {', '.join(KINDS)}")
    with err.status(f"scoring the {split} split of {data}"):
        result = evaluate_checkpoint(open_store(ckpt), data, split, mask)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(score_table(result, f"{ckpt} (step {result['step']}) on {result['images']} "
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
    from cectl.features import export_encoder

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
    from cectl.features import local_results, ray_results, run_probe

    if epochs < 1:
        raise BadInput("--epochs must be at least 1")
    with (ray_output_to_stderr(),
          contextlib.nullcontext(local_results) if nodes is None
          else ray_results(nodes, gpus_per_node, cpu, address) as results):
        result = run_probe(ckpt, data, layer, epochs, cache_dir.expanduser(), err, results)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"linear probe of {result['layer']} ({result['dims']:,} dims): "
              f"{result['classes']} classes, {result['train_images']:,} train / "
              f"{result['val_images']:,} val images, {result['epochs']} epochs")
    table = Table()
    for column in ("encoder", "top-1 %", "top-5 %"):
        table.add_column(column, justify="right")
    for label, key in ((f"{result['arch']} step {result['step']}", "model"),
                       ("random init", "random")):
        table.add_row(label, f"{result[key]['top1_pct']:.1f}", f"{result[key]['top5_pct']:.1f}")
    out.print(table)


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
    from cectl.features import find_neighbors, neighbor_grid

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
        print(json.dumps({"grid": str(output), **{key: result[key] for key in (
            "checkpoint", "step", "layer", "split", "queries")}}, indent=2))
        return
    for item in result["queries"]:
        found = ", ".join(f"{n['key']} ({n['distance']:.3f})" for n in item["neighbors"])
        out.print(f"{item['query']}: {found}")
    out.print(f"grid (query with its hole | neighbours): {output}")


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
    """The one way errors reach the user: credentials in URLs masked, user text kept
    literal (a run name such as `[/x]` is not rich markup)."""
    from cectl.storage import mask_userinfo

    err.print(f"[red]error:[/] {escape(mask_userinfo(message))}", highlight=False,
              soft_wrap=True)
