"""One config system: defaults < recipe < KEY=VALUE < flags."""

from __future__ import annotations

import pytest

from cectl.config import ShardConfig, load_config
from cectl.errors import BadInput


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


@pytest.mark.parametrize("overrides", [["resize=big"], ["no_such_key=1"], ["resize"]])
def test_bad_overrides_are_bad_input(overrides):
    with pytest.raises(BadInput):
        load_config(ShardConfig, overrides=overrides)


def test_missing_recipe_is_bad_input():
    with pytest.raises(BadInput, match="not found"):
        load_config(ShardConfig, "nope.yaml", recipe_folder="shards")
