"""Config: defaults, YAML + key=value layering, and clear errors for every kind of typo."""

import pytest

from longrl.config import Config, config_from_dict, config_to_dict, config_to_yaml, describe_keys, load_config
from longrl.errors import UserError


def test_overrides_layer_on_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  group_size: 4\n  lr: 0.01\ntask:\n  name: sort\n")
    cfg = load_config(f, ["rl.group_size=6", "rollout.partial=true", "task.kwargs.max_len=4", "sft.lr=5e-4"])
    assert cfg.sft.lr == 5e-4
    assert cfg.rl.group_size == 6 and cfg.rl.lr == 0.01 and cfg.task.name == "sort"
    assert cfg.rollout.partial is True and cfg.task.kwargs == {"max_len": 4}


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError, match=r"unknown config key 'rl.grup_size'; did you mean 'rl.group_size'"):
        load_config(None, ["rl.grup_size=4"])
    with pytest.raises(UserError, match="unknown config key 'sft.stepz'.*'sft.steps'"):
        load_config(None, ["sft.stepz=1"])


def test_bad_values_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="rl.group_size' expects int"):
        load_config(None, ["rl.group_size=many"])
    with pytest.raises(UserError, match="rl.loss='gpso'.*did you mean 'gspo'"):
        load_config(None, ["rl.loss=gpso"])
    with pytest.raises(UserError, match="not key=value"):
        load_config(None, ["rl.group_size"])
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="at least 2 samples"):
        load_config(None, ["rl.group_size=1"])


def test_resolved_config_round_trips():
    cfg = load_config(None, ["rl.steps=7", "model.tiny.hidden_size=64"])
    import yaml

    again = config_from_dict(yaml.safe_load(config_to_yaml(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.rl.steps == 7 and again.model.tiny.hidden_size == 64


def test_every_field_is_documented():
    text = describe_keys()
    for line in text.splitlines():
        key, _, doc = line.strip().partition("  ")
        assert doc.strip(), f"{key} has no docstring"
    assert "rl.group_size=8" in text and isinstance(Config().rl.group_size, int)


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    tiny = load_config(root / "grpo_tiny.yaml")
    assert config_to_dict(tiny) == config_to_dict(Config())  # the file spells out the defaults
    qwen = load_config(root / "qwen_grpo.yaml")
    assert qwen.train.backprop == "streambp" and qwen.model.dtype == "bfloat16"
