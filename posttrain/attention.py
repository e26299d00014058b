"""posttrain's attention function for HF models (``posttrain_sdpa``): SDPA, except where
torch's CPU SDPA kernel is measured slow in bf16.

Two cases are computed with plain matmuls instead (query heads grouped over their shared
key/value head, so nothing is repeated):

* **one query position** (a decoding step), any device: torch's CPU kernel took 4.3 ms for
  one bf16 decoding step of 48 rows (9 query / 3 key-value heads, 166 cached positions),
  the two matmuls 0.4 ms; summed over 30 layers that was most of a decoding step.
* **a whole sequence in bf16 on CPU** (training forward/backward, scoring, prefill): the
  flash kernel's backward ran at a fraction of the matmul rate on short sequences. Forward +
  backward of one layer (9 / 3 heads, head dim 64) took 8.7 -> 3.0 ms for 2 x 194 tokens,
  38 -> 17 ms for 8 x 256; the decoder of SmolLM2-135M, forward + backward,
  10-13% faster (``python benchmarks/precision_probe.py --only attention``). The scores are
  rounded to bf16 before the softmax, as HF's eager attention does under bf16; the softmax
  itself accumulates in float32 inside torch's kernel. Only while the ``(B, heads, L, L)``
  probabilities stay small (:data:`MAX_SCORES` elements a layer; they are kept for the
  backward pass). In float32 torch's kernel is as fast as this, so it is left alone there.

Everything else (dropout, soft-capping, attention sinks, a query shorter than the keys but
longer than one, large score matrices) goes to transformers' own SDPA function.
:func:`enable` switches a loaded model over (the name is not saved with the model: a saved
config still says ``sdpa``); :func:`enabled` does it for the length of a ``with`` block.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "posttrain_sdpa"
MAX_SCORES = 1 << 25  # elements of one layer's (B, heads, L, L) probabilities: 64 MB in bf16
_SPECIAL = ("softcap", "position_bias", "s_aux", "sinks")


def _grouped_scores(query, key, scaling):
    """``(B, Hk, G * Lq, Lk)`` scores of the queries grouped by their key/value head."""
    B, Hq, Lq, D = query.shape
    Hk = key.shape[1]
    q = (query * (scaling if scaling is not None else D**-0.5)).reshape(B, Hk, (Hq // Hk) * Lq, D)
    return torch.matmul(q, key.transpose(-1, -2))


def _mask_heads(mask, Hk: int, G: int):
    """A ``(B, 1 or Hq, Lq, Lk)`` mask shaped to broadcast over ``(B, Hk, G, Lq, Lk)``."""
    return mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], Hk, G, *mask.shape[2:])


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF attention function: ``(output (B, Lq, Hq, D), None)``; see the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, Lq, D = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    G = Hq // Hk
    special = dropout or any(kwargs.get(k) is not None for k in _SPECIAL) or Hq % Hk
    if not special and Lq == 1:
        scores = _grouped_scores(query, key, scaling).float()  # (B, Hk, G, Lk)
        if attention_mask is not None:  # True (or 0.0) where a position is seen
            m = attention_mask[:, :, -1:, :]
            m = m if m.shape[1] == 1 else m.reshape(m.shape[0], Hk, G, Lk)
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        out = torch.matmul(scores.softmax(-1).to(value.dtype), value)
        return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous(), None
    low_dtype = _low_precision(query)
    if not special and Lq == Lk and low_dtype is not None and B * Hq * Lq * Lk <= MAX_SCORES:
        with torch.autocast("cpu", enabled=False):
            return _sequence(module, *(t.to(low_dtype) for t in (query, key, value)), attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _low_precision(query) -> torch.dtype | None:
    """The bf16/fp16 dtype a CPU attention computes in: the query's own, or autocast's (under
    autocast the rotary embedding hands attention float32 queries, which SDPA casts itself)."""
    if query.device.type != "cpu":
        return None
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return None


def _sequence(module, query, key, value, attention_mask, scaling):
    """Whole-sequence attention in the inputs' (low) precision; ``(B, Lq, Hq, D)``."""
    B, Hq, Lq, D = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    G = Hq // Hk
    scores = _grouped_scores(query, key, scaling).view(B, Hk, G, Lq, Lk)
    low = torch.finfo(scores.dtype).min  # finite: a row with every key masked (left padding) stays finite
    if attention_mask is None:
        if getattr(module, "is_causal", True):
            scores = scores.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).triu(1), low)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~_mask_heads(attention_mask, Hk, G), low)
    else:
        scores = scores + _mask_heads(attention_mask, Hk, G).clamp(min=low).to(scores.dtype)
    probs = torch.softmax(scores, -1).view(B, Hk, G * Lq, Lk)
    out = torch.matmul(probs, value).view(B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`attention` (and SDPA's mask format for it) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def enable(model) -> bool:
    """Make ``model`` (a peft wrapper or not) attend with :func:`attention` when it uses SDPA;
    True if it does now."""
    from posttrain.models import unwrap_peft

    config = unwrap_peft(model).config
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa":
        register()
        config._attn_implementation = impl = NAME
    return impl == NAME


@contextmanager
def enabled(model):
    """:func:`enable` for the length of the block (the model's own setting back afterwards)."""
    from posttrain.models import unwrap_peft

    config = unwrap_peft(model).config
    before = getattr(config, "_attn_implementation", None)
    enable(model)
    try:
        yield model
    finally:
        config._attn_implementation = before
