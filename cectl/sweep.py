"""`cectl sweep`: Ray Tune over job settings, each trial one run of the training loop.

Trials are single-worker training runs (1 GPU, or 1 CPU with --cpu) of `cectl.train`,
reporting validation metrics at every evaluation; ASHA stops the ones that lag. The
sweep's state lives in STORE/sweeps/NAME and each trial's run in STORE/runs/NAME-TRIAL,
so the same command after Ctrl-C or a killed driver resumes where it stopped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cectl.config import load_config, to_yaml, validate_job
from cectl.distributed import join_cluster
from cectl.errors import BadInput, Failure
from cectl.render import status
from cectl.runs import Run, best_device
from cectl.schema import JobConfig, SweepConfig
from cectl.storage import open_store
from cectl.train import Session, train

DISTRIBUTION = re.compile(r"^\s*(uniform|loguniform|randint|choice)\((.*)\)\s*$")


class Dimension(NamedTuple):
    """One searched key: `kind(args)`, kind one of uniform, loguniform, randint, choice."""

    kind: str
    args: list

    def to_tune(self):
        from ray import tune

        return tune.choice(self.args) if self.kind == "choice" else getattr(tune, self.kind)(
            *self.args)


def parse_dimension(key: str, text: str) -> Dimension | None:
    """`uniform(1, 30)` and friends as a Dimension; None for a plain value. Values are
    numbers or words; `${...}` interpolations are refused, never resolved (they could
    read the environment into trial names)."""
    match = DISTRIBUTION.match(str(text))
    if not match:
        return None
    if "${" in match.group(2):
        raise BadInput(f"search space {key}: {text!r} holds a ${{...}} interpolation: give "
                       "plain values")
    args = [_scalar(a) for a in match.group(2).split(",")]
    if "" in args:
        raise BadInput(f"search space {key}: {text!r} has an empty value")
    return Dimension(match.group(1), args)


def _scalar(text: str) -> int | float | str:
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
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
    cfg = OmegaConf.merge(OmegaConf.create(base),
                          OmegaConf.from_dotlist([f"{k}={v}" for k, v in params.items()]))
    if "loss.lambda_adv" in params and "loss.lambda_rec" not in params:
        cfg.loss.lambda_rec = 1.0 - cfg.loss.lambda_adv
    return validate_job(cfg)


def _trial(params: dict, base: dict, store: str, sweep: str) -> None:
    """One trial: the training loop, reporting validation metrics to Tune."""
    from ray import tune

    name = f"{sweep}-{tune.get_context().get_trial_id()}"

    def on_log(step: int, metrics: dict) -> None:
        if any(k.startswith("val_") for k in metrics):
            tune.report({"step": step, **metrics})

    run_store = open_store(store)
    train(trial_config(base, params), run_store, name, Session(device=best_device(), on_log=on_log),
          resume=bool(Run(run_store, name).steps()))


def run_sweep(args: list[str], data: str | None, store_uri: str, samples: int | None,
              cpu: bool, name: str | None, output: Path | None, console: Console) -> dict:
    """Run (or resume) a sweep; returns the sorted trials and where the best config went.

    The best trial's job config goes to STORE/sweeps/NAME-best.yaml and, if asked, to
    `output` too."""
    recipe, own, fixed, searched = split_arguments(args)
    sweep = load_config(SweepConfig, recipe, own, {"samples": samples})
    name = name or (Path(recipe).stem if recipe else "sweep")
    base_cfg = load_config(JobConfig, sweep.job, fixed,
                           {"data": {"uri": data}} if data else None)
    validate_job(base_cfg)
    base = OmegaConf.to_container(base_cfg)
    space = {key: d.to_tune() for key, d in {**recipe_space(sweep.space), **searched}.items()}
    if not space:
        raise BadInput("nothing to search: give a space in the sweep recipe or KEY=dist(...)")

    store = open_store(store_uri)
    store.check(create=True)
    join_cluster((1, 1), 1, cpu, None)
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    try:
        fs, root = store.arrow_fs()
        path = f"{root}/sweeps/{name}"
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, store=store.uri, sweep=name),
            {"cpu": 1} if cpu else {"cpu": 1, "gpu": 1})
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            console.print(f"resuming sweep {name} from {store.url(f'sweeps/{name}')}")
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            scheduler = ASHAScheduler(time_attr="step", max_t=base_cfg.train.steps,
                                      grace_period=min(sweep.grace_steps, base_cfg.train.steps),
                                      reduction_factor=sweep.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode,
                                            scheduler=scheduler, num_samples=sweep.samples),
                run_config=tune.RunConfig(name=name, storage_path=f"{root}/sweeps",
                                          storage_filesystem=fs, verbose=0))
        with status(console, f"sweep {name}: {sweep.samples} trials over "
                            f"{', '.join(space)}"):
            grid = tuner.fit()
        trials = []
        for result in grid:
            metrics = result.metrics or {}
            trials.append({"trial": metrics.get("trial_id", "?"),
                           "params": {k: result.config[k] for k in space},
                           "step": metrics.get("step"), "metric": metrics.get(sweep.metric),
                           "error": result.error is not None})
        finished = [t for t in trials if t["metric"] is not None]
        if not finished:
            raise Failure(f"no trial of sweep {name} reported {sweep.metric}: see the Ray logs")
        finished.sort(key=lambda t: t["metric"], reverse=sweep.mode == "max")
        best_cfg = trial_config(base, finished[0]["params"])
        store.write_bytes(f"sweeps/{name}-best.yaml", to_yaml(best_cfg).encode())
        if output is not None:
            output.write_text(to_yaml(best_cfg))
        rest = [t for t in trials if t["metric"] is None]
        return {"name": name, "metric": sweep.metric, "trials": finished + rest,
                "space": list(space),
                "best": str(output) if output else store.url(f"sweeps/{name}-best.yaml")}
    finally:
        ray.shutdown()
