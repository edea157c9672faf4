"""The metrics added to Table 1's: SSIM always, LPIPS and FID from weights the user supplies
(here weights made in the test), and the one sentence when they are missing."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_refused
from rich.console import Console
from torch import nn

from cectl.cli import run
from cectl.errors import BadInput
from cectl.evaluate import evaluate_checkpoint, hole_metrics, ssim
from cectl.masks import Window
from cectl.perceptual import (
    FID_FILE,
    LPIPS_FILE,
    FrechetDistance,
    InceptionFeatures,
    Perceptual,
    load_perceptual,
)
from cectl.render import score_report
from cectl.storage import open_store

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# The FID Inception is published as TorchScript, so the tests make their networks with
# torch.jit.script, deprecated in torch 2.13 but still the way to write one.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


class TinyInception(nn.Module):
    """The FID Inception's interface (uint8 NCHW in, `return_features` for the pool
    features) on a tiny random network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.conv(img.to(torch.float32) / 128 - 1).relu().mean((2, 3))
        return features if return_features else features.sum(1, keepdim=True)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / FID_FILE
    torch.jit.script(TinyInception()).save(str(path))
    return path


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """torch hub's cache in an empty folder: the tests see only the weights they make."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_ssim_is_one_for_a_perfect_fill_and_looks_only_at_the_window():
    torch.manual_seed(0)
    truth = torch.rand(2, 3, 32, 32) * 2 - 1
    holes = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    holes[..., 12:20, 12:20] = True
    window = Window(8, 16)
    outside = truth.clone()
    outside[..., :4, :] = -1.0  # changed outside the window only
    assert torch.allclose(hole_metrics(outside, truth, holes, window)["ssim"], torch.ones(2))
    wrong = truth.clone()
    wrong[1, :, 12:20, 12:20] = torch.rand(3, 8, 8) * 2 - 1  # another texture in the hole
    scores = hole_metrics(wrong, truth, holes, window)["ssim"]
    assert scores[0] == pytest.approx(1.0) and scores[1] < 0.8


def test_ssim_keeps_working_on_windows_narrower_than_its_gaussian():
    truth = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.allclose(ssim(truth, truth), torch.ones(3))


def test_eval_without_weights_names_the_files_and_where_they_go(tiny_checkpoint,
                                                                 facade_shards, capsys):
    assert run(["eval", tiny_checkpoint, "--data", facade_shards, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for row in ("model", "mean_fill", "nearest_neighbour"):
        assert -1 <= report[row]["ssim"] <= 1
        assert "lpips" not in report[row] and "fid" not in report[row]
    assert set(report["unavailable"]) == {"lpips", "fid"}
    assert FID_FILE in report["unavailable"]["fid"]
    assert str(torch.hub.get_dir()) in report["unavailable"]["fid"]
    assert (LPIPS_FILE if HAS_TORCHVISION else "torchvision") in report["unavailable"]["lpips"]


def test_fid_runs_through_torchmetrics_on_the_given_inception(tiny_checkpoint, facade_shards,
                                                              inception_file):
    perceptual = load_perceptual(None, inception_file)
    result = evaluate_checkpoint(open_store(tiny_checkpoint), facade_shards,
                                 perceptual=perceptual)
    fids = {row: result[row]["fid"] for row in ("model", "mean_fill", "nearest_neighbour")}
    assert all(value > 0 for value in fids.values())
    assert set(result["unavailable"]) == {"lpips"}
    table = io.StringIO()
    score_report(Console(file=table, width=200), result, "scores")
    assert " FID " in table.getvalue() and "not computed: LPIPS needs" in table.getvalue()
    # Against itself a set is at distance 0; a flat grey set is far away.
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    distance = FrechetDistance(InceptionFeatures(inception_file), images)
    assert distance(images) == pytest.approx(0.0, abs=1e-3)
    assert distance(torch.full_like(images, 128)) > 0.01


def test_fid_weights_come_from_the_torch_hub_cache_without_a_flag(inception_file):
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(inception_file, cached)
    perceptual = load_perceptual(None, None)
    assert perceptual.inception is not None and "fid" not in perceptual.unavailable


@pytest.mark.parametrize("case", ["missing", "not-torchscript", "other-forward",
                                  "lpips-missing"])
def test_bad_weights_exit_2_with_one_sentence(case, tiny_checkpoint, facade_shards, tmp_path,
                                              capsys):
    option, path = "--fid-weights", tmp_path / "weights.pt"
    if case == "not-torchscript":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    elif case == "other-forward":
        torch.jit.script(nn.Conv2d(3, 4, 3)).save(str(path))
    elif case == "lpips-missing":
        option = "--lpips-weights"
    code = run(["eval", tiny_checkpoint, "--data", facade_shards, option, str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    expected = {"missing": "does not exist", "not-torchscript": "not a TorchScript file",
                "other-forward": "return_features",
                "lpips-missing": "does not exist" if HAS_TORCHVISION else "needs torchvision"}
    assert expected[case] in lines[0]


def test_lpips_refuses_a_window_too_small_for_alexnet(tiny_checkpoint, facade_shards):
    with pytest.raises(BadInput) as caught:
        evaluate_checkpoint(open_store(tiny_checkpoint), facade_shards,
                            perceptual=Perceptual(lpips=nn.Identity()))
    assert_refused(caught.value, 2, "LPIPS", "31 px")


@pytest.mark.skipif(not HAS_TORCHVISION, reason="LPIPS builds its AlexNet with torchvision")
def test_lpips_runs_through_torchmetrics_on_the_given_alexnet(facade_shards, tmp_path):
    import torchvision
    from helpers import tiny_job

    from cectl.train import train

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet().state_dict()
    torch.save(alexnet, tmp_path / LPIPS_FILE)
    perceptual = load_perceptual(tmp_path / LPIPS_FILE, None)
    conv5 = perceptual.lpips.net.state_dict()["slice5.10.weight"]
    assert torch.equal(conv5, alexnet["features.10.weight"])  # the file's weights, not random
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert perceptual.lpips(images, images).abs().max() < 1e-6
    assert (perceptual.lpips(images, images.flip(-1)).flatten() > 0).all()

    cfg = tiny_job(facade_shards, "data.image_size=64", "data.load_size=64", "train.steps=1")
    train(cfg, open_store(str(tmp_path / "store")), "lp")
    ckpt = open_store(str(tmp_path / "store" / "runs" / "lp" / "checkpoints" / "step-000001"))
    result = evaluate_checkpoint(ckpt, facade_shards, perceptual=perceptual)
    assert all(result[row]["lpips"] > 0 for row in ("model", "mean_fill", "nearest_neighbour"))
