"""Reading a checkpoint back: every tensor checked against what it will load into, then
loaded into networks and optimizers; checkpoints of the older format upgraded on the way.

Nothing is unpickled: tensors come from safetensors, the rest from state.json (checked by
`cectl.runs.read_state`). A tensor of the wrong shape or dtype, NaN weights or a negative
variance would be cast silently, crash fused Adam or train on garbage: all are refused
before anything is built on them.
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from cectl.errors import BadInput
from cectl.runs import read_state
from cectl.storage import Store, open_store

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
ADAM_STATE = ("exp_avg", "exp_avg_sq")  # per parameter, its shape; and a scalar `step`
NOT_NEGATIVE = (".exp_avg_sq", ".step", ".running_var", ".num_batches_tracked")

Modules = dict[str, nn.Module | None]
Optimizers = dict[str, torch.optim.Optimizer | None]


def load_checkpoint(uri: str | Store) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, local or on S3."""
    ckpt = open_store(uri) if isinstance(uri, str) else uri
    state = read_state(ckpt)
    try:
        tensors = load_tensors(ckpt.read_bytes("model.safetensors"))
    except FileNotFoundError:
        raise BadInput(f"{ckpt.uri} is missing model.safetensors") from None
    except SafetensorError:
        raise BadInput(f"{ckpt.url('model.safetensors')} is corrupt") from None
    return tensors, state




def load_generator(uri: str | Store) -> tuple[nn.Module, DictConfig, dict]:
    """The generator of a checkpoint (eval mode, CPU), its job config and its state."""
    from cectl.model import build_models

    ckpt = open_store(uri) if isinstance(uri, str) else uri
    tensors, state = load_checkpoint(ckpt)
    cfg = OmegaConf.merge(state["config"], {"loss": {"mode": "rec"}})
    with torch.device("meta"):  # the shapes the config asks for, nothing allocated
        shapes, _ = build_models(cfg)
    try:  # before a network of that size is built
        check_tensors(tensors, {"G": shapes}, {})
    except BadInput as e:
        raise BadInput(f"{ckpt.uri}: {e}") from None
    generator, _ = build_models(cfg)
    restore_tensors(tensors, {"G": generator}, {})
    return generator.eval(), state["config"], state


def expected_tensors(modules: Modules, optimizers: Optimizers) -> dict[str, tuple]:
    """(shape, dtype) of each tensor a checkpoint holds for `modules` and their Adams."""
    spec = {}
    for name, module in modules.items():
        if module is None:
            continue
        spec.update({f"{name}.{key}": (value.shape, value.dtype)
                     for key, value in module.state_dict().items()})
        if optimizers.get(name) is not None:
            for key, param in module.named_parameters():
                prefix = f"optim.{name}.state.{key}"
                spec[f"{prefix}.step"] = (torch.Size(), torch.float32)
                spec.update({f"{prefix}.{field}": (param.shape, param.dtype)
                             for field in ADAM_STATE})
    return spec


def _owner(key: str) -> str:
    """What a checkpoint tensor belongs to: `G`, `optim.G`, `rng`..."""
    parts = key.split(".")
    return ".".join(parts[: 2 if parts[0] == "optim" else 1])


def check_tensors(tensors: dict[str, torch.Tensor], modules: Modules, optimizers: Optimizers,
                  rng: bool = False) -> None:
    """BadInput unless the tensors for `modules`, their optimizers and (with `rng`) the RNG
    are exactly what they load: keys, shapes, dtypes, finite floats, no negative variance or
    step. A wrong one would be cast silently, crash fused Adam or train on garbage."""
    spec = expected_tensors(modules, optimizers)
    if rng:
        state = torch.get_rng_state()
        spec["rng.torch"] = (state.shape, state.dtype)
        for key, tensor in tensors.items():
            if re.fullmatch(r"rng\.cuda\.[0-9]+", key):  # a GPU run's, one per rank
                spec[key] = (torch.Size([tensor.numel()]), torch.uint8)
    owners = {_owner(key) for key in spec}
    for key in tensors:
        if _owner(key) in owners and key not in spec:
            raise BadInput(f"checkpoint tensor {key} is not part of the network, its optimizer "
                           "or the RNG: the checkpoint is damaged")
    for key, (shape, dtype) in spec.items():
        tensor = tensors.get(key)
        if tensor is None:
            problem = "is missing"
        elif tensor.dtype != dtype:
            problem = f"is {tensor.dtype}, the network needs {dtype}"
        elif tensor.shape != shape:
            problem = f"has shape {list(tensor.shape)}, the network needs {list(shape)}"
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problem = "holds NaN or infinite values"
        elif key.endswith(NOT_NEGATIVE) and (tensor < 0).any():
            problem = "holds negative values"
        else:
            continue
        raise BadInput(f"checkpoint tensor {key} {problem}: the checkpoint is damaged or does "
                       "not match its config")


def restore_tensors(tensors: dict[str, torch.Tensor], modules: Modules,
                    optimizers: Optimizers) -> None:
    """Load networks and optimizer states from tensors `check_tensors` has passed; the RNG
    is the caller's to restore, when due."""
    for name, module in modules.items():
        if module is None:
            continue
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)})
        if optimizers.get(name) is not None:
            opt = optimizers[name]
            # The current flat state supplies the param_groups (hyperparameters come from
            # the config); the checkpoint supplies every tensor.
            state = get_optimizer_state_dict(module, opt, options=FLAT)
            prefix = f"optim.{name}."
            state.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            set_optimizer_state_dict(module, opt, state, options=FLAT)


def upgrade_v1(tensors: dict[str, torch.Tensor], modules: Modules) -> dict[str, torch.Tensor]:
    """Rename a /1 checkpoint's `optim.NAME.INDEX.FIELD` keys to parameter names."""
    names = {name: [fqn for fqn, _ in module.named_parameters()]
             for name, module in modules.items() if module is not None}
    upgraded = {}
    for key, value in tensors.items():
        parts = key.split(".", 3)
        if (len(parts) == 4 and parts[0] == "optim" and parts[1] in names
                and re.fullmatch("[0-9]+", parts[2])):
            params = names[parts[1]]
            if int(parts[2]) >= len(params):
                raise BadInput(f"checkpoint tensor {key} is for parameter {parts[2]} of "
                               f"{parts[1]}, which has {len(params)}: the checkpoint is damaged")
            key = f"optim.{parts[1]}.state.{params[int(parts[2])]}.{parts[3]}"
        upgraded[key] = value
    return upgraded
