"""`cectl serve`: a local web page to fill a hole painted on a photo with a checkpoint.

The page is Gradio's (the optional `ui` extra): a photo upload, an image editor whose
brush paints the hole (or a hole drawn from a mask kind), and the input with its hole
next to the result, a PNG to download. The photo is read with `cectl.inpaint.read_image`
and filled with `cectl.inpaint.fill`, as `cectl inpaint` does: the same size limits, and
the same one-sentence errors, shown in the page. Gradio never reaches the network here:
no analytics or version check, no share link, no server-side rendering, no MCP server.
"""

from __future__ import annotations

import functools
import html
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from torch import nn

from cectl import render
from cectl.errors import BadInput, CectlError, Failure
from cectl.images import to_rgb
from cectl.inpaint import drawn_hole, fill, read_image
from cectl.masks import KINDS
from cectl.restore import load_generator

BRUSH = "brush"
OFFLINE = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # also the check for a newer version
    "GRADIO_SSR_MODE": "False",  # would start a Node server
    "GRADIO_MCP_SERVER": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "OTEL_SDK_DISABLED": "true",  # FastAPI's OpenTelemetry export, should the environment ask
}


def _import_gradio(host: str) -> Any:
    """Gradio, with everything that could reach the network turned off before it loads."""
    os.environ.update(OFFLINE)
    # launch() requests its own URL: never through a proxy.
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(key, "").split(",") if h]
        os.environ[key] = ",".join([*hosts, host, "127.0.0.1", "localhost"])
    try:
        import gradio
    except ImportError:
        raise Failure("cectl serve needs the ui extra: pip install 'cectl[ui]'") from None
    return gradio


def checkpoint_summary(ckpt: str, cfg: DictConfig, state: dict) -> str:
    """One line on the page's top: the checkpoint, its step and validation PSNR."""
    psnr = state.get("metrics", {}).get("val_psnr_db")
    scored = "not validated yet" if psnr is None else f"validation PSNR {psnr:.2f} dB"
    return (f"{ckpt}: step {state['step']}, {scored}; {cfg.model.arch} on "
            f"{cfg.data.image_size} px, trained with {cfg.mask.kind} masks")


def hole_choices(cfg: DictConfig) -> list[str]:
    """The brush, and the mask kinds this model fills (a center model: its centre alone).
    Not `files`: its masks are the training machine's, which the page's may not hold (and
    the brush paints a mask of the user's own)."""
    if cfg.mask.kind == "center":
        return [BRUSH, "center"]
    return [BRUSH, *(kind for kind in KINDS if kind != "files")]


def read_upload(photo: str | None) -> Image.Image:
    """The photo as `cectl inpaint` reads it; errors name the file, not the server's copy."""
    if photo is None:
        raise BadInput("upload a photo first")
    return read_image(Path(photo).read_bytes(), Path(photo).name)


def painted_hole(editor: dict | None, size: tuple[int, int]) -> np.ndarray:
    """The pixels painted on the editor's layers (alpha above 0)."""
    width, height = size
    hole = np.zeros((height, width), dtype=bool)
    for layer in (editor or {}).get("layers") or []:
        if layer.shape[:2] != (height, width):
            raise BadInput(f"the painted layer is {layer.shape[1]}x{layer.shape[0]} but the "
                           f"photo is {width}x{height}: upload the photo again")
        hole |= layer[..., 3] > 0
    if not hole.any():
        raise BadInput(f"paint the hole on the photo first, or pick a hole other than {BRUSH}")
    return hole


def inpaint_upload(generator: nn.Module, cfg: DictConfig, results: Path, photo: str | None,
                   editor: dict | None, kind: str, seed: int | None) -> tuple[Image.Image, str]:
    """The page's Inpaint: (the photo with its hole in white, the path of the result PNG)."""
    image = read_upload(photo)
    name = Path(photo).name
    if kind == BRUSH:
        hole = painted_hole(editor, image.size)
    else:
        hole = drawn_hole(kind, image.size, cfg, seed or 0, name)  # an emptied field: 0
    result, _ = fill(generator, cfg, image, hole)
    out = Path(tempfile.mkdtemp(dir=results)) / f"{Path(name).stem}-inpainted.png"
    result.save(out)
    shown = np.asarray(to_rgb(image)).copy()
    shown[hole] = 255
    return Image.fromarray(shown), str(out)


def _in_page(gr: Any, err: Console, handler: Callable) -> Callable:
    """`handler` with its errors shown in the page as the CLI prints them: one sentence
    (an unexpected one also on the terminal, with its traceback under CECTL_DEBUG=1)."""

    def handle(*args: Any) -> Any:
        try:
            return handler(*args)
        except CectlError as e:
            raise gr.Error(html.escape(str(e)), print_exception=False) from None
        except Exception as e:
            if os.environ.get("CECTL_DEBUG"):
                raise
            message = f"unexpected {type(e).__name__}: {e} (set CECTL_DEBUG=1 for the traceback)"
            render.error(err, message)
            raise gr.Error(html.escape(message), print_exception=False) from None

    return handle


def build_page(gr: Any, ckpt: str, generator: nn.Module, cfg: DictConfig, state: dict,
               results: Path, err: Console) -> Any:
    """The page's Blocks; results are written under `results`, unexpected errors on `err`."""
    with gr.Blocks(title="cectl serve", analytics_enabled=False) as page:
        gr.HTML(f"<h2>cectl inpaint</h2><p>{html.escape(checkpoint_summary(ckpt, cfg, state))}"
                "</p>", elem_id="checkpoint")
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label="Photo", elem_id="photo")
                kind = gr.Radio(hole_choices(cfg), value=BRUSH, label="Hole", elem_id="hole",
                                info="paint it with the brush, or draw a mask of this kind")
                seed = gr.Number(0, precision=0, label="Seed of random holes")
                button = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
            # eraser=False would hide the whole toolbar, brush included (Gradio 6.31).
            editor = gr.ImageEditor(
                label="Paint the hole", elem_id="editor", type="numpy", image_mode="RGBA",
                sources=[], layers=False, transforms=[], format="png", buttons=[],
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), scale=2)
        with gr.Row():
            holed = gr.Image(label="Input with the hole", elem_id="holed", format="png",
                             interactive=False, buttons=["fullscreen"])
            result = gr.Image(label="Result", elem_id="result", type="filepath",
                              interactive=False, buttons=["download", "fullscreen"])
        photo.upload(_in_page(gr, err, lambda path: to_rgb(read_upload(path))), photo, editor)
        photo.clear(lambda: None, None, editor)
        button.click(_in_page(gr, err, functools.partial(inpaint_upload, generator, cfg, results)),
                     [photo, editor, kind, seed], [holed, result])
    return page


def serve(ckpt: str, host: str, port: int, out: Console, err: Console) -> None:
    """Serve the page for `ckpt` on host:port until Ctrl-C or SIGTERM."""
    generator, cfg, state = load_generator(ckpt)
    gr = _import_gradio(host)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    with tempfile.TemporaryDirectory(prefix="cectl-serve-") as results:
        page = build_page(gr, ckpt, generator, cfg, state, Path(results), err)
        page.queue(default_concurrency_limit=1)  # one inference at a time
        try:
            page.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                        prevent_thread_lock=True, quiet=True, ssr_mode=False,
                        mcp_server=False, footer_links=[])
        except OSError:
            raise BadInput(f"cannot listen on {host}:{port}: give a free port with "
                           "--port") from None
        try:
            out.print(f"serving {checkpoint_summary(ckpt, cfg, state)}")
            out.print(f"open {page.local_url} (Ctrl-C stops)")
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            page.close(verbose=False)
