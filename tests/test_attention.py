"""posttrain's attention function (posttrain.attention) against transformers' SDPA function."""

from __future__ import annotations

import types

import torch

from posttrain import attention


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


MODULE = types.SimpleNamespace(num_key_value_groups=3, is_causal=True)


def test_one_query_matches_sdpa():
    """A decoding step (one query position): grouped key/value heads, a left-padded row."""
    torch.manual_seed(0)
    B, Hq, Hk, L, D = 3, 6, 2, 11, 16
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hk, L, D), torch.randn(B, Hk, L, D)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[1, ..., :4] = False
    for m in (mask, None):
        got, _ = attention.attention(MODULE, q, k, v, m, scaling=0.3)
        want, _ = _sdpa(MODULE, q, k, v, m, scaling=0.3)
        assert got.shape == want.shape == (B, 1, Hq, D)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_query_blocks_go_to_sdpa():
    """More than one query position (training, scoring, prefill) is SDPA's own (identical)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    for qq in (q, q.bfloat16()):
        kk, vv = k.to(qq.dtype), v.to(qq.dtype)
        assert torch.equal(attention.attention(MODULE, qq, kk, vv, None)[0], _sdpa(MODULE, qq, kk, vv, None)[0])


def test_enabled_switches_and_restores(tiny_model_dir):
    from posttrain.models import load_model

    model = load_model(str(tiny_model_dir), dtype="float32")
    assert model.config._attn_implementation == "sdpa"
    with attention.enabled(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"
