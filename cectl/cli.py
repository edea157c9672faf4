"""The `cectl` command line: parses arguments and calls the pipeline stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cectl.config import LAYOUTS, ShardConfig, load_config
from cectl.errors import BadInput, CectlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Context Encoders at scale: shard, train, sweep, evaluate, inpaint.")
out = Console()
err = Console(stderr=True)


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
) -> None:
    """Turn an image folder into WebDataset tar shards with a manifest (resumable)."""
    from cectl.shard import run_shard

    cfg = load_config(ShardConfig, recipe, flags=dict(
        layout=layout, resize=resize, quality=quality, shard_size=shard_size,
        val_fraction=val_fraction, min_size=min_size, workers=workers, seed=seed,
    ), recipe_folder="shards")
    if cfg.layout not in LAYOUTS:
        raise BadInput(f"--layout {cfg.layout!r} is not one of {', '.join(LAYOUTS)}")
    for name in ("shard_size", "workers", "quality"):
        if cfg[name] < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.resize < 0 or not 0 <= cfg.val_fraction < 1:
        raise BadInput("--resize must be >= 0 and --val-fraction in [0, 1)")
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
            err.print(f"[red]bad shard[/] {name}: {'; '.join(problems)}")
        raise CectlError(f"{len(bad)} shard(s) failed verification in {dst}")
    out.print(f"all shards in {dst} verified")


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("demo-out"),
         ) -> None:
    """Generate sample facades and shard them to local disk."""
    from cectl.demo import make_facades
    from cectl.shard import run_shard

    images = out_dir / "images"
    with err.status("generating sample facades"):
        make_facades(images, 200)
    cfg = load_config(ShardConfig, flags={"shard_size": 50, "val_fraction": 0.1})
    manifest = run_shard(str(images), str(out_dir / "shards"), cfg, err)
    manifest["dst"] = str(out_dir / "shards")
    print_shard_summary(manifest)


def main() -> None:
    try:
        app()
    except CectlError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: run the same command again to resume")
        sys.exit(130)
    except Exception as e:  # never a bare traceback, unless asked for
        if os.environ.get("CECTL_DEBUG"):
            raise
        err.print(f"[red]error:[/] unexpected {type(e).__name__}: {e} "
                  "(set CECTL_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
