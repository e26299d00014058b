"""The one function that computes per-token log-probabilities of target tokens.

Every stage that needs log p(token | prefix) (the SFT loss, eval perplexity, DPO,
reference and old-policy log-probs in RL) calls :func:`token_logprobs`. It runs the
decoder once, keeps only the hidden states whose next token is a target (``labels !=
-100``), and applies the LM head to those alone: on chat data most tokens are prompt,
so this skips most of the (N, vocab) logits that a plain ``model(...).logits`` would
materialise (49,152 columns for SmolLM2), and their softmax. The head itself runs in
row chunks (:func:`head_logprobs`), with the logits recomputed in backward, so no
``(N, vocab)`` matrix exists at any time.

Convention (as in transformers): ``labels`` is aligned with ``input_ids``; the log-prob
at position ``t`` is log p(labels[t] | input_ids[:t]), computed from the hidden state at
``t - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.data.tokenize import IGNORE
from posttrain.models import final_hidden_states, gathered


def decoder_and_head(model):
    """(decoder returning hidden states, output head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
    h = hidden[:, :-1][select]  # (N, H): states that predict a target
    want_entropy = "entropy" in extras
    for name in extras:
        if name not in ("entropy", "hidden"):
            raise ValueError(f"unknown extra {name!r} (entropy, hidden)")
    if isinstance(head, torch.nn.Linear):
        lp, ent = head_logprobs(h, gathered(head.weight), gathered(head.bias), targets[select], temperature,
                                want_entropy)
    else:  # a wrapped head (e.g. LoRA on lm_head): plain autograd over the full logits
        lp, ent = _full_head_logprobs(head(h).float(), targets[select], temperature, want_entropy)
    if not extras:
        return lp
    return (lp, *[ent if name == "entropy" else h for name in extras])


# --------------------------------------------------------------------------- LM head + log-softmax

#: Rows of the ``(rows, vocab)`` logits block computed at once. 128 x 49,152 fp32 is 24 MiB:
#: under glibc's largest mmap threshold, so the block's memory is reused from the heap
#: instead of being mapped and zero-filled by the kernel on every call (which cost ~10% of
#: a CPU training step when the whole ``(N, vocab)`` matrix was materialised).
HEAD_CHUNK_ROWS = 128


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


def _chunk_logits(h, weight, bias, inv_temp):
    logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    logits = logits.to(_acc(logits.dtype))  # bf16/fp16 logits are summed in fp32
    if inv_temp != 1.0:
        logits.mul_(inv_temp)
    return logits


def _head_forward(h, weight, bias, targets, inv_temp, want_entropy, chunk):
    n, acc = h.shape[0], _acc(h.dtype)
    lp = torch.empty(n, dtype=acc, device=h.device)
    lse = torch.empty(n, dtype=acc, device=h.device)
    ent = torch.empty(n, dtype=acc, device=h.device) if want_entropy else None
    for s in range(0, n, chunk):
        logits = _chunk_logits(h[s : s + chunk], weight, bias, inv_temp)
        z = torch.logsumexp(logits, -1)
        lse[s : s + chunk] = z
        lp[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - z
        if want_entropy:  # H = lse - sum p * logit
            p = logits.sub(z[:, None]).exp_()
            ent[s : s + chunk] = z - (p * logits).sum(-1)
    return lp, lse, ent


class _HeadLogprobs(torch.autograd.Function):
    """Log-probs of ``targets`` under ``softmax((h W^T + b) / T)``, chunked over rows.

    Only ``(N,)`` log-sum-exps are kept for backward; each logits block is recomputed
    there (one extra ``h W^T`` matmul per chunk) instead of holding the ``(N, vocab)``
    logits and their softmax alive across the whole decoder backward.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, inv_temp, want_entropy, chunk):
        lp, lse, ent = _head_forward(h, weight, bias, targets, inv_temp, want_entropy, chunk)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        acc = _acc(weight.dtype)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, g = h[s : s + ctx.chunk], grad_lp[s : s + ctx.chunk].to(lse.dtype)
            # d lp / d logit = onehot(target) - softmax; times the upstream grad and 1/T
            d = _chunk_logits(hc, weight, bias, ctx.inv_temp).sub_(lse[s : s + ctx.chunk, None]).exp_()
            d.mul_(-g[:, None])
            d.scatter_add_(1, targets[s : s + ctx.chunk, None], g[:, None])
            if ctx.inv_temp != 1.0:
                d.mul_(ctx.inv_temp)
            d = d.to(weight.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = d @ weight
            if need_w:
                grad_w.addmm_(d.T.to(acc), hc.to(acc))  # no-ops in fp32
            if need_b:
                grad_b += d.sum(0).to(acc)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def head_logprobs(h, weight, bias, targets, temperature: float = 1.0, want_entropy: bool = False,
                  chunk: int = HEAD_CHUNK_ROWS):
    """``(log p(target), entropy or None)`` from final hidden states ``h`` ``(N, H)`` and the LM
    head ``weight`` ``(V, H)`` / ``bias``, never materialising more than ``chunk`` rows of logits.

    The same value as ``-cross_entropy(h @ weight.T / temperature, targets)``; gradients flow
    to ``h``, ``weight`` and ``bias`` (tied embeddings included); entropy has no gradient.
    """
    inv_temp = 1.0 / temperature
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _HeadLogprobs.apply(h, weight, bias, targets, inv_temp, want_entropy, chunk)
    lp, _, ent = _head_forward(h, weight, bias, targets, inv_temp, want_entropy, chunk)
    return lp, ent


def batch_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """:func:`token_logprobs` for a collated batch dict (``pad`` or ``flatten`` layout)."""
    return token_logprobs(
        model,
        batch["input_ids"],
        batch["labels"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        temperature=temperature,
    )


def num_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def sequence_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of target log-probs and target counts, each ``(B,)``, for a padded batch.

    ``sum_t log p(y_t | y_<t)`` over each row's target tokens: the sequence log-likelihood
    of a completion (DPO, reference log-probs, judges).
    """
    lp = batch_logprobs(model, batch, temperature)  # (N,)
    select = batch["labels"][:, 1:] != IGNORE  # (B, T-1)
    rows = select.nonzero()[:, 0]  # row of each target, in the same row-major order as lp
    sums = torch.zeros(select.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, select.sum(1)
