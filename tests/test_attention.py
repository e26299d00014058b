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


def _qkv(B, Hq, Hk, L, D, dtype=torch.float32):
    # laid out as HF passes them: (B, L, H, D) transposed to (B, H, L, D)
    def t(h):
        return torch.randn(B, L, h, D).transpose(1, 2).to(dtype).requires_grad_()
    return t(Hq), t(Hk), t(Hk)


def test_whole_sequences_match_sdpa_values_and_gradients():
    """Several query positions on a CPU (training, scoring, prefill): float32 grouped matmuls,
    the same outputs and gradients as SDPA for a padding mask, a 4D prefix-sharing-style mask,
    an additive mask and no mask (causal)."""
    torch.manual_seed(0)
    B, Hq, Hk, L, D = 2, 6, 2, 7, 8
    pad = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    pad[1, ..., 5:] = False  # right padding of row 1: its last queries see only real keys
    pad[1, :, torch.arange(5, L), torch.arange(5, L)] = True
    block = pad.clone()
    block[0, 0, 4:, 1:4] = False  # a second sequence in row 0 that does not see positions 1-3
    additive = torch.zeros(B, 1, L, L).masked_fill(~pad, torch.finfo(torch.float32).min)
    for m in (pad, block, additive, None):
        q, k, v = _qkv(B, Hq, Hk, L, D)
        got, _ = attention.attention(MODULE, q, k, v, m, scaling=0.3)
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
        want, _ = _sdpa(MODULE, q, k, v, m, scaling=0.3)
        want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
        assert got.shape == want.shape == (B, L, Hq, D)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_whole_sequences_bf16_inputs_float32_scores():
    """bf16 inputs (mixed precision): bf16 output, computed from float32 scores, so it is
    within bf16 rounding of a float32 reference on the same (rounded) inputs."""
    torch.manual_seed(0)
    q, k, v = _qkv(2, 6, 2, 9, 8, torch.bfloat16)
    got, _ = attention.attention(MODULE, q, k, v, None)
    assert got.dtype == torch.bfloat16
    want, _ = _sdpa(MODULE, q.float(), k.float(), v.float(), None)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_whole_sequences_over_budget_go_to_sdpa(monkeypatch):
    """Scores larger than the budget (autograd would keep them for every layer): SDPA's own."""
    torch.manual_seed(0)
    q, k, v = _qkv(2, 6, 2, 5, 8)
    monkeypatch.setattr(attention, "SCORES_BUDGET_BYTES", 2 * 6 * 5 * 5 * 4 - 1)
    assert torch.equal(attention.attention(MODULE, q, k, v, None)[0], _sdpa(MODULE, q, k, v, None)[0])


def test_long_float32_sequences_go_to_sdpa(monkeypatch):
    """Float32 inputs with more keys than FLOAT32_MAX_KEYS: torch's flash kernel (faster there on a
    CPU, and it keeps no probabilities); bf16 inputs of the same length stay on the matmul path."""
    torch.manual_seed(0)
    q, k, v = _qkv(2, 6, 2, 5, 8)
    monkeypatch.setattr(attention, "FLOAT32_MAX_KEYS", 4)
    assert torch.equal(attention.attention(MODULE, q, k, v, None)[0], _sdpa(MODULE, q, k, v, None)[0])
    called = []
    monkeypatch.setattr(attention, "_whole_sequence", lambda *a: called.append(1) or a[0].transpose(1, 2))
    attention.attention(MODULE, q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert called
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast: the matmul path
        attention.attention(MODULE, q, k, v, None)
    assert len(called) == 2
    monkeypatch.setattr(attention, "FLOAT32_MAX_KEYS", 5)
    attention.attention(MODULE, q, k, v, None)
    assert len(called) == 3


def test_boolean_masks_to_sdpa_convert_once_per_pass(monkeypatch):
    """A boolean mask going to torch's SDPA under autograd is converted to the additive float
    mask once for every call that gets the same mask (each call would otherwise save its own
    float copy for backward): the same outputs and gradients as SDPA given the boolean mask,
    one float tensor shared by the "layers", a fresh one for another mask or a changed one."""
    torch.manual_seed(0)
    B, Hq, Hk, L, D = 2, 6, 2, 9, 8
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    mask[0, 0, 5:, 1:4] = False  # a prefix-sharing-style block
    monkeypatch.setattr(attention, "FLOAT32_MAX_KEYS", 4)  # float32 over 4 keys: SDPA
    seen = []
    real = attention.additive_mask
    monkeypatch.setattr(attention, "additive_mask", lambda m, d: seen.append(real(m, d)) or seen[-1])
    q, k, v = _qkv(B, Hq, Hk, L, D)
    outs = [attention.attention(MODULE, q, k, v, mask)[0] for _ in range(3)]  # three "layers"
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), (q, k, v))
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2] and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))
    want = [_sdpa(MODULE, q, k, v, mask)[0] for _ in range(3)]
    want_grads = torch.autograd.grad(sum(o.square().sum() for o in want), (q, k, v))
    for g, w in zip(outs + list(grads), want + list(want_grads)):
        assert torch.equal(g, w)
    other = mask.clone()
    assert real(other, torch.float32) is not seen[0]
    kept = seen[0]
    mask[1, 0, 8, 0] = False  # changed in place: converted again
    assert real(mask, torch.float32) is not kept
    with torch.no_grad():  # no autograd, nothing saved: SDPA converts the boolean mask itself
        attention.attention(MODULE, q, k, v, mask)
    assert len(seen) == 3


def test_whole_sequences_under_autocast_compute_in_float32():
    """Under bf16 autocast (mixed precision: the rotary embedding hands float32 queries and keys,
    the value projection bf16 values) the whole-sequence path still computes in float32: the
    same output and gradients as with autocast off, not autocast's bf16 matmuls."""
    torch.manual_seed(0)
    q, k, v = _qkv(2, 6, 2, 9, 8)
    v = v.bfloat16().detach().requires_grad_()
    outs = []
    for enabled in (False, True):
        q.grad = k.grad = v.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out, _ = attention.attention(MODULE, q, k, v, None)
        out.float().sum().backward()
        outs.append((out, q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_auto_attention_trains_like_sdpa(tiny_model_dir):
    """``attn_implementation: auto`` (the default) gives SDPA's loss and gradients on a padded batch,
    and the saved checkpoint's config does not name posttrain's function."""
    from posttrain.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    out = {}
    for impl in ("auto", "sdpa"):
        model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation=impl)
        assert model.config._attn_implementation == (attention.NAME if impl == "auto" else "sdpa")
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        out[impl] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(out["auto"][0], out["sdpa"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["auto"][1], out["sdpa"][1], rtol=1e-4, atol=1e-6)


def test_enabled_switches_and_restores(tiny_model_dir):
    from posttrain.models import load_model

    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    with attention.enabled(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"
