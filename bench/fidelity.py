"""Paper fidelity (issue 12): one short CPU run per mask kind, before and after the change.

Run it once with this tree and once with a tree from before the change on PYTHONPATH; both
train the same recipe (jobs/demo.yaml, shrunk) from the same seed on the same shards:

    PYTHONPATH=. .venv/bin/python bench/fidelity.py --shards S --steps 150

Prints JSON per mask kind: the logged reconstruction loss (mean of the last 20 steps, in
that tree's own normalisation), the held-out reconstruction loss in the authors'
normalisation (computed here, the same formula for both trees) and `cectl eval`'s
held-out L1 / L2 / PSNR on the hole.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cectl.config import load_config, validate_job
from cectl.evaluate import evaluate_checkpoint
from cectl.masks import derive_seed, draw_holes, fill_holes, output_window
from cectl.pixels import load_eval_images, to_model_range
from cectl.restore import load_generator
from cectl.schema import JobConfig
from cectl.storage import open_store
from cectl.train import train

RECIPE = ["data.batch_size=16", "data.workers=1", "train.log_every=1", "train.eval_every=100000",
          "train.checkpoint_every=100000"]


@torch.no_grad()
def heldout_rec_loss(ckpt: str, shards: str) -> float:
    """mean(w x d^2) over the output window, w = 1 in the hole and 10 elsewhere (train.lua)."""
    generator, cfg, _ = load_generator(ckpt)
    images, _ = load_eval_images(shards, "val", cfg.data.image_size)
    truth = to_model_range(images)
    holes = draw_holes(cfg.mask.kind, len(truth), cfg.data.image_size, cfg.mask.overlap,
                       derive_seed(1234, "fidelity"))
    window = output_window(cfg.data.image_size, cfg.mask.kind)
    pred = generator(fill_holes(truth, holes))
    weights = torch.where(window.crop(holes), 1.0, 10.0)
    return ((pred - window.crop(truth)).square() * weights).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--kinds", default="center,random-region")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for kind in args.kinds.split(","):
        cfg = validate_job(load_config(JobConfig, "demo", [*RECIPE, f"mask.kind={kind}",
                                                           f"train.steps={args.steps}"],
                                       flags={"data": {"uri": args.shards}}))
        store = tempfile.mkdtemp(prefix="cectl-fidelity-")
        start = time.perf_counter()
        train(cfg, open_store(store), kind)
        seconds = time.perf_counter() - start
        lines = Path(store, "runs", kind, "metrics.jsonl").read_text().splitlines()
        rec = [m["loss_rec"] for m in map(json.loads, lines) if "loss_rec" in m]
        ckpt = f"{store}/runs/{kind}/checkpoints/step-{args.steps:06d}"
        scores = evaluate_checkpoint(open_store(ckpt), args.shards)["model"]
        results[kind] = {"steps": args.steps, "train_seconds": round(seconds, 1),
                         "loss_rec_logged_last20": sum(rec[-20:]) / len(rec[-20:]),
                         "heldout_rec_loss_authors": heldout_rec_loss(ckpt, args.shards),
                         **{k: scores[k] for k in ("l1_pct", "l2_pct", "psnr_db")}}
        print(json.dumps({kind: results[kind]}), flush=True)


if __name__ == "__main__":
    main()
