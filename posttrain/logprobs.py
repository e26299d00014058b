"""The one function that computes per-token log-probabilities of target tokens.

Every stage that needs log p(token | prefix) (the SFT loss, eval perplexity, DPO,
reference and old-policy log-probs in RL) calls :func:`token_logprobs`. It runs the
decoder once, keeps only the hidden states whose next token is a target (``labels !=
-100``), and applies the LM head to those alone: on chat data most tokens are prompt,
so this skips most of the (N, vocab) logits that a plain ``model(...).logits`` would
materialise (49,152 columns for SmolLM2), and their softmax.

Convention (as in transformers): ``labels`` is aligned with ``input_ids``; the log-prob
at position ``t`` is log p(labels[t] | input_ids[:t]), computed from the hidden state at
``t - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.data.tokenize import IGNORE


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
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1)
    select = targets != IGNORE
    h = hidden[:, :-1][select]  # (N, H): states that predict a target
    logits = head(h).float()  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    lp = -F.cross_entropy(logits, targets[select], reduction="none")
    if not extras:
        return lp
    more = []
    for name in extras:
        if name == "entropy":
            with torch.no_grad():
                logp_all = torch.log_softmax(logits, -1)
                more.append(-(logp_all.exp() * logp_all).sum(-1))
        elif name == "hidden":
            more.append(h)
        else:
            raise ValueError(f"unknown extra {name!r} (entropy, hidden)")
    return (lp, *more)


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
