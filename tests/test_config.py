"""One config system: defaults < recipe < KEY=VALUE < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import assert_refused
from omegaconf import OmegaConf

import cectl
from cectl.config import RECIPES, find_recipe, load_config, to_yaml
from cectl.errors import BadInput
from cectl.schema import JobConfig, MaskKind, ShardConfig, SweepConfig
from cectl.sweep import Dimension, parse_dimension, recipe_space, split_arguments

SECRET = "supersecretvalue123"


def test_flags_override_overrides_override_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resize: 256\nquality: 80\nshard_size: 10\n")
    cfg = load_config(ShardConfig, str(recipe), ["quality=85", "seed=3"], {"shard_size": 20,
                                                                          "workers": None})
    assert (cfg.resize, cfg.quality, cfg.shard_size, cfg.seed) == (256, 85, 20, 3)
    assert cfg.min_size == ShardConfig.min_size


def test_bundled_recipes_load_by_name():
    assert load_config(ShardConfig, "imagenet", recipe_folder="shards").layout == "imagenet"
    assert load_config(ShardConfig, "paris-streetview", recipe_folder="shards").layout == "paris"


@pytest.mark.parametrize(("overrides", "name"), [(["resize=big"], "resize"),
                                              (["no_such_key=1"], "no_such_key"),
                                              (["resize"], "'resize'")])
def test_bad_overrides_are_bad_input(overrides, name):
    with pytest.raises(BadInput) as caught:
        load_config(ShardConfig, overrides=overrides)
    assert_refused(caught.value, 2, name)


def test_missing_recipe_is_bad_input():
    with pytest.raises(BadInput) as caught:
        load_config(ShardConfig, "nope.yaml", recipe_folder="shards")
    assert_refused(caught.value, 2, "nope.yaml")


@pytest.mark.parametrize(("override", "key"), [
    ("model.arch=resnet", "model.arch"),
    ("mask.kind=star", "mask.kind"),
    ("loss.mode=both", "loss.mode"),
    ("train.precision=fp8", "train.precision"),
    ("model.width=0", "model.width"),
    ("model.width=200000", "model.width"),
    ("model.bottleneck=-1", "model.bottleneck"),
    ("data.image_size=1000000", "data.image_size"),
    ("data.image_size=100", "data.image_size"),
    ("data.load_size=0", "data.load_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.workers=-1", "data.workers"),
    ("mask.overlap=100", "mask.overlap"),
    ("mask.overlap=-5", "mask.overlap"),
    ("mask.overlap_weight=inf", "mask.overlap_weight"),
    ("mask.min_area=0", "mask.min_area"),
    ("mask.max_area=0.95", "mask.max_area"),
    ("mask.min_area=0.38", "mask.max_area"),  # closer to max_area than a stroke's step
    ("mask.kind=files", "mask.source"),
    ("loss.lambda_rec=inf", "loss.lambda_rec"),
    ("loss.lambda_adv=1.5", "loss.lambda_adv"),
    ("optim.lr_d=nan", "optim.lr_d"),
    ("optim.lr_d=0", "optim.lr_d"),
    ("optim.lr_ratio=-1", "optim.lr_ratio"),
    ("optim.beta1=1", "optim.beta1"),
    ("train.steps=0", "train.steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.resize_check_s=0", "train.resize_check_s"),
    ("train.resize_check_s=inf", "train.resize_check_s"),
    ("model.width=wide", "model.width"),
    ("model.colour=red", "model.colour"),
])
def test_job_values_out_of_range_are_refused_naming_the_key(override, key):
    with pytest.raises(BadInput) as caught:
        load_config(JobConfig, overrides=[override])
    assert_refused(caught.value, 2, key)


@pytest.mark.parametrize(("overrides", "names"), [
    (["model.arch=alexnet227", "loss.mode=rec"], ["data.image_size=227"]),
    (["model.arch=alexnet227", "data.image_size=227"], ["loss.mode=rec", "dcgan128"]),
])
def test_settings_that_do_not_fit_together_are_refused(overrides, names):
    with pytest.raises(BadInput) as caught:
        load_config(JobConfig, overrides=overrides)
    assert_refused(caught.value, 2, "model.arch=alexnet227", *names)


@pytest.mark.parametrize("overrides", [
    [], ["mask.kind=random-region", "mask.overlap=0"], ["model.width=512", "loss.lambda_adv=0"],
    ["model.arch=alexnet227", "data.image_size=227", "loss.mode=rec"],
    ["data.image_size=16", "mask.overlap=3"], ["optim.beta1=0", "train.precision=bf16"],
    ["mask.kind=free-form", "mask.min_area=0.01", "mask.max_area=0.06"],
    ["mask.kind=files", "mask.source=s3://bucket/masks"],
])
def test_values_in_range_load(overrides):
    cfg = load_config(JobConfig, overrides=overrides)
    for override in overrides:
        key = override.split("=")[0]
        assert OmegaConf.select(cfg, key) == OmegaConf.select(OmegaConf.from_dotlist([override]),
                                                              key)


def test_choices_are_enums_equal_to_their_names():
    cfg = load_config(JobConfig, overrides=["mask.kind=random-block", "model.arch=dcgan128"])
    assert cfg.mask.kind is MaskKind["random-block"] and cfg.mask.kind == "random-block"
    assert f"{cfg.model.arch}" == "dcgan128"
    assert "kind: random-block" in to_yaml(cfg)


@pytest.mark.parametrize("layer", ["override", "stored", "stored-dict", "recipe"])
def test_interpolations_are_refused_never_resolved(layer, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    value = "${oc.env:AWS_SECRET_ACCESS_KEY}"
    recipe = tmp_path / "job.yaml"
    recipe.write_text(f"train:\n  steps: '{value}'\n")
    kwargs = {"override": {"overrides": [f"train.steps={value}"]},
              "stored": {"stored": f"train:\n  steps: '{value}'\n", "source": "config.yaml"},
              "stored-dict": {"stored": {"train": {"steps": value}}, "source": "state.json"},
              "recipe": {"recipe": str(recipe)}}[layer]
    with pytest.raises(BadInput) as caught:
        load_config(JobConfig, **kwargs)
    assert SECRET not in assert_refused(caught.value, 2, "train.steps", "${")


def test_rejected_values_are_not_echoed():
    with pytest.raises(BadInput) as caught:
        load_config(JobConfig, overrides=[f"model.width={SECRET}"])
    assert SECRET not in assert_refused(caught.value, 2, "model.width")


@pytest.mark.parametrize("stored", ["- a list", "model: [", ["model"], 7])
def test_stored_configs_that_are_not_mappings_are_bad_input(stored):
    with pytest.raises(BadInput) as caught:
        load_config(JobConfig, stored=stored, source="state.json")
    assert_refused(caught.value, 2, "state.json")


@pytest.mark.parametrize("flags", [
    {"layout": "weird"}, {"resize": -1}, {"quality": 0}, {"quality": 101}, {"shard_size": 0},
    {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"min_size": 0}, {"workers": 0},
])
def test_shard_options_are_checked_by_the_shard_config(flags):
    with pytest.raises(BadInput) as caught:
        load_config(ShardConfig, flags=flags)
    assert_refused(caught.value, 2, next(iter(flags)))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (RECIPES / "jobs").iterdir()
                                          if not p.name.startswith("sweep")))
def test_every_bundled_job_recipe_loads(recipe):
    cfg = load_config(JobConfig, recipe)
    written = yaml.safe_load(find_recipe(recipe, "jobs").read_text())

    def leaves(node: dict, prefix: str = "") -> list[tuple[str, object]]:
        return [leaf for key, value in node.items() for leaf in (
            leaves(value, f"{prefix}{key}.") if isinstance(value, dict)
            else [(f"{prefix}{key}", value)])]

    assert len(leaves(written)) > 0  # each value the recipe writes is the one loaded
    for key, value in leaves(written):
        assert OmegaConf.select(cfg, key) == value, key


def test_bundled_recipes_live_in_the_package():
    package = Path(cectl.__file__).parent
    assert find_recipe("demo", "jobs").is_relative_to(package / "recipes")
    assert find_recipe("folder", "shards").is_relative_to(package / "recipes")
    assert load_config(SweepConfig, "sweep-lambda-lr").job == "inpaint-center"


@pytest.mark.parametrize(("text", "dimension"), [
    ("uniform(1, 30)", Dimension("uniform", [1, 30])),
    ("loguniform(1e-4, 0.1)", Dimension("loguniform", [1e-4, 0.1])),
    (" choice(a, 'b', 3) ", Dimension("choice", ["a", "b", 3])),
    ("0.5", None), ("uniform", None),
])
def test_sweep_dimensions_parse_into_tune_distributions(text, dimension):
    assert parse_dimension("optim.beta1", text) == dimension


def test_sweep_arguments_split_into_recipe_sweep_keys_fixed_keys_and_dimensions():
    recipe, own, fixed, searched = split_arguments(
        ["my.yaml", "samples=8", "train.steps=500", "optim.beta1=uniform(0.3, 0.9)"])
    assert (recipe, own, fixed) == ("my.yaml", ["samples=8"], ["train.steps=500"])
    assert searched == {"optim.beta1": Dimension("uniform", [0.3, 0.9])}


@pytest.mark.parametrize(("args", "names"), [
    (["a.yaml", "b.yaml"], ["a.yaml", "b.yaml"]),
    (["optim.lr_d=uniform(1, )"], ["optim.lr_d", "'uniform(1, )'"]),
    (["optim.lr_d=uniform(${oc.env:AWS_SECRET_ACCESS_KEY}, 1)"], ["optim.lr_d", "${...}"]),
])
def test_sweep_arguments_that_do_not_parse_are_refused(args, names):
    with pytest.raises(BadInput) as caught:
        split_arguments(args)
    assert_refused(caught.value, 2, *names)


@pytest.mark.parametrize(("space", "names"), [
    ({"optim.lr_d": "0.5"}, ["optim.lr_d", "'0.5'", "uniform(a, b)"]),
    ({"optim.lr_d": "normal(0, 1)"}, ["optim.lr_d", "'normal(0, 1)'"]),
    ({"loss.lambda_adv": "choice(${oc.env:HOME}, 1)"}, ["loss.lambda_adv", "${...}"]),
])
def test_sweep_recipe_spaces_that_do_not_parse_are_refused(space, names):
    with pytest.raises(BadInput) as caught:
        recipe_space(space)
    assert_refused(caught.value, 2, *names)


def test_a_sweep_recipe_with_an_interpolation_is_refused_without_the_secret(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    recipe = tmp_path / "s.yaml"
    recipe.write_text("space:\n  optim.lr_d: uniform(${oc.env:AWS_SECRET_ACCESS_KEY}, 1)\n")
    with pytest.raises(BadInput) as caught:
        load_config(SweepConfig, str(recipe))
    assert SECRET not in assert_refused(caught.value, 2, "optim.lr_d", str(recipe), "${")
