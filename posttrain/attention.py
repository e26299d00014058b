"""posttrain's attention function for HF models (``posttrain_sdpa``, what ``model.attn_implementation:
auto`` loads): torch's SDPA, except in two cases on a CPU.

One query position (a decoding step): two small matmuls with the query heads grouped over
their shared key/value head do the work (nothing is repeated). torch's CPU SDPA kernel took
4.3 ms for one bf16 decoding step of 48 rows (9 query / 3 key-value heads, 166 cached
positions), the two matmuls 0.4 ms; summed over 30 layers that was most of a decoding step.
The matmuls run in the cache's dtype and the softmax in float32, as HF's eager attention does.

Whole sequences (training passes, reference passes, prefill) whose ``(B, heads, Lq, Lk)``
scores fit :data:`SCORES_BUDGET_BYTES` (in float32, only up to :data:`FLOAT32_MAX_KEYS` keys): everything in float32 (queries, keys and values cast
up, scores as one ``baddbmm`` with the mask as its additive input, softmax, one ``bmm`` with
the values), the query heads grouped over their key/value head. Measured on the 2-core CPU
(SmolLM2-135M's 9/3 heads, bf16 inputs, 8 x 134 tokens, forward + backward of one layer):
12-14 ms against 22-26 ms for torch's CPU flash kernel, whose backward is slow; that is
~0.3 s of a ~3.2 s SFT step. Autograd keeps each layer's float32 probabilities for backward
(flash keeps only a log-sum-exp per row), hence the budget: above it, SDPA as before. The
float32 scores are at least as precise as the flash kernel's (bf16 inputs, float32
accumulation).

Under bf16 autocast (mixed precision) the path runs with autocast off: until 2026-12-04 it did
not, so autocast ran its ``baddbmm``/``bmm`` in bf16 and the softmax on bf16 scores (the variant
dropped below) for rows up to 160 keys, while longer rows went to SDPA, which autocast also runs
in bf16. Measured on the 2-core AVX-512 BF16 CPU (machine C), forward + backward of one layer
under autocast (``python benchmarks/attention_paths.py``), this path in float32 against SDPA:
8 x 134 keys 15.5 vs 27.5 ms, 8 x 182 22.2 vs 39.0, 2 x 384 17.9 vs 23.5, 1 x 600 24.1 vs 27.8.
A whole step of the SFT benchmark (``python benchmarks/profile_step.py --batch 4``, against the
same with ``POSTTRAIN_ATTN_SCORES_MIB=0``, SDPA always): at 8 x 182 tokens 4.23 vs 4.78 s, at
8 x 134 (``--batch 10``) 2.96 vs 3.58 s. (The bf16 variant, no longer reachable, was faster
still on short rows, at the precision cost below.)

Tried and dropped: the same whole sequences in bf16 (scores as a bf16 matmul, then the
softmax). The decoder's forward + backward was 11-12% faster than with torch's flash kernel,
but the demo's cold start trained with it scored 41.5% on 400 held-out questions against
47.0% and 47.8% for two runs with the flash kernel (same recipe and seed): scores rounded to
bf16 before the softmax cost more accuracy than the time saved buys back. Also tried: a
float32 function that keeps only the log-sum-exp and recomputes the scores in backward (as
flash does): slower than the flash kernel here (30 ms).

:func:`use` switches a model to it for good (``attn_implementation: auto``); :func:`enabled`
for the length of a ``with`` block (the rollout's decoding loop, for models loaded with
``sdpa``).
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch

NAME = "posttrain_sdpa"
_SPECIAL = ("softcap", "position_bias", "s_aux", "sinks")

#: Largest float32 ``(B, query heads, Lq, Lk)`` score tensor (per layer) computed by the
#: float32 whole-sequence path; autograd keeps one per layer for backward. 32 MiB holds 8 x 256
#: tokens with 9 heads. Env ``POSTTRAIN_ATTN_SCORES_MIB`` overrides it (0 = always SDPA).
SCORES_BUDGET_BYTES = int(os.environ.get("POSTTRAIN_ATTN_SCORES_MIB", "32")) * 2**20

#: Float32 inputs outside autocast (pure float32 training) take the whole-sequence path only up
#: to this many keys. Measured on the 2-core AVX2 CPU (machine D; SmolLM2's 9/3 heads, forward +
#: backward of one layer, causal mask): at 160
#: keys both took the same time (1 x 160: 2.5 ms, 8 x 160: 19.9 ms), above it torch's flash
#: kernel was faster (1 x 320: 9.2 vs 7.5 ms; 8 x 256: 49 vs 40 ms) and keeps no probabilities
#: (in online RL's prefix-shared rows of 256-450 tokens those were ~100 MB across 30 layers);
#: below it the matmuls were (8 x 134: 12.6 vs 16.7 ms; 16 x 64: 5.9 vs 8.4 ms).
FLOAT32_MAX_KEYS = 160


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF attention function: ``(output (B, Lq, Hq, D), None)``; see the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, Lq, D = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    G = Hq // Hk
    special = dropout or any(kwargs.get(k) is not None for k in _SPECIAL) or Hq % Hk
    if not special and Lq == 1:
        q = query.reshape(B, Hk, G, D)
        scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else D**-0.5)
        if attention_mask is not None:  # True (or 0.0) where a position is seen
            m = attention_mask[:, :, -1:, :]
            m = m if m.shape[1] == 1 else m.reshape(m.shape[0], Hk, G, Lk)
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        out = torch.matmul(scores.softmax(-1).to(value.dtype), value)
        return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous(), None
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    # float32 attention with no autocast: torch's flash kernel runs in float32 too and is faster
    # over many keys; under autocast SDPA runs in bf16, slower than this path at every length
    # measured (module docstring)
    pure_f32 = query.dtype == torch.float32 and not torch.is_autocast_enabled(query.device.type)
    if (not special and Lq > 1 and query.device.type == "cpu" and B * Hq * Lq * Lk * 4 <= SCORES_BUDGET_BYTES
            and (not pure_f32 or Lk <= FLOAT32_MAX_KEYS)
            and (attention_mask is not None or (causal and Lq == Lk))):
        with torch.autocast(query.device.type, enabled=False):  # float32 as written, also under autocast
            out = _whole_sequence(query, key, value, attention_mask, D**-0.5 if scaling is None else scaling)
        return out, None
    if attention_mask is not None and attention_mask.dtype == torch.bool and query.device.type == "cpu" \
            and torch.is_grad_enabled():
        attention_mask = additive_mask(attention_mask, query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_ADDITIVE: dict[str, object] = {}


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean ``mask`` (True = seen) as SDPA's additive float mask (0 / -inf), made once
    for all the layers of a forward pass that get the same mask tensor.

    Given a boolean mask, torch's CPU SDPA converts it to a float mask of the query's dtype
    inside every call and, under autograd, saves that copy for the backward: one ``(B, 1, T, T)``
    float tensor per layer. For online RL's prefix-shared rows (a prompt and its 8 completions,
    up to ~5,000 tokens) that is 100 MB a layer, 3 GB a row over SmolLM2's 30 layers, and it
    took the main job's GRPO stage out of memory (24 GB) on 2026-12-05. Converted here, the 30
    layers save one tensor (measured with torch's SDPA alone, 6 calls at 5,000 tokens: +624 MB
    with the boolean mask, +27 MB with one float mask). The same values as torch's own
    conversion (``-inf`` where not seen), so the same outputs and gradients. The cache holds
    weak references: the float mask lives as long as autograd keeps it."""
    if torch.is_autocast_enabled(mask.device.type):  # SDPA then runs in the autocast dtype
        dtype = torch.get_autocast_dtype(mask.device.type)
    src, out = (ref() if ref is not None else None for ref in (_ADDITIVE.get("src"), _ADDITIVE.get("out")))
    if src is mask and out is not None and out.dtype == dtype and _ADDITIVE.get("version") == mask._version:
        return out
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _ADDITIVE.update(src=weakref.ref(mask), out=weakref.ref(out), version=mask._version)
    return out


def _whole_sequence(query, key, value, attention_mask, scale: float) -> torch.Tensor:
    """Float32 attention of ``query`` ``(B, Hq, Lq, D)`` over ``key``/``value`` ``(B, Hk, Lk, D)``
    with a boolean (True = seen) or additive mask broadcastable to ``(B, Hq, Lq, Lk)``, or a
    causal one when it is None; ``(B, Lq, Hq, D)`` in the query's dtype."""
    B, Hq, Lq, D = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    G = Hq // Hk
    f32 = torch.float32
    # (B*Hk, G*Lq, D): the G query heads of one key/value head stacked, so no key is repeated
    q = query.to(f32, memory_format=torch.contiguous_format).reshape(B * Hk, G * Lq, D)
    k = key.to(f32, memory_format=torch.contiguous_format).reshape(B * Hk, Lk, D)
    v = value.to(f32, memory_format=torch.contiguous_format).reshape(B * Hk, Lk, D)
    if attention_mask is None:
        attention_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()
    if attention_mask.dtype == torch.bool:  # a large finite negative: a row with nothing seen stays finite
        bias = torch.zeros(attention_mask.shape, dtype=f32, device=query.device)
        bias.masked_fill_(~attention_mask, torch.finfo(f32).min)
    else:
        bias = attention_mask.to(f32)
    bias = bias.expand(B, Hq, Lq, Lk).reshape(B, Hk, G, Lq, Lk).reshape(B * Hk, G * Lq, Lk)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # (B*Hk, G*Lq, Lk)
    out = torch.bmm(torch.softmax(scores, -1), v).to(query.dtype)  # (B*Hk, G*Lq, D)
    return out.reshape(B, Hq, Lq, D).transpose(1, 2).contiguous()


def register() -> None:
    """Register :func:`attention` (and SDPA's mask format for it) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use(model) -> None:
    """Switch ``model`` (a peft wrapper or not) to :func:`attention` for good when it uses SDPA
    (not saved: a checkpoint's config still says what transformers loads by default)."""
    from posttrain.models import unwrap_peft

    config = unwrap_peft(model).config
    if getattr(config, "_attn_implementation", None) == "sdpa":
        register()
        config._attn_implementation = NAME


@contextmanager
def enabled(model):
    """``model`` (a peft wrapper or not) attends with :func:`attention` for the length of the
    block when it uses SDPA; its own setting comes back afterwards."""
    from posttrain.models import unwrap_peft

    config = unwrap_peft(model).config
    before = getattr(config, "_attn_implementation", None)
    use(model)
    try:
        yield model
    finally:
        config._attn_implementation = before
