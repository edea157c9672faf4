"""`cectl export`: a checkpoint's encoder alone, BatchNorm folded, as safetensors.

The file holds the plain feature stack's weights (`convK.weight`, `convK.bias`, ...,
`fc.*`) for the chosen layers, and metadata saying how to feed it (input size,
normalisation) and where it came from (checkpoint, step).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save as save_tensors
from torch import nn

from cectl.encoder import check_layers, layer_outputs, load_encoder
from cectl.errors import BadInput

FORMAT = "cectl-encoder/1"
NORMALISATION = "RGB, x / 127.5 - 1 (range [-1, 1]), center crop of the shorter side"


def parse_layer_range(stack: nn.Sequential, arch: str, spec: str | None) -> list[str]:
    """The layers of `FIRST..LAST` (or one layer, or all for None), in order."""
    known = list(layer_outputs(stack))
    if spec is None:
        return known
    first, _, last = spec.partition("..")
    last = last or first
    check_layers(stack, arch, first, last)
    if known.index(first) > known.index(last):
        raise BadInput(f"--layers {spec}: {first} comes after {last}")
    return known[known.index(first) : known.index(last) + 1]


def export_encoder(ckpt_uri: str, out: Path, layers: str | None = None) -> dict:
    """Write the encoder's folded weights as safetensors with plain key names; returns metadata."""
    stack, cfg, origin = load_encoder(ckpt_uri)
    chosen = parse_layer_range(stack, cfg.model.arch, layers)
    # A layer's weights are those of the module it is named after (convK, poolK, fc).
    tensors = {key: value.contiguous() for key, value in stack.state_dict().items()
               if key.split(".")[0] in chosen}
    meta = {"format": FORMAT, "arch": cfg.model.arch, "pool_free": str(cfg.model.pool_free),
            "input_size": str(cfg.data.image_size), "normalisation": NORMALISATION,
            "batchnorm": "folded into the preceding layer (running statistics)",
            "layers": ",".join(chosen), "stack": str(stack), **origin,
            "step": str(origin["step"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(save_tensors(tensors, metadata=meta))
    return {**meta, "out": str(out), "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values())}
