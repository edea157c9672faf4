"""Training: it learns, checkpoints round-trip, and resume is exact."""

from __future__ import annotations

import io
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, assert_refused, mask_png, tiny_job
from PIL import Image
from safetensors.torch import load_file, save_file

from cectl.checkpoint import Checkpointer, write_checkpoint
from cectl.data import TrainLoader
from cectl.model import build_models, weights_digest
from cectl.restore import load_checkpoint, restore_tensors
from cectl.runs import FORMATS, Run
from cectl.shard_format import open_manifest
from cectl.storage import open_store
from cectl.train import train


def snapshot(modules: dict, optimizers: dict) -> dict[str, torch.Tensor]:
    """Copies of what a checkpoint holds but the RNG, by its key names, from torch's own
    state dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    tensors = {f"{name}.{key}": value.clone() for name, module in modules.items()
               for key, value in module.state_dict().items()}
    for name, optimizer in optimizers.items():
        state = get_optimizer_state_dict(modules[name], optimizer, options=flat)
        tensors |= {f"optim.{name}.{key}": value.clone() for key, value in state.items()
                    if isinstance(value, torch.Tensor)}
    return tensors


def metrics(store: Path, run: str) -> list[dict]:
    lines = (store / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(store: Path, run: str) -> dict[int, dict]:
    """The loss lines of a run's metrics.jsonl, by step."""
    return {m["step"]: m for m in metrics(store, run) if "loss_rec" in m}


@pytest.mark.slow  # 60 steps: the fast lane's trainings take a few
def test_a_short_run_lowers_the_reconstruction_loss(facade_shards, tmp_path):
    # Reconstruction alone trains at optim.lr_d (train.lua); 2e-3 learns within 60 steps.
    cfg = tiny_job(facade_shards, "train.steps=60", "loss.mode=rec", "optim.lr_d=2e-3")
    summary = train(cfg, open_store(str(tmp_path)), "learn")
    rec = [m["loss_rec"] for m in metrics(tmp_path, "learn") if "loss_rec" in m]
    assert len(rec) == 60 and summary["step"] == 60 and summary["workers"] == 1
    assert sum(rec[-10:]) / 10 < 0.7 * sum(rec[:5]) / 5
    run = tmp_path / "runs" / "learn"
    assert (run / "config.yaml").is_file()
    assert (run / "samples" / "step-000060.png").is_file()
    assert [p.name for p in (run / "tensorboard").iterdir()
            if p.name.startswith("events.out.tfevents.")]


@pytest.mark.parametrize("ending", ["done", "error"])
def test_a_run_leaves_no_loader_process_or_input_thread_behind(ending, facade_shards,
                                                              tmp_path, monkeypatch):
    import multiprocessing
    import threading

    cfg = tiny_job(facade_shards, "train.steps=3", "data.workers=2")
    real_next = TrainLoader.__next__

    def failing(self):  # at step 2: the loader processes and the input thread are busy
        if self.samples:
            raise ZeroDivisionError
        return real_next(self)

    if ending == "error":
        monkeypatch.setattr(TrainLoader, "__next__", failing)
    kept = None  # as a restart policy keeps the failure (its frames hold the loader)
    try:
        train(cfg, open_store(str(tmp_path)), "r")
    except ZeroDivisionError as e:
        kept = e
    assert not [t for t in threading.enumerate() if t.name.startswith("cectl-input")]
    assert not multiprocessing.active_children()
    assert (kept is not None) == (ending == "error")


def test_every_validation_writes_its_sample_grid_to_tensorboard(facade_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_job(facade_shards, "train.steps=3", "train.eval_every=2")
    train(cfg, open_store(str(tmp_path)), "tb")
    run = tmp_path / "runs" / "tb"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["samples"]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 3]  # every eval_every steps, and the last
    for grid in grids:
        png = (run / "samples" / f"step-{grid.step:06d}.png").read_bytes()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(grid.encoded_image_string))),
                              np.asarray(Image.open(io.BytesIO(png))))
    assert {"loss_rec", "val_psnr_db", "val_ssim"} <= set(events.Tags()["scalars"])


def test_checkpoint_round_trip_restores_networks_and_optimizers(facade_shards, tmp_path):
    cfg = tiny_job(facade_shards, "train.steps=2", "train.checkpoint_every=2")
    train(cfg, open_store(str(tmp_path)), "rt")
    tensors, state = load_checkpoint(str(tmp_path / "runs/rt/checkpoints/step-000002"))
    assert state["step"] == 2 and state["config"]["model"]["width"] == 8
    for prefix in ("G.", "D.", "optim.G.", "optim.D.", "rng."):
        assert any(key.startswith(prefix) for key in tensors), prefix
    generator, discriminator = build_models(cfg)
    opt = torch.optim.Adam(generator.parameters(), fused=True)
    restore_tensors(tensors, {"G": generator, "D": discriminator}, {"G": opt})
    again = snapshot({"G": generator, "D": discriminator}, {"G": opt})
    for key, value in again.items():
        if not key.startswith(("rng.", "optim.D.")):
            assert torch.equal(value, tensors[key]), key
    # Plain safetensors: readable by any tool, no pickle involved.
    plain = load_file(tmp_path / "runs/rt/checkpoints/step-000002/model.safetensors")
    assert plain.keys() == tensors.keys()
    assert all(torch.equal(plain[key], value) for key, value in tensors.items())


def straight_and_resumed(shards: str, root: Path, *overrides: str) -> tuple[dict, dict]:
    """The states of step 6 of a straight run and of a run of 3 steps resumed to 6, after
    checking that their tensors are equal."""
    common = ["train.checkpoint_every=3", *overrides]
    store = open_store(str(root))
    train(tiny_job(shards, "train.steps=6", *common), store, "straight")
    train(tiny_job(shards, "train.steps=3", *common), store, "split")
    train(tiny_job(shards, "train.steps=6", *common), store, "split", resume=True)
    straight, straight_state = load_checkpoint(str(root / "runs/straight/checkpoints/step-000006"))
    resumed, resumed_state = load_checkpoint(str(root / "runs/split/checkpoints/step-000006"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    return straight_state, resumed_state


def test_resume_gives_the_same_weights_as_a_straight_run(facade_shards, tmp_path):
    # Two loader processes, so the resumed loader must also restart the right stream.
    _, state = straight_and_resumed(facade_shards, tmp_path, "data.workers=2",
                                    "train.eval_every=3")
    assert state["data_position"] == {"samples": 6 * 8}
    steps = [m["step"] for m in metrics(tmp_path, "split") if "loss_rec" in m]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_run_stopped_while_a_checkpoint_is_written_keeps_that_checkpoint(
        facade_shards, tmp_path, monkeypatch):
    import cectl.checkpoint

    def slow_save(tensors, path):  # a large model, a slow upload
        time.sleep(1.0)
        save_file(tensors, path)

    def interrupted(self):  # Ctrl-C as step 4 starts
        if self.samples == 3 * 8:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(cectl.checkpoint, "save_file", slow_save)
    store = open_store(str(tmp_path))
    cfg = tiny_job(facade_shards, "train.steps=6", "train.checkpoint_every=3")
    real_next = TrainLoader.__next__
    monkeypatch.setattr(TrainLoader, "__next__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, "stopped")
    assert Run(store, "stopped").steps() == [3]
    monkeypatch.setattr(TrainLoader, "__next__", real_next)
    assert train(cfg, store, "stopped", resume=True)["step"] == 6


def test_an_fp16_resume_keeps_the_loss_scale(facade_shards, tmp_path):
    state, resumed_state = straight_and_resumed(facade_shards, tmp_path, "train.precision=fp16")
    assert state["loss_scale"] == resumed_state["loss_scale"]
    assert state["loss_scale"]["scale"] < 65536  # it moved: a fresh scale would differ


def test_resume_drops_the_metrics_logged_after_its_checkpoint(facade_shards, tmp_path):
    # A run that logged steps 4 and 5 and died before their checkpoint was complete
    # (here: step 5's checkpoint removed) resumes from step 3 and logs 4 and 5 again.
    store = open_store(str(tmp_path))
    common = ["train.checkpoint_every=3", "train.eval_every=1000"]
    train(tiny_job(facade_shards, "train.steps=5", *common), store, "died")
    assert sorted(losses(tmp_path, "died")) == [1, 2, 3, 4, 5]
    first = losses(tmp_path, "died")
    shutil.rmtree(tmp_path / "runs/died/checkpoints/step-000005")
    with open(tmp_path / "runs/died/metrics.jsonl", "a") as log:
        log.write('{"step": 5, "loss_r\n["not", "a record"]\n')  # a line cut short, a stray
    train(tiny_job(facade_shards, "train.steps=6", *common), store, "died", resume=True)
    lines = metrics(tmp_path, "died")
    assert [m["step"] for m in lines if "loss_rec" in m] == [1, 2, 3, 4, 5, 6]
    assert [(i, m["step"]) for i, m in enumerate(lines) if "resumed" in m] == [(3, 3)]
    again = losses(tmp_path, "died")
    assert all(again[step] == first[step] for step in (1, 2, 3))  # kept, not rewritten
    assert again[4]["loss_rec"] == first[4]["loss_rec"]  # the same step, redone exactly


def test_loader_resumes_mid_epoch_with_the_same_batches(facade_shards):
    cfg = tiny_job(facade_shards, "data.workers=2")
    manifest = open_manifest(facade_shards)
    straight = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    batches = [next(straight) for _ in range(12)]  # past one epoch of ~80 samples
    position = straight.state_dict()
    later = [next(straight) for _ in range(3)]
    resumed = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    resumed.load_state_dict(position)
    for images, holes in later:
        again = next(resumed)
        assert torch.equal(images, again[0]) and torch.equal(holes, again[1])
    assert not torch.equal(batches[0][0], batches[1][0])


def test_pruning_keeps_the_last_checkpoints_and_the_best_and_no_empty_folders(tmp_path):
    run = Run(open_store(str(tmp_path)), "r")
    for step in range(1, 7):
        state = {"step": step, "best_step": 2, "config": {}, "data_position": {"samples": 0}}
        write_checkpoint(run, step, {"x": torch.zeros(1)}, state)
    assert run.steps() == [2, 4, 5, 6]
    assert run.checkpoint("best").uri.endswith("step-000002")
    folders = sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").iterdir())
    assert folders == ["step-000002", "step-000004", "step-000005", "step-000006"]


def test_the_best_checkpoint_is_one_that_was_kept(facade_shards, tmp_path, monkeypatch):
    import cectl.monitor

    validate = cectl.monitor.Validator.run_at

    def scored(self, step, generator):  # lowest at step 3, between checkpoints
        return validate(self, step, generator) | {"val_l2_pct": {1: 5, 2: 4, 3: 1, 4: 3}[step]}

    monkeypatch.setattr(cectl.monitor.Validator, "run_at", scored)
    store = open_store(str(tmp_path))
    train(tiny_job(facade_shards, "train.steps=4", "train.checkpoint_every=2",
                   "train.eval_every=1"), store, "r")
    run = Run(store, "r")
    assert run.steps() == [2, 4]
    assert run.checkpoint("best").uri.endswith("step-000004")


def test_a_prune_cut_short_leaves_no_checkpoint_without_its_weights(tmp_path, monkeypatch):
    import cectl.runs

    run = Run(open_store(str(tmp_path)), "r")
    for step in range(1, 4):
        state = {"step": step, "best_step": None, "config": {}, "data_position": {"samples": 0}}
        write_checkpoint(run, step, {"x": torch.zeros(1)}, state)
    delete = run.store.delete

    def one_delete_then_fail(key):
        delete(key)
        raise OSError("the store went away")

    monkeypatch.setattr(run.store, "delete", one_delete_then_fail)
    monkeypatch.setattr(cectl.runs, "KEEP_LAST", 2)
    with pytest.raises(OSError):
        run.prune(keep=None)
    assert run.steps() == [2, 3]  # step 1 lost its state.json first: incomplete, ignored


def test_a_version_1_checkpoint_restores_the_same_optimizer_state(facade_shards, tmp_path):
    cfg = tiny_job(facade_shards, "train.steps=2")
    train(cfg, open_store(str(tmp_path)), "v1")
    tensors, _ = load_checkpoint(str(tmp_path / "runs/v1/checkpoints/step-000002"))
    generator, discriminator = build_models(cfg)
    modules = {"G": generator, "D": discriminator}
    # The /1 layout: optimizer states keyed by the parameter's index.
    index = {name: {fqn: i for i, (fqn, _) in enumerate(m.named_parameters())}
             for name, m in modules.items()}
    old = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, name, _, rest = key.split(".", 3)
            fqn, field = rest.rsplit(".", 1)
            key = f"optim.{name}.{index[name][fqn]}.{field}"
        old[key] = value
    folder = tmp_path / "runs/v1/checkpoints/step-000002"
    save_file(old, folder / "model.safetensors")
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "format": FORMATS[0]}))

    run = Run(open_store(str(tmp_path)), "v1")
    optimizers = {name: torch.optim.Adam(m.parameters(), fused=True) for name, m in modules.items()}
    loader = TrainLoader(facade_shards, open_manifest(facade_shards), cfg, 0, 1)
    assert Checkpointer(run, cfg, modules, optimizers, loader).restore() == 2
    again = snapshot(modules, optimizers)
    for key, value in tensors.items():
        if key.startswith("optim."):
            assert torch.equal(again[key], value), key
    assert loader.state_dict() == {"samples": 2 * 8}


def test_a_background_save_holds_its_step_while_the_next_step_runs(facade_shards, tmp_path,
                                                                  monkeypatch):
    from cectl import checkpoint
    from cectl.pixels import to_model_range
    from cectl.train import make_optimizer, train_step

    copy = checkpoint.Checkpointer._stage

    def slow_copy(*args):  # as 880 MB would be: the next step starts before it is done
        time.sleep(0.5)
        return copy(*args)

    monkeypatch.setattr(checkpoint.Checkpointer, "_stage", slow_copy)
    cfg = tiny_job(facade_shards)
    generator, discriminator = build_models(cfg)
    modules = {"G": generator, "D": discriminator}
    optimizers = {name: make_optimizer(m, 1e-3, 0.5) for name, m in modules.items()}
    loader = TrainLoader(facade_shards, open_manifest(facade_shards), cfg, 0, 1)
    checkpointer = Checkpointer(Run(open_store(str(tmp_path)), "bg"), cfg, modules,
                                optimizers, loader)
    images, holes = next(loader)
    images = to_model_range(images)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step() -> None:
        train_step(generator, discriminator, optimizers["G"], optimizers["D"], images, holes,
                   cfg, scaler)

    step()
    expected = snapshot(modules, optimizers)
    checkpointer.save(1, {})
    step()  # its updates wait for the copy
    checkpointer.wait()
    saved, _ = load_checkpoint(str(tmp_path / "runs/bg/checkpoints/step-000001"))
    assert saved.keys() == expected.keys() | {"rng.torch"}
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    assert not torch.equal(snapshot(modules, optimizers)["G.encoder.0.weight"],
                           expected["G.encoder.0.weight"])  # the second step did update


def _ddp_rank(rank: int, world: int, port: int, shards: str, store: str, log: str) -> None:
    import os

    from torch.nn.parallel import DistributedDataParallel

    from cectl.train import Session

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CECTL_SAMPLE_LOG=log)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    train(tiny_job(shards, "train.steps=3"), open_store(store), "ddp",
          Session(rank=rank, world=world, wrap=DistributedDataParallel))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes that each import torch and train: the Ray tests' DDP, unit-sized
def test_ddp_ranks_end_with_identical_weights(facade_shards, tmp_path):
    from helpers import free_port

    log = tmp_path / "debug.jsonl"
    torch.multiprocessing.spawn(_ddp_rank, args=(2, free_port(), facade_shards,
                                                 str(tmp_path / "store"), str(log)),
                                nprocs=2)
    ends = [r for r in map(json.loads, log.read_text().splitlines()) if "weights" in r]
    assert sorted(r["rank"] for r in ends) == [0, 1]
    assert ends[0]["weights"] == ends[1]["weights"]
    summary = Run(open_store(str(tmp_path / "store")), "ddp").summary()
    assert summary["step"] == 3 and summary["workers"] == 2
    # ... and they are the weights rank 0 checkpointed.
    generator, discriminator = build_models(tiny_job(facade_shards))
    tensors, _ = load_checkpoint(str(tmp_path / "store/runs/ddp/checkpoints/step-000003"))
    restore_tensors(tensors, {"G": generator, "D": discriminator}, {})
    assert weights_digest(generator, discriminator) == ends[0]["weights"]


def test_the_gpu_decoding_layout_gives_the_same_batches_and_resumes(facade_shards):
    # What GPU decoding gets: JPEG bytes and crop plans from the loader processes, decoded
    # and cut here (by the CPU decoder standing in for nvJPEG): the CPU path's batches.
    # load_size 72, the shards' size: every JPEG goes to the decoder, none needs a resize.
    cfg = tiny_job(facade_shards, "data.workers=2", "data.load_size=72",
                   "mask.kind=random-region")
    manifest = open_manifest(facade_shards)
    pixels = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    encoded = TrainLoader(facade_shards, manifest, cfg, 0, 1, gpu_jpegs=True)
    for _ in range(12):  # past one epoch
        (a, holes_a), (b, holes_b) = next(pixels), next(encoded)
        assert torch.equal(a, b) and torch.equal(holes_a, holes_b)
    position = encoded.state_dict()
    later = [next(encoded) for _ in range(3)]
    resumed = TrainLoader(facade_shards, manifest, cfg, 0, 1, gpu_jpegs=True)
    resumed.load_state_dict(position)
    for images, holes in later:
        again = next(resumed)
        assert torch.equal(images, again[0]) and torch.equal(holes, again[1])


def test_loader_processes_on_one_machine_fetch_each_s3_shard_once(facade_shards, s3_env,
                                                                  bucket, tmp_path, monkeypatch):
    import tempfile

    import boto3
    from helpers import FlakyProxy

    s3 = boto3.client("s3", endpoint_url=s3_env)
    for path in filter(Path.is_file, Path(facade_shards).rglob("*")):
        s3.upload_file(str(path), bucket, f"shards/{path.relative_to(facade_shards)}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a cache of this test's own
    monkeypatch.setattr(tempfile, "tempdir", None)
    proxy = FlakyProxy(int(s3_env.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    uri = f"s3://{bucket}/shards"
    manifest = open_manifest(uri)
    # Two loader processes, batches of 8 and shards of 16: each process takes a share of
    # every shard, and without a shared cache each would fetch all of them.
    loader = TrainLoader(uri, manifest, tiny_job(uri, "data.workers=2"), 0, 1)
    train_bytes = manifest["splits"]["train"]["bytes"]
    for _ in range(-(-manifest["splits"]["train"]["samples"] // 8)):  # one epoch
        next(loader)
    assert train_bytes < proxy.passed < 1.2 * train_bytes
    cached = {p.stem for p in tmp_path.glob("cectl-shard-cache-*/*.tar")}
    assert cached == {s["sha256"] for s in manifest["splits"]["train"]["shards"]}


def test_losses_are_the_same_whether_read_every_step_or_not(facade_shards, tmp_path):
    store = open_store(str(tmp_path))
    for name, every in (("each", 1), ("third", 3)):
        train(tiny_job(facade_shards, "train.steps=6", f"train.log_every={every}"), store, name)
    each = {m["step"]: m for m in metrics(tmp_path, "each") if "loss_rec" in m}
    third = [m for m in metrics(tmp_path, "third") if "loss_rec" in m]
    assert [m["step"] for m in third] == [3, 6]
    for m in third:
        for key in ("loss_rec", "loss_d", "loss_adv"):
            assert m[key] == each[m["step"]][key], key


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU host decodes on its GPU")
def test_gpu_decoding_without_a_gpu_is_a_usage_error(cli, facade_shards, tmp_path):
    from helpers import TINY

    result = cli("train", *TINY, "data.decode=gpu", "--local", "--data", facade_shards,
                 "--store", tmp_path, "--name", "gpu")
    assert_refused(result, 2, "data.decode=gpu")
    assert not (tmp_path / "runs" / "gpu" / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["random-block", "random-region"])
def test_random_mask_training_validates_on_whole_images(kind, facade_shards, tmp_path):
    from cectl.evaluate import evaluate
    from cectl.pixels import load_eval_images
    from cectl.restore import load_generator

    cfg = tiny_job(facade_shards, f"mask.kind={kind}", "train.steps=2", "train.eval_every=1")
    train(cfg, open_store(str(tmp_path)), "random")
    lines = metrics(tmp_path, "random")
    assert [m["step"] for m in lines if "loss_rec" in m] == [1, 2]
    assert [m["step"] for m in lines if "val_l2_pct" in m] == [1, 2]
    assert all(math.isfinite(v) for m in lines for v in m.values())
    grid = tmp_path / "runs/random/samples/step-000002.png"
    assert Image.open(grid).size == (8 * 32, 3 * 32)  # input | prediction | truth
    # The last validation is the checkpoint's score on the val images with these masks.
    generator, saved, _ = load_generator(str(tmp_path / "runs/random/checkpoints/step-000002"))
    assert saved.mask.kind == kind
    images, _ = load_eval_images(facade_shards, "val", 32, limit=8)
    scores = evaluate(generator, saved, images, kind)["model"]
    assert lines[-1]["val_l2_pct"] == pytest.approx(scores["l2_pct"], rel=1e-5)
    assert lines[-1]["val_psnr_db"] == pytest.approx(scores["psnr_db"], rel=1e-5)


def test_a_model_trains_with_free_form_masks_and_evaluates_with_them(cli, facade_shards,
                                                                   tmp_path):
    store = tmp_path / "store"
    result = cli("train", *TINY, "mask.kind=free-form", "mask.min_area=0.2", "mask.max_area=0.3",
                 "train.steps=2", "train.eval_every=1", "--local", "--data", facade_shards,
                 "--store", store, "--name", "strokes", "--json")
    assert result.returncode == 0, result.stderr
    assert [m["step"] for m in metrics(store, "strokes") if "val_l2_pct" in m] == [1, 2]
    ckpt = json.loads(result.stdout)["checkpoints"] + "/step-000002"
    scored = cli("eval", ckpt, "--data", facade_shards, "--mask", "free-form", "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["mask"] == "free-form" and report["images"] > 0
    assert all(math.isfinite(v) for row in ("model", "mean_fill") for v in report[row].values())
    # The kind it trained with is the default, drawn from the same fixed seed.
    again = json.loads(cli("eval", ckpt, "--data", facade_shards, "--json").stdout)
    assert again["model"] == report["model"]


def test_a_model_trains_with_mask_files_and_evaluates_with_them_and_per_image_masks(
        cli, facade_shards, tmp_path):
    from cectl.pixels import load_eval_images

    masks = tmp_path / "masks"
    masks.mkdir()
    for i, (height, width) in enumerate([(64, 64), (40, 90), (120, 50)]):
        hole = np.zeros((height, width), dtype=bool)
        hole[height // 4 : height // 2 + i, width // 5 : width // 2] = True
        (masks / f"m{i}.png").write_bytes(mask_png(hole))
    (masks / "broken.png").write_text("not a picture")
    store = tmp_path / "store"
    result = cli("train", *TINY, "mask.kind=files", f"mask.source={masks}", "data.workers=1",
                 "train.steps=2", "train.eval_every=1", "--local", "--data", facade_shards,
                 "--store", store, "--name", "files", "--json")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert f"skipped {masks / 'broken.png'}: not-an-image" in said
    assert f"masks: 3 from {masks} (skipped: 1 not-an-image)" in said
    summary = json.loads(result.stdout)
    assert summary["masks"] == {"source": str(masks), "masks": 3,
                                "skipped": {"not-an-image": 1}}
    assert [m["step"] for m in metrics(store, "files") if "val_l2_pct" in m] == [1, 2]
    ckpt = summary["checkpoints"] + "/step-000002"
    drawn = json.loads(cli("eval", ckpt, "--data", facade_shards, "--json").stdout)
    assert drawn["mask"] == "files" and drawn["images"] > 0
    # One mask per image, named after it, of the image's size before the eval crop.
    _, keys = load_eval_images(facade_shards, "val", 32)
    per_image = tmp_path / "per-image"
    per_image.mkdir()
    for i, key in enumerate(keys):
        hole = np.zeros((72, 72), dtype=bool)
        hole[20 + i % 10 : 40 + i % 10, 30:50] = True
        (per_image / f"{key}.png").write_bytes(mask_png(hole))
    scored = cli("eval", ckpt, "--data", facade_shards, "--mask", per_image, "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["mask"] == str(per_image) and report["images"] == len(keys)
    assert report["model"] != drawn["model"]
    (per_image / f"{keys[0]}.png").unlink()
    assert_refused(cli("eval", ckpt, "--data", facade_shards, "--mask", per_image), 2,
                   f"1 of the {len(keys)} images", repr(keys[0]))
    assert_refused(cli("eval", ckpt, "--data", facade_shards, "--mask", "nowhere"), 2,
                   "'nowhere'", "free-form")


def test_fp16_and_bf16_train_in_their_precision(facade_shards, tmp_path):
    store = open_store(str(tmp_path))
    digests = {}
    for precision in ("fp32", "fp16", "bf16"):
        cfg = tiny_job(facade_shards, "train.steps=2", f"train.precision={precision}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "this CPU has no native bf16")
            train(cfg, store, precision)
        logged = losses(tmp_path, precision)
        assert sorted(logged) == [1, 2] and all(math.isfinite(m["loss_rec"])
                                                 for m in logged.values())
        generator, discriminator = build_models(cfg)
        tensors, _ = load_checkpoint(str(tmp_path / f"runs/{precision}/checkpoints/step-000002"))
        restore_tensors(tensors, {"G": generator, "D": discriminator}, {})
        digests[precision] = weights_digest(generator, discriminator)
    # The same seed and batches: only the arithmetic differs, so each precision is in use.
    assert len(set(digests.values())) == 3
    fp32, fp16 = losses(tmp_path, "fp32")[1], losses(tmp_path, "fp16")[1]
    assert fp16["loss_rec"] == pytest.approx(fp32["loss_rec"], rel=0.05)


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_lowers_the_scale(facade_shards):
    from cectl.masks import draw_holes
    from cectl.pixels import to_model_range
    from cectl.train import make_optimizer, train_step

    cfg = tiny_job(facade_shards, "train.precision=fp16")
    torch.manual_seed(0)
    generator, discriminator = build_models(cfg)
    optimizers = [make_optimizer(m, 1e-3, 0.5) for m in (generator, discriminator)]
    images = to_model_range(next(TrainLoader(facade_shards, open_manifest(facade_shards), cfg,
                                             0, 1))[0])
    holes = draw_holes("center", len(images), 32, 2, 0)
    before = weights_digest(generator, discriminator)
    # A scale no fp16 gradient survives: the scaler finds infinities and skips the updates.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    train_step(generator, discriminator, *optimizers, images, holes, cfg, scaler)
    assert weights_digest(generator, discriminator) == before
    assert scaler.get_scale() == 2.0**59
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    step = train_step(generator, discriminator, *optimizers, images, holes, cfg, scaler)
    assert weights_digest(generator, discriminator) != before
    assert scaler.get_scale() == 1.0 and all(torch.isfinite(v) for v in step.values())


def test_precision_auto_is_bf16_only_where_the_device_does_it_natively(monkeypatch):
    from cectl import train as training

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"),
                                       (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        training.resolve_precision.cache_clear()
        assert training.resolve_precision("auto", cpu) == expected
        assert training.resolve_precision("fp32", cpu) == "fp32"
    training.resolve_precision.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_checkpoint_restores_the_cuda_generator(facade_shards, tmp_path):
    from cectl.train import Session, make_optimizer

    device = torch.device("cuda", torch.cuda.current_device())
    cfg = tiny_job(facade_shards, "train.steps=2", "train.checkpoint_every=2")
    train(cfg, open_store(str(tmp_path)), "rng", Session(device=device))
    tensors, _ = load_checkpoint(str(tmp_path / "runs/rng/checkpoints/step-000002"))
    generator, discriminator = (m.to(device) for m in build_models(cfg))
    modules = {"G": generator, "D": discriminator}
    optimizers = {name: make_optimizer(m, 1e-3, 0.5) for name, m in modules.items()}
    loader = TrainLoader(facade_shards, open_manifest(facade_shards), cfg, 0, 1, device)
    torch.cuda.manual_seed(12345)
    Checkpointer(Run(open_store(str(tmp_path)), "rng"), cfg, modules, optimizers,
                 loader).restore()
    assert torch.equal(torch.cuda.get_rng_state(device), tensors["rng.cuda.0"])
