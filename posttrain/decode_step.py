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
ones, and the fusion costs no memory; on models loaded for inference only
(``load_model(inference=True)``: evaluation, rejection sampling), fused in place; and on
float32 models on an x86 CPU with float16 copies of the weights packed for fbgemm
(:func:`pack_fp16`), LoRA adapters unmerged beside them. On a CPU with native bf16 the
projections and LM head of bf16 weights run packed for oneDNN (:func:`pack_onednn`: 1.26x HF's
forward at batch 8 against 1.03x on plain ``F.linear``, ``benchmarks/decode_speed.py``).
Architectures: ``llama`` and ``qwen2`` (the same layer, with or without projection biases),
plain rotary embeddings of any scaling (the model's own rotary module computes them), no
sliding window. Anything else decodes through HF's forward.

Measured on a 2-core CPU with fast bf16 (SmolLM2-135M, bf16 weights): decoding alone 1.09x at
batch 8, 1.07x at 48, 1.02x at 96 (``benchmarks/decode_speed.py``: the matmuls are most of a
step at these sizes); a GRPO step of ``benchmarks/grpo_vs_trl.py`` 7.75 -> 6.84 s (its
generation 4.18 -> 3.40 s). On an AVX2-only CPU (float32), with the float16 packed weights:
2.10x HF's float32 forward at batch 8, 1.07x at 48.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F

ARCHS = {"llama", "qwen2"}
ATTR = "_posttrain_fused"
# model -> its float16 packs (pack_fp16): kept beside the model, not on it, so that copying or
# pickling a model never copies them
PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> (key of its weights, their oneDNN packs) (pack_onednn)
ONEDNN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def fp16_packing_available() -> bool:
    """Whether this torch has fbgemm's float16-weight linear (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                              "linear_prepack_fp16")


class _PackedProjection:
    """``x -> x W^T + b`` on float16 weights packed for fbgemm, plus the unmerged LoRA adapters of
    the projections ``W`` stacks (``x A^T`` for all of them in one matmul, then their B's as one
    block-diagonal matrix with the scalings folded in)."""

    def __init__(self, packed, lora: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.packed = packed
        self.lora = None if lora is None else (lora[0].t().contiguous(), lora[1].t().contiguous())  # A^T, B^T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        if self.lora is not None:
            a_t, b_t = self.lora
            flat = x.reshape(-1, x.shape[-1])
            y.view(flat.shape[0], -1).addmm_(flat @ a_t, b_t)
        return y


def _adapters(mod) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """``(A, B, scaling)`` of each active, unmerged LoRA adapter of the peft layer ``mod`` ([] for
    a plain layer or merged adapters), or None for what a plain ``W + B A s`` does not describe
    (DoRA, adapter biases, a base layer that is not ``nn.Linear``)."""
    if not hasattr(mod, "lora_A"):
        return []
    if not isinstance(getattr(mod, "base_layer", None), torch.nn.Linear):
        return None
    from posttrain.models import active_adapters

    active = active_adapters(mod)
    if any(getattr(mod, "use_dora", {}).get(a) or getattr(mod, "lora_bias", {}).get(a) for a in active):
        return None
    return [(mod.lora_A[a].weight, mod.lora_B[a].weight, float(mod.scaling[a])) for a in active]


@torch.no_grad()
def pack_fp16(model) -> bool:
    """Attach float16 copies of ``model``'s projection and LM-head weights, packed for fbgemm's
    float16-weight linear (``x`` float32, weights widened to float32 inside the matmul), for the
    decoding steps of :class:`FusedDecoder`; True when done (a supported float32 model on a CPU
    with fbgemm). :func:`unpack_fp16` detaches them.

    LoRA adapters stay unmerged: the packed weights are the frozen base layers', kept between
    calls while those weights are unchanged (a LoRA run packs once), and each call adds its
    adapters as two small matmuls per fused projection. A full fine-tune repacks on each call
    (1.1-1.4 s for SmolLM2-135M on 2 cores, split over threads). Memory: fbgemm pads each
    pack's input dimension to blocks of 512, so a 576-wide projection's pack takes 1.78x its
    float16 bytes: ~475 MB for SmolLM2-135M, held for the whole of a LoRA run.

    Why: at batch 8 on a CPU without fast bf16 (AVX2 only) fbgemm's float16-weight kernel ran
    the projections 2-2.8x faster than float32 ``F.linear`` (the 49152 x 576 LM head: 6.8 vs
    22 ms), which made decoding 2.1x faster there at batch 8, 1.07x at 48
    (``benchmarks/decode_speed.py``).
    float16 keeps 11 significant bits (bf16: 8): the projections differ from float32 by ~2e-4
    relative. Prefill (many tokens a row, compute bound) runs on the float32 model as it is.
    """
    if not (fp16_packing_available() and supported(model)):
        return False
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        return False
    plan, weights = [], []
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        groups = [(at.q_proj, at.k_proj, at.v_proj), (mlp.gate_proj, mlp.up_proj), (at.o_proj,), (mlp.down_proj,)]
        entry = []
        for group in groups:
            bases = [_linear(m, lora_as_base=True) for m in group]
            adapters = [_adapters(m) for m in group]
            if any(not isinstance(b, torch.nn.Linear) for b in bases) or any(a is None for a in adapters):
                return False
            if len({b.bias is None for b in bases}) > 1:
                return False
            entry.append((bases, adapters))
            weights += [b.weight for b in bases] + [b.bias for b in bases if b.bias is not None]
        plan.append(entry)
    head = model.lm_head
    if not isinstance(head, torch.nn.Linear):
        return False
    weights.append(head.weight)
    key = tuple((w.data_ptr(), w._version) for w in weights)
    kept = PACKED.get(model)
    if kept is not None and kept["key"] == key:
        packs = kept["packs"]
    else:
        PACKED.pop(model, None)  # free the old packs before making new ones
        packs = _prepack_all([bases for entry in plan for bases, _ in entry] + [[head]])
    it = iter(packs)
    layers = [tuple(_PackedProjection(next(it), _stacked(adapters, bases)) for bases, adapters in entry)
              for entry in plan]
    frozen = not any(w.requires_grad for w in weights)
    PACKED[model] = {"key": key, "packs": packs, "layers": layers, "head": _PackedProjection(next(it)),
                     "frozen": frozen}
    return True


def _stacked(adapters, bases):
    if not any(adapters):
        return None
    A = torch.cat([a for mod in adapters for a, _, _ in mod])
    B = torch.zeros(sum(b.weight.shape[0] for b in bases), A.shape[0])
    row = col = 0
    for mod, base in zip(adapters, bases):
        for a, b, scale in mod:
            B[row : row + base.weight.shape[0], col : col + a.shape[0]] = b * scale
            col += a.shape[0]
        row += base.weight.shape[0]
    return A, B


def _prepack_all(groups: list[list[torch.nn.Linear]]) -> list:
    """fbgemm float16 packs of each group of linear layers' weights stacked along their outputs
    (with their biases, when any), made on ``torch.get_num_threads()`` threads (each pack runs
    on one)."""
    from concurrent.futures import ThreadPoolExecutor

    def stacked(tensors):  # one layer's own tensor as it is (no copy of the 49152-row head)
        return tensors[0].detach() if len(tensors) == 1 else torch.cat([t.detach() for t in tensors])

    def one(group):
        b = None if group[0].bias is None else stacked([m.bias for m in group])
        return torch.ops.quantized.linear_prepack_fp16(stacked([m.weight for m in group]), b)

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return list(pool.map(one, groups))


def unpack_fp16(model) -> None:
    """Detach the weights :func:`pack_fp16` attached to ``model``: freed when they come from
    trainable weights (repacked on the next call anyway), kept for the next call when frozen."""
    kept = PACKED.get(model)
    if kept is None:
        return
    if kept["frozen"]:
        kept.update(layers=None, head=None)  # detached: kept for the next call, not decoded with
    else:
        del PACKED[model]


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """Whether bf16 ``dtype`` weights can be packed for oneDNN here (a CPU with native bf16
    matmuls); ``POSTTRAIN_ONEDNN_PACK=0`` turns it off."""
    if dtype != torch.bfloat16 or os.environ.get("POSTTRAIN_ONEDNN_PACK", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _OnednnProjection:
    """``x -> x W^T + b`` on a bf16 weight reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def cache_rows(cache) -> int:
    """Rows of a (filled) cache: the decoding batch (8 before anything was written)."""
    first = cache.layers[0]
    return int(first.keys.shape[0]) if getattr(first, "is_initialized", False) else 8


@torch.no_grad()
def pack_onednn(model, groups: list[tuple], rows: int) -> list[tuple] | None:
    """``groups`` (tuples of ``(weight, bias)``) as tuples of oneDNN-packed projections
    (:class:`_OnednnProjection`), or None where packing does not apply (not bf16 on a CPU with
    native bf16). Kept beside ``model`` (:data:`ONEDNN`) while its weights are unchanged (same
    storage, same version): a model loaded for inference packs once; a decoding copy, refreshed
    in place before each rollout, packs once per rollout, and :func:`unpack_onednn` frees them
    with the copy's weights.

    Why: at a decoding step's few rows torch's plain bf16 ``F.linear`` reorders the weight for
    oneDNN on every call, and a step reads every weight. Measured on a 2-core CPU with AVX-512
    bf16 (``python benchmarks/decode_speed.py --batch 8,48 --rounds 2``, SmolLM2-135M, packing
    counted): the fused step 156 -> 190 tok/s at batch 8, 430 -> 466 at 48, the same greedy
    tokens. Prefill and training passes (hundreds of rows a matmul, compute-bound) keep
    ``F.linear``.
    """
    tensors = [t for group in groups for pair in group for t in pair if t is not None]
    if not tensors or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
        return None
    if not onednn_packing_available(torch.bfloat16):
        return None
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    kept = ONEDNN.get(model)
    if kept is not None and kept[0] == key:
        return kept[1]
    ONEDNN.pop(model, None)  # free the old packs before making new ones
    packed = [tuple(_OnednnProjection(w, b, rows) for w, b in group) for group in groups]
    ONEDNN[model] = (key, packed)
    return packed


def unpack_onednn(model) -> None:
    """Free the oneDNN packs of ``model``'s weights (:func:`pack_onednn`)."""
    ONEDNN.pop(model, None)


class FusedDecoder:
    """``step(tokens, positions, mask) -> logits`` for one new token per row, writing the keys and
    values into ``cache`` (a preallocated cache, already holding the prompts)."""

    def __init__(self, model, cache, layers, head):
        self.model, self.cache, self.head = model, cache, head
        self.layers = layers  # per layer, callables x -> x W^T (+ b): (q/k/v, gate/up, o_proj, down_proj)
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hq, self.hk = cfg.num_attention_heads, cfg.num_key_value_heads

    @classmethod
    def build(cls, model, cache):
        """A decoder for ``model`` (a fused decoding copy, or a model with :func:`pack_fp16` weights
        attached) or None (use HF's forward)."""
        if cache is None or not supported(model):
            return None
        if not all(getattr(layer, "preallocated", False) for layer in getattr(cache, "layers", [None])):
            return None
        packed = PACKED.get(model)
        if packed is not None and packed["layers"] is not None:
            return cls(model, cache, packed["layers"], packed["head"])
        if getattr(model, ATTR, None) is None:
            return None
        weights = []  # per layer, (weight, bias) of q/k/v, gate/up, o_proj, down_proj
        for layer, (w_qkv, b_qkv, w_gu) in zip(model.model.layers, getattr(model, ATTR)):
            at, mlp = layer.self_attn, layer.mlp
            # an adapter active and unmerged since the fusion: HF's forward
            if any(_linear(m) is None for m in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj)):
                return None
            o, down = _linear(at.o_proj), _linear(mlp.down_proj)
            if o is None or down is None:
                return None
            weights.append(((w_qkv, b_qkv), (w_gu, None), (o.weight, o.bias), (down.weight, down.bias)))
        head = model.lm_head
        if isinstance(head, torch.nn.Linear):
            packed = pack_onednn(model, weights + [((head.weight, head.bias),)], rows=cache_rows(cache))
            if packed is not None:
                return cls(model, cache, packed[:-1], packed[-1][0])
        layers = [tuple(functools.partial(F.linear, weight=w, bias=b) for w, b in group) for group in weights]
        return cls(model, cache, layers, head)

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
        for layer, cache_layer, (qkv_proj, gate_up_proj, o_proj, down_proj) in zip(inner.layers, self.cache.layers,
                                                                                   self.layers):
            at, mlp = layer.self_attn, layer.mlp
            x = self._norm(h, layer.input_layernorm)
            qkv = qkv_proj(x)
            q = qkv[..., :nq].view(B, 1, self.hq, D).transpose(1, 2)
            k = qkv[..., nq : nq + nk].view(B, 1, self.hk, D).transpose(1, 2)
            v = qkv[..., nq + nk :].view(B, 1, self.hk, D).transpose(1, 2)
            k, v = cache_layer.update(self._rotate(k, cos, sin), v)
            out, _ = attention(at, self._rotate(q, cos, sin), k, v, seen, scaling=at.scaling)
            h = h + o_proj(out.reshape(B, 1, nq))
            x = self._norm(h, layer.post_attention_layernorm)
            gate, up = gate_up_proj(x).chunk(2, -1)
            h = h + down_proj(mlp.act_fn(gate) * up)
        h = self._norm(h, inner.norm)
        return self.head(h[:, -1])
