"""Using a trained model: train, runs, pull, eval and inpaint through the CLI; bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import TINY, assert_refused, tiny_job
from PIL import Image

from cectl.demo import make_facades
from cectl.evaluate import hole_metrics
from cectl.masks import MEAN_FILL, Window, fill_holes


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a table the CLI printed, as lists of cell texts."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in text.splitlines() if line.startswith("│")]


def test_train_runs_pull_eval_through_the_cli(cli, facade_shards, tmp_path):
    store = tmp_path / "store"
    args = ["train", "jobs/demo.yaml", *TINY, "train.steps=3", "--local", "--data",
            facade_shards, "--store", store, "--name", "cli", "--json"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step"] == 3 and summary["workers"] == 1 and summary["resumes"] == 0
    assert_refused(cli(*args), 2, "'cli'", "--resume", "--name")
    more = cli("train", "train.steps=5", "--store", store, "--name", "cli", "--resume", "--json")
    assert more.returncode == 0, more.stderr
    summary = json.loads(more.stdout)
    assert summary["step"] == 5 and summary["resumes"] == 1

    listing = json.loads(cli("runs", "--store", store, "--json").stdout)
    assert [(r["run"], r["step"], r["target_steps"]) for r in listing] == [("cli", 5, 5)]
    assert f"tensorboard --logdir {store}/runs" in cli("runs", "--store", store).stdout

    pulled = cli("pull", "cli", "--store", store, "--dest", tmp_path / "pulled")
    assert pulled.returncode == 0, pulled.stderr
    ckpt = tmp_path / "pulled" / "cli" / "step-000005"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.json"}

    scored = cli("eval", ckpt, "--data", facade_shards, "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["step"] == 5 and report["images"] > 0
    assert set(report["model"]) == {"l1_pct", "l2_pct", "psnr_db", "psnr_pooled_db",
                                    "psnr_window_db", "ssim"}
    table = cli("eval", ckpt, "--data", facade_shards).stdout
    rows = table_rows(table)
    for row, key in zip(rows, ("model", "mean_fill", "nearest_neighbour"), strict=True):
        assert row[1:] == [f"{report[key][k]:.2f}" for k in ("l1_pct", "l2_pct", "psnr_db")] + [
            f"{report[key]['ssim']:.3f}"]
    assert "not computed: FID needs" in table


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


def test_runs_lists_finished_stopped_and_new_runs(cli, facade_shards, tmp_path):
    from cectl.storage import open_store
    from cectl.train import train

    store = open_store(str(tmp_path))
    train(tiny_job(facade_shards, "train.steps=2"), store, "done")
    train(tiny_job(facade_shards, "train.steps=3", "train.checkpoint_every=2",
                   "train.eval_every=2"), store, "stopped")
    shutil.rmtree(tmp_path / "runs/stopped/checkpoints/step-000003")  # as if killed at step 3
    store.write_bytes("runs/new/config.yaml", b"{}")  # started, no checkpoint yet
    table = cli("runs", "--store", tmp_path)
    assert table.returncode == 0, table.stderr
    listing = {r["run"]: r for r in json.loads(cli("runs", "--store", tmp_path, "--json").stdout)}

    def cells(run: str, state: str) -> list[str]:
        metrics = listing[run]["metrics"]
        return [run, str(listing[run]["step"]), str(listing[run]["target_steps"]), state,
                f"{metrics['loss_rec']:.4f}", f"{metrics['val_psnr_db']:.2f}"]

    assert table_rows(table.stdout) == [cells("done", "finished"), ["new", "-", "-",
                                        "no checkpoint yet", "", ""],
                                        cells("stopped", "stopped or running")]
    assert (listing["done"]["step"], listing["stopped"]["step"], listing["new"]["step"]) == (
        2, 2, None)


def test_pull_copies_the_checkpoint_of_a_given_step(cli, facade_shards, tmp_path):
    from cectl.storage import open_store
    from cectl.train import train

    train(tiny_job(facade_shards, "train.steps=3", "train.checkpoint_every=1"),
          open_store(str(tmp_path / "store")), "p")
    pulled = cli("pull", "p", "--store", tmp_path / "store", "--dest", tmp_path / "here",
                 "--checkpoint", "2")
    assert pulled.returncode == 0, pulled.stderr
    source = tmp_path / "store/runs/p/checkpoints/step-000002"
    copy = tmp_path / "here/p/step-000002"
    assert json.loads((copy / "state.json").read_text())["step"] == 2
    for name in ("model.safetensors", "state.json"):
        assert (copy / name).read_bytes() == (source / name).read_bytes()
    missing = cli("pull", "p", "--store", tmp_path / "store", "--dest", tmp_path / "here",
                  "--checkpoint", "7")
    assert_refused(missing, 2, "'p'", "'7'", "1, 2, 3")
    assert [p.name for p in (tmp_path / "here/p").iterdir()] == ["step-000002"]


def test_train_and_pull_with_an_s3_store(cli, facade_shards, tmp_path, bucket):
    store = f"s3://{bucket}/runs-store"
    result = cli("train", *TINY, "train.steps=2", "--data", facade_shards, "--store", store,
                 "--name", "s3run")
    assert result.returncode == 0, result.stderr
    pulled = cli("pull", "s3run", "--store", store, "--dest", tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    copy = tmp_path / "s3run" / "step-000002"
    assert json.loads((copy / "state.json").read_text())["step"] == 2
    assert (copy / "model.safetensors").stat().st_size > 0


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
def test_inpaint_odd_images_changes_only_the_hole(mode, size, cli, tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    src = tmp_path / f"in.{'jpg' if mode == 'RGB' else 'png'}"
    image.save(src)
    hole = np.zeros((size[1], size[0]), dtype=bool)
    hole[size[1] * 3 // 8 : size[1] * 5 // 8, size[0] * 3 // 8 : size[0] * 9 // 16] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = cli("inpaint", src, "--ckpt", tiny_checkpoint, "--mask", tmp_path / "mask.png",
                 "-o", out)
    assert result.returncode == 0, result.stderr
    before, after = Image.open(src), Image.open(out)
    assert after.size == size
    assert after.mode == (mode if mode != "P" else "RGBA")  # the palette had transparency
    b = np.asarray(before.convert(after.mode))
    a = np.asarray(after)
    assert changed_outside(b, a, hole) == 0
    assert not np.array_equal(b[hole], a[hole])


def test_inpaint_with_free_form_strokes_and_with_the_mask_named_after_the_image(
        cli, random_mask_checkpoint, tmp_path):
    from cectl.inpaint import drawn_hole
    from cectl.restore import load_generator

    src = tmp_path / "street.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 150, 3), dtype=np.uint8)
                    ).save(src)
    before = np.asarray(Image.open(src))
    result = cli("inpaint", src, "--ckpt", random_mask_checkpoint, "--mask", "free-form",
                 "--seed", "3", "-o", tmp_path / "strokes.png")
    assert result.returncode == 0, result.stderr
    _, cfg, _ = load_generator(random_mask_checkpoint)
    hole = drawn_hole("free-form", (150, 90), cfg, 3, "street.jpg")
    area = hole[:, 30:120].mean()  # the strokes are drawn on the central square
    assert cfg.mask.min_area - 0.02 <= area <= cfg.mask.max_area + 0.02
    after = np.asarray(Image.open(tmp_path / "strokes.png"))
    assert changed_outside(before, after, hole) == 0 and not np.array_equal(before, after)

    masks = tmp_path / "masks"
    masks.mkdir()
    hole = np.zeros((90, 150), dtype=bool)
    hole[10:30, 100:140] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(masks / "street.png")
    Image.new("L", (150, 90), 255).save(masks / "other.png")
    result = cli("inpaint", src, "--ckpt", random_mask_checkpoint, "--mask", masks,
                 "-o", tmp_path / "named.png")
    assert result.returncode == 0, result.stderr
    assert f"{hole.sum():,} hole pixels" in result.stdout
    after = np.asarray(Image.open(tmp_path / "named.png"))
    assert changed_outside(before, after, hole) == 0 and not np.array_equal(before, after)
    (masks / "street.png").unlink()
    assert_refused(cli("inpaint", src, "--ckpt", random_mask_checkpoint, "--mask", masks), 2,
                   str(masks), "street.jpg", "street.png")
    assert_refused(cli("inpaint", src, "--ckpt", random_mask_checkpoint, "--mask", "files"), 2,
                   "mask.kind=random-region", "--mask")


def test_inpaint_center_mask_default_output_name(cli, tiny_checkpoint, tmp_path):
    src = tmp_path / "photo.png"
    Image.new("RGB", (200, 120), (90, 120, 150)).save(src)
    result = cli("inpaint", src, "--ckpt", tiny_checkpoint, "--mask", "center")
    assert result.returncode == 0, result.stderr
    out = Image.open(tmp_path / "photo-inpainted.png")
    assert out.size == (200, 120)
    assert np.asarray(out).reshape(-1, 3).tolist() != [[90, 120, 150]] * 200 * 120


@pytest.mark.parametrize("case", ["not-an-image", "missing-ckpt", "corrupt-ckpt", "mask-size",
                                  "other-arch", "mask-outside-window"])
def test_inpaint_bad_inputs_exit_2_with_one_sentence(case, cli, tiny_checkpoint, tmp_path):
    src = tmp_path / "img.png"
    Image.new("RGB", (64, 64), "gray").save(src)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    mask = "center"
    if case == "not-an-image":
        src.write_text("hello")
        names = [str(src)]
    elif case == "missing-ckpt":
        ckpt = tmp_path / "nowhere"
        names = [str(ckpt)]
    elif case == "corrupt-ckpt":
        (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
        names = [str(ckpt / "model.safetensors")]
    elif case == "mask-size":
        Image.new("L", (10, 10), 255).save(tmp_path / "m.png")
        mask = str(tmp_path / "m.png")
        names = [mask, "10x10", "64x64"]
    elif case == "other-arch":
        state = json.loads((ckpt / "state.json").read_text())
        state["config"]["model"]["width"] = 16  # tensors no longer fit the claimed network
        (ckpt / "state.json").write_text(json.dumps(state))
        names = [str(ckpt), "G.encoder.0.weight", "does not match its config"]
    elif case == "mask-outside-window":
        mask = "random-block"
        names = ["mask.kind=center", "--mask center"]
    result = cli("inpaint", src, "--ckpt", ckpt, "--mask", mask, "-o", tmp_path / "o.png")
    assert_refused(result, 2, *names)
    assert not (tmp_path / "o.png").exists()


def test_eval_needs_a_split_that_exists(cli, tiny_checkpoint, facade_shards):
    result = cli("eval", tiny_checkpoint, "--data", facade_shards, "--split", "test")
    assert_refused(result, 2, "'test'", facade_shards)


def test_eval_refuses_a_mask_outside_the_models_window(cli, tiny_checkpoint, facade_shards):
    result = cli("eval", tiny_checkpoint, "--data", facade_shards, "--mask", "random-block")
    assert_refused(result, 2, "mask.kind=center", "--mask center")


def test_training_without_data_is_bad_input(cli, tmp_path):
    assert_refused(cli("train", "--store", tmp_path), 2, "--data")


def test_bad_config_values_are_bad_input(cli, facade_shards, tmp_path):
    result = cli("train", "mask.kind=star", "--data", facade_shards, "--store", tmp_path)
    assert_refused(result, 2, "mask.kind")
    result = cli("train", "model.arch=alexnet227", "--data", facade_shards, "--store", tmp_path)
    assert_refused(result, 2, "model.arch=alexnet227", "data.image_size=227")
