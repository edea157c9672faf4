"""Using a trained model: train, runs, pull, eval and inpaint through the CLI; bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import TINY, cectl
from PIL import Image

from cectl.demo import make_facades
from cectl.evaluate import hole_metrics
from cectl.masks import MEAN_FILL, Window, fill_holes


def test_train_runs_pull_eval_through_the_cli(facade_shards, tmp_path):
    store = tmp_path / "store"
    args = ["train", "jobs/demo.yaml", *TINY, "train.steps=3", "--local", "--data",
            facade_shards, "--store", store, "--name", "cli", "--json"]
    result = cectl(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step"] == 3 and summary["workers"] == 1 and summary["resumes"] == 0
    again = cectl(*args)
    assert again.returncode == 2 and "already exists" in again.stderr
    more = cectl("train", "train.steps=5", "--store", store, "--name", "cli", "--resume",
                 "--json")
    assert more.returncode == 0, more.stderr
    summary = json.loads(more.stdout)
    assert summary["step"] == 5 and summary["resumes"] == 1

    listing = json.loads(cectl("runs", "--store", store, "--json").stdout)
    assert [(r["run"], r["step"], r["target_steps"]) for r in listing] == [("cli", 5, 5)]
    assert f"tensorboard --logdir {store}/runs" in cectl("runs", "--store", store).stdout

    pulled = cectl("pull", "cli", "--store", store, "--dest", tmp_path / "pulled")
    assert pulled.returncode == 0, pulled.stderr
    ckpt = tmp_path / "pulled" / "cli" / "step-000005"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.json"}

    scored = cectl("eval", ckpt, "--data", facade_shards, "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["step"] == 5 and report["images"] > 0
    assert set(report["model"]) == {"l1_pct", "l2_pct", "psnr_db", "psnr_pooled_db",
                                    "psnr_window_db", "ssim"}
    table = cectl("eval", ckpt, "--data", facade_shards)
    assert "mean-colour fill" in table.stdout and "NN inpainting" in table.stdout
    assert "SSIM" in table.stdout and "not computed: FID needs" in table.stdout


def test_no_generated_facade_holds_another_ones_hole(tmp_path):
    # The demo's nearest-neighbour baseline must not win by copying a near-identical
    # facade: as between photographs, another image's central quarter is a poor fill.
    paths = make_facades(tmp_path, 64, size=64)
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in paths])
    holes = pixels[:, 16:48, 16:48].reshape(len(paths), -1)
    mse = ((holes[:, None] - holes[None]) ** 2).mean(-1)
    np.fill_diagonal(mse, np.inf)
    best_psnr = 10 * np.log10(1 / mse.min(1))  # each facade's best fill from another one
    assert best_psnr.mean() < 17 and best_psnr.max() < 25


def test_train_and_pull_with_an_s3_store(facade_shards, tmp_path, s3_env, bucket):
    store = f"s3://{bucket}/runs-store"
    result = cectl("train", *TINY, "train.steps=2", "--data", facade_shards, "--store", store,
                   "--name", "s3run")
    assert result.returncode == 0, result.stderr
    pulled = cectl("pull", "s3run", "--store", store, "--dest", tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "s3run" / "step-000002" / "model.safetensors").stat().st_size > 0


def test_hole_metrics_on_known_cases():
    truth = torch.zeros(2, 3, 8, 8)
    holes = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    holes[..., 2:6, 2:6] = True
    off = truth.clone()
    off[holes.expand_as(off)] = 0.2  # 0.1 on the [0, 1] scale
    off[..., 0, 0] = 1.0  # outside the hole: must not count
    m = hole_metrics(off, truth, holes, Window(2, 4))
    assert torch.equal(m["pixels"], torch.tensor([48, 48]))
    assert torch.allclose(m["abs"] / m["pixels"], torch.tensor(0.1))
    assert torch.allclose(m["squared"] / m["pixels"], torch.tensor(0.01))
    assert torch.allclose(m["psnr"], torch.tensor(20.0))
    assert torch.allclose(m["psnr_window"], torch.tensor(20.0))
    black = torch.full((1, 3, 8, 8), -1.0)
    fill = hole_metrics(fill_holes(black, holes[:1]), black, holes[:1], Window(0, 8))
    expected = ((MEAN_FILL + 1) / 2).mean()
    assert torch.allclose(fill["abs"] / fill["pixels"], expected)


def changed_outside(before: np.ndarray, after: np.ndarray, hole: np.ndarray) -> int:
    """Pixels outside the hole that changed."""
    diff = np.abs(before.astype(int) - after.astype(int))
    diff = diff.reshape(*diff.shape[:2], -1).max(axis=2)
    return int(((diff > 0) & ~hole).sum())


@pytest.mark.parametrize(("mode", "size"), [("L", (300, 170)), ("RGBA", (90, 200)),
                                            ("RGB", (1600, 1200)), ("P", (128, 96))])
def test_inpaint_odd_images_changes_only_the_hole(mode, size, tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    src = tmp_path / f"in.{'jpg' if mode == 'RGB' else 'png'}"
    image.save(src)
    hole = np.zeros((size[1], size[0]), dtype=bool)
    hole[size[1] * 3 // 8 : size[1] * 5 // 8, size[0] * 3 // 8 : size[0] * 9 // 16] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = cectl("inpaint", src, "--ckpt", tiny_checkpoint, "--mask", tmp_path / "mask.png",
                   "-o", out)
    assert result.returncode == 0, result.stderr
    before, after = Image.open(src), Image.open(out)
    assert after.size == size
    assert after.mode == (mode if mode != "P" else "RGBA")  # the palette had transparency
    b = np.asarray(before.convert(after.mode))
    a = np.asarray(after)
    assert changed_outside(b, a, hole) == 0
    assert not np.array_equal(b[hole], a[hole])


def test_inpaint_center_mask_default_output_name(tiny_checkpoint, tmp_path):
    src = tmp_path / "photo.png"
    Image.new("RGB", (200, 120), (90, 120, 150)).save(src)
    result = cectl("inpaint", src, "--ckpt", tiny_checkpoint, "--mask", "center")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "photo-inpainted.png").size == (200, 120)


@pytest.mark.parametrize("case", ["not-an-image", "missing-ckpt", "corrupt-ckpt", "mask-size",
                                  "other-arch", "mask-outside-window"])
def test_inpaint_bad_inputs_exit_2_with_one_sentence(case, tiny_checkpoint, tmp_path):
    src = tmp_path / "img.png"
    Image.new("RGB", (64, 64), "gray").save(src)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    mask = "center"
    if case == "not-an-image":
        src.write_text("hello")
    elif case == "missing-ckpt":
        ckpt = tmp_path / "nowhere"
    elif case == "corrupt-ckpt":
        (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    elif case == "mask-size":
        Image.new("L", (10, 10), 255).save(tmp_path / "m.png")
        mask = str(tmp_path / "m.png")
    elif case == "other-arch":
        state = json.loads((ckpt / "state.json").read_text())
        state["config"]["model"]["width"] = 16  # tensors no longer fit the claimed network
        (ckpt / "state.json").write_text(json.dumps(state))
    elif case == "mask-outside-window":
        mask = "random-block"
    result = cectl("inpaint", src, "--ckpt", ckpt, "--mask", mask, "-o", tmp_path / "o.png")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_needs_a_split_that_exists(tiny_checkpoint, facade_shards):
    result = cectl("eval", tiny_checkpoint, "--data", facade_shards, "--split", "test")
    assert result.returncode == 2 and "no 'test' split" in result.stderr


def test_training_without_data_is_bad_input(tmp_path):
    result = cectl("train", "--store", tmp_path)
    assert result.returncode == 2 and "--data" in result.stderr


def test_bad_config_values_are_bad_input(facade_shards, tmp_path):
    result = cectl("train", "mask.kind=star", "--data", facade_shards, "--store", tmp_path)
    assert result.returncode == 2 and "mask.kind" in result.stderr
    result = cectl("train", "model.arch=alexnet227", "--data", facade_shards, "--store", tmp_path)
    assert result.returncode == 2 and "227" in result.stderr

