"""`cectl serve`: the page fills holes as `cectl inpaint` does, refuses bad uploads with the
CLI's sentences, and works in a real browser (headless Debian Chromium, by Playwright)."""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_refused, free_port, png_header
from PIL import Image

from cectl.cli import run
from cectl.errors import BadInput
from cectl.restore import load_generator
from cectl.serve import BRUSH, hole_choices, inpaint_upload, painted_hole

CHROMIUM = shutil.which("chromium")
# Headless, and nothing of Chromium's own reaches the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def gradient(width: int, height: int) -> Image.Image:
    """A smooth picture without a pure white pixel: no hole pixel of the preview is the
    photo's own white."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([40 + xs * 160 // width, 40 + ys * 160 // height,
                       np.full_like(xs, 90)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def layer_of(hole: np.ndarray) -> np.ndarray:
    """An editor layer (RGBA) with `hole` painted white, as the page receives it."""
    layer = np.zeros((*hole.shape, 4), dtype=np.uint8)
    layer[hole] = 255
    return layer


def test_page_and_cli_fill_the_same_hole_alike(tiny_checkpoint, tmp_path):
    photo = tmp_path / "street.png"
    gradient(120, 80).save(photo)
    hole = np.zeros((80, 120), dtype=bool)
    hole[30:50, 20:70] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    assert run(["inpaint", str(photo), "--ckpt", tiny_checkpoint, "--mask",
                str(tmp_path / "mask.png"), "-o", str(tmp_path / "cli.png")]) == 0

    generator, cfg, _ = load_generator(tiny_checkpoint)
    (tmp_path / "results").mkdir()
    shown, written = inpaint_upload(generator, cfg, tmp_path / "results", str(photo),
                                    {"layers": [layer_of(hole)]}, BRUSH, 0)
    assert Path(written).name == "street-inpainted.png"
    assert np.array_equal(np.asarray(Image.open(written)),
                          np.asarray(Image.open(tmp_path / "cli.png")))
    assert (np.asarray(shown)[hole] == 255).all()
    assert np.array_equal(np.asarray(shown)[~hole], np.asarray(Image.open(photo))[~hole])

    # A drawn hole: the page's center is the CLI's --mask center.
    assert run(["inpaint", str(photo), "--ckpt", tiny_checkpoint, "-o",
                str(tmp_path / "cli-center.png")]) == 0
    _, written = inpaint_upload(generator, cfg, tmp_path / "results", str(photo), None,
                                "center", 0)
    assert np.array_equal(np.asarray(Image.open(written)),
                          np.asarray(Image.open(tmp_path / "cli-center.png")))


@pytest.mark.parametrize("case", ["not-an-image", "too-many-pixels", "too-small"])
def test_page_refuses_a_bad_upload_with_the_cli_sentence(case, tiny_checkpoint, tmp_path,
                                                         capsys):
    photo = tmp_path / "upload.png"
    if case == "not-an-image":
        photo.write_text("a shopping list")
    elif case == "too-many-pixels":
        photo.write_bytes(png_header(20_000, 20_000))
    else:
        Image.new("RGB", (1, 1)).save(photo)
    capsys.readouterr()
    assert run(["inpaint", str(photo), "--ckpt", tiny_checkpoint, "-o",
                str(tmp_path / "out.png")]) == 2
    printed = capsys.readouterr().err.strip()

    generator, cfg, _ = load_generator(tiny_checkpoint)
    served = tmp_path / "server-copy"  # the page's upload lives in the server's own folder
    served.mkdir()
    shutil.copy(photo, served / photo.name)
    with pytest.raises(BadInput) as refused:
        inpaint_upload(generator, cfg, tmp_path, str(served / photo.name), None, "center", 0)
    assert str(served) not in str(refused.value)
    assert printed == f"error: {refused.value}".replace(photo.name, str(photo))
    assert "\n" not in printed


def test_the_page_offers_the_kinds_the_model_fills_but_the_training_machines_files():
    from omegaconf import OmegaConf

    def choices(kind: str) -> list[str]:
        return hole_choices(OmegaConf.create({"mask": {"kind": kind}}))

    assert choices("center") == [BRUSH, "center"]
    assert choices("files") == [BRUSH, "center", "random-block", "random-region", "free-form"]


def test_painted_hole_needs_paint_of_the_photo_size():
    with pytest.raises(BadInput) as unpainted:
        painted_hole({"layers": [np.zeros((8, 10, 4), dtype=np.uint8)]}, (10, 8))
    assert_refused(unpainted.value, 2, "hole")
    with pytest.raises(BadInput) as other_size:
        painted_hole({"layers": [np.full((8, 10, 4), 255, dtype=np.uint8)]}, (12, 8))
    assert_refused(other_size.value, 2, "10x8", "12x8")


class ProxyTrap:
    """A proxy on 127.0.0.1 that counts the connections made to it and answers none: set
    as a process's HTTP(S) proxy, it catches whatever tries to leave the machine."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.caught = 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.caught += 1
            connection.close()


def start_serving(ckpt: str, port: int, tmp_path: Path, proxy: str) -> subprocess.Popen:
    """`cectl serve` in a subprocess; returns once it says where the page is."""
    env = {**os.environ, "COLUMNS": "200", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy}
    server = subprocess.Popen([sys.executable, "-m", "cectl", "serve", ckpt, "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if lines.get(timeout=1).startswith(f"open http://127.0.0.1:{port}/"):
                return server
        except queue.Empty:
            if server.poll() is not None:
                raise AssertionError(f"cectl serve exited: {server.stderr.read()}") from None
    server.kill()
    raise AssertionError("cectl serve did not say where its page is")


def picture_on(canvas, colour: np.ndarray) -> bool:
    """Whether the editor's canvas (WebGL) shows the photo yet: its centre pixel."""
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)
    return bool(np.abs(shot[shot.shape[0] // 2, shot.shape[1] // 2] - colour).max() < 12)


@pytest.mark.slow  # 15 s to 45 s: the server's start (torch, Gradio), the browser, a stop
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium; .ci/run installs it where apt is available)")
def test_browser_paints_a_stroke_and_only_the_stroke_is_filled(tiny_checkpoint, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photo = gradient(320, 200)
    photo.save(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_text("a shopping list")
    trap = ProxyTrap()
    port = free_port()
    server = start_serving(tiny_checkpoint, port, tmp_path, trap.url)
    outside = []
    try:
        with sync_playwright() as playwright:
            # A fresh profile each launch (Playwright's own temporary user data folder).
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: None if r.url.startswith(
                (f"http://127.0.0.1:{port}/", "data:", "blob:")) else outside.append(r.url))
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#checkpoint")).to_contain_text("step 4, validation PSNR")
            # Files set before the editor has started are dropped: wait for its toolbar.
            brush = page.locator("#editor button[aria-label='Brush']")
            expect(brush).to_be_visible(timeout=30_000)
            upload = page.locator("#photo input[type=file]")

            upload.set_input_files(tmp_path / "notes.png")
            expect(page.locator("[data-testid='toast-body']")).to_contain_text(
                "notes.png is not a readable image (not-an-image)")
            page.locator("#photo button[aria-label='Clear']").click()

            upload.set_input_files(tmp_path / "photo.png")
            # The brush paints on whatever the canvas shows: wait for the photo on it.
            canvas = page.locator("#editor .pixi-target canvas")
            centre = np.asarray(photo)[100, 160].astype(int)
            deadline = time.monotonic() + 30
            while not picture_on(canvas, centre):
                assert time.monotonic() < deadline, "the photo never showed in the editor"
                page.wait_for_timeout(200)
            if "highlight" not in (brush.get_attribute("class") or ""):
                brush.click()
            box = canvas.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x - 60, y)
            page.mouse.down()
            page.mouse.move(x + 60, y, steps=6)
            page.mouse.up()
            page.click("#inpaint")
            result = page.locator("#result img")
            expect(result).to_be_visible(timeout=60_000)
            filled = page.request.get(result.get_attribute("src")).body()
            shown = page.request.get(page.locator("#holed img").get_attribute("src")).body()
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        stopped = server.wait(timeout=60)
        trap.server.close()
    assert stopped == 0
    assert outside == [] and trap.caught == 0  # neither the page nor the server went out

    before = np.asarray(photo).astype(int)
    after = np.asarray(Image.open(io.BytesIO(filled)).convert("RGB")).astype(int)
    stroke = (np.asarray(Image.open(io.BytesIO(shown)).convert("RGB")) == 255).all(axis=2)
    changed = (after != before).any(axis=2)
    assert after.shape == before.shape
    # The stroke: a horizontal band across the middle of the photo, as it was painted.
    ys, xs = np.nonzero(stroke)
    assert stroke.sum() > 1000
    assert abs(ys.mean() - 100) < 10 and abs(xs.mean() - 160) < 10
    assert xs.max() - xs.min() > 2 * (ys.max() - ys.min())
    # The result differs from the photo inside the stroke and nowhere else.
    assert not (changed & ~stroke).any()
    assert changed[stroke].mean() > 0.5
