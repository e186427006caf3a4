from __future__ import annotations

import json

import pytest

from core.config import PRESETS, AugmentConfig, TrainConfig, get_preset
from core.errors import ConfigError


def test_presets_are_valid_and_roundtrip_json():
    for name in PRESETS:
        cfg = get_preset(name)
        again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg


def test_replace_with_nested_augment_and_unknown_field():
    cfg = TrainConfig().replace(batch_size=8, augment={"flip": False})
    assert cfg.batch_size == 8 and cfg.augment == AugmentConfig(flip=False)
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig().replace(nope=1)


@pytest.mark.parametrize("bad", [{"val_fraction": 1.5}, {"batch_size": 0}, {"classes": 1},
                                 {"dropout": 1.0}, {"finetune_layers": -2}, {"resize_policy": "x"},
                                 {"tta_sizes": (16,)}, {"tta_sizes": (192, 192)},
                                 {"input_size": 224, "tta_sizes": (224,)}, {"per_class": 1}])
def test_invalid_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="smoke"):
        get_preset("nope")


def test_from_dict_reads_yaml_style_exponent_floats():
    """PyYAML reads `1e-05` as a string; a config file must still give float learning rates."""
    import yaml

    from core.config import TrainConfig, mobilenet_v2

    text = yaml.safe_dump(mobilenet_v2().to_dict()).replace("weight_decay: 1.0e-05", "weight_decay: 1e-05")
    data = yaml.safe_load(text)
    assert isinstance(data["weight_decay"], str)
    cfg = TrainConfig.from_dict(data)
    assert cfg.weight_decay == 1e-5 and isinstance(cfg.weight_decay, float)
    with pytest.raises(ConfigError, match="weight_decay must be a number"):
        TrainConfig.from_dict({**data, "weight_decay": "tiny"})
    assert TrainConfig.from_dict({**data, "head_epochs": "3"}).head_epochs == 3  # a quoted whole number
    with pytest.raises(ConfigError, match="head_epochs must be a number, got 'many'"):
        TrainConfig.from_dict({**data, "head_epochs": "many"})


def test_tta_sizes_from_lists_become_the_tuple_field():
    """JSON/YAML config files and argparse give lists; the config holds (and compares as) a tuple."""
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), "tta_sizes": [192]})
    assert cfg.tta_sizes == (192,) and cfg == TrainConfig(tta_sizes=(192,))
    assert TrainConfig().replace(tta_sizes=[160, 192]).tta_sizes == (160, 192)


def test_a_config_that_trains_nothing_is_refused():
    """No head epochs and no fine-tuning phase would export a random head as if trained."""
    from core.config import smoke

    for changes in ({"head_epochs": 0, "finetune_epochs": 0}, {"head_epochs": 0, "finetune_layers": 0}):
        with pytest.raises(ConfigError, match="nothing would be trained"):
            smoke().replace(**changes)
    assert smoke().replace(head_epochs=0).finetune_epochs == 1  # fine-tuning alone trains the head too


@pytest.mark.parametrize("bad, says", [
    (dict(min_prob=7.0), "--min-prob 7.0: give a probability between 0 and 1"),
    (dict(stage_every_s=-1.0), "--stage-every must be 0 (after every batch) or more seconds"),
    (dict(summary_breeds=-1), "--summary-breeds must be 0 (none) or more"),
    (dict(stage_every_s=float("nan")), "--stage-every must be 0 (after every batch) or more seconds"),
    (dict(io_timeout_s=float("nan")), "--io-timeout must be more than 0"),
    (dict(lease_ttl_s=float("nan")), "--lease-ttl must be at least 3 seconds"),
])
def test_label_options_out_of_range_are_usage_errors(bad, says):
    """`--min-prob 7` was accepted (every row then counted low-confidence) and `--stage-every` said
    "0 (auto)", which it is not: 0 stages after every batch."""
    from core.label_config import LabelConfig

    base = dict(inputs=("photos",), model="bundle", out="out")
    LabelConfig(**base, stage_every_s=0.0, min_prob=0.0, summary_breeds=0).check()
    with pytest.raises(ConfigError) as err:
        LabelConfig(**base, **bad).check()
    assert says in str(err.value)
