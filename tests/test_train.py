"""Training: it learns, checkpoints round-trip, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import tiny_job
from safetensors.torch import load_file

from cectl.checkpoint import Run, collect_tensors, load_checkpoint, restore_tensors
from cectl.data import TrainLoader, assign_shards, open_manifest
from cectl.model import build_models
from cectl.storage import open_store
from cectl.train import train


def metrics(store: Path, run: str) -> list[dict]:
    lines = (store / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_short_run_lowers_the_reconstruction_loss(facade_shards, tmp_path):
    # Reconstruction alone trains at optim.lr_d (train.lua); 2e-3 learns within 60 steps.
    cfg = tiny_job(facade_shards, "train.steps=60", "loss.mode=rec", "optim.lr_d=2e-3")
    summary = train(cfg, str(tmp_path), "learn")
    rec = [m["loss_rec"] for m in metrics(tmp_path, "learn") if "loss_rec" in m]
    assert len(rec) == 60 and summary["trained_steps"] == 60
    assert sum(rec[-10:]) / 10 < 0.7 * sum(rec[:5]) / 5
    run = tmp_path / "runs" / "learn"
    assert (run / "config.yaml").is_file()
    assert (run / "samples" / "step-000060.png").is_file()
    assert list((run / "tensorboard").iterdir())


def test_checkpoint_round_trip_restores_networks_and_optimizers(facade_shards, tmp_path):
    cfg = tiny_job(facade_shards, "train.steps=2", "train.checkpoint_every=2")
    train(cfg, str(tmp_path), "rt")
    tensors, state = load_checkpoint(str(tmp_path / "runs/rt/checkpoints/step-000002"))
    assert state["step"] == 2 and state["config"]["model"]["width"] == 8
    for prefix in ("G.", "D.", "optim.G.", "optim.D.", "rng."):
        assert any(key.startswith(prefix) for key in tensors), prefix
    generator, discriminator = build_models(cfg)
    opt = torch.optim.Adam(generator.parameters(), fused=True)
    restore_tensors(tensors, {"G": generator, "D": discriminator}, {"G": opt})
    again = collect_tensors({"G": generator, "D": discriminator}, {"G": opt})
    for key, value in again.items():
        if not key.startswith(("rng.", "optim.D.")):
            assert torch.equal(value, tensors[key]), key
    # Plain safetensors: readable by any tool, no pickle involved.
    assert load_file(tmp_path / "runs/rt/checkpoints/step-000002/model.safetensors")


def test_resume_gives_the_same_weights_as_a_straight_run(facade_shards, tmp_path):
    # Two loader processes, so the resumed loader must also restart the right stream.
    common = ["data.workers=2", "train.checkpoint_every=3", "train.eval_every=3"]
    train(tiny_job(facade_shards, "train.steps=6", *common), str(tmp_path), "straight")
    train(tiny_job(facade_shards, "train.steps=3", *common), str(tmp_path), "split")
    train(tiny_job(facade_shards, "train.steps=6", *common), str(tmp_path), "split", resume=True)

    straight, _ = load_checkpoint(str(tmp_path / "runs/straight/checkpoints/step-000006"))
    resumed, state = load_checkpoint(str(tmp_path / "runs/split/checkpoints/step-000006"))
    assert state["data_position"]["batches"] == 6
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [m["step"] for m in metrics(tmp_path, "split") if "loss_rec" in m]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_streams_split_shards_without_overlap(facade_shards):
    manifest = open_manifest(facade_shards)
    seen = []
    for rank in range(2):
        for stream in assign_shards(manifest, "train", rank, 2, 2):
            seen += [s["name"] for s in stream]
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert sorted(seen) == sorted(names)


def test_loader_resumes_mid_epoch_with_the_same_batches(facade_shards):
    cfg = tiny_job(facade_shards, "data.workers=2")
    manifest = open_manifest(facade_shards)
    straight = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    batches = [next(straight) for _ in range(12)]  # past one epoch of ~80 samples
    later = [next(straight) for _ in range(3)]
    resumed = TrainLoader(facade_shards, manifest, cfg, 0, 1, batches=12)
    assert all(torch.equal(a, next(resumed)) for a in later)
    assert not torch.equal(batches[0], batches[1])


def test_pruning_keeps_the_last_checkpoints_and_the_best(tmp_path):
    run = Run(open_store(str(tmp_path)), "r")
    for step in range(1, 7):
        run.save(step, {"x": torch.zeros(1)}, {"step": step, "best_step": 2})
    assert run.steps() == [2, 4, 5, 6]
    assert run.checkpoint("best").uri.endswith("step-000002")
