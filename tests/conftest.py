"""Shared fixtures: the SmolLM2 tokenizer (from the embedded model) and tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# model.dtype=auto means float32 in the tests (and in the processes they start), whatever this
# machine's bf16 speed: their exact comparisons (two processes vs one, resume, TRL cross-checks)
# are float32 facts. Mixed precision is tested explicitly (test_models.py).
os.environ.setdefault("POSTTRAIN_DTYPE", "float32")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer and chat template (converts the embedded model once, cached)."""
    from posttrain.models import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())


def make_tiny_llama(tok, out: Path, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer Llama with the SmolLM2 tokenizer, random weights, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(48)]
    return write_jsonl(tmp_path / "chat.jsonl", rows)
