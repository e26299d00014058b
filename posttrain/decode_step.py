"""One decoding step of a Llama-family model in a few fused operations (the rollout's fast path).

HF's forward for one new token per row runs every module on its own: three projections for
the query, key and value, two for the MLP's gate and up halves, a mask built for the whole
sequence, and per-module bookkeeping, thirty layers deep. :class:`FusedDecoder` runs the same
arithmetic with the query/key/value projections as one matmul and the gate/up projections as
one, the padding mask made once per step, and the keys and values written straight into the
rollout's preallocated cache (:func:`posttrain.rollout.preallocated_cache`).

It is used on a bf16 decoding copy (:func:`posttrain.rollout.decode_copy`), whose q/k/v and
gate/up weights are made views of one fused tensor each when the copy is built
(:func:`fuse_into`): refreshing the copy from the trained weights then refreshes the fused
ones, and the fusion costs no memory; and on models loaded for inference only
(``load_model(inference=True)``: evaluation, rejection sampling), fused in place.
Architectures: ``llama`` and ``qwen2`` (the same layer, with or without projection biases),
plain rotary embeddings of any scaling (the model's own rotary module computes them), no
sliding window. Anything else decodes through HF's forward.

Measured on a 2-core CPU with fast bf16 (SmolLM2-135M, bf16 weights): decoding alone 1.09x at
batch 8, 1.07x at 48, 1.02x at 96 (``benchmarks/decode_speed.py``: the matmuls are most of a
step at these sizes); a GRPO step of ``benchmarks/grpo_vs_trl.py`` 7.75 -> 6.84 s (its
generation 4.18 -> 3.40 s).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ARCHS = {"llama", "qwen2"}
ATTR = "_posttrain_fused"


def _linear(mod, lora_as_base: bool = False):
    """The ``nn.Linear`` holding a projection's weights (a merged peft layer's base layer), or
    None when an adapter is active and unmerged (its output is not the base layer's alone);
    ``lora_as_base``: a peft layer's base layer in any case (a decoding copy that merges the
    adapters into it)."""
    base = getattr(mod, "base_layer", None)
    if base is None:
        return mod
    if lora_as_base or getattr(mod, "merged", False) or not getattr(mod, "active_adapters", None):
        return base
    return None


def supported(model) -> bool:
    """Whether ``model`` can decode through :class:`FusedDecoder` (``POSTTRAIN_FUSED_DECODE=0``
    turns the fused path off everywhere: HF's forward then decodes)."""
    if os.environ.get("POSTTRAIN_FUSED_DECODE", "1") == "0":
        return False
    cfg = model.config
    if getattr(cfg, "model_type", "") not in ARCHS or getattr(cfg, "use_sliding_window", False):
        return False
    if getattr(cfg, "sliding_window", None) and cfg.model_type != "qwen2":
        return False
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "rotary_emb") and hasattr(inner, "layers")


def fuse_into(src_model, memo: dict, dtype: torch.dtype, lora_as_base: bool = False) -> list[tuple] | None:
    """Fill ``memo`` (for ``copy.deepcopy(src_model, memo)``) so that each layer's q/k/v weights
    (and biases) become views of one ``dtype`` tensor, and the gate/up weights of another;
    returns ``(qkv weight, qkv bias or None, gate_up weight)`` per layer, or None (nothing done)
    when the model is not supported."""
    if not supported(src_model):
        return None
    plan = []
    for layer in src_model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        qkv = [_linear(m, lora_as_base) for m in (at.q_proj, at.k_proj, at.v_proj)]
        gu = [_linear(m, lora_as_base) for m in (mlp.gate_proj, mlp.up_proj)]
        if any(m is None or not isinstance(m, torch.nn.Linear)
               for m in qkv + gu + [_linear(at.o_proj, lora_as_base), _linear(mlp.down_proj, lora_as_base)]):
            return None
        plan.append((qkv, gu))
    if any(m.bias is not None for qkv, gu in plan for m in gu) or \
            any((m.bias is None) != (qkv[0].bias is None) for qkv, _ in plan for m in qkv):
        return None  # biases on some of q/k/v only, or on gate/up: not a layout this handles
    fused = []
    for qkv, gu in plan:
        w_qkv = _fuse_params([m.weight for m in qkv], memo, dtype)
        b_qkv = _fuse_params([m.bias for m in qkv], memo, dtype) if qkv[0].bias is not None else None
        fused.append((w_qkv, b_qkv, _fuse_params([m.weight for m in gu], memo, dtype)))
    return fused


def _fuse_params(params: list[torch.nn.Parameter], memo: dict, dtype: torch.dtype) -> torch.Tensor:
    whole = torch.cat([p.detach().to(dtype) for p in params])
    start = 0
    for p in params:
        n = p.shape[0]
        memo[id(p)] = torch.nn.Parameter(whole[start : start + n], requires_grad=False)
        start += n
    return whole


def attach(copy_model, fused) -> None:
    setattr(copy_model, ATTR, fused)


def fuse_in_place(model) -> bool:
    """Make ``model``'s own q/k/v and gate/up weights views of fused tensors (for a model loaded
    for inference only: nothing trains it); True when done."""
    memo: dict = {}
    fused = fuse_into(model, memo, next(model.parameters()).dtype)
    if fused is None:
        return False
    for p in model.parameters():
        if id(p) in memo:
            p.data = memo[id(p)].data
    attach(model, fused)
    return True


class FusedDecoder:
    """``step(tokens, positions, mask) -> logits`` for one new token per row, writing the keys and
    values into ``cache`` (a preallocated cache, already holding the prompts)."""

    def __init__(self, model, cache, layers):
        self.model, self.cache = model, cache
        self.layers = layers  # per layer: (q/k/v weight, its bias or None, gate/up weight, o_proj, down_proj)
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hq, self.hk = cfg.num_attention_heads, cfg.num_key_value_heads

    @classmethod
    def build(cls, model, cache):
        """A decoder for ``model`` (a fused decoding copy) or None (use HF's forward)."""
        if cache is None or getattr(model, ATTR, None) is None or not supported(model):
            return None
        if not all(getattr(layer, "preallocated", False) for layer in getattr(cache, "layers", [None])):
            return None
        layers = []
        for layer, fused in zip(model.model.layers, getattr(model, ATTR)):
            at, mlp = layer.self_attn, layer.mlp
            # an adapter active and unmerged since the fusion: HF's forward
            if any(_linear(m) is None for m in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj)):
                return None
            o, down = _linear(at.o_proj), _linear(mlp.down_proj)
            if o is None or down is None:
                return None
            layers.append((*fused, o, down))
        return cls(model, cache, layers)

    @staticmethod
    def _norm(x, norm):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, vocab)`` after ``tokens`` ``(B,)`` at ``positions`` ``(B, 1)``; ``mask``
        ``(B, cached + 1)`` marks the positions each row sees (0 = left padding)."""
        from posttrain.attention import attention

        inner = self.model.model
        B, D = tokens.shape[0], self.head_dim
        h = inner.embed_tokens(tokens[:, None])
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D)
        seen = mask.bool()[:, None, None, :]
        nq, nk = self.hq * D, self.hk * D
        for layer, cache_layer, (w_qkv, b_qkv, w_gu, o_proj, down_proj) in zip(inner.layers, self.cache.layers,
                                                                              self.layers):
            at, mlp = layer.self_attn, layer.mlp
            x = self._norm(h, layer.input_layernorm)
            qkv = F.linear(x, w_qkv, b_qkv)
            q = qkv[..., :nq].view(B, 1, self.hq, D).transpose(1, 2)
            k = qkv[..., nq : nq + nk].view(B, 1, self.hk, D).transpose(1, 2)
            v = qkv[..., nq + nk :].view(B, 1, self.hk, D).transpose(1, 2)
            k, v = cache_layer.update(self._rotate(k, cos, sin), v)
            out, _ = attention(at, self._rotate(q, cos, sin), k, v, seen, scaling=at.scaling)
            h = h + o_proj(out.reshape(B, 1, nq))
            x = self._norm(h, layer.post_attention_layernorm)
            gate, up = F.linear(x, w_gu).chunk(2, -1)
            h = h + down_proj(mlp.act_fn(gate) * up)
        h = self._norm(h, inner.norm)
        return self.model.lm_head(h[:, -1])
