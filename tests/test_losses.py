"""SFT loss and the shared log-prob function against hand-computed values and transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data.tokenize import IGNORE
from posttrain.logprobs import token_logprobs
from posttrain.losses import sft_loss
from posttrain.models import load_model


def test_sft_loss_by_hand():
    """logprobs ln(1/2), ln(1/4) -> mean NLL = (ln2 + ln4)/2 = 1.5 ln 2.

    With a normaliser of 4 tokens (two micro-batches of 2), each micro-batch contributes
    its sum / 4, so two such halves add up to the full-batch mean.
    """
    lp = torch.log(torch.tensor([0.5, 0.25]))
    assert math.isclose(float(sft_loss(lp)), 1.5 * math.log(2), rel_tol=1e-6)
    assert math.isclose(float(sft_loss(lp, 4)), 0.75 * math.log(2), rel_tol=1e-6)
    empty = torch.zeros(0, requires_grad=True)
    assert float(sft_loss(empty)) == 0.0 and sft_loss(empty).requires_grad


def test_token_logprobs_match_full_log_softmax(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    ids = torch.tensor([[5, 17, 200, 31, 2, 9], [7, 8, 9, 10, 11, 12]])
    labels = ids.clone()
    labels[0, :3] = IGNORE  # prompt
    labels[1, :5] = IGNORE
    with torch.no_grad():
        got = token_logprobs(model, ids, labels)
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    want = torch.stack([logp[0, 2, 31], logp[0, 3, 2], logp[0, 4, 9], logp[1, 4, 12]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _tiny(kind: str):
    import transformers

    common = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}
    if kind == "cohere":
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.0625))
    if kind == "granite":
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=4.0))
    cfg = transformers.Gemma2Config(**common, final_logit_softcapping=3.0, query_pre_attn_scalar=8)
    cfg._attn_implementation = "eager"
    return transformers.Gemma2ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["cohere", "granite", "gemma2"])
def test_token_logprobs_apply_the_models_logit_scaling_and_softcapping(kind):
    """Cohere multiplies its logits, Granite divides them, Gemma-2 soft-caps them after the LM
    head: the log-probs (and their gradients) are those of the model's own forward."""
    torch.manual_seed(0)
    model = _tiny(kind).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits large enough for the cap and the scales to matter
    ref = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = token_logprobs(model, ids, ids, temperature=0.7)
    torch.testing.assert_close(got, ref.flatten(), atol=2e-5, rtol=1e-5)
    got.sum().backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    ref_lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None])
    ref_lp.sum().backward()
    torch.testing.assert_close(ours, model.lm_head.weight.grad, atol=1e-4, rtol=1e-4)


def test_token_logprobs_refuse_a_model_whose_logits_they_cannot_reproduce(monkeypatch):
    """An architecture outside the plain-head list is checked once against its own forward."""
    import transformers

    from posttrain import logprobs
    from posttrain.config import ConfigError

    monkeypatch.setattr(logprobs, "PLAIN_HEAD", set())  # llama checked like an unknown architecture
    common = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    ids = torch.randint(0, 97, (1, 6))
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    token_logprobs(plain, ids, ids)  # its forward is lm_head(decoder states): accepted

    class Scaled(transformers.LlamaForCausalLM):  # a transform no config key announces
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 3.0
            return out

    with pytest.raises(ConfigError, match="not supported"):
        token_logprobs(Scaled(transformers.LlamaConfig(**common)).eval(), ids, ids)


def test_sft_loss_equals_transformers_loss(tiny_model_dir):
    """Cross-check with the reference implementation: HF's shifted, -100-masked token-mean CE."""
    model = load_model(tiny_model_dir, "float32")
    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[mask == 0] = IGNORE
    with torch.no_grad():
        ours = sft_loss(token_logprobs(model, ids, labels, attention_mask=mask))
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_temperature_scales_logits(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    ids = torch.tensor([[5, 17, 200, 31]])
    with torch.no_grad():
        got = token_logprobs(model, ids, ids, temperature=0.7)
        logp = torch.log_softmax(model(ids).logits.float() / 0.7, -1)
    torch.testing.assert_close(got, logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature,bias,chunk", [(1.0, False, 3), (0.7, True, 4), (1.3, False, 100)])
def test_chunked_head_matches_full_logits_and_grads(temperature, bias, chunk):
    from posttrain.logprobs import head_logprobs

    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 10, 6, 17
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    up = torch.randn(n, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient

    logits = (h @ w.T + (b if bias else 0)) / temperature
    ref = -torch.nn.functional.cross_entropy(logits, t, reduction="none")
    logp = torch.log_softmax(logits, -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ref_grads = torch.autograd.grad((ref * up).sum(), [h, w] + ([b] if bias else []))

    lp, ent = head_logprobs(h, w, b, t, temperature, want_entropy=True, chunk=chunk)
    grads = torch.autograd.grad((lp * up).sum(), [h, w] + ([b] if bias else []))
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # forward-only path: same values, nothing saved
        lp2, none = head_logprobs(h, w, b, t, temperature)
    assert none is None
    torch.testing.assert_close(lp2, lp.detach())


def test_chunked_head_gradcheck():
    from posttrain.logprobs import head_logprobs

    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 2, 2, 5])
    torch.autograd.gradcheck(lambda h, w, b: head_logprobs(h, w, b, t, 0.9, chunk=2)[0], (h, w, b))
    # the path that recomputes the softmax in backward instead of keeping it
    torch.autograd.gradcheck(lambda h, w, b: head_logprobs(h, w, b, t, 0.9, chunk=2, save_bytes=0)[0], (h, w, b))


def test_chunked_head_kept_softmax_equals_recomputed():
    from posttrain.logprobs import head_logprobs

    g = torch.Generator().manual_seed(2)
    h0, w0 = torch.randn(9, 4, generator=g), torch.randn(11, 4, generator=g)
    t = torch.randint(0, 11, (9,), generator=g)
    up = torch.randn(9, generator=g)
    grads = []
    for save in (0, 1 << 30):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = head_logprobs(h, w, None, t, 0.7, want_entropy=True, chunk=4, save_bytes=save)
        (lp * up).sum().backward()
        ref = torch.log_softmax((h0 @ w0.T) / 0.7, -1)
        torch.testing.assert_close(lp.detach(), ref.gather(1, t[:, None]).squeeze(1))
        torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_chunked_head_bf16_compute_matches_autocast():
    """compute_dtype=bf16 on float32 inputs: the same log-probs and gradients as plain autograd
    over ``h @ w.T`` under bf16 autocast (the logits rounded to bf16, the loss in fp32), with
    the gradients returned in float32."""
    from posttrain.logprobs import head_logprobs

    g = torch.Generator().manual_seed(3)
    h0, w0, b0 = torch.randn(9, 8, generator=g), torch.randn(13, 8, generator=g), torch.randn(13, generator=g)
    t = torch.randint(0, 13, (9,), generator=g)
    up = torch.randn(9, generator=g)
    h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
    lp, _ = head_logprobs(h, w, b, t, 1.0, chunk=4, compute_dtype=torch.bfloat16)
    (lp * up).sum().backward()
    hr, wr, br = (x.clone().requires_grad_() for x in (h0, w0, b0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hr, wr, br)
    ref = torch.log_softmax(logits.float(), -1).gather(1, t[:, None]).squeeze(1)
    (ref * up).sum().backward()
    assert lp.dtype == h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    torch.testing.assert_close(lp.detach(), ref.detach())
    for ours, theirs in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
