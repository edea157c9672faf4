"""`cectl shard` and `cectl verify`: images to checked shards."""

from __future__ import annotations

from typing import Annotated

import typer

from cectl import render
from cectl.cli.app import app
from cectl.config import load_config
from cectl.errors import CectlError
from cectl.render import err, out
from cectl.schema import ShardConfig


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


