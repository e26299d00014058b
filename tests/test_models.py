"""Model resolution: the embedded default (real conversion), local dirs, the offline HF cache, errors."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from posttrain import models


@pytest.mark.slow
def test_embedded_model_converts_once_and_loads_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path))
    # a half-written directory from a killed conversion is never used
    stale = tmp_path / "models" / f"{models.EMBEDDED_NAME}-{models.EMBEDDED_CACHE_VERSION}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{broken")
    path = models.embedded_model_dir()
    assert path == stale and (path / "posttrain_converted.json").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(path.parent.glob("*.tmp-*"))

    models.load_model(tmp_path / "models" / path.name)  # warm imports
    t0 = time.perf_counter()
    model, tok = models.load_model(models.EMBEDDED_NAME, with_tokenizer=True)
    assert time.perf_counter() - t0 < 2.0
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    # trainable (the GGUF-loaded model is not) and generates sensible text
    assert all(p.requires_grad for p in model.parameters())
    from posttrain.rollout import SamplingConfig, generate

    (reply,) = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                        SamplingConfig(max_new_tokens=12))
    assert "Paris" in reply


def test_missing_model_lists_what_was_tried(tmp_path):
    with pytest.raises(models.ModelNotFoundError) as e:
        models.resolve_model_path(str(tmp_path / "nope"))
    msg = str(e.value)
    assert "not found" in msg and "local directory" in msg and "nothing is downloaded" in msg
    with pytest.raises(models.ModelNotFoundError, match="local Hugging Face cache for hub id 'someone/absent'"):
        models.resolve_model_path("someone/absent")


def test_hub_id_from_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snap)
    (hub / "models--someone--tiny" / "refs").mkdir(parents=True)
    (hub / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    assert models.resolve_model_path("someone/tiny") == snap
    model = models.load_model("someone/tiny", "float32")
    assert model.config.num_hidden_layers == 2


def test_dtype_choice():
    assert models.pick_dtype("float32") == torch.float32
    assert models.pick_dtype("bfloat16") == torch.bfloat16
    assert models.pick_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_lora_defaults_target_attention_and_mlp(tiny_model_dir):
    model = models.load_model(tiny_model_dir, "float32")
    cfg = models.ModelConfig(lora=True, lora_r=4)
    peft_model = models.apply_lora(model, cfg)
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    targeted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert targeted == set(models.LORA_TARGETS["llama"])
    trainable, total = models.count_parameters(peft_model)
    assert 0 < trainable < total
