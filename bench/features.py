"""Linear probe of an alexnet227 context encoder against a random encoder, on this CPU.

The data: `cectl.demo.make_shapes`, four kinds of shape (circle, square, triangle, cross)
in random colours, places and sizes on noisy random backgrounds, 128 px, in the ImageNet
layout (one wnid a kind). The encoder is pre-trained on the train split's images (labels
unused) with random-region masks and the reconstruction loss for `--steps` steps at the
paper's random-region rate (1e-4), then `cectl probe` scores its pool5 (and `--layers`)
and a randomly initialised encoder of the same architecture on the val split.

    .venv/bin/python bench/features.py --steps 150 --layers conv3 pool5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from cectl.config import load_config, validate_job
from cectl.demo import make_shapes
from cectl.probe import run_probe
from cectl.render import TrainProgress
from cectl.schema import JobConfig, ShardConfig
from cectl.shard import run_shard
from cectl.storage import open_store
from cectl.train import Session, train

PRETRAIN = ["mask.kind=random-region", "loss.mode=rec", "optim.lr_d=1e-5", "optim.lr_ratio=10",
            "data.image_size=227", "data.load_size=227", "data.batch_size=16", "data.workers=1",
            "train.precision=fp32", "train.eval_every=100000", "train.log_every=10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="pre-training steps")
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--layers", nargs="+", default=["pool5"])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    err = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_shapes(root / "images", args.train_per_class, args.val_per_class, size=128)
        run_shard(str(root / "images"), str(root / "shards"),
                  load_config(ShardConfig, flags={"shard_size": 100, "resize": 0}), err)
        cfg = validate_job(load_config(
            JobConfig, "features-alexnet",
            [*PRETRAIN, f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}"],
            flags={"data": {"uri": str(root / "shards")}}))
        start = time.perf_counter()
        with TrainProgress(err, cfg.train.steps) as progress:
            summary = train(cfg, open_store(str(root / "store")), "shapes",
                            Session(on_log=progress.update))
        pretrain_s = time.perf_counter() - start
        ckpt = str(root / "store" / "runs" / "shapes" / "checkpoints" / f"step-{args.steps:06d}")
        rows = []
        for layer in args.layers:
            result = run_probe(ckpt, str(root / "shards"), layer, args.epochs, root / "cache",
                               err)
            rows.append({"layer": layer, "dims": result["dims"],
                         "model_top1_pct": result["model"]["top1_pct"],
                         "random_top1_pct": result["random"]["top1_pct"],
                         "extraction": result["extraction"]})
    print(json.dumps({"pretrain": {"steps": args.steps, "batch": cfg.data.batch_size,
                                   "seconds": pretrain_s, "loss_rec": summary["metrics"].get(
                                       "loss_rec")},
                      "train_images": result["train_images"], "val_images": result["val_images"],
                      "classes": result["classes"], "epochs": args.epochs, "probes": rows},
                     indent=2))


if __name__ == "__main__":
    main()
