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


@pytest.mark.parametrize("override,message", [
    ("lr=nan", "lr: expected a finite number"),
    ("lr=inf", "lr: expected a finite number"),
    ("lr=-1", "lr must be >= 0"),
    ("max_steps=-5", "max_steps must be >= 0"),
    ("adam_beta1=2", r"adam_beta1 must be in \[0, 1\)"),
    ("warmup_ratio=2", r"warmup_ratio must be in \[0, 1\]"),
    ("log_every=0", "log_every must be >= 1"),
    ("data.max_examples=-3", "data.max_examples must be >= 0"),
])
def test_out_of_range_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, None, [override])


def test_out_of_range_sampling_values_are_config_errors():
    from posttrain.stages.online_rl import GRPOConfig

    for override, message in (("sampling.max_new_tokens=0", "sampling.max_new_tokens must be >= 1"),
                              ("sampling.top_k=-3", "sampling.top_k must be >= 0"),
                              ("sampling.top_p=0", r"sampling.top_p must be in \(0, 1\]")):
        with pytest.raises(ConfigError, match=message):
            load_config(GRPOConfig, None, [override])


def test_a_dotted_override_under_a_plain_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: some/path\n")
    with pytest.raises(ConfigError, match="'model' is set to 'some/path', not a section"):
        load_config(SFTConfig, f, ["model.name_or_path=other"])


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


def test_a_key_written_twice_in_yaml_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: a.jsonl\n  eval: b.jsonl\nlr: 1.0e-4\ndata:\n  max_length: 256\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: key 'data' is written twice in one mapping \(first at line 1\)"):
        load_config(SFTConfig, p)


@pytest.mark.parametrize("raw,paths", [
    ("/tmp/a #1.jsonl", ["/tmp/a #1.jsonl"]),  # not a YAML comment
    ('"/tmp/x,y.jsonl"', ["/tmp/x,y.jsonl"]),  # quoted: one path, comma and all
    ("/tmp/a: b.jsonl", ["/tmp/a: b.jsonl"]),  # not a mapping
    ("a.jsonl,b.jsonl", ["a.jsonl", "b.jsonl"]),
    ("[{path: a.jsonl, weight: 2}, b.jsonl]", ["a.jsonl", "b.jsonl"]),
])
def test_data_path_overrides_are_paths_as_written(raw, paths):
    assert [s.path for s in load_config(SFTConfig, None, [f"data.train={raw}"]).data.train] == paths


def test_a_run_checks_its_directory_and_data_before_writing_anything(tmp_path, monkeypatch):
    """An empty output_dir (the current directory) and a missing data file are errors before the
    run directory is made; ~ in output_dir and data paths is the home directory."""
    from posttrain import engine

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(SFTConfig, None, ["data.train=~/d.jsonl", "output_dir=~/runs/x"])
    with pytest.raises(ConfigError, match="output_dir: empty"):
        engine.setup_run("", "sft", cfg, ["~/d.jsonl"])
    with pytest.raises(ConfigError, match="data file not found: ~/d.jsonl"):
        engine.setup_run(cfg.output_dir, "sft", cfg, ["~/d.jsonl"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no literal "~" directory
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "d.jsonl").write_text('{"text": "a"}\n')
    out = engine.setup_run(cfg.output_dir, "sft", cfg, ["~/d.jsonl"])
    assert out == tmp_path / "home" / "runs" / "x" and (out / "manifest.json").is_file()


def test_yaml_merge_keys_still_load_and_may_be_overridden(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: &b {lr: 1.0e-3, max_steps: 7}\nmodel: {lora: true}\n<<: *b\nlr: 2.0e-4\n")
    from posttrain.config import read_yaml

    assert read_yaml(p)["lr"] == 2.0e-4 and read_yaml(p)["max_steps"] == 7
