"""Sharding throughput: `cectl shard` with 1 and 2 workers against a plain single-process loop.

Inputs: the shared Paris StreetView images, re-saved as ImageNet-sized JPEGs (500x375,
quality 90) under many names, so that decode, resize to 350 and re-encode all happen.
The baseline does the same work a hand-written script would: Pillow open, RGB, resize
the shorter side to 350, JPEG save, tarfile. Also MB/s for `--resize 0` on the PNGs.

    .venv/bin/python bench/shard.py [--copies 40]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from cectl.config import load_config
from cectl.schema import ShardConfig
from cectl.shard import run_shard

PARIS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paris-streetview-eval"


def make_inputs(root: Path, copies: int) -> tuple[Path, Path]:
    jpegs, pngs = root / "jpeg", root / "png"
    jpegs.mkdir()
    pngs.mkdir()
    for source in sorted(PARIS.glob("*.png")):
        big = Image.open(source).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        first = jpegs / f"0-{source.stem}.jpg"
        big.save(first, quality=90)
        for i in range(copies):
            if i:
                (jpegs / f"{i}-{source.stem}.jpg").symlink_to(first)
            (pngs / f"{i}-{source.name}").symlink_to(source)
    return jpegs, pngs


def baseline(src: Path, out: Path, size: int = 350) -> float:
    start = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for path in sorted(src.iterdir()):
            img = Image.open(path).convert("RGB")
            w, h = img.size
            if min(w, h) > size:
                s = size / min(w, h)
                img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            info = tarfile.TarInfo(path.stem + ".jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return time.perf_counter() - start


def cectl_shard(src: Path, dst: Path, workers: int, resize: int = 350) -> tuple[float, dict]:
    # 100-image shards: enough of them that both workers stay busy to the end.
    cfg = load_config(ShardConfig, flags={"workers": workers, "resize": resize,
                                          "shard_size": 100})
    start = time.perf_counter()
    manifest = run_shard(str(src), str(dst), cfg, Console(quiet=True))
    return time.perf_counter() - start, manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args()
    if not PARIS.is_dir():
        sys.exit(f"needs the shared images at {PARIS}")
    root = Path(tempfile.mkdtemp(prefix="cectl-bench-"))
    try:
        jpegs, pngs = make_inputs(root, args.copies)
        n = len(list(jpegs.iterdir()))
        rows = [("baseline (1 process)", baseline(jpegs, root / "baseline.tar"))]
        for workers in (1, 2):
            seconds, _ = cectl_shard(jpegs, root / f"w{workers}", workers)
            rows.append((f"cectl shard --workers {workers}", seconds))
        seconds, manifest = cectl_shard(pngs, root / "raw", 2, resize=0)
        raw_mb = manifest["totals"]["bytes"] / 1e6
    finally:
        shutil.rmtree(root)

    table = Table(title=f"sharding {n} images (500x375 JPEG -> 350 px, q95), 2 cores")
    for column in ("run", "seconds", "images/s", "vs baseline"):
        table.add_column(column)
    base_rate = n / rows[0][1]
    results = {}
    for name, secs in rows:
        results[name] = n / secs
        table.add_row(name, f"{secs:.2f}", f"{n / secs:.0f}", f"{n / secs / base_rate:.2f}x")
    Console().print(table)
    print(f"--resize 0 on {n} PNGs (227x227), 2 workers: {raw_mb / seconds:.1f} MB/s "
          f"({n / seconds:.0f} images/s)")
    print(json.dumps({"images": n, "images_per_s": results,
                      "resize0_mb_per_s": raw_mb / seconds}))


if __name__ == "__main__":
    main()
