"""The one function that computes per-token log-probabilities of target tokens.

Every stage that needs log p(token | prefix) (the SFT loss, eval perplexity, DPO,
reference and old-policy log-probs in RL) calls :func:`token_logprobs`. It runs the
decoder once, keeps only the hidden states whose next token is a target (``labels !=
-100``), and applies the LM head to those alone: on chat data most tokens are prompt,
so this skips most of the (N, vocab) logits that a plain ``model(...).logits`` would
materialise (49,152 columns for SmolLM2), and their softmax. The head itself runs in
row chunks (:func:`head_logprobs`); the softmax that backward needs is kept when it is
small and otherwise recomputed there block by block, so a long batch never holds an
``(N, vocab)`` matrix across the decoder's backward.

Convention (as in transformers): ``labels`` is aligned with ``input_ids``; the log-prob
at position ``t`` is log p(labels[t] | input_ids[:t]), computed from the hidden state at
``t - 1``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from posttrain.data.tokenize import IGNORE
from posttrain.models import final_hidden_states, gathered, unwrap_peft

#: causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)`` (no scaling or capping)
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}


def head_transform(model) -> tuple[float, float | None]:
    """``(scale, softcap)`` a causal LM applies to its LM head's output, read from its config:
    Cohere's ``logit_scale`` (multiplied), Granite's ``logits_scaling`` (divided), Gemma-2/3's
    ``final_logit_softcapping`` (``cap * tanh(z / cap)``, after the scaling).

    The log-prob path applies the head to the decoder's states itself, so for an architecture
    outside :data:`PLAIN_HEAD` this is checked once per model against the model's own forward
    on a few tokens: one that transforms its logits some other way is refused, not trained on
    wrong log-probs. (Under FSDP the config is trusted: its root forward must run first.)
    """
    base = unwrap_peft(model)
    base = getattr(base, "module", base)
    known = getattr(base, "_posttrain_head_transform", None)
    if known is not None:
        return known
    cfg = base.config.get_text_config()
    scale = float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)
    cap = getattr(cfg, "final_logit_softcapping", None) or None
    found = (scale, float(cap) if cap else None)
    from posttrain import distributed

    if getattr(cfg, "model_type", "") not in PLAIN_HEAD and not distributed.fsdp():
        _check_head_transform(model, found)
    base._posttrain_head_transform = found
    return found


def _transformed(logits: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    logits = logits * scale if scale != 1.0 else logits
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.no_grad()
def _check_head_transform(model, found: tuple[float, float | None]) -> None:
    from posttrain.config import ConfigError

    decoder, head = decoder_and_head(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.arange(1, 9, device=device).unsqueeze(0) % unwrap_peft(model).config.get_text_config().vocab_size
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        h = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        ours = _transformed(head(h).float(), *found)
    finally:
        model.train(was_training)
    if not torch.allclose(ours, ref, rtol=1e-2, atol=1e-2 * (1.0 + float(ref.abs().max()))):
        kind = getattr(unwrap_peft(model).config, "model_type", "?")
        raise ConfigError(
            f"model type {kind!r}: its logits are not lm_head(decoder states) with the scaling and soft-capping "
            f"posttrain knows (logit_scale, logits_scaling, final_logit_softcapping; max difference "
            f"{float((ours - ref).abs().max()):.3g}), so posttrain's log-probs would be wrong for it: not supported")


def decoder_and_head(model):
    """(decoder returning hidden states, output head) of a causal LM, peft-wrapped or not."""
    base = unwrap_peft(model)
    base = getattr(base, "module", base)  # DDP
    return base.get_decoder(), base.get_output_embeddings()


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    extras: tuple[str, ...] = (),
):
    """Log-probs of the target tokens, shape ``(N,)`` in row-major order of ``labels != -100``.

    Args:
        input_ids: ``(B, T)`` token ids.
        labels: ``(B, T)`` target ids, ``-100`` where no log-prob is wanted (position 0 is
            never a target: nothing precedes it).
        attention_mask: ``(B, T)`` 1 for real tokens (padded batches), or None.
        position_ids: ``(B, T)`` positions; restarting positions mark packed sequences.
        temperature: logits are divided by it (sampling temperature of a rollout).
        extras: also return, in this order, any of ``"entropy"`` (``(N,)`` entropy of the
            predictive distribution at each target) and ``"hidden"`` (``(N, H)`` the hidden
            states that predict each target: a value head reads them).

    Returns:
        ``(N,)`` float32 log-probs, N = number of target tokens (after the first position);
        with ``extras``, a tuple ``(logprobs, *extras)``.
    """
    decoder, head = decoder_and_head(model)
    hidden = final_hidden_states(model, decoder, input_ids, attention_mask, position_ids, causal_lm=True)  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1)
    select = targets != IGNORE
    # (N, H): the states that predict a target
    return _states_logprobs(model, head, hidden[:, :-1][select], targets[select], temperature, extras)


def packed_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, extras: tuple[str, ...] = ()):
    """:func:`token_logprobs` of a prefix-shared batch
    (:func:`~posttrain.data.tokenize.collate_shared_prefix`): each distinct target computed once,
    returned per example in ``member_targets`` order (extras likewise)."""
    decoder, head = decoder_and_head(model)
    hidden = final_hidden_states(model, decoder, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                 causal_lm=True)
    out = _states_logprobs(model, head, hidden.flatten(0, 1)[batch["sources"]], batch["targets"], temperature, extras)
    index = batch["member_targets"]
    return out[index] if not extras else tuple(x[index] for x in out)


def _states_logprobs(model, head, h, targets, temperature, extras):
    """The LM head and log-softmax on the selected states ``h`` ``(N, H)`` (see token_logprobs)."""
    want_entropy = "entropy" in extras
    for name in extras:
        if name not in ("entropy", "hidden"):
            raise ValueError(f"unknown extra {name!r} (entropy, hidden)")
    scale, cap = head_transform(model)
    if isinstance(head, torch.nn.Linear) and cap is None:
        # mixed precision: the head's matmuls run in bf16 too (the softmax sums stay fp32); a
        # logit scale is a temperature: softmax(s z / t) = softmax(z / (t / s))
        lp, ent = head_logprobs(h, gathered(head.weight), gathered(head.bias), targets, temperature / scale,
                                want_entropy, compute_dtype=getattr(model, "posttrain_autocast", None))
    else:  # a wrapped head (e.g. LoRA on lm_head) or soft-capped logits: plain autograd over the full logits
        lp, ent = _full_head_logprobs(_transformed(head(h).float(), scale, cap), targets, temperature, want_entropy)
    if not extras:
        return lp
    return (lp, *[ent if name == "entropy" else h for name in extras])


# --------------------------------------------------------------------------- LM head + log-softmax

#: Rows of the ``(rows, vocab)`` logits block computed at once (256 x 49,152 fp32 is 48 MiB).
#: Measured on the 2-core CPU (1,200 target tokens, SmolLM2's head, forward + backward):
#: 128 rows 2.35 s, 256 rows 1.89 s, 512 rows 1.80 s with the softmax kept; the blocks are
#: reused from the heap because :mod:`posttrain.allocator` keeps freed memory mapped.
HEAD_CHUNK_ROWS = 256


def _full_head_logprobs(logits, targets, temperature, want_entropy):
    if temperature != 1.0:
        logits = logits / temperature
    lp = -F.cross_entropy(logits, targets, reduction="none")
    ent = None
    if want_entropy:
        with torch.no_grad():
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h, weight, bias, inv_temp, out=None):
    """``(h W^T + b) / T`` in the accumulation dtype, written into ``out`` when given."""
    if out is not None and out.dtype == h.dtype:
        logits = torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
    else:  # bf16/fp16 logits are summed in fp32 (written straight into ``out``: one conversion)
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        logits = out.copy_(logits) if out is not None else logits.to(_acc(logits.dtype))
    if inv_temp != 1.0:
        logits.mul_(inv_temp)
    return logits


def _in_dtype(dtype: torch.dtype | None, h, weight, bias):
    """``(h, weight, bias)`` cast to ``dtype`` (None: as they are; a missing bias stays None)."""
    if dtype is None:
        return h, weight, bias
    return h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _head_forward(h, weight, bias, targets, inv_temp, want_entropy, chunk, probs=None):
    """Log-probs, log-sum-exps and entropies (or None) of each row; with ``probs`` (an
    ``(N, vocab)`` buffer) each row's softmax is left there for the backward pass."""
    n, acc = h.shape[0], _acc(h.dtype)
    lp = torch.empty(n, dtype=acc, device=h.device)
    lse = torch.empty(n, dtype=acc, device=h.device)
    ent = torch.empty(n, dtype=acc, device=h.device) if want_entropy else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        logits = _chunk_logits(h[s:e], weight, bias, inv_temp, None if probs is None else probs[s:e])
        target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)
        if want_entropy:  # H = lse - sum p * logit (needs the logits after the softmax)
            z = torch.logsumexp(logits, -1)
            p = logits.sub(z[:, None]).exp_()
            ent[s:e] = z - (p * logits).sum(-1)
            if probs is not None:
                logits.copy_(p)
        else:  # the softmax in place: logits -> exp(logits - max) -> / sum
            m = logits.amax(-1, keepdim=True)
            p = logits.sub_(m).exp_()
            total = p.sum(-1, keepdim=True)
            z = (m + total.log()).squeeze(1)
            if probs is not None:
                p.div_(total)
        lse[s:e] = z
        lp[s:e] = target_logit - z
    return lp, lse, ent


#: Up to this many bytes, the forward pass keeps the ``(N, vocab)`` softmax for backward
#: (3 matmuls per chunk in all); above it, backward recomputes each logits block from the
#: saved hidden states (4 matmuls, no ``(N, vocab)`` matrix alive across the decoder's
#: backward). 2,048 target tokens x 49,152 fp32 is 384 MiB. Env ``POSTTRAIN_HEAD_SAVE_MIB``
#: overrides it (0 = always recompute).
HEAD_SAVE_BYTES = int(os.environ.get("POSTTRAIN_HEAD_SAVE_MIB", "512")) * 2**20


class _HeadLogprobs(torch.autograd.Function):
    """Log-probs of ``targets`` under ``softmax((h W^T + b) / T)``, chunked over rows.

    The softmax needed by backward is either kept from the forward pass (when ``(N, vocab)``
    fits in :data:`HEAD_SAVE_BYTES`) or recomputed there block by block from ``h``, so only
    ``(N,)`` log-sum-exps are kept and no ``(N, vocab)`` matrix lives across the whole
    decoder backward.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, inv_temp, want_entropy, chunk, save_bytes, compute_dtype):
        # the inputs in the compute dtype, cast once (kept for backward: no second cast there)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        h, weight, bias = _in_dtype(compute_dtype, h, weight, bias)
        acc = _acc(h.dtype)
        keep = h.shape[0] * weight.shape[0] * acc.itemsize <= save_bytes
        probs = torch.empty(h.shape[0], weight.shape[0], dtype=acc, device=h.device) if keep else None
        lp, lse, ent = _head_forward(h, weight, bias, targets, inv_temp, want_entropy, chunk, probs)
        ctx.save_for_backward(h, weight, bias, targets, lse, probs)  # freed after backward
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        h, weight, bias, targets, lse, probs = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_h = torch.empty_like(h) if need_h else None
        acc = _acc(weight.dtype)
        grad_w = grad_b = None
        # bf16/fp16 weights with the softmax kept (it fits the memory budget, so half of it does):
        # every block's d goes into one low-precision (N, vocab) matrix and the weight gradient is
        # one matmul at the end, rounded once as under autocast. Per block, each (vocab, H)
        # product would have to be cast to fp32 to be summed: 4 such casts of SmolLM2's head
        # took 0.5 s of a 4.7 s step.
        d_all = (torch.empty(h.shape[0], weight.shape[0], dtype=weight.dtype, device=h.device)
                 if need_w and weight.dtype != acc and probs is not None else None)
        for s in range(0, h.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, h.shape[0])
            hc, g, t = h[s:e], grad_lp[s:e].to(lse.dtype), targets[s:e, None]
            # d lp / d logit = (onehot(target) - softmax) * upstream grad / T
            if ctx.inv_temp != 1.0:
                g = g * ctx.inv_temp
            if d_all is not None:  # written in low precision in one pass; the target column set apart
                d = torch.mul(probs[s:e], -g[:, None], out=d_all[s:e])
                d.scatter_(1, t, (g - probs[s:e].gather(1, t).squeeze(1) * g)[:, None].to(d.dtype))
            else:
                if probs is None:
                    d = _chunk_logits(hc, weight, bias, ctx.inv_temp).sub_(lse[s:e, None]).exp_().mul_(-g[:, None])
                else:  # (not in place: a retained graph may run backward again)
                    d = probs[s:e] * -g[:, None]
                d = d.scatter_add_(1, t, g[:, None]).to(weight.dtype)
            if need_h:
                torch.mm(d, weight, out=grad_h[s:e])
            if need_w and d_all is None:  # the first block writes, the others add (no zeroed (V, H) buffer)
                if weight.dtype == acc:
                    grad_w = d.T @ hc if grad_w is None else grad_w.addmm_(d.T, hc)
                else:  # low precision, softmax recomputed: each block's product summed in fp32
                    part = (d.T @ hc).to(acc)
                    grad_w = part if grad_w is None else grad_w.add_(part)
            if need_b:
                grad_b = d.sum(0).to(acc) if grad_b is None else grad_b.add_(d.sum(0).to(acc))
        if d_all is not None:
            grad_w = d_all.T @ h
        if grad_h is not None:
            grad_h = grad_h.to(h_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def head_logprobs(h, weight, bias, targets, temperature: float = 1.0, want_entropy: bool = False,
                  chunk: int = HEAD_CHUNK_ROWS, save_bytes: int | None = None,
                  compute_dtype: torch.dtype | None = None):
    """``(log p(target), entropy or None)`` from final hidden states ``h`` ``(N, H)`` and the LM
    head ``weight`` ``(V, H)`` / ``bias``, computing ``chunk`` rows of logits at a time; under
    autograd the softmax is kept for backward when it fits in ``save_bytes`` (default
    :data:`HEAD_SAVE_BYTES`; 0 = always recompute it there).

    The same value as ``-cross_entropy(h @ weight.T / temperature, targets)``; gradients flow
    to ``h``, ``weight`` and ``bias`` (tied embeddings included); entropy has no gradient.
    ``compute_dtype`` (mixed precision: bf16): the matmuls run in it, as under autocast (each
    logits block rounded to it, then soft-maxed in fp32); gradients return in the inputs'
    dtypes, the weight's summed over blocks in fp32.
    """
    inv_temp = 1.0 / temperature
    if compute_dtype == h.dtype:
        compute_dtype = None
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        save = HEAD_SAVE_BYTES if save_bytes is None else save_bytes
        return _HeadLogprobs.apply(h, weight, bias, targets, inv_temp, want_entropy, chunk, save, compute_dtype)
    h, weight, bias = _in_dtype(compute_dtype, h, weight, bias)
    lp, _, ent = _head_forward(h, weight, bias, targets, inv_temp, want_entropy, chunk)
    return lp, ent


def batch_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, extras: tuple[str, ...] = ()):
    """:func:`token_logprobs` for a collated batch dict (``pad``, ``flatten`` or prefix-shared layout)."""
    if "sources" in batch:
        return packed_logprobs(model, batch, temperature, extras)
    return token_logprobs(
        model,
        batch["input_ids"],
        batch["labels"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        temperature=temperature,
        extras=extras,
    )


def num_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def sequence_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target log-probs and target counts, each ``(B,)``, for a padded batch
    (a sequence per row) or a prefix-shared one (a sequence per member, in member order).

    ``sum_t log p(y_t | y_<t)`` over each sequence's target tokens: the log-likelihood of a
    completion (DPO, reference log-probs, judges).
    """
    lp = batch_logprobs(model, batch, temperature)  # (N,)
    if "member_of" in batch:
        rows, n = batch["member_of"], int(batch["members"])
    else:
        select = batch["labels"][:, 1:] != IGNORE  # (B, T-1)
        rows = select.nonzero()[:, 0]  # row of each target, in the same row-major order as lp
        n = select.shape[0]
    sums = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, torch.bincount(rows, minlength=n)
