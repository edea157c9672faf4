"""Checkpoints and runs on storage.

STORE/runs/RUN/config.yaml, metrics.jsonl, samples/step-NNNNNN.png and
checkpoints/step-NNNNNN/{model.safetensors,state.json}; claim.json while a process trains
the run (created atomically, so a second training of it is refused). Tensors (both
networks, both optimizers keyed by parameter name, the RNG) go in safetensors; everything
else (step, the loader's data position, config, metrics, best step) in JSON. state.json
is written last, so a checkpoint without it is incomplete and ignored. Nothing is ever
unpickled, and state.json is checked as data (its config like any loaded config).
Saving is off the training loop's critical path: the loop copies only buffers and the
RNG; a background thread copies the weights and optimizer states, then serialises and
uploads them while training goes on (see `Checkpointer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from cectl.config import JobConfig, load_config
from cectl.errors import BadInput
from cectl.storage import Store, check_name, open_store

FORMAT = "cectl-checkpoint/2"
FORMATS = ("cectl-checkpoint/1", FORMAT)  # /1 keyed optimizer states by parameter index
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
STEP_DIR = re.compile(r"checkpoints/step-(\d+)/state\.json$")
KEEP_LAST = 3  # older checkpoints are deleted, except the best one
CLAIM = "claim.json"  # who is training the run now
HEARTBEAT_S = 10.0  # the holder rewrites its claim this often
STALE_S = 60.0  # a claim not rewritten for this long is a dead process's


def step_dir(step: int) -> str:
    return f"checkpoints/step-{step:06d}"


Modules = dict[str, nn.Module | None]
Optimizers = dict[str, torch.optim.Optimizer | None]


def _buffer_copies(modules: Modules) -> dict[str, torch.Tensor]:
    """CPU copies of what changes outside an optimizer step: buffers (BatchNorm's running
    statistics move in every forward) and the RNG."""
    tensors = {f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
               for name, module in modules.items() if module is not None
               for key, value in module.state_dict(keep_vars=True).items()
               if not isinstance(value, nn.Parameter)}
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def _live_weights(modules: Modules, optimizers: Optimizers) -> dict[str, torch.Tensor]:
    """What only an optimizer step changes, the tensors themselves (no copies):
    parameters and optimizer states, keyed by parameter name."""
    tensors = {}
    for name, module in modules.items():
        if module is None:
            continue
        for key, value in module.named_parameters():
            tensors[f"{name}.{key}"] = value.detach()
        if optimizers.get(name) is not None:
            state = get_optimizer_state_dict(module, optimizers[name], options=FLAT)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):  # param_groups come from the config
                    tensors[f"optim.{name}.{key}"] = value.detach()
    return tensors


def load_generator(uri: str | Store) -> tuple[nn.Module, DictConfig, dict]:
    """The generator of a checkpoint (eval mode, CPU), its job config and its state."""
    from cectl.model import build_models

    tensors, state = load_checkpoint(uri)
    cfg = state["config"]
    generator, _ = build_models(OmegaConf.merge(cfg, {"loss": {"mode": "rec"}}))
    try:
        restore_tensors(tensors, {"G": generator}, {})
    except RuntimeError:
        raise BadInput(f"{state.get('checkpoint', 'the checkpoint')} does not match the "
                       f"{cfg.model.arch} network it claims to hold") from None
    return generator.eval(), cfg, state


def restore_tensors(tensors: dict[str, torch.Tensor], modules: Modules,
                    optimizers: Optimizers) -> None:
    """Load networks and optimizer states; the RNG is the caller's to restore, when due."""
    for name, module in modules.items():
        if module is None:
            continue
        prefix = f"{name}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for key, want in module.state_dict().items():
            # load_state_dict would silently cast, e.g. int8 weights into garbage floats
            if key in mine and mine[key].dtype != want.dtype:
                raise BadInput(f"checkpoint tensor {prefix}{key} is {mine[key].dtype}, "
                               f"the network needs {want.dtype}: the checkpoint is damaged")
        module.load_state_dict(mine)
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
        if parts[0] == "optim" and parts[1] in names and parts[2].isdigit():
            key = f"optim.{parts[1]}.state.{names[parts[1]][int(parts[2])]}.{parts[3]}"
        upgraded[key] = value
    return upgraded


class DataPosition(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Everything a checkpoint holds: when it is saved, how it is restored, the best step.

    Rank 0 writes (DDP keeps the replicas identical), in the background: one save at a
    time, the next waits for the previous; `wait()` before reading what was saved (it
    raises what went wrong in the background, up to `checkpoint_every` steps later).
    Every rank restores. Saving costs the training thread a copy of the buffers alone: a
    background thread copies parameters and optimizer states (on a GPU, on a stream of its
    own) while the next step runs its forward and backward passes, and that step's
    optimizer updates wait for the copy.
    """

    def __init__(self, run: Run, cfg: DictConfig, modules: Modules, optimizers: Optimizers,
                 loader: DataPosition, rank: int = 0, world: int = 1):
        self.run, self.cfg, self.rank, self.world = run, cfg, rank, world
        self.modules, self.optimizers, self.loader = modules, optimizers, loader
        self.every, self.final = cfg.train.checkpoint_every, cfg.train.steps
        self.best_step: int | None = None
        self.best_val = float("inf")
        self.restored_world: int | None = None  # the world the restored checkpoint ran on
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._no_copy_pending = threading.Event()
        self._no_copy_pending.set()
        self._staging: dict[str, torch.Tensor] = {}
        self._hooks = [optimizer.register_step_pre_hook(self._before_update)
                       for optimizer in optimizers.values() if optimizer is not None]

    def should_save(self, step: int) -> bool:
        return step % self.every == 0 or step == self.final

    def track(self, step: int, val_l2_pct: float) -> None:
        """Remember the step with the lowest validation error (`best`, never pruned)."""
        if val_l2_pct < self.best_val:
            self.best_step, self.best_val = step, val_l2_pct

    def save(self, step: int, metrics: dict[str, float]) -> None:
        """Snapshot this step and write it to storage, both in the background."""
        if self.rank != 0:
            return
        self.wait()
        state = {"step": step, "world": self.world, "data_position": self.loader.state_dict(),
                 "config": OmegaConf.to_container(self.cfg), "metrics": dict(metrics),
                 "best_step": self.best_step, "best_val": self.best_val}
        buffers = _buffer_copies(self.modules)
        live = _live_weights(self.modules, self.optimizers)
        device = next(iter(live.values())).device
        ready = None
        if device.type == "cuda":  # this step's updates, queued on the training stream
            ready = torch.cuda.Event()
            ready.record()
        self._no_copy_pending.clear()
        self._writer = threading.Thread(target=self._write,
                                        args=(step, state, buffers, live, ready),
                                        name=f"checkpoint-{step}")
        self._writer.start()

    def _before_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._no_copy_pending.wait()  # the copy in progress holds the weights before this

    def _write(self, step: int, state: dict, buffers: dict[str, torch.Tensor],
               live: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        try:
            try:
                tensors = {**buffers, **self._stage(live, ready)}
            finally:
                self._no_copy_pending.set()
            self.run.save(step, tensors, state)
        except BaseException as e:  # raised on the training thread by wait()
            self._error = e

    def _stage(self, live: dict[str, torch.Tensor],
               ready: torch.cuda.Event | None) -> dict[str, torch.Tensor]:
        """Copy `live` into CPU buffers kept from one save to the next (pinned on a GPU):
        fresh ones would cost page faults every save (for dcgan128's 880 MB, 0.15 - 0.9 s
        against 0.05 s). Safe to reuse: a save starts after the previous one is written."""
        if {k: (v.shape, v.dtype) for k, v in self._staging.items()} != {
                k: (v.shape, v.dtype) for k, v in live.items()}:
            self._staging = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
                             for k, v in live.items()}
        if ready is None:
            for key, value in live.items():
                self._staging[key].copy_(value)
        else:  # a side stream, so that the copy runs beside the next step's kernels
            stream = torch.cuda.Stream(next(iter(live.values())).device)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                for key, value in live.items():
                    self._staging[key].copy_(value, non_blocking=True)
            stream.synchronize()
        return dict(self._staging)

    def wait(self) -> None:
        """Block until the last save is on storage; raise its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the last save; unhook the optimizers and free the CPU buffers."""
        self.wait()
        for hook in self._hooks:
            hook.remove()
        self._staging = {}

    def restore(self) -> int:
        """Load the latest checkpoint into networks, optimizers, loader and RNG; its step."""
        self.wait()  # no copy of these networks may still be running
        tensors, state = load_checkpoint(self.run.checkpoint("latest"))
        if state["format"] == FORMATS[0]:
            tensors = upgrade_v1(tensors, self.modules)
        restore_tensors(tensors, self.modules, self.optimizers)
        # With the world it was saved with: a per-rank data position (written before the
        # data position became global) holds only for that world.
        self.loader.load_state_dict({"world": state.get("world", 1), **state["data_position"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.best_step, self.best_val = state.get("best_step"), state.get("best_val", self.best_val)
        self.restored_world = state.get("world", 1)
        return state["step"]

    def resume_metrics(self) -> dict[str, int]:
        """What a resume logs: `resumed`, and `resized_from`/`world` when the world changed."""
        if self.restored_world in (None, self.world):
            return {"resumed": 1}
        return {"resumed": 1, "resized_from": self.restored_world, "world": self.world}


class Run:
    """One training run's folder in a store."""

    def __init__(self, store: Store, name: str):
        self.name = check_name(name, "run name")
        self.store = store.child(f"runs/{name}")

    def exists(self) -> bool:
        """Whether the run holds anything but a claim."""
        return any(key != CLAIM for key in self.store.list())

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(m.group(1)) for key in self.store.list("checkpoints/")
                      if (m := STEP_DIR.match(key)))

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> str:
        folder = step_dir(step)
        # Through a file: safetensors writes one without holding the GIL (building the
        # bytes in memory holds it for a second), so a background save does not stall the
        # training thread, and S3 gets a multipart upload.
        self.store.write_file(f"{folder}/model.safetensors",
                              lambda path: save_file(tensors, path))
        self.store.write_bytes(f"{folder}/state.json",
                               json.dumps({"format": FORMAT, **state}, indent=2).encode())
        self._prune(keep=state.get("best_step"))
        return self.store.url(folder)

    def _prune(self, keep: int | None) -> None:
        for step in self.steps()[:-KEEP_LAST]:
            if step != keep:
                for key in self.store.list(f"{step_dir(step)}/"):
                    self.store.delete(key)

    def summary(self) -> dict:
        """The run at its latest checkpoint: step reached, workers, resumes and resizes
        (resumes on another number of workers), last metrics."""
        state = read_state(self.checkpoint("latest"))
        lines = (self.store.read_bytes("metrics.jsonl").decode().splitlines()
                 if self.store.exists("metrics.jsonl") else [])
        return {"run": self.name, "step": state["step"],
                "target_steps": state["config"]["train"]["steps"],
                "workers": state.get("world", 1),
                "resumes": sum('"resumed"' in line for line in lines),
                "resizes": sum('"resized_from"' in line for line in lines),
                "metrics": state.get("metrics", {}), "checkpoints": self.store.url("checkpoints")}

    def claim(self, resume: bool) -> Claim:
        """Hold the run for this process, or raise BadInput: two trainings of one run would
        interleave their checkpoints. With `resume`, a dead holder's claim (its process is
        gone from this host, or its heartbeat stopped) is taken over."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        for _ in range(2):
            if self.store.create(CLAIM, _claim_bytes(record)):
                return Claim(self, record)
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if holder.get("token") == record["token"]:
                return Claim(self, record)  # our create got through; its reply did not
            # Without `resume`, only a dead holder's claim on an empty run (it died before
            # writing anything) is taken over: there is nothing to continue.
            if _alive(holder) or (not resume and self.exists()):
                raise BadInput(
                    f"run {self.name!r} in {self.store.uri} is being trained by process "
                    f"{holder.get('pid')} on {holder.get('host')}: pick another --name, or "
                    f"once that process is gone, add --resume (after {STALE_S:.0f} s if it "
                    "ran on another machine)")
            self.store.delete(CLAIM)
        raise BadInput(f"run {self.name!r} was claimed by another process just now: "
                       "only one training of a run may run at a time")

    def _holder(self) -> dict | None:
        """The current claim (empty if unreadable: cut short by a crash), or None."""
        if not self.store.exists(CLAIM):
            return None
        try:
            holder = json.loads(self.store.read_bytes(CLAIM))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def checkpoint(self, which: str = "latest") -> Store:
        """The store of a checkpoint: latest, best or a step number."""
        steps = self.steps()
        if not steps:
            raise BadInput(f"run {self.name!r} has no checkpoint in {self.store.uri}")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            state = read_state(self.store.child(step_dir(steps[-1])))
            step = state.get("best_step") or steps[-1]
        elif which.isdigit() and int(which) in steps:
            step = int(which)
        else:
            raise BadInput(f"run {self.name!r} has no checkpoint {which!r}; it has steps "
                           f"{', '.join(map(str, steps))}, latest and best")
        return self.store.child(step_dir(step))


def _claim_bytes(record: dict) -> bytes:
    return json.dumps({**record, "heartbeat": time.time()}).encode()


def _alive(holder: dict) -> bool:
    """Whether a claim's holder may still be training."""
    try:
        if not time.time() - float(holder.get("heartbeat", 0)) < STALE_S:
            return False
    except (TypeError, ValueError):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass  # someone else's process, or a pid we cannot test: assume it lives
    return True


class Claim:
    """A process's hold on a run, kept fresh by a heartbeat until `release()`."""

    def __init__(self, run: Run, record: dict):
        self.run, self.record = run, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only ages the claim
                self.run.store.write_bytes(CLAIM, _claim_bytes(self.record))

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        holder = self.run._holder()
        if holder and holder.get("token") == self.record["token"]:
            self.run.store.delete(CLAIM)


def read_state(ckpt: Store) -> dict:
    """A checkpoint's state.json, checked as data; its `config` a checked JobConfig."""
    where = ckpt.url("state.json")
    try:
        state = json.loads(ckpt.read_bytes("state.json"))
    except FileNotFoundError:
        raise BadInput(f"{ckpt.uri} is not a checkpoint: state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{where} is corrupt") from None
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise BadInput(f"{ckpt.uri} is not a checkpoint this cectl reads (it reads "
                       f"{', '.join(FORMATS)})")
    metrics = state.get("metrics", {})
    best = state.get("best_step")
    if not (_count(state.get("step")) and (best is None or _count(best))
            and isinstance(state.get("config"), dict) and isinstance(metrics, dict)
            and all(type(v) in (int, float) for v in metrics.values())):
        raise BadInput(f"{where} is damaged: it needs step numbers, a config mapping and "
                       "numeric metrics")
    state["config"] = load_config(JobConfig, stored=state["config"], source=where)
    return state


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


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


def list_runs(store: Store) -> list[str]:
    return sorted({key.split("/")[1] for key in store.list("runs/") if key.count("/") >= 2})

