import pytest

from posttrain.config import ConfigError, describe, load_config
from posttrain.stages.sft import SFTConfig


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-4\nmodel:\n  lora: true\ndata:\n  train:\n    - path: a.jsonl\n      weight: 2\n")
    cfg = load_config(SFTConfig, f, ["model.lora_r=4", "batch_size=2", "data.max_length=64"])
    assert cfg.lr == pytest.approx(1e-4) and cfg.model.lora and cfg.model.lora_r == 4
    assert cfg.batch_size == 2 and cfg.data.max_length == 64
    assert cfg.data.train[0].path == "a.jsonl" and cfg.data.train[0].weight == 2.0


def test_sources_from_comma_list():
    cfg = load_config(SFTConfig, None, ["data.train=a.jsonl,b.parquet"])
    assert [s.path for s in cfg.data.train] == ["a.jsonl", "b.parquet"]


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        load_config(SFTConfig, None, ["batchsize=3"])
    with pytest.raises(ConfigError, match="model.lora_rank.*lora_r"):
        load_config(SFTConfig, None, ["model.lora_rank=3"])


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_lenght: 5\n")
    with pytest.raises(ConfigError, match="data.max_lenght.*max_length"):
        load_config(SFTConfig, f)


def test_type_and_value_errors():
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        load_config(SFTConfig, None, ["batch_size=two"])
    with pytest.raises(ConfigError, match="too_long"):
        load_config(SFTConfig, None, ["data.too_long=cut"])
    with pytest.raises(ConfigError, match="batching"):
        load_config(SFTConfig, None, ["batching=packed"])


def test_every_key_documented():
    rows = describe(SFTConfig)
    keys = [r[0] for r in rows]
    assert "model.lora_r" in keys and "data.too_long" in keys and "lr" in keys
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]


def test_partial_section_keeps_the_stage_defaults():
    """RL stages default sampling.temperature to 1.0 (the section class says 0.0); setting
    only sampling.max_new_tokens must not silently fall back to greedy decoding."""
    from posttrain.stages.online_rl import GRPOConfig

    cfg = load_config(GRPOConfig, None, ["sampling.max_new_tokens=12"])
    assert cfg.sampling.max_new_tokens == 12 and cfg.sampling.temperature == 1.0
