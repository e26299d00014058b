"""posttrain's attention function (posttrain.attention) against transformers' SDPA function."""

from __future__ import annotations

import types

import pytest
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


def _sequence_mask(B: int, L: int, left: int, right: int) -> torch.Tensor:
    """SDPA-style bool mask (True = attend): causal, row 1 left-padded, row 2 right-padded."""
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :left] = False
    keep[2, L - right:] = False
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return causal[None, None] & keep[:, None, None, :]


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-autocast"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
def test_bf16_sequence_matches_sdpa_forward_and_backward(masked, autocast):
    """A whole bf16 sequence on CPU (the training path; under autocast the queries arrive in
    float32): output and gradients equal SDPA's to bf16 rounding, with the causal mask implied
    (no mask) or given with left and right padding; a query row that sees no key at all (left
    padding) stays finite."""
    torch.manual_seed(0)
    B, Hq, Hk, L, D = 3, 6, 2, 13, 16
    mask = _sequence_mask(B, L, left=4, right=3) if masked else None
    base = [torch.randn(B, h, L, D) for h in (Hq, Hk, Hk)]
    grads = {}
    outs = {}
    for name, fn in (("ours", attention.attention), ("sdpa", _sdpa)):
        q, k, v = ((t.clone() if autocast else t.bfloat16()).requires_grad_(True) for t in base)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fn(MODULE, q, k, v, mask, scaling=0.25)
        assert out.dtype == torch.bfloat16
        w = torch.linspace(-1, 1, out.numel()).view_as(out)
        valid = mask.any(-1).transpose(1, 2)[..., None] if masked else torch.ones(1, 1, 1, 1, dtype=torch.bool)
        (out.float() * w * valid).sum().backward()
        outs[name] = out.float() * valid
        grads[name] = [t.grad.float() for t in (q, k, v)]
        assert torch.isfinite(out.float()).all() and all(torch.isfinite(g).all() for g in grads[name])
    assert outs["ours"].shape == (B, L, Hq, D)
    torch.testing.assert_close(outs["ours"], outs["sdpa"], rtol=0, atol=3e-2)
    for got, want in zip(grads["ours"], grads["sdpa"]):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-2)


def test_float32_and_long_queries_go_to_sdpa(monkeypatch):
    """float32 sequences, a query block shorter than the keys, and score matrices over the
    limit are SDPA's (identical results)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    assert torch.equal(attention.attention(MODULE, q, k, v, None)[0], _sdpa(MODULE, q, k, v, None)[0])
    q2 = torch.randn(2, 6, 3, 8)
    assert torch.equal(attention.attention(MODULE, q2, k, v, None)[0], _sdpa(MODULE, q2, k, v, None)[0])
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    monkeypatch.setattr(attention, "MAX_SCORES", 10)
    assert torch.equal(attention.attention(MODULE, qb, kb, vb, None)[0], _sdpa(MODULE, qb, kb, vb, None)[0])


def test_loaded_models_use_it_and_save_plain_sdpa(tiny_model_dir, tmp_path):
    """load_model switches SDPA models to posttrain_sdpa; a saved config still loads anywhere,
    and a mixed-precision forward gives the same loss as with SDPA."""
    import json

    from posttrain.models import load_model

    model = load_model(str(tiny_model_dir), dtype="float32")
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path / "saved")
    assert "posttrain" not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    losses = []
    for impl in (attention.NAME, "sdpa"):
        model.config._attn_implementation = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(model(input_ids=ids, attention_mask=mask, labels=ids).loss.float())
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=0)
