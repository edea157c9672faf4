"""Using a model: `cectl eval`, `inpaint`, `serve`, `export`, `probe`, `neighbors`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from cectl import render
from cectl.cli.app import (
    AddressOption,
    CheckpointArgument,
    GpusOption,
    JsonOption,
    app,
    ray_output_to_stderr,
)
from cectl.errors import BadInput
from cectl.render import err, out


def _check_image(path: Path, what: str) -> None:
    """BadInput unless `path` is a file (an image, its reader will find out)."""
    if path.is_dir():
        raise BadInput(f"{what}{path} is a folder, not an image")
    if not path.is_file():
        raise BadInput(f"{what}{path} does not exist")


@app.command(name="eval")
def eval_command(
    ckpt: CheckpointArgument,
    data: Annotated[str, typer.Option(help="shards: path or s3://bucket/prefix")],
    split: Annotated[str, typer.Option(help="split to score")] = "val",
    mask: Annotated[str | None, typer.Option(
        help="center | random-block | random-region | free-form | files (drawn from a fixed "
             "seed; default: the kind trained with) | DIR (a mask per image, named after "
             "it; path or s3://)")] = None,
    lpips_weights: Annotated[Path | None, typer.Option(
        help="torchvision's AlexNet weights for LPIPS, alexnet-owt-7be5be79.pth "
             "(default: torch hub's cache)")] = None,
    fid_weights: Annotated[Path | None, typer.Option(
        help="the TorchScript FID Inception, inception-2015-12-05.pt "
             "(default: torch hub's cache)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a checkpoint on held-out images: L1 %, L2 %, PSNR dB on the hole, SSIM, and
    LPIPS and FID where their weights are at hand."""
    from cectl.evaluate import evaluate_checkpoint
    from cectl.masks import KINDS
    from cectl.perceptual import load_perceptual
    from cectl.storage import open_store

    if mask is not None and mask not in KINDS and not (mask.startswith("s3://")
                                                        or Path(mask).is_dir()):
        raise BadInput(f"--mask {mask!r} is neither a mask kind ({', '.join(KINDS)}) nor a "
                       "folder of masks")
    perceptual = load_perceptual(lpips_weights, fid_weights)
    with render.status(err, f"scoring the {split} split of {data}"):
        result = evaluate_checkpoint(open_store(ckpt), data, split, mask, perceptual)
    if as_json:
        render.print_json(result)
        return
    render.score_report(out, result, f"{ckpt} (step {result['step']}) on {result['images']} "
                                     f"{split} images, {result['mask']} mask")


@app.command(name="inpaint")
def inpaint_command(
    img: Annotated[Path, typer.Argument(help="image to fill")],
    ckpt: Annotated[str, typer.Option(help="checkpoint folder (path or s3://)")],
    mask: Annotated[str, typer.Option(
        help="center | random-block | random-region | free-form | files | MASK.png (white = "
             "hole, the image's size) | DIR (the mask named after IMG)")] = "center",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="output PNG")] = None,
    seed: Annotated[int, typer.Option(help="seed for random masks")] = 0,
) -> None:
    """Fill a hole in an image of any size and mode."""
    from cectl.inpaint import inpaint

    _check_image(img, "")
    result = inpaint(img, ckpt, mask, output or img.with_name(f"{img.stem}-inpainted.png"), seed)
    out.print(f"wrote {result['out']} ({result['hole_pixels']:,} hole pixels filled)")


@app.command()
def serve(
    ckpt: CheckpointArgument,
    port: Annotated[int, typer.Option(help="port of the page")] = 7860,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every "
                                      "interface)")] = "127.0.0.1",
) -> None:
    """A local web page: upload a photo, paint the hole, see it filled (the ui extra)."""
    from cectl.serve import serve as serve_page

    serve_page(ckpt, host, port, out, err)


@app.command(name="export")
def export_command(
    ckpt: CheckpointArgument,
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
    ckpt: CheckpointArgument,
    data: Annotated[str, typer.Option(help="labelled shards with train and val splits")],
    layer: Annotated[str | None, typer.Option(help="pool5 | conv5 | ... (default: the "
                                              "encoder's last layer)")] = None,
    epochs: Annotated[int, typer.Option(help="passes of the linear classifier")] = 30,
    cache_dir: Annotated[Path, typer.Option(help="feature cache")] = Path(
        "~/.cache/cectl/features"),
    as_json: JsonOption = False,
    nodes: Annotated[int | None, typer.Option(help="extract features on Ray workers "
                                              "over N nodes")] = None,
    gpus_per_node: GpusOption = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU workers")] = False,
    address: AddressOption = None,
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
    ckpt: CheckpointArgument,
    data: Annotated[str, typer.Option(help="shards to search (path or s3://)")],
    query: Annotated[list[Path], typer.Option(help="query image (repeat for several)")],
    k: Annotated[int, typer.Option("-k", help="neighbours per query")] = 8,
    output: Annotated[Path, typer.Option("-o", "--output", help="grid PNG")] = Path(
        "neighbors.png"),
    split: Annotated[str, typer.Option(help="split to search")] = "train",
    as_json: JsonOption = False,
) -> None:
    """Nearest neighbours by context features (hole dropped, Fig. 8), as a PNG grid."""
    from cectl.neighbors import find_neighbors, neighbor_grid

    if k < 1:
        raise BadInput("-k must be at least 1")
    for path in query:
        _check_image(path, "query ")
    result = find_neighbors(ckpt, data, query, k, split, err)
    grid = neighbor_grid(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    if as_json:
        render.print_json({"grid": str(output), **{key: result[key] for key in (
            "checkpoint", "step", "layer", "split", "queries")}})
        return
    render.neighbors_report(out, result, str(output))


