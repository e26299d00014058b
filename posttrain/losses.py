"""Losses as pure functions of tensors.

Each takes per-token quantities computed by :func:`posttrain.logprobs.token_logprobs`
and returns a scalar to minimise. Later stages add the preference and policy-gradient
losses here.
"""

from __future__ import annotations

import torch


def sft_loss(logprobs: torch.Tensor, normalizer: float | int | None = None) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, averaged over tokens.

    ``loss = -sum_t log p(y_t | y_<t) / normalizer``

    Args:
        logprobs: ``(N,)`` log-probs of the N target tokens of a micro-batch.
        normalizer: number of target tokens in the whole *optimizer* step (all micro-batches
            of a gradient-accumulation cycle). Dividing each micro-batch's sum by the step
            total makes the accumulated gradient equal to that of one big batch with a
            token-level mean (the fix HF's Trainer adopted as ``num_items_in_batch``).
            Defaults to N (plain token mean of this micro-batch).
    """
    n = logprobs.numel() if normalizer is None else normalizer
    if n == 0:
        return logprobs.sum() * 0.0  # keeps the graph (all ranks must call backward)
    return -logprobs.sum() / n
