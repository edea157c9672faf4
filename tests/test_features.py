"""Feature learning: export (BN folded), the linear probe, nearest neighbours, their errors."""

from __future__ import annotations

import json
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused, cectl, shard_images, train_checkpoint
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn import Conv2d, Flatten, LeakyReLU, Linear, MaxPool2d, ReLU, Sequential

from cectl.restore import load_generator
from cectl.storage import open_store

COLOURS = {"n01440764": (200, 40, 40), "n02102040": (40, 170, 60), "n03000684": (50, 60, 210)}


def write_colour_classes(root: Path, train: int, val: int, size: int = 64) -> None:
    """A trivially separable set in the ImageNet layout: one colour (plus noise) per wnid."""
    rng = random.Random(0)
    for split, count in (("train", train), ("val", val)):
        for wnid, colour in COLOURS.items():
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                tint = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in colour)
                noise = Image.effect_noise((size, size), 40).convert("RGB")
                img = Image.blend(Image.new("RGB", (size, size), tint), noise, 0.25)
                img.save(root / split / wnid / f"{wnid}_{i}.png")


def run_json(cli, *args) -> dict:
    """A command's --json report; the command must succeed."""
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("labelled")
    write_colour_classes(root / "images", train=8, val=4)
    shard_images(root / "images", root / "shards", shard_size=10)
    return str(root / "shards")


@pytest.fixture(scope="module")
def alexnet_checkpoint(facade_shards, tmp_path_factory) -> str:
    """A step of alexnet227, so BatchNorm's running statistics are no longer the identity."""
    return train_checkpoint(facade_shards, tmp_path_factory.mktemp("alexnet"), "alex",
                            "model.arch=alexnet227", "data.image_size=227", "data.load_size=227",
                            "loss.mode=rec", "data.batch_size=2", "train.steps=1")


def test_probe_reads_wnid_labels_and_separates_colour_classes(cli, labelled_shards,
                                                               tiny_checkpoint, tmp_path):
    from cectl.encoder import load_encoder, random_encoder
    from cectl.probe import cache_folder
    from cectl.shard_format import open_manifest

    cache = tmp_path / "cache"
    report = run_json(cli, "probe", tiny_checkpoint, "--data", labelled_shards, "--layer",
                      "conv3", "--cache-dir", cache)
    assert (report["classes"], report["train_images"], report["val_images"]) == (3, 24, 12)
    assert report["dims"] == 16 * 4 * 4
    assert report["model"]["top1_pct"] == pytest.approx(100)  # colours: trivially separable
    assert 0 <= report["random"]["top1_pct"] <= report["random"]["top5_pct"] == 100  # 3 classes
    assert report["extraction"]["images"] == 36 and report["extraction"]["images_per_s"] > 0
    # The two rows come from two encoders: the checkpoint's and a fresh one, cached apart.
    model, cfg, _ = load_encoder(tiny_checkpoint)
    features = [np.load(cache_folder(cache, stack, open_manifest(labelled_shards), "val", 32)
                        / "conv3.npy") for stack in (model, random_encoder(cfg))]
    assert features[0].shape == features[1].shape == (12, 256)
    assert not np.array_equal(*features)

    again = run_json(cli, "probe", tiny_checkpoint, "--data", labelled_shards, "--cache-dir",
                     cache)
    assert again["layer"] == "fc"  # the encoder's last layer, by default
    assert again["extraction"]["images"] == 0  # every layer came from the first pass's cache


@pytest.mark.slow
def test_probe_on_ray_workers_gives_the_local_numbers(labelled_shards, tiny_checkpoint,
                                                      tmp_path):
    def probe(*extra: str) -> dict:  # a process of its own: Ray stays out of this one
        return json.loads(cectl("probe", tiny_checkpoint, "--data", labelled_shards, "--layer",
                                "conv2", "--json", *extra, check=True).stdout)

    local = probe("--cache-dir", tmp_path / "local")
    on_ray = probe("--cache-dir", tmp_path / "ray", "--nodes", "2", "--cpu")
    assert on_ray["extraction"]["images"] == 36
    assert (on_ray["model"], on_ray["random"]) == (local["model"], local["random"])


def plain_alexnet() -> Sequential:
    """The README's plain AlexNet feature stack, verbatim."""
    C, P, R = Conv2d, MaxPool2d, ReLU  # noqa: N806
    return Sequential(OrderedDict(
        conv1=C(3, 96, 11, 4), relu1=R(), pool1=P(3, 2), conv2=C(96, 256, 5, 1, 2), relu2=R(),
        pool2=P(3, 2), conv3=C(256, 384, 3, 1, 1), relu3=R(), conv4=C(384, 384, 3, 1, 1),
        relu4=R(), conv5=C(384, 256, 3, 1, 1), relu5=R(), pool5=P(3, 2)))


def test_export_folds_batchnorm_so_a_plain_alexnet_gives_the_same_features(cli,
                                                                           alexnet_checkpoint,
                                                                           tmp_path):
    out = tmp_path / "encoder.safetensors"
    assert cli("export", alexnet_checkpoint, "-o", out).returncode == 0
    plain = plain_alexnet()
    plain.load_state_dict(load_file(out))  # strict: exactly these keys and shapes
    generator, _, _ = load_generator(alexnet_checkpoint)
    x = torch.rand(2, 3, 227, 227) * 2 - 1
    with torch.no_grad():
        expected = generator.encoder(x)
        assert expected.shape == (2, 256, 6, 6)
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-4, rtol=1e-4)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "alexnet227" and meta["input_size"] == "227"
    assert meta["step"] == "1" and meta["layers"].split(",")[-1] == "pool5"


def test_folding_keeps_pool_free_alexnet_features_under_strong_batchnorm_statistics():
    from cectl.encoder import feature_stack, layer_outputs
    from cectl.model import AlexNetGenerator

    torch.manual_seed(0)
    generator = AlexNetGenerator(227, pool_free=True).eval()
    for module in generator.encoder:
        if isinstance(module, torch.nn.BatchNorm2d):
            for buffer in (module.running_mean, module.weight.data, module.bias.data):
                buffer.uniform_(-1, 1)
            module.running_var.uniform_(0.2, 3)
    stack = feature_stack(generator.encoder)
    assert list(layer_outputs(stack)) == ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4",
                                          "conv5", "pool5"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stack.modules())
    assert "pool1.weight" in stack.state_dict()  # strided convs carry weights
    x = torch.rand(2, 3, 227, 227) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(stack(x), generator.encoder(x), atol=1e-4, rtol=1e-4)


def test_export_of_dcgan_encoder_loads_into_its_plain_stack(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "dcgan.safetensors"
    assert cli("export", tiny_checkpoint, "-o", out).returncode == 0
    # TINY: width 8 on 32 px, three 4x4 stride-2 convs to 4x4x16, then the 32-unit bottleneck.
    plain = Sequential(OrderedDict(
        conv1=Conv2d(3, 8, 4, 2, 1), relu1=LeakyReLU(0.2), conv2=Conv2d(8, 8, 4, 2, 1),
        relu2=LeakyReLU(0.2), conv3=Conv2d(8, 16, 4, 2, 1), relu3=LeakyReLU(0.2),
        flatten=Flatten(), fc=Linear(256, 32), relufc=LeakyReLU(0.2))).eval()
    plain.load_state_dict(load_file(out))
    generator, _, _ = load_generator(tiny_checkpoint)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(plain(x), generator.encoder(x), atol=1e-5, rtol=1e-4)

    part = tmp_path / "part.safetensors"
    assert cli("export", tiny_checkpoint, "-o", part, "--layers", "conv1..conv2").returncode == 0
    assert sorted(load_file(part)) == ["conv1.bias", "conv1.weight", "conv2.bias",
                                       "conv2.weight"]


def test_export_reads_a_checkpoint_on_s3(cli, bucket, tiny_checkpoint, tmp_path):
    remote = open_store(f"s3://{bucket}/runs/tiny/checkpoints/step-000004")
    for path in Path(tiny_checkpoint).iterdir():
        remote.put_file(path, path.name)
    out = tmp_path / "encoder.safetensors"
    assert cli("export", remote.uri, "-o", out).returncode == 0
    with safe_open(out, "pt") as f:
        assert f.metadata()["checkpoint"] == remote.uri
    assert cli("export", tiny_checkpoint, "-o", tmp_path / "local.safetensors").returncode == 0
    local, remote_copy = load_file(tmp_path / "local.safetensors"), load_file(out)
    assert local.keys() == remote_copy.keys()
    assert all(torch.equal(value, local[key]) for key, value in remote_copy.items())


def test_neighbors_finds_the_query_itself_first(cli, tmp_path, tiny_checkpoint):
    from cectl.demo import make_facades

    images = make_facades(tmp_path / "images", 12, size=72)
    shard_images(tmp_path / "images", tmp_path / "shards", resize=0)
    grid = tmp_path / "grid.png"
    queries = run_json(cli, "neighbors", tiny_checkpoint, "--data", tmp_path / "shards",
                       "--query", images[5], "--query", images[9], "-k", "3", "-o",
                       grid)["queries"]
    for query, path in zip(queries, (images[5], images[9]), strict=True):
        first = query["neighbors"][0]
        assert first["key"] == path.stem and first["distance"] == pytest.approx(0, abs=1e-3)
        assert len(query["neighbors"]) == 3
    assert Image.open(grid).size == (4 * 36, 2 * 36)  # 32 px tiles with a 4 px gap


def test_shard_label_from_folder_labels_by_top_level_folder(cli, tmp_path):
    from cectl.shard_format import read_samples

    for kind in ("cats", "dogs"):
        (tmp_path / "src" / kind / "more").mkdir(parents=True)
        Image.new("RGB", (64, 64), "red").save(tmp_path / "src" / kind / "a.png")
        Image.new("RGB", (64, 64), "blue").save(tmp_path / "src" / kind / "more" / "b.png")
    result = cli("shard", tmp_path / "src", tmp_path / "shards", "--label-from", "folder",
                 "--workers", "1")
    assert result.returncode == 0, result.stderr
    samples = read_samples(open_store(str(tmp_path / "shards")), "train/shard-000000.tar")
    labels = {s["__key__"]: json.loads(s["json"])["label"] for s in samples}
    assert labels == {"cats/a": "cats", "cats/more/b": "cats", "dogs/a": "dogs",
                      "dogs/more/b": "dogs"}


@pytest.mark.parametrize("case", ["unknown-layer", "no-labels", "export-past-the-encoder",
                                  "foreign-arch", "not-a-checkpoint", "label-from-imagenet"])
def test_feature_commands_refuse_bad_input_with_exit_2(case, cli, tmp_path, tiny_checkpoint,
                                                       facade_shards, labelled_shards):
    if case == "unknown-layer":
        args = ["probe", tiny_checkpoint, "--data", labelled_shards, "--layer", "conv9",
                "--cache-dir", tmp_path]
        names = ["'conv9'", "dcgan128"]
    elif case == "no-labels":
        args = ["probe", tiny_checkpoint, "--data", facade_shards, "--cache-dir", tmp_path]
        names = ["train/shard-000000.tar", "--label-from folder"]
    elif case == "export-past-the-encoder":
        args = ["export", tiny_checkpoint, "-o", tmp_path / "e.safetensors", "--layers",
                "conv1..pool5"]
        names = ["'pool5'"]
    elif case == "foreign-arch":
        foreign = tmp_path / "foreign"
        shutil.copytree(tiny_checkpoint, foreign)
        state = json.loads((foreign / "state.json").read_text())
        state["config"]["model"]["arch"] = "vgg16"
        (foreign / "state.json").write_text(json.dumps(state))
        args = ["export", foreign, "-o", tmp_path / "v.safetensors"]
        names = ["model.arch", str(foreign / "state.json")]
    elif case == "not-a-checkpoint":
        args = ["neighbors", tmp_path, "--data", labelled_shards, "--query", __file__]
        names = [str(tmp_path), "state.json"]
    else:
        args = ["shard", Path(labelled_shards).parent / "images", tmp_path / "s",
                "--label-from", "folder", "--layout", "imagenet"]
        names = ["--label-from folder", "imagenet"]
    assert_refused(cli(*args), 2, *names)
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("damage", ["3-rows", "truncated", "nan", "labels-cut", "not-json"])
def test_a_damaged_feature_cache_is_extracted_again(damage, labelled_shards, tiny_checkpoint,
                                                    tmp_path):
    import numpy as np
    from rich.console import Console

    from cectl.probe import run_probe

    def probe() -> dict:
        return run_probe(tiny_checkpoint, labelled_shards, "conv3", 3, tmp_path,
                         Console(quiet=True))

    first = probe()
    for folder in tmp_path.glob("*-train-*"):
        path = folder / "conv3.npy"
        rows = np.load(path)
        if damage == "3-rows":  # 3 rows for 24 labels
            np.save(path, rows[:3])
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:-100])
        elif damage == "nan":
            rows[5] = np.nan
            np.save(path, rows)
        elif damage == "labels-cut":
            meta = json.loads((folder / "labels.json").read_text())
            (folder / "labels.json").write_text(json.dumps({**meta, "labels": ["x"] * 3}))
        else:
            (folder / "labels.json").write_text("[[[")
    again = probe()
    assert again["extraction"]["images"] == first["train_images"]  # train again, not val
    for key in ("model", "random", "classes", "train_images", "dims"):
        assert again[key] == first[key], key
