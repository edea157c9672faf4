"""LPIPS and FID for `cectl eval`, from backbone weights the user supplies.

Both run through torchmetrics, and nothing is downloaded: the weights come from a file
given on the command line, else from torch hub's cache (`~/.cache/torch/hub/checkpoints/`,
where torchvision and the FID tools keep them), and none is unpickled as code.

- LPIPS (Zhang et al. 2018, the AlexNet variant): torchmetrics' network, whose linear
  layers ship inside torchmetrics. Its AlexNet is torchvision's, with the ImageNet weights of
  torchvision's own file, read as tensors alone (`weights_only=True`).
- FID (Heusel et al. 2017): torchmetrics' FrechetInceptionDistance over the 2048 pool
  features of the TorchScript Inception that StyleGAN2/3 and clean-fid use (the TensorFlow
  FID network, translated). TorchScript loads as a graph and tensors, not as pickled code.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cectl.errors import BadInput

LPIPS_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet
FID_FILE = "inception-2015-12-05.pt"  # the TorchScript FID Inception
LPIPS_MIN_WINDOW = 31  # narrower, AlexNet's second pooling has nothing left to pool
FID_BATCH = 64


def hub_checkpoints() -> Path:
    """torch hub's weight cache, where `torchvision.models` and the FID tools look."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass
class Perceptual:
    """The perceptual networks a user has weights for, and why each other one is missing."""

    lpips: nn.Module | None = None
    inception: nn.Module | None = None
    unavailable: dict[str, str] = field(default_factory=dict)


def load_perceptual(lpips_weights: Path | None, fid_weights: Path | None) -> Perceptual:
    """LPIPS and FID networks from the given files, else from torch hub's cache.

    A given file must work (else BadInput); a metric without one is named in `unavailable`
    with the sentence that says what it needs.
    """
    result = Perceptual()
    cache = hub_checkpoints()
    lpips_path = lpips_weights or cache / LPIPS_FILE
    if importlib.util.find_spec("torchvision") is None:
        reason = ("LPIPS needs torchvision, which builds its AlexNet: install the torchvision "
                  "build that matches your torch (the gpu extra does)")
        if lpips_weights:
            raise BadInput(f"--lpips-weights: {reason}")
        result.unavailable["lpips"] = reason
    elif lpips_path.is_file():
        result.lpips = lpips_network(lpips_path)
    elif lpips_weights:
        raise BadInput(f"--lpips-weights {lpips_weights} does not exist")
    else:
        result.unavailable["lpips"] = (f"LPIPS needs AlexNet's ImageNet weights, {LPIPS_FILE} "
                                       f"from torchvision: put it in {cache}/ or pass "
                                       "--lpips-weights FILE")
    fid_path = fid_weights or cache / FID_FILE
    if fid_path.is_file():
        result.inception = InceptionFeatures(fid_path)
    elif fid_weights:
        raise BadInput(f"--fid-weights {fid_weights} does not exist")
    else:
        result.unavailable["fid"] = (f"FID needs the TorchScript Inception {FID_FILE} (as "
                                     f"StyleGAN2/3 and clean-fid use it): put it in {cache}/ "
                                     "or pass --fid-weights FILE")
    return result


def lpips_network(path: Path) -> nn.Module:
    """torchmetrics' LPIPS (alex) with the AlexNet weights of `path` (torchvision's keys).

    Takes two batches in [-1, 1]; returns their distances, N x 1 x 1 x 1.
    """
    # The public LearnedPerceptualImagePatchSimilarity fetches AlexNet's weights through
    # torch hub, downloading them when they are missing; its network class, built without
    # them, takes them from a file read as tensors alone.
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    network = _NoTrainLpips(net="alex", pnet_rand=True)
    weights = _tensors(path)
    # torchmetrics keeps torchvision's layer numbers: its `sliceK.I.weight` is torchvision's
    # `features.I.weight`.
    wanted = {key: weights.get(f"features.{key.split('.', 1)[1]}")
              for key in network.net.state_dict()}
    if any(value is None for value in wanted.values()):
        raise BadInput(f"{path} does not hold torchvision's AlexNet weights "
                       "(features.0.weight ...)")
    try:
        network.net.load_state_dict(wanted)
    except RuntimeError as e:
        raise BadInput(f"{path} does not hold AlexNet's layer shapes: "
                       f"{str(e).splitlines()[-1].strip()}") from None
    return network.eval()


def _tensors(path: Path) -> dict:
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files that are not weights
        raise BadInput(f"{path} is not a file of tensors: {str(e).splitlines()[0]}") from None
    if not isinstance(weights, dict):
        raise BadInput(f"{path} does not hold a state dict")
    return weights


class InceptionFeatures(nn.Module):
    """The pool features of the TorchScript FID Inception, for uint8 NCHW images of any size
    (the network scales them to 299 x 299 itself, as the TensorFlow original did)."""

    def __init__(self, path: Path):
        super().__init__()
        try:
            with warnings.catch_warnings():
                # torch.jit.load is deprecated in favour of torch.export, but this network
                # is published as TorchScript only.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise BadInput(f"{path} is not a TorchScript file: "
                           f"{str(e).splitlines()[0]}") from None
        try:
            with torch.no_grad():
                probe = self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        except RuntimeError as e:
            raise BadInput(f"{path} is not the FID Inception, whose forward takes uint8 images "
                           f"and return_features: {str(e).splitlines()[0]}") from None
        self.num_features = probe.shape[-1]  # torchmetrics sizes its statistics by it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True)


class FrechetDistance:
    """FID of sets of images against one set of real images, whose statistics are computed
    once (torchmetrics keeps them across resets)."""

    def __init__(self, inception: nn.Module, real: torch.Tensor):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if len(real) < 2:
            raise BadInput("FID needs at least 2 images")
        self.metric = FrechetInceptionDistance(feature=inception, reset_real_features=False)
        for batch in real.split(FID_BATCH):
            self.metric.update(batch, real=True)

    def __call__(self, fake: torch.Tensor) -> float:
        self.metric.reset()
        for batch in fake.split(FID_BATCH):
            self.metric.update(batch, real=False)
        return self.metric.compute().item()
