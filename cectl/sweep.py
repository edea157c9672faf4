"""`cectl sweep`: Ray Tune over job settings, each trial one run of the training loop.

Trials are single-worker training runs (1 GPU, or 1 CPU with --cpu) of `cectl.train`,
reporting validation metrics at every evaluation; ASHA stops the ones that lag. cectl
draws every trial's values itself and keeps the sweep in STORE/sweeps/NAME.json (the
trials' values, which have ended and their results): JSON it checks when it reads it, so
that resuming a sweep unpickles nothing from the store. Ray Tune runs the unfinished
trials, each by its index, and only writes its own state (STORE/sweeps/NAME/), which
cectl never reads. Each trial's run is STORE/runs/NAME-NNN, so the same command after
Ctrl-C or a killed driver resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from cectl.cluster import join_cluster
from cectl.config import load_config, to_yaml, validate_job
from cectl.errors import BadInput, Failure
from cectl.render import status
from cectl.runs import Run, best_device, list_runs
from cectl.schema import JobConfig, SweepConfig
from cectl.shard_format import open_manifest
from cectl.storage import Store, check_name, open_store
from cectl.train import Session, train

DISTRIBUTION = re.compile(r"^\s*(uniform|loguniform|randint|choice)\((.*)\)\s*$")
FORMAT = "cectl-sweep/1"
STATUSES = ("pending", "done", "error")  # done: finished, or stopped by ASHA


class Dimension(NamedTuple):
    """One searched key: `kind(args)`, kind one of uniform, loguniform, randint, choice."""

    kind: str
    args: list

    def draw(self, rng: random.Random) -> int | float | str:
        if self.kind == "choice":
            return rng.choice(self.args)
        low, high = self.args
        if self.kind == "randint":
            return rng.randrange(low, high)
        value = (rng.uniform(low, high) if self.kind == "uniform"
                 else math.exp(rng.uniform(math.log(low), math.log(high))))
        return min(max(value, low), high)  # rounding may step just outside

    def holds(self, value: object) -> bool:
        """Whether `value` is one this dimension can draw."""
        if self.kind == "choice":
            return value in self.args and type(value) in map(type, self.args)
        low, high = self.args
        if self.kind == "randint":
            return type(value) is int and low <= value < high
        return type(value) in (int, float) and low <= value <= high


def parse_dimension(key: str, text: str) -> Dimension | None:
    """`uniform(1, 30)` and friends as a Dimension; None for a plain value. Values are
    numbers or words; `${...}` interpolations are refused, never resolved (they could
    read the environment into trial names)."""
    match = DISTRIBUTION.match(str(text))
    if not match:
        return None
    if "${" in match.group(2) or "${" in key:
        raise BadInput(f"search space {key}: {text!r} holds a ${{...}} interpolation: give "
                       "plain values")
    kind, args = match.group(1), [_scalar(a) for a in match.group(2).split(",")]
    if "" in args:
        raise BadInput(f"search space {key}: {text!r} has an empty value")
    numbers = (int,) if kind == "randint" else (int, float)
    if kind != "choice" and not (len(args) == 2 and all(type(a) in numbers for a in args)
                                 and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)):
        rule = {"uniform": "numbers", "loguniform": "numbers above 0",
                "randint": "whole numbers"}[kind]
        raise BadInput(f"search space {key}: {text!r} needs two {rule}, the first the smaller")
    return Dimension(kind, args)


def _scalar(text: str) -> int | float | str:
    text = text.strip()
    for kind in (int, float):
        try:
            value = kind(text)
            return value if math.isfinite(value) else text
        except ValueError:
            pass
    return text.strip("'\"")


def split_arguments(args: list[str]) -> tuple[str | None, list[str], list[str],
                                              dict[str, Dimension]]:
    """(sweep recipe, sweep overrides such as samples=8, job overrides such as
    train.steps=500, search dimensions such as optim.beta1=uniform(0.3, 0.9))."""
    recipes = [a for a in args if "=" not in a]
    if len(recipes) > 1:
        raise BadInput(f"one sweep recipe at most, got {', '.join(recipes)}")
    sweep_keys = set(SweepConfig.__dataclass_fields__)
    own, fixed, searched = [], [], {}
    for item in (a for a in args if "=" in a):
        key, value = item.split("=", 1)
        if key in sweep_keys:
            own.append(item)
        elif dimension := parse_dimension(key, value):
            searched[key] = dimension
        else:
            fixed.append(item)
    return (recipes[0] if recipes else None), own, fixed, searched


def recipe_space(space: dict[str, str]) -> dict[str, Dimension]:
    """The `space` of a sweep recipe, every entry a distribution."""
    parsed = {}
    for key, text in space.items():
        if (dimension := parse_dimension(key, text)) is None:
            raise BadInput(f"search space {key}: {text!r} is not uniform(a, b), "
                           "loguniform(a, b), randint(a, b) or choice(a, b, ...)")
        parsed[key] = dimension
    return parsed


def trial_config(base: dict, params: dict) -> DictConfig:
    """The checked job config of a trial: `base` with the trial's values set (as values,
    never parsed as YAML or interpolations)."""
    cfg = OmegaConf.create(base)
    for key, value in params.items():
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException:
            raise BadInput(f"search space key {key!r} is not a job config key") from None
    if "loss.lambda_adv" in params and "loss.lambda_rec" not in params:
        cfg.loss.lambda_rec = 1.0 - cfg.loss.lambda_adv
    return validate_job(cfg)


def trial_run(sweep: str, index: int) -> str:
    return f"{sweep}-{index:03d}"


def new_state(definition: dict, space: dict[str, Dimension], samples: int) -> dict:
    """A new sweep: every trial's values drawn now, none run yet."""
    rng = random.Random()
    return {"format": FORMAT, "definition": definition, "trials": [
        {"params": {key: d.draw(rng) for key, d in space.items()}, "status": "pending",
         "step": None, "metric": None} for _ in range(samples)]}


def read_state(store: Store, key: str, definition: dict, space: dict[str, Dimension],
               samples: int) -> dict:
    """A sweep's state as stored, checked as data: the same search, trials of the right
    shape whose values the space can draw. BadInput otherwise."""
    where = store.url(key)
    try:
        state = json.loads(store.read_bytes(key))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadInput(f"{where} is corrupt: delete it, or give another --name") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadInput(f"{where} is not a cectl sweep state ({FORMAT})")
    if state.get("definition") != json.loads(json.dumps(definition)):
        raise BadInput(f"{where} is a sweep of another search space, metric or number of "
                       "trials: give another --name")
    trials = state.get("trials")
    if not (isinstance(trials, list) and len(trials) == samples
            and all(_is_trial(t, space) for t in trials)):
        raise BadInput(f"{where} is damaged: it needs {samples} trials, each with values the "
                       "search space can draw, a status, a step and a finite metric or null")
    return state


def _is_trial(trial: object, space: dict[str, Dimension]) -> bool:
    if not (isinstance(trial, dict) and set(trial) == {"params", "status", "step", "metric"}):
        return False
    params, step, metric = trial["params"], trial["step"], trial["metric"]
    return (isinstance(params, dict) and set(params) == set(space)
            and all(d.holds(params[k]) for k, d in space.items())
            and trial["status"] in STATUSES
            and (step is None or (type(step) is int and step >= 0))
            and (metric is None or (type(metric) in (int, float) and math.isfinite(metric))))


def write_state(store: Store, key: str, state: dict) -> None:
    store.write_bytes(key, json.dumps(state, indent=1).encode())


def _trial(config: dict, base: dict, store: str, sweep: str, trials: list[dict]) -> None:
    """One trial, the one at index `config["trial"]`: the training loop, reporting
    validation metrics to Tune."""
    from ray import tune

    index = config["trial"]
    name = trial_run(sweep, index)

    def on_log(step: int, metrics: dict) -> None:
        if any(k.startswith("val_") for k in metrics):
            tune.report({"step": step, **metrics})

    run_store = open_store(store)
    train(trial_config(base, trials[index]["params"]), run_store, name,
          Session(device=best_device(), on_log=on_log),
          resume=bool(Run(run_store, name).steps()))


def _recorder(store_uri: str, key: str, state: dict, metric: str):
    """A Tune callback that writes each trial's end (and last results) to the state."""
    from ray import tune

    class Recorder(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._ended(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._ended(trial, "error")

        def _ended(self, trial, outcome: str) -> None:
            result = trial.last_result or {}
            value = result.get(metric)
            state["trials"][trial.config["trial"]].update(
                status=outcome, step=result.get("step"),
                metric=value if isinstance(value, int | float) and math.isfinite(value)
                else None)
            write_state(open_store(store_uri), key, state)

    return Recorder()


def run_sweep(args: list[str], data: str | None, store_uri: str, samples: int | None,
              cpu: bool, name: str | None, output: Path | None, console: Console) -> dict:
    """Run (or resume) a sweep; returns the sorted trials and where the best config went.

    The best trial's job config goes to STORE/sweeps/NAME-best.yaml and, if asked, to
    `output` too."""
    recipe, own, fixed, searched = split_arguments(args)
    sweep = load_config(SweepConfig, recipe, own, {"samples": samples})
    name = check_name(name or (Path(recipe).stem if recipe else "sweep"), "sweep name")
    check_name(trial_run(name, sweep.samples - 1), "trial run name")
    base_cfg = load_config(JobConfig, sweep.job, fixed,
                           {"data": {"uri": data}} if data else None)
    validate_job(base_cfg)
    open_manifest(base_cfg.data.uri)  # bad shards fail here, before any trial starts
    base = OmegaConf.to_container(base_cfg)
    space = {**recipe_space(sweep.space), **searched}
    if not space:
        raise BadInput("nothing to search: give a space in the sweep recipe or KEY=dist(...)")
    definition = {"space": {key: list(d) for key, d in space.items()}, "metric": sweep.metric,
                  "samples": sweep.samples}

    store = open_store(store_uri)
    store.check(create=True)
    key = f"sweeps/{name}.json"
    if store.exists(key):
        state = read_state(store, key, definition, space, sweep.samples)
        console.print(f"resuming sweep {name} from {store.url(key)}")
    else:
        taken = set(list_runs(store)) & {trial_run(name, i) for i in range(sweep.samples)}
        if taken:
            raise BadInput(f"runs of an earlier sweep {name} are in {store.uri} "
                           f"({min(taken)}, ...): give another --name")
        state = new_state(definition, space, sweep.samples)
    for trial in state["trials"]:  # every trial's config is checked before any runs
        trial_config(base, trial["params"])
    todo = [i for i, trial in enumerate(state["trials"]) if trial["status"] != "done"]
    if todo:
        write_state(store, key, state)
        _tune(state, todo, base, store, key, name, sweep, base_cfg.train.steps, cpu, console)
    return _report(state, base, store, name, sweep, list(space), output)


def _tune(state: dict, todo: list[int], base: dict, store: Store, key: str, name: str,
          sweep: DictConfig, steps: int, cpu: bool, console: Console) -> None:
    """Run the trials at indices `todo` with Ray Tune and ASHA, recording each as it ends."""
    join_cluster((1, 1), 1, cpu, None)
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Ctrl-C stops at once (cectl's state holds what has ended); Tune's graceful stop
    # would only save its own state, and tell to resume with Tuner.restore.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        fs, root = store.arrow_fs()
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, store=store.uri, sweep=name,
                                 trials=state["trials"]),
            {"cpu": 1} if cpu else {"cpu": 1, "gpu": 1})
        scheduler = ASHAScheduler(time_attr="step", max_t=steps,
                                  grace_period=min(sweep.grace_steps, steps),
                                  reduction_factor=sweep.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=name, storage_path=f"{root}/sweeps",
                                      storage_filesystem=fs, verbose=0, callbacks=[
                                          _recorder(store.uri, key, state, sweep.metric)]))
        with status(console, f"sweep {name}: {len(todo)} of {sweep.samples} trials to run "
                             f"over {', '.join(state['definition']['space'])}"):
            tuner.fit()
    finally:
        ray.shutdown()


def _report(state: dict, base: dict, store: Store, name: str, sweep: DictConfig,
            space: list[str], output: Path | None) -> dict:
    """The trials, best first; the best one's job config written where it goes."""
    trials = [{"trial": f"{i:03d}", "params": t["params"], "step": t["step"],
               "metric": t["metric"], "error": t["status"] == "error"}
              for i, t in enumerate(state["trials"])]
    finished = [t for t in trials if t["metric"] is not None]
    if not finished:
        raise Failure(f"no trial of sweep {name} reported {sweep.metric}: see the Ray logs")
    finished.sort(key=lambda t: t["metric"], reverse=sweep.mode == "max")
    best_cfg = trial_config(base, finished[0]["params"])
    store.write_bytes(f"sweeps/{name}-best.yaml", to_yaml(best_cfg).encode())
    if output is not None:
        output.write_text(to_yaml(best_cfg))
    rest = [t for t in trials if t["metric"] is None]
    return {"name": name, "metric": sweep.metric, "trials": finished + rest, "space": space,
            "best": str(output) if output else store.url(f"sweeps/{name}-best.yaml")}
