"""`cectl demo`: the whole pipeline on generated images, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cectl.cli.app import app
from cectl.render import err, out


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("demo-out"),
         ) -> None:
    """The whole pipeline on generated facades: shard, train, evaluate, inpaint."""
    from cectl.demo import run_demo

    run_demo(out_dir, out, err)
