"""Losses as pure functions of tensors.

Each takes per-token or per-sequence quantities (log-probs from
:func:`posttrain.logprobs.token_logprobs`, rewards from a scalar head) and returns a
scalar to minimise. Implemented: SFT negative log-likelihood; Bradley–Terry reward-model
loss with margin, soft labels and reward centering; the DPO family (DPO, IPO, hinge,
conservative DPO via label smoothing); per-step binary cross-entropy for process reward
models. Shapes are given in each docstring; ``B`` counts pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(logprobs: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
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


# --------------------------------------------------------------------------- preference losses


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(w * v) / sum(w)`` (plain mean without weights); shapes ``(B,)``."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def soft_logsigmoid_loss(logits: torch.Tensor, label: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-pair ``-(q log σ(z) + (1 - q) log σ(-z))`` for target probability ``q``; shape ``(B,)``.

    With ``q = 1`` this is ``-log σ(z)``. The binary cross-entropy of a preference whose
    label says "chosen is better with probability q" (soft labels from an AI judge, or
    conservative DPO's label smoothing).
    """
    pos = F.logsigmoid(logits)
    if isinstance(label, float) and label == 1.0:
        return -pos
    return -(label * pos + (1 - label) * F.logsigmoid(-logits))


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    label: torch.Tensor | float = 1.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Reward-model loss ``-log σ(r_c - r_r - m)`` (+ ``η · mean((r_c + r_r)^2)``).

    Bradley–Terry pairwise loss as in InstructGPT (Ouyang et al. 2022, eq. 1); ``margin``
    ``m`` as in Llama 2 (Touvron et al. 2023); the optional centering term (Eisenstein et
    al. 2023) keeps rewards near zero mean, as TRL's ``center_rewards_coefficient``.

    Args:
        r_chosen, r_rejected: ``(B,)`` scalar rewards.
        margin: ``(B,)`` required reward gap, or None (0).
        weight: ``(B,)`` pair weights (a ranked prompt's pairs share weight 1), or None.
        label: ``(B,)`` or scalar probability that chosen is preferred (soft labels).
        center_coef: η of the centering term (0 = off).
    """
    d = r_chosen - r_rejected
    if margin is None:
        per_pair = soft_logsigmoid_loss(d, label)
    else:  # each side must win by the margin: -(q log σ(d - m) + (1 - q) log σ(-d - m))
        per_pair = -F.logsigmoid(d - margin)
        if not (isinstance(label, float) and label == 1.0):
            per_pair = label * per_pair - (1 - label) * F.logsigmoid(-d - margin)
    loss = weighted_mean(per_pair, weight)
    if center_coef:
        loss = loss + center_coef * weighted_mean((r_chosen + r_rejected) ** 2, weight)
    return loss


def dpo_sigmoid(delta: torch.Tensor, beta: float, label: torch.Tensor | float = 1.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log σ(β Δ)`` per pair, with
    ``Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))``. With a soft label
    ``q`` (conservative DPO, label smoothing ε gives q = 1 - ε) the loss is
    ``-q log σ(βΔ) - (1-q) log σ(-βΔ)``."""
    return soft_logsigmoid_loss(beta * delta, label)


def ipo(delta: torch.Tensor, beta: float, label: torch.Tensor | float = 1.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(Δ - 1/(2β))^2`` per pair, β playing the paper's τ.

    ``Δ`` is expected length-normalised (per-token average log-ratios), as TRL computes it and
    as the IPO authors' reported results use; see :func:`dpo_loss`. A soft label q sets the
    target to ``(2q - 1)/(2β)``, which is ``1/(2β)`` for q = 1."""
    target = (2 * label - 1) / (2 * beta)
    return (delta - target) ** 2


def hinge(delta: torch.Tensor, beta: float, label: torch.Tensor | float = 1.0) -> torch.Tensor:
    """SLiC-style hinge (Zhao et al. 2023): ``max(0, 1 - β Δ)`` per pair (labels are hard:
    a pair with q < 0.5 is flipped)."""
    sign = torch.where(torch.as_tensor(label) >= 0.5, 1.0, -1.0)
    return torch.relu(1 - beta * sign * delta)


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "ipo": ipo, "hinge": hinge}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    label: torch.Tensor | float = 1.0,
    weight: torch.Tensor | None = None,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family on summed completion log-probs; returns (loss, chosen reward, rejected reward).

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs summed over completion tokens.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the frozen reference.
        beta: β, the strength of the implicit KL constraint.
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge`` (see :data:`DPO_LOSSES`).
        label_smoothing: ε of conservative DPO (Mitchell 2023): labels are flipped with
            probability ε, i.e. the target probability becomes ``(1-ε) q + ε (1-q)``.
        label: ``(B,)`` or scalar probability that chosen is preferred (soft AI-judge labels).
        weight: ``(B,)`` pair weights for the mean, or None.
        chosen_len, rejected_len: ``(B,)`` completion token counts; required by ``ipo``,
            whose log-ratios are averaged per token.

    The implicit rewards ``β (log π - log π_ref)`` are returned detached, per pair.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {sorted(DPO_LOSSES)}")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo needs chosen_len and rejected_len (per-token averaged log-ratios)")
        delta = chosen_ratio / chosen_len.clamp_min(1) - rejected_ratio / rejected_len.clamp_min(1)
    else:
        delta = chosen_ratio - rejected_ratio
    q = label if not label_smoothing else (1 - label_smoothing) * label + label_smoothing * (1 - label)
    losses = DPO_LOSSES[loss_type](delta, beta, q)
    return weighted_mean(losses, weight), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# --------------------------------------------------------------------------- process reward


def step_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Process-reward loss: binary cross-entropy of each step's score against its label.

    Args:
        logits: ``(S,)`` one logit per step (all steps of the batch, flattened).
        labels: ``(S,)`` step correctness in [0, 1] (hard 0/1 or soft, e.g. Math-Shepherd's
            Monte-Carlo estimates).
    """
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


# --------------------------------------------------------------------------- online RL
#
# Token-level quantities are flat ``(N,)`` vectors over all completion tokens of a batch
# (the layout :func:`posttrain.logprobs.token_logprobs` returns), with ``seq`` ``(N,)``
# giving each token's completion index; aggregation turns them into one scalar.


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020).

    With ``log r = log π_ref(y) - log π(y)``: ``k1 = -log r`` (unbiased, high variance, may be
    negative), ``k2 = (log r)^2 / 2`` (biased, low variance), ``k3 = r - 1 - log r`` (unbiased,
    low variance, always ≥ 0; GRPO's choice, DeepSeekMath eq. 4).
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float = 0.2,
                        clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), to minimise.

    ``-min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)`` with ``ρ = exp(logp - old_logp)``;
    ``clip_high`` defaults to ``clip_low`` (DAPO's "clip-higher" sets it larger).

    Returns:
        (per-token loss ``(N,)``, per-token 0/1 "the clip was active" ``(N,)``).
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -torch.min(unclipped, clipped)
    return loss, (clipped < unclipped).float().detach()


def aggregate(per_token: torch.Tensor, seq: torch.Tensor, num_seqs: int, mode: str = "seq_mean",
              max_len: int | None = None) -> torch.Tensor:
    """One scalar from per-token losses ``(N,)`` of ``num_seqs`` completions.

    ``seq_mean``: mean over tokens of each completion, then over completions (GRPO paper);
    ``token_mean``: mean over all tokens of the batch (DAPO; TRL's ``bnpo``/``dapo``);
    ``constant``: sum divided by ``num_seqs * max_len`` (Dr. GRPO: no length bias).
    """
    if mode == "token_mean":
        return per_token.sum() / max(per_token.numel(), 1)
    if mode == "constant":
        if not max_len:
            raise ValueError("constant aggregation needs max_len (the maximum completion length)")
        return per_token.sum() / (num_seqs * max_len)
    if mode == "seq_mean":
        sums = torch.zeros(num_seqs, dtype=per_token.dtype, device=per_token.device).index_add(0, seq, per_token)
        counts = torch.zeros(num_seqs, dtype=per_token.dtype, device=per_token.device).index_add(
            0, seq, torch.ones_like(per_token))
        return (sums / counts.clamp_min(1)).mean()
    raise ValueError(f"unknown aggregation {mode!r} (seq_mean, token_mean, constant)")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, seq: torch.Tensor, num_seqs: int,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, clip_low: float = 0.2,
              clip_high: float | None = None, agg: str = "seq_mean", max_len: int | None = None,
              kl_kind: str = "k3", kl_ratio_correction: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (DeepSeekMath eq. 3) per token: clipped surrogate + β · KL(π ‖ π_ref).

    Args:
        logp, old_logp: ``(N,)`` log-probs under the current and the sampling policy.
        adv: ``(N,)`` per-token advantages.
        seq: ``(N,)`` completion index of every token; ``num_seqs`` completions in all.
        ref_logp: ``(N,)`` reference log-probs (needed when ``beta > 0``).
        agg: token aggregation, see :func:`aggregate`.
        kl_ratio_correction: multiply the per-token KL by the importance ratio π/π_old, since
            the tokens were sampled from π_old (TRL's ``use_bias_correction_kl``); off by
            default, as in DeepSeekMath.

    Returns:
        (loss, stats) with stats ``kl`` and ``clip_fraction`` as per-token tensors (detached).
    """
    per_token, clipped = clipped_policy_loss(logp, old_logp, adv, clip_low, clip_high)
    stats = {"clip_fraction": clipped}
    if beta:
        kl = kl_estimate(logp, ref_logp, kl_kind)
        if kl_ratio_correction:
            kl = kl * torch.exp(logp - old_logp)
        per_token = per_token + beta * kl
        stats["kl"] = kl.detach()
    return aggregate(per_token, seq, num_seqs, agg, max_len), stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """PPO value loss per token: ``½ max((V - R)^2, (clip(V, V_old ± ε) - R)^2)``; shape ``(N,)``."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
