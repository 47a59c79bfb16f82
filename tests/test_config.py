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


def test_edges_of_the_survivable_ranges_are_accepted():
    """The refusals stop at the boundary: the last sane value of each range still loads."""
    cfg = load_config(None, ["sft.steps=0", "rl.steps=0", "rl.clip_low=0.999", "rl.kl_coef=0", "run.save_every=1",
                             "rl.group_size=1024", "rl.prompts_per_step=64", "run.name=sweeps/a", "train.grad_clip=0",
                             "model.tiny.hidden_size=8", "model.tiny.num_heads=4", "model.tiny.num_kv_heads=1"])
    assert (cfg.rl.group_size, cfg.run.name, cfg.rl.clip_low) == (1024, "sweeps/a", 0.999)
    for bad, message in [(["rl.group_size=1025"], "more than 1024"), (["rl.clip_low=1"], "must be in \\(0, 1\\)"),
                         (["rl.clip_low=0"], "must be in \\(0, 1\\)"), (["model.tiny.hidden_size=12"], "even head width"),
                         (["run.name=a/../../b"], "plain directory name"), (["run.name=."], "plain directory name"),
                         (["rl.prompts_per_step=65", "rl.group_size=1024"], "66560 sequences"),
                         (["rollout.partial=true", "rollout.over_provision=2", "rl.prompts_per_step=33", "rl.group_size=1000"],
                          "66000 sequences")]:
        with pytest.raises(UserError, match=message):
            load_config(None, bad)


def test_cuda_is_refused_only_where_no_gpu_is_visible(monkeypatch):
    import longrl.config as config

    monkeypatch.setattr(config, "gpu_visible", lambda: True)
    assert load_config(None, ["model.device=cuda:1"]).model.device == "cuda:1"
    monkeypatch.setattr(config, "gpu_visible", lambda: False)
    with pytest.raises(UserError, match="model.device=cuda: no GPU is visible"):
        load_config(None, ["model.device=cuda"])
    assert load_config(None, ["model.device=cpu"]).model.device == "cpu"  # cpu and auto never look
    with pytest.raises(UserError, match="did you mean 'cuda'"):
        load_config(None, ["model.device=cdua"])


def test_gpu_visible_honours_an_empty_cuda_visible_devices(monkeypatch):
    from longrl.config import gpu_visible

    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert gpu_visible() is False
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    import glob
    import os

    assert gpu_visible() == (bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd"))


def test_yaml_is_read_as_utf8(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes("\ufeffrun:\n  name: café\n".encode("utf-8"))  # a BOM, as Windows editors write
    assert load_config(f).run.name == "café"
    f.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text .* at byte 16"):
        load_config(f)
