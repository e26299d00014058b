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


def test_an_unreadable_model_directory_names_itself(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(models.ModelLoadError, match=f"{broken}: could not load the model"):
        models.load_model(str(broken))
    for f in broken.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(models.ModelLoadError, match=f"{broken}: could not load the tokenizer"):
        models.load_tokenizer(broken)


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


def test_dtype_choice(monkeypatch):
    assert models.pick_precision("float32").weights == torch.float32
    assert models.pick_precision("bfloat16").weights == torch.bfloat16
    P = models.Precision
    assert models.pick_precision("bf16-mixed") == P(torch.float32, torch.bfloat16)
    assert models.pick_precision("bfloat16") == P(torch.bfloat16)  # pure bf16 only when asked for
    assert str(P(torch.float32, torch.bfloat16)) == "float32 weights, bfloat16 autocast"
    monkeypatch.delenv("POSTTRAIN_DTYPE", raising=False)
    # auto never trains pure-bf16 weights: float32, with bf16 autocast where bf16 is fast
    assert models.pick_precision("auto", "cpu") in (P(torch.float32), P(torch.float32, torch.bfloat16))
    monkeypatch.setenv("POSTTRAIN_DTYPE", "bf16-mixed")
    assert models.pick_precision("auto", "cpu") == P(torch.float32, torch.bfloat16)


def test_mixed_precision_forward_is_bf16_and_returns_float32(tiny_model_dir):
    """bf16-mixed: float32 weights; the decoder runs under bf16 autocast, log-probs come back
    float32 and within bf16 rounding of the float32 model's."""
    from posttrain.logprobs import token_logprobs

    fp32 = models.load_model(tiny_model_dir, "float32")
    mixed = models.load_model(tiny_model_dir, "bf16-mixed")
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = mixed.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    lp_mixed = token_logprobs(mixed, ids, ids)
    hook.remove()
    lp_fp32 = token_logprobs(fp32, ids, ids)
    assert seen == [torch.bfloat16] and lp_mixed.dtype == torch.float32
    assert not torch.equal(lp_mixed, lp_fp32)
    torch.testing.assert_close(lp_mixed, lp_fp32, rtol=0.02, atol=0.05)


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


def test_checkpointing_gives_the_same_gradients_without_a_deprecation_warning(tiny_model_dir):
    """Activation checkpointing (LoRA and full): the same loss and gradients as without it,
    and transformers' deprecated alias (a FutureWarning per load) is not used."""
    import warnings

    from posttrain.logprobs import token_logprobs

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for lora in (True, False):
        grads = []
        for ckpt in (False, True):
            cfg = models.ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", lora=lora, lora_r=4,
                                     lora_dropout=0.0, gradient_checkpointing=ckpt)
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                model, _, _ = models.prepare_model(cfg)
            model.train()
            assert _checkpointing_on(model) is ckpt
            token_logprobs(model, ids, ids).sum().backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def _checkpointing_on(model) -> bool:
    inner = models.unwrap_peft(model)
    name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(inner, name))


def test_sliding_window_models_run_shared_prefix_rows_only_within_their_window():
    """A prompt-sharing row's block mask carries no sliding window, so sharing is turned off
    where a sequence can pass the window (the same log-probs as separate rows otherwise)."""
    import transformers

    from posttrain.models import prefix_sharing_exact, sliding_window

    small = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    assert sliding_window(transformers.LlamaConfig(**small)) is None
    assert sliding_window(transformers.MistralConfig(**small, sliding_window=16)) == 16
    assert sliding_window(transformers.MistralConfig(**small, sliding_window=None)) is None
    assert sliding_window(transformers.Qwen2Config(**small)) is None  # use_sliding_window off by default
    assert sliding_window(transformers.Qwen2Config(**small, use_sliding_window=True, sliding_window=16,
                                                   max_window_layers=0)) == 16
    assert sliding_window(transformers.Gemma2Config(**small, sliding_window=16)) == 16
    mistral = transformers.MistralConfig(**small, sliding_window=16)
    assert prefix_sharing_exact(mistral, 16, "dpo") and not prefix_sharing_exact(mistral, 17, "dpo")
    assert prefix_sharing_exact(transformers.LlamaConfig(**small), 10_000, "dpo")
