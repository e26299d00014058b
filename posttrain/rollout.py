"""Text generation from chat prompts (the seed of the RL rollout engine).

:func:`generate` renders each conversation with the chat template and its generation
prompt, left-pads the batch (so every row's continuation starts at the same column),
and samples with our KV-cache loop (:func:`decode`): greedy when ``temperature == 0``,
otherwise temperature / top-p / top-k sampling, seeded. It stops at EOS (the end-of-turn
token for chat models) and at any of ``stop`` strings, which are cut from the returned
text (HF ``generate`` checks those as it goes). Prompts are processed longest-first in
batches so that little padding is generated.

For online RL, :func:`sample` works on token ids: it returns each completion's token
ids up to and including its EOS (or cut at ``max_new_tokens``: ``truncated``), decoded
text, and generation throughput. The behaviour policy's log-probs are recomputed by the
trainer with :func:`posttrain.logprobs.token_logprobs` (the same function as the loss, so
the importance ratio is exactly 1 on the first update).

Decoding runs in the model's compute dtype (``SamplingConfig.dtype``): under mixed precision
(float32 weights, bf16 autocast) from a bf16 copy of the weights (:func:`decode_copy`). The
sampler then differs from the trainer's autocast forward only by where bf16 rounding happens
(autocast keeps softmax and norms in float32), the way a bf16 vLLM engine differs from a TRL
or verl trainer; ``sampling.dtype=float32`` decodes on the float32 weights instead.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from posttrain import attention, decode_step
from posttrain.config import doc
from posttrain.models import active_adapters, lora_layers, unwrap_peft


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    max_new_tokens: int = doc("Maximum tokens generated per completion.", 256)
    temperature: float = doc("Sampling temperature; 0 = greedy.", 0.0)
    top_p: float = doc("Nucleus sampling mass (1 = off).", 1.0)
    top_k: int = doc("Sample among the k most likely tokens (0 = off).", 0)
    stop: list[str] = doc("Extra stop strings (EOS always stops).", default_factory=list)
    batch_size: int = doc("Prompts generated together.", 16)
    seed: int = doc("Sampling seed.", 0)
    dtype: str = doc("Weights dtype decoding runs in: auto (the model's compute dtype: bfloat16 under "
                     "mixed precision, decoded from a bf16 copy of the weights refreshed before each "
                     "rollout; float16 for float32 on an x86 CPU; otherwise the weights as they are), "
                     "float32, bfloat16, or float16 (on a CPU: float16 weights packed for fbgemm, "
                     "float32 activations; elsewhere a float16 copy).", "auto")
    backend: str = doc("Online-RL rollout backend: hf (our KV-cache loop on the transformers model, any "
                       "device) or vllm (CUDA, pip install 'posttrain[vllm]').", "hf")
    vllm_gpu_memory_utilization: float = doc("Share of the GPU the colocated vLLM engine may use.", 0.3)

    def validate(self) -> None:
        from posttrain.config import ConfigError, check_bounds

        check_bounds(self, "sampling.", max_new_tokens=">= 1", temperature=">= 0", top_p="in (0, 1]", top_k=">= 0",
                     batch_size=">= 1", vllm_gpu_memory_utilization="in (0, 1]")

        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"sampling.backend: {self.backend!r} is not hf or vllm")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"sampling.dtype: {self.dtype!r} is not auto, float32, bfloat16 or float16")


def render_prompts(tok, conversations: list[list[dict[str, str]]]) -> list[str]:
    if not getattr(tok, "chat_template", None):
        from posttrain.data.tokenize import ChatTemplateError

        raise ChatTemplateError("the tokenizer has no chat template; prompting with conversations needs one (use a "
                                "chat/instruct model)")
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def _has_stop(text: str, stops: list[str]) -> bool:
    return any(s and s in text for s in stops)


def _ran_out(ids: list[int], text: str, eos: int | None, cfg: SamplingConfig) -> bool:
    """A completion cut at ``max_new_tokens``: neither EOS nor a stop string ended it."""
    return len(ids) >= cfg.max_new_tokens and eos not in ids and not _has_stop(text, cfg.stop)


def _own_tokens(tok, seq: list[int], eos: int | None, pad: int | None, stops: list[str]) -> list[int]:
    """A decoded row's own tokens: up to its EOS (kept) or the end of its stop string, without
    the padding that fills a row that ended before the batch's longest."""
    # a row the HF path stopped at a stop string is filled with pad after it, which is the EOS
    # token for many models: the ids end where the text stopped
    cut = _stop_token_end(tok, seq, stops)
    if cut is not None and eos not in seq[:cut]:
        return seq[:cut]
    if eos in seq:
        return seq[: seq.index(eos) + 1]
    seq = list(seq)
    while seq and seq[-1] == pad and pad != eos:
        seq.pop()
    return seq


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: counted from each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def _stop_token_end(tok, seq: list[int], stops: list[str]) -> int | None:
    """The length of the shortest prefix of ``seq`` whose text holds a stop string, or None.
    (A prefix's text only grows with it, so a binary search finds the first.)"""
    def holds(n: int) -> bool:
        return _has_stop(tok.decode(seq[:n], skip_special_tokens=True), stops)

    if not stops or not holds(len(seq)):
        return None
    lo, hi = 1, len(seq)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


@torch.no_grad()
def generate(model, tok, conversations: list[list[dict[str, str]]], cfg: SamplingConfig | None = None,
             streamer=None, progress: str | None = None, prefixes: list[str] | None = None,
             stop_when: Callable[[int, str], bool] | None = None, truncated: list[bool] | None = None) -> list[str]:
    """Completions (text, special tokens removed) for chat ``conversations``, in input order.
    ``progress``: show a bar with this label, advanced per batch (not inside another bar).
    ``prefixes``: text the assistant's turn already starts with, one per conversation; the
    completion continues it (what is returned is the continuation alone).
    ``stop_when(i, text)``: asked each time conversation ``i``'s completion ends a line (its
    ``text`` so far); True ends that completion there (our decoding loop only: with ``stop``
    strings or a streamer it is never asked). ``truncated``: a list filled with one flag per
    conversation, True where the completion ran to ``max_new_tokens`` without EOS or a stop."""
    cfg = cfg or SamplingConfig()
    flags = [False] * len(conversations)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    texts = render_prompts(tok, conversations)
    if prefixes is not None:
        if len(prefixes) != len(texts):
            raise ValueError(f"generate: {len(prefixes)} prefixes for {len(texts)} conversations")
        texts = [t + p for t, p in zip(texts, prefixes)]
    bar = None
    if progress:
        from posttrain.engine import progress as progress_bar

        bar = progress_bar(progress)
        bar_task = bar.add_task(progress, total=len(conversations), status="")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    padding_side = tok.padding_side
    tok.padding_side = "left"
    try:
        if bar is not None:
            bar.start()
        with generation_model(model, decode_dtype(model, cfg.dtype)) as gen:
            gen.eval()
            for b, s in enumerate(range(0, len(order), cfg.batch_size)):
                idx = order[s : s + cfg.batch_size]
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                check = None if stop_when is None else \
                    (lambda row, new_ids, idx=idx: stop_when(idx[row], tok.decode(new_ids, skip_special_tokens=True)))
                new = continue_batch(gen, tok, enc["input_ids"], enc["attention_mask"], cfg,
                                     cfg.seed * 100_003 + b, streamer, check)
                for row, i in enumerate(idx):
                    text = tok.decode(new[row], skip_special_tokens=True)
                    results[i] = _cut_at_stop(text, cfg.stop)
                    flags[i] = _ran_out(_own_tokens(tok, new[row], eos, pad, cfg.stop), text, eos, cfg)
                if bar is not None:
                    bar.update(bar_task, advance=len(idx), status=f"{max(map(len, new), default=0)} tokens")
    finally:
        tok.padding_side = padding_side
        model.train(was_training)
        if bar is not None:
            bar.stop()
    if truncated is not None:
        truncated[:] = flags
    return results


@dataclass
class Rollout:
    """Completions sampled for a batch of prompts (one entry per completion, prompt order)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # including the final EOS when generated
    texts: list[str]  # decoded, special tokens removed, cut at stop strings
    truncated: list[bool]  # hit max_new_tokens without EOS or stop string
    seconds: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def decode_dtype(model, requested: str = "auto") -> torch.dtype:
    """The dtype to decode ``model`` in: ``requested``, or for ``auto`` its compute dtype (the
    autocast dtype under mixed precision, else its weights'), except float32 on an x86 CPU:
    float16 there, which :func:`generation_model` decodes with float16 weights packed for
    fbgemm and float32 activations (:func:`posttrain.decode_step.pack_fp16`). Always the
    weights' dtype under FSDP (the gathered parameters are decoded where they are)."""
    from posttrain import distributed

    first = next(model.parameters())
    if distributed.fsdp():
        return first.dtype
    if requested == "auto":
        compute = getattr(model, "posttrain_autocast", None) or first.dtype
        if compute == torch.float32 and first.device.type == "cpu" and decode_step.fp16_packing_available():
            return torch.float16  # float16 weights packed for fbgemm, float32 activations (pack_fp16)
        return compute
    return getattr(torch, requested)


_DECODE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def merges_by_delta(model, layers: list | None = None) -> bool:
    """Whether every LoRA layer of ``model`` merges as ``W + get_delta_weight`` (plain LoRA on a
    linear layer; DoRA and other variants do not); ``layers``: its :func:`lora_layers`, when
    already at hand."""
    layers = lora_layers(unwrap_peft(model)) if layers is None else layers
    n_lora = sum(1 for m in unwrap_peft(model).modules() if hasattr(m, "lora_A"))
    return len(layers) == n_lora and not any(any(getattr(m, "use_dora", {}).values()) for m in layers)


def decode_copy(model, dtype: torch.dtype):
    """A plain copy of ``model`` in ``dtype`` for decoding, its LoRA adapters merged into the
    copy's weights (the trained model itself is never changed).

    Made once per model and refreshed on every call (one cast-copy of the weights, ~0.1 s for
    135M parameters; for an adapted projection ``W + B A s`` computed in float32, then cast);
    :func:`generation_model` frees its weights after each rollout
    (:func:`release_decode_copy`), so the training passes between rollouts reuse that memory
    (2 bytes a parameter in bf16) and only the structure is kept. peft's LoRA layers become
    their plain base layers in the copy (no adapter bookkeeping per decoding step); buffers
    (rotary frequencies) stay as they are, and tied parameters stay tied: the copy is a
    ``deepcopy`` whose memo maps each parameter to its cast.
    Why: on a CPU with fast bf16, decoding reads every weight per token, and reading bf16 ones
    made a decoding step ~1.9x faster than float32 (``benchmarks/precision_probe.py``), while
    training under mixed precision already computes its forward passes in bf16. For the
    architectures of :mod:`posttrain.decode_step` the copy's q/k/v and gate/up weights are views
    of one fused tensor each, for its fused decoding step.
    """
    base = unwrap_peft(model)
    entry = _DECODE_COPIES.get(base)
    if entry is None or entry[0] != dtype:
        memo: dict = {}
        fused = decode_step.fuse_into(base, memo, dtype, lora_as_base=True)  # q/k/v, gate/up: views of one tensor each
        adapted = lora_layers(base)
        delta_of = {id(layer.base_layer.weight): layer for layer in adapted}
        pairs = []
        for name, p in base.named_parameters():
            if "lora_" in name:  # adapters: merged into the copy's weights at each refresh
                continue
            if id(p) not in memo:
                memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False)
            pairs.append((p, memo[id(p)], delta_of.get(id(p))))
        for layer in adapted:  # each LoRA layer becomes (a copy of) its plain base layer
            memo[id(layer)] = copy.deepcopy(layer.base_layer, memo)
        copy_ = copy.deepcopy(base, memo)
        if fused is not None:
            decode_step.attach(copy_, fused)
        copy_.requires_grad_(False)
        entry = (dtype, copy_, pairs, {})
        _DECODE_COPIES[base] = entry
    _restore_storage(entry)
    with torch.no_grad():
        for src, dst, layer in entry[2]:
            dst.copy_(merged_weight(src, layer))
    return entry[1]


def _copy_tensors(copy_) -> tuple[list[torch.nn.Parameter], list | None]:
    """The copy's unique parameters and its fused q/k/v, gate/up tensors (None: not fused)."""
    return list(dict.fromkeys(copy_.parameters())), getattr(copy_, decode_step.ATTR, None)


def release_decode_copy(model) -> None:
    """Free the weights of ``model``'s decoding copy between rollouts, keeping its structure:
    the training passes that follow a rollout can then reuse that memory (2 bytes a parameter
    in bf16) instead of adding their activations on top of it. :func:`decode_copy` allocates
    them again, in the same layout (tied weights tied, fused q/k/v and gate/up views of one
    tensor each), before refreshing them."""
    entry = _DECODE_COPIES.get(unwrap_peft(model))
    if entry is None:
        return
    decode_step.unpack_onednn(entry[1])  # its packs go with its weights
    if entry[3].get("layout") is not None:
        return
    params, fused = _copy_tensors(entry[1])
    tensors = params + [t for group in fused or [] for t in group if t is not None]
    if any(t.dtype != entry[0] for t in tensors):
        return
    storages: dict[int, tuple[int, int]] = {}
    layout = []
    for t in tensors:
        st = t.untyped_storage()
        index, _ = storages.setdefault(st.data_ptr(), (len(storages), st.nbytes()))
        layout.append((index, t.storage_offset(), tuple(t.shape), t.stride()))
    sizes = dict(storages.values())
    shape = None if fused is None else [tuple(t is not None for t in group) for group in fused]
    for p in params:
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    if fused is not None:
        decode_step.attach(entry[1], [tuple(None for _ in group) for group in fused])
    entry[3]["layout"] = (sizes, layout, len(params), shape, params[0].device)


def _restore_storage(entry) -> None:
    """Undo :func:`release_decode_copy` (new, uninitialised storage in the old layout)."""
    kept = entry[3].pop("layout", None)
    if kept is None:
        return
    sizes, layout, n_params, shape, device = kept
    item = torch.empty(0, dtype=entry[0]).element_size()
    bufs = {i: torch.empty(nbytes // item, dtype=entry[0], device=device) for i, nbytes in sizes.items()}
    tensors = iter([bufs[i].as_strided(size, stride, offset) for i, offset, size, stride in layout])
    params, _ = _copy_tensors(entry[1])
    for p in params[:n_params]:
        p.data = next(tensors)
    if shape is not None:
        decode_step.attach(entry[1], [tuple(next(tensors) if present else None for present in group)
                                      for group in shape])


@torch.no_grad()
def merged_weight(weight: torch.Tensor, layer=None) -> torch.Tensor:
    """``weight`` with the active adapters of the peft LoRA ``layer`` around it added (``W + B A
    s``, in float32), or ``weight`` itself (no layer, or nothing active)."""
    adapters = active_adapters(layer) if layer is not None else []
    if not adapters:
        return weight
    w = weight.to(torch.float32, copy=True)
    for a in adapters:
        w += layer.get_delta_weight(a).to(w.device, torch.float32)
    return w


@contextmanager
def generation_model(model, dtype: torch.dtype | None = None):
    """The model to sample from, inside a ``with``.

    When ``dtype`` differs from the weights' dtype, or the adapted projections are stored in
    a lower precision than float32 (:func:`posttrain.models.store_frozen_base`), a
    :func:`decode_copy` in ``dtype`` (the compute dtype when None) with the LoRA adapters
    merged into it: merging in place into rounded weights would not unmerge exactly. Otherwise
    (float32 weights decoded in float32) a LoRA model has its adapters merged into the base
    weights for the duration and unmerged after, even on error: unmerged LoRA adds two small
    matmuls per adapted projection to every decoding step (10-15% slower decoding at batch 8
    on CPU), and merging in place costs no memory. Merge + unmerge round the base weights by
    about one float32 ulp (1.2e-7 after two cycles on the embedded model); TRL's vLLM path for
    peft models does the same. ``float16`` for float32 weights on a CPU: the model itself, its
    adapters unmerged, with float16 copies of its decoding weights packed for fbgemm attached
    for the duration (:func:`posttrain.decode_step.pack_fp16`; prefill stays in float32).
    """
    layers = lora_layers(unwrap_peft(model))
    low = any(m.base_layer.weight.dtype != torch.float32 for m in layers)
    first = next(model.parameters())
    packed = dtype == torch.float16 and not low and first.dtype == torch.float32 and first.device.type == "cpu"
    if low and dtype is None:
        dtype = getattr(model, "posttrain_autocast", None) or layers[0].base_layer.weight.dtype
    if not packed and dtype is not None and (dtype != first.dtype or low) and merges_by_delta(model, layers):
        try:
            yield decode_copy(model, dtype)
        finally:
            release_decode_copy(model)
        return
    base = unwrap_peft(model)
    if packed and decode_step.pack_fp16(base):  # adapters unmerged: the packed base is kept between rollouts
        try:
            yield model
        finally:
            decode_step.unpack_fp16(base)
        return
    merge = bool(getattr(model, "peft_config", None) and hasattr(model, "merge_adapter"))
    if merge:
        model.merge_adapter()
    try:
        if dtype is not None and dtype != first.dtype and not packed:
            yield decode_copy(model, dtype)
        else:  # float32, or float16 where packing is not possible (no fbgemm, another architecture)
            yield model
    finally:
        if merge:
            model.unmerge_adapter()


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``(B, V)`` float32 logits as HF's sampling sees them: divided by the temperature, then
    all but the ``top_k`` largest set to -inf, then the tail beyond ``top_p`` of the mass."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix reaching top_p: a token goes when the mass before it does
        # (HF's TopPLogitsWarper: ascending cumulative mass <= 1 - top_p)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``(B, V)`` probabilities, by inverting the cumulative sum with one
    uniform draw per row. ``torch.multinomial`` took 11 ms for 8 rows of SmolLM2's 49,152-token
    vocabulary on this CPU (about a tenth of a decoding step), this 0.3 ms. Tokens of
    probability 0 are never drawn (``right=True``: the first cumulative sum above the draw)."""
    cum = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=cum.dtype, device=cum.device) * cum[:, -1:]
    token = torch.searchsorted(cum, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    bad = probs.gather(-1, token[:, None]).squeeze(-1) <= 0  # a draw rounded onto the very end of the sum
    return torch.where(bad, probs.argmax(-1), token)


def preallocated_cache(model, capacity: int):
    """A ``DynamicCache`` whose layers hold ``capacity`` positions written in place, or
    ``None`` (the model makes its usual cache) when a layer is not a plain dynamic layer
    (sliding windows, linear attention).

    HF's ``DynamicLayer`` appends with ``torch.cat``, copying the whole cache on every token;
    at batch 64 on CPU that copy was about half of a decoding step's profile. Here each
    step's keys/values are written in place and views of the filled part are returned.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        preallocated = True  # what decode_step.FusedDecoder writes into

        def __init__(self):
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty(b, h, capacity, d)
            self._v = value_states.new_empty(b, h, capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache of {capacity} positions overflowed")
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices):
            if self.is_initialized:
                k, v = self._k, self._v
                self._k = k.new_empty((len(indices),) + k.shape[1:])
                self._v = v.new_empty((len(indices),) + v.shape[1:])
                self._k[:, :, : self.length] = k[indices, :, : self.length]
                self._v[:, :, : self.length] = v[indices, :, : self.length]
                self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [PreallocatedLayer() for _ in cache.layers]
    return cache


def _cache_argument(model) -> str:
    """The KV-cache argument (and output field) of ``model``'s forward: ``cache`` since transformers
    5.2x renamed it, ``past_key_values`` before (still accepted there, with a FutureWarning)."""
    import inspect

    base = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def prefill(model, cache, **inputs):
    """``(cache, logits of each row's last position)`` after running the prompts through ``model``.

    For the plain architectures the decoder runs alone and the LM head sees only the last
    position, a contiguous ``(B, hidden)`` matrix. HF's own ``logits_to_keep=1`` hands the head a
    strided ``(B, 1, hidden)`` slice, which torch multiplied as a batched matmul against the
    head weight expanded (and copied) once per row: a ``(48, 576, 49152)`` bf16 copy, 2.9 s of a
    4.7 s prefill of 48 prompts (1.0 of 3.7 s in float32), once per generated batch.
    """
    from posttrain import distributed
    from posttrain.logprobs import PLAIN_HEAD, decoder_and_head

    # not under FSDP: its root module's forward must run first (lazy init, parameter gathering)
    if getattr(unwrap_peft(model).config, "model_type", "") in PLAIN_HEAD and not distributed.fsdp():
        decoder, head = decoder_and_head(model)
        key = _cache_argument(decoder)
        out = decoder(use_cache=True, **({key: cache} if cache is not None else {}), **inputs)
        return getattr(out, key), head(out.last_hidden_state[:, -1].contiguous())
    key = _cache_argument(model)
    res = model(use_cache=True, logits_to_keep=1, **({key: cache} if cache is not None else {}), **inputs)
    return getattr(res, key), res.logits[:, -1]


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int, pad: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           line_check: tuple[torch.Tensor, Callable[[int, list[int]], bool]] | None = None) -> torch.Tensor:
    """``(B, n <= max_new_tokens)`` new tokens after the left-padded prompts ``ids``, with a
    KV cache; rows that ended (EOS) are filled with ``pad``; stops when every row has ended.

    Our own loop instead of HF ``generate``: at batch 8-32 on CPU most of ``generate``'s time
    per token went to its per-step machinery (logits processors, stopping criteria, cache
    bookkeeping) rather than to the model, and online RL calls it on every step. The cache is
    preallocated (:func:`preallocated_cache`), and rows that ended are dropped from the batch
    once they are an eighth of it, so a few long completions do not keep the whole batch
    decoding (completions here vary from ~40 to the token limit). Identical prompt rows (a
    GRPO group's copies of its prompt) are prefilled once and their cache copied: prefill is
    compute-bound (a batch of 8 copies of a 60-token prompt: ~0.9 s of float32 matmuls on 2
    cores, against ~70 ms a decoding step), and HF ``generate`` prefills every copy.

    ``line_check = (line_ends, check)``: ``line_ends`` a boolean per vocabulary id (the tokens
    holding a newline, :func:`line_end_tokens`); when row ``r`` draws one, ``check(r, its new
    ids so far)`` is asked and True ends the row there (as EOS would, the token kept): a
    verifier-guided repair stops a continuation at its first false step instead of decoding
    the rest of a solution it will cut.
    """
    with attention.enabled(model):
        return _decode(model, ids, mask, max_new_tokens, eos, pad, temperature, top_k, top_p, generator, line_check)


def line_end_tokens(tok) -> torch.Tensor:
    """A boolean per vocabulary id of ``tok``: whether the token's text holds a newline."""
    ids = list(range(len(tok)))
    return torch.tensor(["\n" in t for t in tok.batch_decode([[i] for i in ids])], dtype=torch.bool)


_LINE_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _line_ends(tok) -> torch.Tensor:
    """:func:`line_end_tokens` of ``tok``, worked out once per tokenizer."""
    if tok not in _LINE_ENDS:
        _LINE_ENDS[tok] = line_end_tokens(tok)
    return _LINE_ENDS[tok]


def _decode(model, ids, mask, max_new_tokens, eos, pad, temperature, top_k, top_p, generator, line_check=None):
    B = ids.shape[0]
    out = ids.new_full((B, max_new_tokens), pad)
    live = torch.arange(B, device=ids.device)  # original row of each row still in the batch
    position_ids = left_padded_positions(mask)
    past = preallocated_cache(model, ids.shape[1] + max_new_tokens)
    key = _cache_argument(model)
    rows, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True)
    if past is not None and len(rows) < B:  # a group's copies of one prompt: prefill it once, then copy its cache
        past, logits = prefill(model, past, input_ids=rows[:, : ids.shape[1]], attention_mask=rows[:, ids.shape[1] :],
                               position_ids=position_ids[_first_of_each(inverse, len(rows))])
        past.batch_select_indices(inverse)
        logits = logits[inverse]
    else:
        past, logits = prefill(model, past, input_ids=ids, attention_mask=mask, position_ids=position_ids)
    next_pos = position_ids[:, -1:] + 1
    fused = decode_step.FusedDecoder.build(unwrap_peft(model), past)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    n = 0
    for t in range(max_new_tokens):
        if temperature > 0:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            token = draw(probs.cpu() if generator is not None else probs, generator).to(ids.device)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(done, pad)
        out[live, t] = token
        done |= token == eos
        if line_check is not None:
            line_ends, check = line_check
            for r in (line_ends[token.cpu()] & ~done.cpu()).nonzero().flatten().tolist():
                row = int(live[r])
                if check(row, out[row, : t + 1].tolist()):
                    done[r] = True
        n = t + 1
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if int(done.sum()) * 8 >= len(live):  # compact: drop the rows that ended
            keep = (~done).nonzero().squeeze(-1)
            live, token, mask, next_pos, done = live[keep], token[keep], mask[keep], next_pos[keep], done[keep]
            past.batch_select_indices(keep)
        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=mask.device)], 1)
        if fused is not None:
            logits = fused.step(token, next_pos, mask)
        else:
            res = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                        **{key: past})
            past, logits = getattr(res, key), res.logits[:, -1]
        next_pos = next_pos + 1
    return out[:, :n]


def _first_of_each(inverse: torch.Tensor, n: int) -> torch.Tensor:
    """For ``inverse`` from ``torch.unique(..., return_inverse=True)`` over ``n`` unique rows: the
    index of the first original row of each unique one."""
    first = torch.full((n,), len(inverse), dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, torch.arange(len(inverse), device=inverse.device), reduce="amin")


def continue_batch(model, tok, ids: torch.Tensor, mask: torch.Tensor, cfg: SamplingConfig,
                   seed: int, streamer=None, line_check: Callable[[int, list[int]], bool] | None = None
                   ) -> list[list[int]]:
    """New token ids after each left-padded prompt row (pad after EOS), sampled as ``cfg``
    says and seeded by ``seed``: our :func:`decode` loop, or HF ``generate`` when stop
    strings must be checked as the text grows or a ``streamer`` prints it. ``line_check(row,
    new ids)``: asked at each line end of a row, True ends it (:func:`decode`; not asked on
    the HF path)."""
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if not cfg.stop and streamer is None:
        g = torch.Generator().manual_seed(seed)
        lines = None if line_check is None else (_line_ends(tok), line_check)
        return decode(model, ids, mask, cfg.max_new_tokens, eos, pad, cfg.temperature, cfg.top_k, cfg.top_p,
                      g, lines).tolist()
    from transformers import GenerationConfig

    # a generation config of cfg alone, as our loop samples: nothing from the model's
    # generation_config.json (a repetition_penalty there would apply on this path only)
    params = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": pad, "eos_token_id": eos}
    if cfg.stop:
        params["stop_strings"] = cfg.stop
    if cfg.temperature > 0:
        torch.manual_seed(seed)
        # top_k 0 = off (None would let transformers fill in its default of 50: a filter our own
        # loop and the trainer's log-probs do not apply)
        params.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    else:
        params.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    inner = unwrap_peft(model)
    own = inner.generation_config
    inner.generation_config = GenerationConfig()  # transformers fills what params leave unset from it
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**params),
                             streamer=streamer, tokenizer=tok if cfg.stop else None)
    finally:
        inner.generation_config = own
    return out[:, ids.shape[1] :].tolist()


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of token-id rows padded on the left to the longest, so every
    row's continuation starts at the same column."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def sample(model, tok, prompt_ids: list[list[int]], cfg: SamplingConfig, seed: int = 0) -> Rollout:
    """Sample one completion per entry of ``prompt_ids`` (repeat a prompt for a group).

    Batches of ``cfg.batch_size`` are left-padded so every continuation starts at the same
    column; each batch is seeded from ``seed`` so a rollout is reproducible (a resumed run
    samples the same completions). Dropout is off while sampling.
    """
    t0 = time.perf_counter()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out_ids: list[list[int]] = [[] for _ in prompt_ids]
    truncated = [False] * len(prompt_ids)
    was_training = model.training
    try:
        with generation_model(model, decode_dtype(model, cfg.dtype)) as gen:
            gen.eval()
            for b, s in enumerate(range(0, len(prompt_ids), cfg.batch_size)):
                rows = list(range(s, min(s + cfg.batch_size, len(prompt_ids))))
                ids, mask = left_pad([prompt_ids[i] for i in rows], pad)
                new = continue_batch(gen, tok, ids, mask, cfg, seed * 100_003 + b)
                for r, i in enumerate(rows):
                    out_ids[i] = seq = _own_tokens(tok, new[r], eos, pad, cfg.stop)
                    text = tok.decode(seq, skip_special_tokens=True)
                    truncated[i] = _ran_out(seq, text, eos, cfg)
    finally:
        model.train(was_training)
    texts = [_cut_at_stop(tok.decode(c, skip_special_tokens=True), cfg.stop) for c in out_ids]
    dt = time.perf_counter() - t0
    n_tok = sum(len(c) for c in out_ids)
    return Rollout(prompt_ids, out_ids, texts, truncated, dt, {"rollout/tokens_per_s": n_tok / max(dt, 1e-9)})
