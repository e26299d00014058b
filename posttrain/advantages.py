"""Advantage estimators as pure functions of tensors.

Online RL (:mod:`posttrain.stages.online_rl`) differs between GRPO, RLOO and PPO only in
the function here that turns rewards into per-token advantages (and, for PPO, a critic).

* :func:`group_advantages`: GRPO (Shao et al. 2024, DeepSeekMath §4.1.2), outcome
  supervision: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``, the same for every
  token of completion i; ``scale='batch'`` divides by the batch std instead (Hu et al.
  2025, REINFORCE++/Lite PPO), ``scale='none'`` does not divide (Dr. GRPO, Liu et al. 2025).
* :func:`rloo_advantages`: REINFORCE leave-one-out (Ahmadian et al. 2024):
  ``A_i = r_i - mean_{j != i} r_j``.
* :func:`process_advantages`: GRPO with process supervision (DeepSeekMath §4.1.3): every
  step reward of a group is normalised by the mean and std of all step rewards of that
  group, and a token's advantage is the sum of the normalised rewards of the steps that
  end at or after it.
* :func:`gae`: generalised advantage estimation (Schulman et al. 2016) for PPO with a critic,
  ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = Σ_l (γλ)^l δ_{t+l}``, returns ``A_t + V_t``.
* :func:`whiten`: masked standardisation (PPO's advantage whitening).

Missing rewards. A reward of NaN (a reward function returned None: "no score") gives that
completion advantage 0 and is left out of its group's statistics.
"""

from __future__ import annotations

import math

import torch


def _group_view(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def _nan_mean_std(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std ignoring NaNs (std 0 with fewer than two values)."""
    valid = ~torch.isnan(x)
    n = valid.sum(dim) if dim is not None else valid.sum()
    x0 = torch.where(valid, x, torch.zeros_like(x))
    mean = x0.sum(dim) / n.clamp_min(1) if dim is not None else x0.sum() / n.clamp_min(1)
    m = mean.unsqueeze(dim) if dim is not None else mean
    sq = torch.where(valid, (x - m) ** 2, torch.zeros_like(x))
    var = (sq.sum(dim) if dim is not None else sq.sum()) / (n - 1).clamp_min(1)
    return mean, var.sqrt()


def groups_with_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N / group_size,)`` bools: which groups hold two scored completions whose rewards
    differ. The others (all equal, or fewer than two scores) get advantage 0 for every
    completion from :func:`group_advantages` and :func:`rloo_advantages`: no gradient (DAPO's
    dynamic sampling drops them)."""
    g = _group_view(rewards, group_size)
    valid = ~torch.isnan(g)
    hi = torch.where(valid, g, torch.full_like(g, -torch.inf)).amax(1)
    lo = torch.where(valid, g, torch.full_like(g, torch.inf)).amin(1)
    return hi > lo


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages, one per completion.

    Args:
        rewards: ``(N,)`` rewards, groups of ``group_size`` consecutive completions of one
            prompt; NaN = no score.
        scale: ``group`` (divide by the group std), ``batch`` (by the std of the whole batch),
            or ``none`` (Dr. GRPO: only subtract the group mean).
        eps: added to the std (TRL uses 1e-4).

    Returns:
        ``(N,)`` advantages (0 where the reward is NaN).
    """
    g = _group_view(rewards, group_size)
    mean, std = _nan_mean_std(g, dim=1)
    adv = g - mean.unsqueeze(1)
    if scale == "group":
        adv = adv / (std.unsqueeze(1) + eps)
    elif scale == "batch":
        adv = adv / (_nan_mean_std(rewards)[1] + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r} (group, batch, none)")
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N,)`` leave-one-out advantages ``r_i - mean_{j != i} r_j`` within each group.

    With NaNs the baseline averages the other scored completions; a completion with no
    other scored completion in its group gets 0.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt")
    g = _group_view(rewards, group_size)
    valid = ~torch.isnan(g)
    total = torch.where(valid, g, torch.zeros_like(g)).sum(1, keepdim=True)
    others = (valid.sum(1, keepdim=True) - valid.long()).clamp_min(1)
    baseline = (total - torch.where(valid, g, torch.zeros_like(g))) / others
    adv = torch.where(valid & (valid.sum(1, keepdim=True) > 1), g - baseline, torch.zeros_like(g))
    return adv.reshape(-1)


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], lengths: list[int],
                       group_size: int, eps: float = 1e-4) -> list[torch.Tensor]:
    """Per-token advantages from per-step rewards (process supervision).

    Args:
        step_rewards: for each completion, the reward of each of its steps.
        step_ends: for each completion, the index (within the completion's tokens) of each
            step's last token, ascending.
        lengths: number of tokens of each completion.
        group_size: completions per prompt (consecutive).

    Returns:
        One ``(lengths[i],)`` tensor per completion:
        ``A_t = Σ_{k: end_k >= t} (r_k - mean(R)) / (std(R) + eps)`` with ``R`` all step
        rewards of the completion's group. Tokens after the last step end get 0; a ``NaN``
        step reward (no score) adds nothing and is left out of ``R``.
    """
    out = []
    for g0 in range(0, len(step_rewards), group_size):
        group = list(range(g0, g0 + group_size))
        flat = torch.tensor([r for i in group for r in step_rewards[i]], dtype=torch.float32)
        mean, std = _nan_mean_std(flat) if flat.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        for i in group:
            adv = torch.zeros(lengths[i])
            for r, end in zip(step_rewards[i], step_ends[i]):
                if math.isnan(r):  # NaN: an unscored step adds nothing (and is left out of the statistics)
                    continue
                # a step reward counts for every token up to and including the step's last token
                adv[: min(end, lengths[i] - 1) + 1] += (r - mean) / (std + eps)
            out.append(adv)
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded sequences.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        values: ``(B, T)`` critic values ``V(s_t)``.
        mask: ``(B, T)`` 1 on real tokens; values after a sequence's last token count as 0
            (the episode ends there).

    Returns:
        (advantages, returns), each ``(B, T)``, zero on padding; returns = advantages + values.
    """
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Standardise ``x`` over the entries where ``mask`` is 1 (all without a mask)."""
    if mask is None:
        mean, var = x.mean(), x.var(unbiased=False)
    else:
        m = mask.to(x.dtype)
        mean = (x * m).sum() / m.sum().clamp_min(1)
        var = (((x - mean) ** 2) * m).sum() / m.sum().clamp_min(1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)
