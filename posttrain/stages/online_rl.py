"""Online RL: GRPO, RLOO and PPO in one loop that differs only in the advantage estimator.

Each step, top to bottom:

1. **rollout**: ``batch_size`` prompts, ``group_size`` completions each, sampled from the
   current policy (:func:`posttrain.rollout.sample`, seeded by the step); with
   ``dynamic_sampling`` (DAPO) the groups without reward spread are dropped and groups of
   further prompts sampled, up to ``max_sampling_rounds`` rollouts, until ``batch_size`` remain;
2. **rewards**: the weighted sum of the reward functions (:class:`posttrain.rewards.RewardSet`);
   ``None`` = no score, zero advantage;
3. **no-grad pass** where needed: the sampling policy's log-probs (``num_iterations > 1``,
   or PPO), the reference's (``beta > 0``; under LoRA the same weights with adapters
   disabled, otherwise a frozen copy), and the critic's values (PPO);
4. **advantages** (:mod:`posttrain.advantages`): ``group`` (GRPO: group-normalised outcome
   reward, or with ``process_reward_model`` DeepSeekMath's process supervision), ``rloo``
   (leave-one-out baseline), or ``gae`` (PPO: per-token reward ``-β_kl·(log π_old - log
   π_ref)`` with the score added at the last token, GAE(γ, λ) on a critic, whitened);
5. **updates**: ``num_iterations`` passes over the rollout in minibatches of
   ``minibatch_size`` completions (one optimizer step each), loss = clipped surrogate
   (+ ``beta`` · k3 KL in the loss for GRPO/RLOO) (+ ``vf_coef`` · clipped value loss for
   PPO), aggregated over tokens as ``loss_agg`` says;
6. **log / eval / checkpoint**: ``metrics.jsonl`` (``reward/*``, ``rollout/*``, ``loss/*``,
   ``policy/*``, ``perf/*``), ``samples.jsonl`` every ``sample_every`` steps.

Departures and simplifications, stated plainly:

* The critic (PPO) is a linear value head, either on the policy's own final hidden states
  (``critic: shared``: one copy of the weights; its gradient reaches the backbone scaled by
  ``vf_coef``) or on a separate, fully trained copy of the starting model's decoder
  (``critic: separate``: twice the weights, no interference with the policy).
* With ``num_iterations = 1`` and no PPO, the "old" log-probs are the current ones
  detached, so the ratio is exactly 1 (on-policy; the clip never triggers), as in TRL.
* KL for PPO enters the reward with the k1 estimator (InstructGPT); for GRPO/RLOO it enters
  the loss with ``kl_estimator`` (k3 by default), as in DeepSeekMath.
* Sampling uses our KV-cache loop (:mod:`posttrain.rollout`); the behaviour log-probs are
  recomputed by the trainer's own forward. Under mixed precision the rollout decodes from a
  bf16 copy of the weights (``sampling.dtype``), so the samples come from a policy that differs
  from the trained one by bf16 rounding (as with a bf16 vLLM engine); no importance correction
  for that is applied (``sampling.dtype=float32`` removes the difference, at decoding speed).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import allocator, distributed, engine
from posttrain.advantages import (
    gae,
    group_advantages,
    groups_with_spread,
    process_advantages,
    rloo_advantages,
    whiten,
)
from posttrain.config import ConfigError, doc
from posttrain.data.dataset import DataConfig, report_loading, split_records
from posttrain.data.formats import PromptRecord, to_prompt_record
from posttrain.data.loading import BadRowError, BadRows, iter_rows
from posttrain.data.tokenize import (
    IGNORE,
    TokenizedExample,
    TokenizeStats,
    collate_pad,
    collate_shared_prefix,
    shared_prefix_length,
)
from posttrain.log import log
from posttrain.logprobs import batch_logprobs
from posttrain.losses import aggregate, clipped_value_loss, grpo_loss, kl_estimate
from posttrain.models import (
    ModelConfig,
    autocast,
    count_parameters,
    is_adapter,
    load_model,
    prefix_sharing_exact,
    prepare_model,
    resolve_model_path,
    set_precision,
)
from posttrain.rewards.combine import RewardSet, reward_name
from posttrain.rollout import Rollout, SamplingConfig, generate, sample

ESTIMATORS = ("group", "rloo", "gae")
# per-token means in the metrics, over the completions the update pass ran (those skipped for a
# zero advantage, train/skipped_frac of them, are not in them)
TOKEN_STATS = ("policy/kl", "policy/entropy", "policy/clip_fraction")


def _rl_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=128, temperature=1.0, batch_size=16)


def _rl_model() -> ModelConfig:
    """Online RL checkpoints the policy's activations by default (as TRL's GRPOConfig does): the
    training passes' activations grow with the completions' lengths, which vary from step to
    step, and they set the run's peak memory. In ``benchmarks/grpo_vs_trl.py`` on machine D
    (``--only posttrain``, passes of 4 completions of <= 64 tokens): peak RSS 2,556 -> 2,001 MB
    at 7.33 -> 7.82 s/step; recipes that train long completions on a roomy machine turn it off
    for speed.

    LoRA dropout is off by default (0.05 elsewhere): the old log-probs of a rollout are taken
    without dropout, so with it the first update pass's ratio was not 1 (off-policy by the
    dropout mask, growing with the adapters' size; TRL's ``disable_dropout`` does the same)."""
    return ModelConfig(gradient_checkpointing=True, lora_dropout=0.0)


def _rl_data() -> DataConfig:
    """Online RL holds no prompts out unless asked (``eval_fraction``: its eval is a rollout per
    prompt, and its prompts are often few)."""
    return DataConfig(eval_fraction=0.0)


@dataclass
class RLConfig(engine.TrainConfig):
    """Online RL (``posttrain grpo`` / ``rloo`` / ``ppo``: the same loop, different estimator)."""

    model: ModelConfig = field(default_factory=_rl_model)
    data: DataConfig = field(default_factory=_rl_data)
    output_dir: str = doc("Run directory (config, metrics, samples, checkpoints, final model).", "runs/grpo")
    batch_size: int = doc("Prompts per step.", 4)
    lr: float = doc("Peak learning rate (RL wants small steps: ~1e-6 full, ~1e-5 LoRA).", 1e-6)
    schedule: str = doc("LR schedule after warmup: cosine, linear, constant_with_warmup, constant.",
                        "constant_with_warmup")
    warmup_ratio: float = doc("Share of optimizer steps with linear LR warmup.", 0.0)
    max_steps: int = doc("Rollout steps to run (0 = from epochs over the prompts).", 50)
    sampling: SamplingConfig = field(default_factory=_rl_sampling)
    group_size: int = doc("Completions sampled per prompt (G).", 8)
    rewards: list[str] = doc("Reward functions: names (exact_answer, tagged_answer, math_equal, think_format, task_verifier) "
                             "or rm:PATH for a trained reward model.", default_factory=lambda: ["exact_answer"])
    reward_weights: list[float] = doc("Weight of each reward function (empty = all 1).", default_factory=list)
    advantage: str = doc("Advantage estimator: group (GRPO), rloo, or gae (PPO with a critic).", "group")
    scale_rewards: str = doc("group: divide by the group std (GRPO); batch: by the batch std; none: Dr. GRPO.",
                             "group")
    process_reward_model: str = doc("PRM directory: per-step rewards and process-supervised advantages "
                                    "(advantage: group only).", "")
    step_verifier: str = doc("Rule-based step scores instead of a PRM, with the same process-supervised "
                             "advantages: arithmetic (each step 1 when every arithmetic claim in it holds, "
                             "else 0; posttrain.synth.claims).", "")
    step_separator: str = doc("Completions are cut into steps at this text for the PRM or step verifier.", "\n")
    beta: float = doc("KL coefficient: in the loss (group, rloo) or in the per-token reward (gae); 0 = no "
                      "reference model at all.", 0.04)
    kl_estimator: str = doc("KL estimator in the loss: k1, k2 or k3.", "k3")
    kl_ratio_correction: bool = doc("Weight the in-loss KL by the importance ratio π/π_old (TRL's "
                                    "use_bias_correction_kl).", False)
    num_iterations: int = doc("Passes over each rollout batch (μ in GRPO, PPO epochs).", 1)
    minibatch_size: int = doc("Completions per optimizer step (0 = the whole rollout batch).", 0)
    micro_batch_size: int = doc("Completions per forward/backward pass, shortest first: peak memory grows "
                                "with it (~2.4 MB a token for a 135M model in fp32, less with gradient "
                                "checkpointing). 8, TRL's default: with share_prefix a group of 8 is one row, its "
                                "prompt computed once (GRPO step on 2 CPU cores 5.98 -> 4.91 s against 4).", 8)
    share_prefix: bool = doc("Run the completions of one prompt in a micro-batch as one sequence, their prompt "
                             "(and any identical start) computed once, each completion seeing only the prompt and "
                             "itself; the same log-probs as separate rows (not with critic=separate).", True)
    clip_eps: float = doc("Clip range ε of the importance ratio.", 0.2)
    clip_eps_high: float = doc("Upper clip range (DAPO clip-higher; 0 = same as clip_eps).", 0.0)
    loss_agg: str = doc("Token aggregation: seq_mean (GRPO), token_mean (DAPO), constant (Dr. GRPO).", "seq_mean")
    vf_coef: float = doc("PPO: weight of the value loss.", 0.1)
    critic: str = doc("PPO critic: shared (a value head on the policy's backbone) or separate (a value head on "
                      "its own copy of the starting model's decoder, fully trained).", "shared")
    value_clip: float = doc("PPO: clip range of the value update.", 0.2)
    gamma: float = doc("PPO: discount γ.", 1.0)
    lam: float = doc("PPO: GAE λ.", 0.95)
    whiten_advantages: bool = doc("PPO: standardise advantages over the batch.", True)
    missing_eos_penalty: float = doc("Subtracted from the score of completions cut at max_new_tokens.", 0.0)
    dynamic_sampling: bool = doc("DAPO's dynamic sampling: groups whose completions all score the same "
                                 "(all right or all wrong) have zero advantage and teach nothing, so they are "
                                 "dropped and groups of further prompts, drawn at random, are sampled until the "
                                 "step has batch_size groups with spread (group and rloo only).", False)
    max_sampling_rounds: int = doc("Dynamic sampling: rollouts per step at most (the first one included); "
                                   "a step trains the groups with spread it has found by then (with a "
                                   "minibatch_size below the batch, in fewer optimizer steps of that size; "
                                   "the learning-rate schedule skips the steps not taken).", 4)
    eval_limit: int = doc("Evaluate (greedy) on at most this many eval prompts (0 = all).", 64)
    sample_every: int = doc("Write rollout samples to samples.jsonl every N steps (0 = never).", 5)

    def validate(self) -> None:
        super().validate()
        if self.advantage not in ESTIMATORS:
            raise ConfigError(f"advantage: {self.advantage!r} is not one of {', '.join(ESTIMATORS)}")
        if self.critic not in ("shared", "separate"):
            raise ConfigError(f"critic: {self.critic!r} is not shared or separate")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError("scale_rewards must be group, batch or none")
        if self.loss_agg not in ("seq_mean", "token_mean", "constant"):
            raise ConfigError("loss_agg must be seq_mean, token_mean or constant")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError("kl_estimator must be k1, k2 or k3")
        if self.advantage in ("group", "rloo") and self.group_size < 2:
            raise ConfigError(f"advantage {self.advantage} needs group_size >= 2")
        if (self.process_reward_model or self.step_verifier) and self.advantage != "group":
            raise ConfigError("process_reward_model and step_verifier need advantage: group")
        if self.num_iterations < 1 or self.micro_batch_size < 1:
            raise ConfigError("num_iterations and micro_batch_size must be at least 1")
        if self.step_verifier:
            from posttrain.synth.claims import STEP_VERIFIERS

            if self.step_verifier not in STEP_VERIFIERS:
                raise ConfigError(f"step_verifier: {self.step_verifier!r} is not one of {sorted(STEP_VERIFIERS)}")
            if self.process_reward_model:
                raise ConfigError("set process_reward_model or step_verifier, not both")
        if (self.process_reward_model or self.step_verifier) and not self.step_separator:
            raise ConfigError("step_separator must not be empty")
        if self.dynamic_sampling and (self.advantage == "gae" or self.process_reward_model or self.step_verifier):
            raise ConfigError("dynamic_sampling drops groups by their outcome rewards: it needs advantage group "
                              "or rloo, without process_reward_model or step_verifier")
        if self.max_sampling_rounds < 1:
            raise ConfigError("max_sampling_rounds must be at least 1")
        if not self.rewards and not (self.process_reward_model or self.step_verifier):
            raise ConfigError("no reward: set rewards and/or process_reward_model or step_verifier")


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: G samples per prompt, group-normalised advantages, KL to the reference in the loss."""


@dataclass
class RLOOConfig(RLConfig):
    """RLOO: G samples per prompt, leave-one-out baseline."""

    output_dir: str = doc("Run directory.", "runs/rloo")
    advantage: str = doc("Advantage estimator: group (GRPO), rloo, or gae (PPO with a critic).", "rloo")


@dataclass
class PPOConfig(RLConfig):
    """PPO: a critic (value head), per-token KL penalty in the reward, GAE, several epochs per rollout."""

    output_dir: str = doc("Run directory.", "runs/ppo")
    advantage: str = doc("Advantage estimator: group (GRPO), rloo, or gae (PPO with a critic).", "gae")
    group_size: int = doc("Completions sampled per prompt.", 1)
    batch_size: int = doc("Prompts per step.", 16)
    beta: float = doc("KL coefficient in the per-token reward.", 0.05)
    num_iterations: int = doc("PPO epochs over each rollout batch.", 2)
    minibatch_size: int = doc("Completions per optimizer step (0 = the whole rollout batch).", 8)


@dataclass
class Prompt:
    record: PromptRecord
    ids: list[int]


@dataclass
class RLResult:
    run_dir: Path
    model_dir: Path
    steps: int
    eval: dict[str, float]


# --------------------------------------------------------------------------- data


def load_prompts(tok, sources, max_length: int, too_long: str, bad: BadRows,
                 stats: TokenizeStats | None = None) -> list[Prompt]:
    """Chat-templated prompt token ids of every prompt row (``prompt`` or ``messages`` rows);
    prompts over ``max_length`` dropped or cut from the left as ``too_long`` says, counted in
    ``stats``."""
    stats = stats if stats is not None else TokenizeStats()
    out = []
    for src in sources:
        for row in iter_rows(src.path, bad):
            try:
                rec = to_prompt_record(row)
                text = tok.apply_chat_template(rec.messages, tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) > max_length:
                    if too_long == "error":
                        raise BadRowError(row.origin, "prompt", f"too long: {len(ids)} tokens > max_length "
                                          f"{max_length}")
                    if too_long == "drop":
                        stats.count("dropped_too_long", row.origin)
                        continue
                    ids = ids[-max_length:]
                    stats.count("truncated", row.origin)
                out.append(Prompt(rec, ids))
            except BadRowError as e:
                bad.handle(e)
    return out


def rows_tokens(per_token: dict[str, torch.Tensor], offsets: list[int], key: str, idx: list[int]) -> torch.Tensor:
    """The per-token values ``per_token[key]`` of completions ``idx``, concatenated in that order."""
    flat = per_token[key]
    return torch.cat([flat[offsets[i] : offsets[i + 1]] for i in idx])


def row_fields(prompts: list[Prompt]) -> dict[str, list]:
    """The prompt rows' other columns as lists aligned with ``prompts`` (reward kwargs)."""
    keys = sorted({k for p in prompts for k in p.record.fields})
    return {k: [p.record.fields.get(k) for p in prompts] for k in keys}


# --------------------------------------------------------------------------- policy pieces


class Policy:
    """The trained model plus what the loss needs from it: reference log-probs and values."""

    def __init__(self, cfg: RLConfig, model, value_head: torch.nn.Module | None, ref_model=None):
        self.cfg, self.model, self.value_head, self.ref_model = cfg, model, value_head, ref_model

    def forward(self, model, batch, extras=()):
        return batch_logprobs(model, batch, temperature=self.cfg.sampling.temperature or 1.0, extras=extras)

    @torch.no_grad()
    def reference_logprobs(self, batch) -> torch.Tensor:
        if self.ref_model is not None:
            return self.forward(self.ref_model, batch)
        with self.model.disable_adapter():  # LoRA: the base weights are the reference
            return self.forward(self.model, batch)


class Critic(torch.nn.Module):
    """PPO's value model: a linear head (zero-initialised) on the policy's hidden states, or on
    those of its own ``backbone`` (a separate decoder) when given."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, backbone: torch.nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1).to(dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, policy_hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N,)`` values at the positions that predict each target token (float32)."""
        h = policy_hidden
        if self.backbone is not None:
            with autocast(self.backbone):
                out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False)
            h = out.last_hidden_state[:, :-1][batch["labels"][:, 1:] != IGNORE].to(self.head.weight.dtype)
        return self.head(h).squeeze(-1).float()


def completion_examples(roll: Rollout) -> list[TokenizedExample]:
    """Prompt + completion with labels on the completion tokens only."""
    return [TokenizedExample(p + c, [IGNORE] * len(p) + c, "") for p, c in zip(roll.prompt_ids, roll.completion_ids)]


#: Micro-batch rows are padded to a multiple of this many tokens, so that the shapes of the matmuls
#: repeat from step to step and the CPU kernel caches stay small (posttrain.allocator.limit_kernel_caches).
ROW_MULTIPLE = 32


def micro_batch(examples: list[TokenizedExample], idx: list[int], group_size: int, pad_id: int, device,
                pair_cost: float = 0.0) -> dict:
    """Completions ``idx`` as one micro-batch on ``device``: with ``group_size`` G, one row per
    prompt (completion i belongs to prompt i // G; prefix sharing) where that costs less than
    separate rows (:func:`sharing_pays`; always when ``pair_cost`` is 0), else padded rows; rows
    padded to a multiple of :data:`ROW_MULTIPLE` tokens. Both layouts give the same log-probs."""
    chosen = [examples[i] for i in idx]
    if group_size and pair_cost:
        groups: dict[int, list[TokenizedExample]] = {}
        for i in idx:
            groups.setdefault(i // group_size, []).append(examples[i])
        group_size = group_size if sharing_pays(list(groups.values()), pair_cost) else 0
    if group_size:
        b = collate_shared_prefix(chosen, [i // group_size for i in idx], pad_id, ROW_MULTIPLE)
    else:
        b = collate_pad(chosen, pad_id, ROW_MULTIPLE)
        b["n_tokens"] = int(b["attention_mask"].sum())
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def attention_pair_cost(config) -> float:
    """FLOPs of one query-key pair in attention over the FLOPs of one token through the
    decoder's linear layers (both per layer, forward): what :func:`sharing_pays` weighs."""
    h = config.hidden_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    inter = getattr(config, "intermediate_size", 4 * h)
    linear = 2 * (2 * h * heads * d + 2 * h * kv * d + 3 * h * inter)  # q, o; k, v; gate, up, down
    return 4 * heads * d / linear  # scores and values: two multiply-adds per pair and head dimension


def sharing_pays(groups: list[list[TokenizedExample]], pair_cost: float) -> bool:
    """Whether one prefix-shared row per group costs fewer FLOPs than a row per completion.

    A shared row computes the prompt once, but its attention runs over the whole row (the
    block mask is not skipped). Each layout is priced as its rows are padded, to the
    micro-batch's longest: ``rows x (W + k W^2)``, ``W`` the longest shared row ``P + sum c``
    or the longest completion's ``P + c``, ``k`` = ``pair_cost``. With short completions the
    saved prompt tokens win; with long ones the attention loses: 8 completions of ~600 tokens
    behind a 60-token prompt made a 4,864-token row whose forward and backward took 267 s (peak
    RSS 10.5 GB) on a 2-core CPU (2026-12-05, the reasoning demo's GRPO on GCD prompts), 141 s
    as padded rows.

    Counting the padding matters: separate rows of completions of mixed length all pad to the
    longest completion. (Priced without padding, 2026-12-05, the demo's GRPO on mixed lengths
    was no faster in padded rows, 241 against 219 s in one step, and peaked higher, 13.5
    against 11.6 GB.)"""
    shared_rows = []
    for members in groups:
        P = shared_prefix_length(members)
        shared_rows.append(P + sum(len(e.input_ids) - P for e in members))
    n = sum(len(members) for members in groups)
    width = max(len(e.input_ids) for members in groups for e in members)
    shared = len(shared_rows) * (max(shared_rows) + pair_cost * max(shared_rows) ** 2)
    separate = n * (width + pair_cost * width ** 2)
    return shared < separate


def chunks(idx: list[int], size: int) -> list[list[int]]:
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def by_length(idx: list[int], examples: list[TokenizedExample]) -> list[int]:
    """``idx`` shortest example first, so that each micro-batch pads its rows to similar lengths
    (the micro-batches of one optimizer step are summed: their order does not change the update)."""
    return sorted(idx, key=lambda i: len(examples[i].input_ids))


def split_steps(text: str, sep: str) -> list[str]:
    return [s for s in text.split(sep) if s.strip()]


def step_end_tokens(tok, completion_ids: list[int], steps: list[str], sep: str) -> list[int]:
    """Token index (within the completion) of each step's last token, by decoded length."""
    ends, target, k = [], 0, 0
    text = ""
    for i in range(len(completion_ids)):
        text = tok.decode(completion_ids[: i + 1], skip_special_tokens=True)
        while k < len(steps):
            at = text.find(steps[k], target)
            if at < 0 or at + len(steps[k]) > len(text):
                break
            ends.append(i)
            target = at + len(steps[k])
            k += 1
        if k == len(steps):
            break
    return ends + [len(completion_ids) - 1] * (len(steps) - len(ends))


# --------------------------------------------------------------------------- advantages


def outcome_scores(cfg: RLConfig, rewards: torch.Tensor, truncated: list[bool]) -> torch.Tensor:
    """The scores the advantages take: the rewards less ``missing_eos_penalty`` for completions
    cut at ``max_new_tokens`` (``NaN``, no score, stays ``NaN``)."""
    return rewards - cfg.missing_eos_penalty * torch.tensor(truncated, dtype=torch.float32)


def token_advantages(cfg: RLConfig, roll: Rollout, rewards: torch.Tensor, lengths: list[int],
                     old: dict[str, torch.Tensor], step_rewards=None, step_ends=None) -> dict[str, torch.Tensor]:
    """Flat ``(N,)`` per-token advantages (and PPO returns) as ``cfg.advantage`` says."""
    G = cfg.group_size
    if cfg.advantage == "gae":
        B, T = len(lengths), max(lengths)
        mask = torch.zeros(B, T)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        sel = mask.bool()
        values = torch.zeros(B, T)
        values[sel] = old["values"]
        per_tok = torch.zeros(B, T)
        if cfg.beta:
            per_tok[sel] = -cfg.beta * kl_estimate(old["logp"], old["ref_logp"], "k1")
        score = outcome_scores(cfg, torch.nan_to_num(rewards, nan=0.0), roll.truncated)
        for i, n in enumerate(lengths):
            per_tok[i, n - 1] += score[i]
        adv, ret = gae(per_tok, values, mask, cfg.gamma, cfg.lam)
        # no score (NaN), no signal: advantage 0, left out of the whitening statistics, and the
        # critic's target its own estimate
        scored = ~torch.isnan(rewards.float().cpu())
        adv_mask = mask * scored[:, None]
        if cfg.whiten_advantages:
            adv = whiten(adv, adv_mask)
        adv = adv * adv_mask
        ret = torch.where(scored[:, None], ret, values * mask)
        return {"adv": adv[sel], "returns": ret[sel]}
    if step_rewards is not None:
        if cfg.missing_eos_penalty:  # a cut completion's last step (its outcome, if scored) pays the penalty
            step_rewards = [sr[:-1] + [sr[-1] - cfg.missing_eos_penalty] if cut and sr else sr
                            for sr, cut in zip(step_rewards, roll.truncated)]
        per_seq = process_advantages(step_rewards, step_ends, lengths, G)
        return {"adv": torch.cat(per_seq)}
    r = outcome_scores(cfg, rewards, roll.truncated)
    seq_adv = group_advantages(r, G, cfg.scale_rewards) if cfg.advantage == "group" else rloo_advantages(r, G)
    return {"adv": torch.repeat_interleave(seq_adv, torch.tensor(lengths))}


# --------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(cfg: RLConfig, model, tok, prompts: list[Prompt], reward_set: RewardSet) -> dict[str, float]:
    """Greedy completions of the eval prompts scored by the reward functions (their means)."""
    if not prompts:
        return {}
    sc = SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, batch_size=cfg.sampling.batch_size,
                        stop=cfg.sampling.stop)
    mine = distributed.shard(prompts)  # each rank evaluates its share; the sums are combined
    sums = {"reward": 0.0, "chars": 0.0}
    with distributed.full_params(model):
        texts = generate(model, tok, [p.record.messages for p in mine], sc) if mine else []
    if mine:
        total, per_fn = reward_set([p.record.messages for p in mine], texts, row_fields(mine))
        sums = {"reward": float(torch.nan_to_num(total, nan=0.0).sum()), "chars": float(sum(len(t) for t in texts))}
        for name, vals in per_fn.items():
            scored = [v for v in vals if v is not None]
            sums[f"{name}#sum"], sums[f"{name}#n"] = float(sum(scored)), float(len(scored))
    names = sorted({k.split("#")[0] for k in sums if "#" in k} | {reward_name(f) for f in reward_set.functions})
    sums = distributed.all_sum({**{f"{n}#sum": 0.0 for n in names}, **{f"{n}#n": 0.0 for n in names}, **sums})
    out = {"eval/reward": sums["reward"] / len(prompts)}
    for name in names:
        out[f"eval/{name}"] = sums[f"{name}#sum"] / max(sums[f"{name}#n"], 1)
    out["eval/response_chars"] = sums["chars"] / len(prompts)
    return out


# --------------------------------------------------------------------------- train


def train(cfg: RLConfig, reward_functions: list | None = None) -> RLResult:
    """Run online RL as ``cfg`` says; ``reward_functions`` (callables) replace ``cfg.rewards``."""
    # ---------------------------------------------------------------- setup
    stage = {"group": "grpo", "rloo": "rloo", "gae": "ppo"}[cfg.advantage]
    RewardSet.check(reward_functions or cfg.rewards, cfg.reward_weights)  # (before any model loads)
    run_dir = engine.setup_run(cfg.output_dir, stage, cfg, [s.path for s in cfg.data.train + cfg.data.eval])
    engine.seed_everything(cfg.seed)
    model, tok, dtype = prepare_model(cfg.model, lower_frozen=cfg.parallel != "fsdp")
    bad, stats = BadRows(skip=cfg.data.skip_bad_rows), TokenizeStats()
    read = lambda src: load_prompts(tok, [src], cfg.data.max_length, cfg.data.too_long, bad, stats)
    # mixed by weight, eval held out, max_examples: as every stage's data (split_records)
    prompts, eval_prompts = split_records([read(src) for src in cfg.data.train], cfg.data, cfg.seed, read, bad,
                                          stats)
    if cfg.eval_limit:
        eval_prompts = eval_prompts[: cfg.eval_limit]
    report_loading(bad, stats)
    ref_model = None
    # the reference is the starting policy: under LoRA the base with the adapters disabled, unless
    # the run continues another run's adapter (the base is then not where it starts); a frozen
    # copy otherwise (an adapter loaded merged)
    if cfg.beta and (not cfg.model.lora or is_adapter(cfg.model.name_or_path)):
        ref_model = load_model(cfg.model.name_or_path, dtype)
        if hasattr(ref_model, "peft_config"):
            ref_model = ref_model.merge_and_unload()
        ref_model.eval().requires_grad_(False)
    value_head = None  # the critic (PPO)
    if cfg.advantage == "gae":
        backbone = None
        if cfg.critic == "separate":
            critic_model = load_model(cfg.model.name_or_path, dtype)
            if hasattr(critic_model, "merge_and_unload"):  # started from an adapter: its model, merged
                critic_model = critic_model.merge_and_unload()
            backbone = set_precision(critic_model.get_decoder().requires_grad_(True), dtype)  # trained whole
        value_head = Critic(model.config.hidden_size, dtype.weights, backbone)
    policy = Policy(cfg, model, value_head, ref_model)
    G = cfg.group_size
    # a separate critic reads its own padded rows; one completion per prompt has nothing to share
    share_prefix = cfg.share_prefix and G > 1 and not (value_head is not None and value_head.backbone is not None)
    longest = max((len(p.ids) for p in prompts + eval_prompts), default=0) + cfg.sampling.max_new_tokens
    share_prefix = share_prefix and prefix_sharing_exact(model.config, longest, stage)
    row_group = G if share_prefix else 0  # completions per packed row (0: padded rows)
    pair_cost = attention_pair_cost(model.config)  # shared rows only where they pay
    batches = engine.EpochBatches([len(p.ids) for p in prompts], cfg.batch_size, cfg.seed)
    total_steps = cfg.total_steps(batches.per_epoch)
    n_completions = cfg.batch_size * G
    mb = cfg.minibatch_size or n_completions
    opt_steps = total_steps * cfg.num_iterations * -(-n_completions // mb)
    t = engine.open_training(cfg, model, opt_steps, extra={"value_head": value_head} if value_head else None)
    if ref_model is not None:  # (loaded on the CPU; the micro-batches it scores are on the policy's device)
        ref_model.to(t.device)
    reward_set = RewardSet.build(reward_functions or cfg.rewards, cfg.reward_weights, device=t.device)
    prm = None
    if cfg.process_reward_model:
        from posttrain.rewards.process import ProcessRewardModel

        prm = ProcessRewardModel(cfg.process_reward_model, device=t.device)  # (joins the steps its own way)
    elif cfg.step_verifier:
        from posttrain.synth.claims import STEP_VERIFIERS

        prm = STEP_VERIFIERS[cfg.step_verifier]()
    trainable_params, total_params = count_parameters(model)
    log(f"{stage}: {len(prompts)} prompts ({len(eval_prompts)} eval), {total_steps} steps of {cfg.batch_size} "
        f"prompts x {G} completions, rewards {[reward_name(f) for f in reward_set.functions]}"
        f"{' + PRM' if cfg.process_reward_model else ''}{' + step verifier' if cfg.step_verifier else ''}, β={cfg.beta}, {trainable_params:,}/{total_params:,} params trained"
        f"{' (LoRA)' if cfg.model.lora else ''}, on {engine.describe_device(t.device, dtype)}")
    start, metrics = engine.resume(cfg, run_dir, t)
    samples_path = run_dir / "samples.jsonl"
    sampler = sample
    if cfg.sampling.backend == "vllm":
        from posttrain.rollout_vllm import VLLMSampler

        sampler = VLLMSampler(str(resolve_model_path(cfg.model.name_or_path)), dtype.compute,
                              cfg.sampling.vllm_gpu_memory_utilization, seed=cfg.seed).sample

    def roll_out(idx: list[int], seed: int) -> StepSamples:
        """Groups of G completions of the prompts ``idx``, scored, whole on every rank."""
        local_prompts = [prompts[i] for i in distributed.shard(idx) for _ in range(G)]
        with distributed.full_params(t.model):  # FSDP: gathered once, no collective per decoding step
            roll = sampler(t.model, tok, [p.ids for p in local_prompts], cfg.sampling,
                           seed=seed + 7_919 * distributed.rank())
        allocator.release_freed_memory()  # the decoding phase's free blocks, before training's
        msgs = [p.record.messages for p in local_prompts]
        rewards, per_fn = reward_set(msgs, roll.texts, row_fields(local_prompts)) if local_prompts else \
            (torch.empty(0), {})
        step_rewards = step_ends = None
        if prm is not None and local_prompts:
            steps = [split_steps(txt, cfg.step_separator) or [txt] for txt in roll.texts]
            step_rewards = prm.score_many(msgs, steps)
            step_ends = [step_end_tokens(tok, c, s, cfg.step_separator) for c, s in zip(roll.completion_ids, steps)]
            if cfg.rewards:  # outcome rewards count as a final step (NaN, unscored: left out)
                step_rewards = [sr + [float(r)] for sr, r in zip(step_rewards, rewards)]
                step_ends = [se + [len(c) - 1] for se, c in zip(step_ends, roll.completion_ids)]
        roll, rewards, per_fn, step_rewards, step_ends = gather_rollout(
            G, roll, rewards, per_fn, step_rewards, step_ends, with_steps=prm is not None)
        return StepSamples([prompts[i] for i in idx for _ in range(G)], roll, rewards, per_fn, step_rewards,
                           step_ends)

    # ---------------------------------------------------------------- train
    ev: dict[str, float] = {}
    with engine.progress() as bar:
        task = bar.add_task(stage, total=total_steps, completed=start, status="")
        for step in range(start + 1, total_steps + 1):
            t_step = time.perf_counter()
            # 1-2. rollout and rewards: G completions of each prompt, seeded by the step; under
            # several processes each rank samples and scores whole groups for its share of the
            # prompts, and every rank gets them all (group statistics over whole groups)
            step_seed = cfg.seed * 1_000_003 + step
            got = roll_out(batches[step - 1], step_seed)
            sampled = [got]
            if cfg.dynamic_sampling:  # DAPO: only groups with spread, from more prompts if needed
                got = got.groups(got.with_spread(cfg), G)
                draw = random.Random(step_seed)
                while got.n_groups(G) < cfg.batch_size and len(sampled) < cfg.max_sampling_rounds:
                    more = roll_out(draw.sample(range(len(prompts)), min(cfg.batch_size, len(prompts))),
                                    step_seed + 104_729 * len(sampled))
                    sampled.append(more)
                    got = StepSamples.concat([got, more.groups(more.with_spread(cfg), G)])
                if not got.n_groups(G):  # nothing to learn from: the first batch as it was
                    got = sampled[0]
                got = got.groups(list(range(min(got.n_groups(G), cfg.batch_size))), G)
                got.roll.seconds = sum(x.roll.seconds for x in sampled)  # the step's sampling, all of it
                got.roll.stats["rollout/tokens_per_s"] = sum(x.roll.num_tokens for x in sampled) / \
                    max(got.roll.seconds, 1e-9)
            roll, rewards, per_fn, step_rewards, step_ends = got.roll, got.rewards, got.per_fn, got.step_rewards, \
                got.step_ends
            msgs = [p.record.messages for p in got.prompts]
            examples = completion_examples(roll)
            lengths = [len(c) for c in roll.completion_ids]
            # 3. no-grad pass: sampling-policy log-probs, reference log-probs, values
            need_old = cfg.num_iterations > 1 or cfg.advantage == "gae" or mb < n_completions
            old: dict[str, torch.Tensor] = {}
            if need_old or cfg.beta:
                # per completion, each rank its share, then gathered: {key: {row: (n_tokens,)}}
                parts: dict[str, dict[int, torch.Tensor]] = {"logp": {}, "ref_logp": {}, "values": {}}
                t.model.eval()
                with torch.no_grad():
                    for idx, _ in distributed.even_chunks(by_length(list(range(len(examples))), examples),
                                                         cfg.micro_batch_size):
                        b = micro_batch(examples, idx, row_group, tok.pad_token_id, t.device, pair_cost)
                        sizes = [lengths[i] for i in idx]
                        if need_old:
                            lp, h = policy.forward(t.model, b, extras=("hidden",))
                            parts["logp"].update(zip(idx, lp.float().cpu().split(sizes)))
                            if value_head is not None:
                                parts["values"].update(zip(idx, value_head(h, b).cpu().split(sizes)))
                        if cfg.beta:
                            parts["ref_logp"].update(zip(idx, policy.reference_logprobs(b).float().cpu().split(sizes)))
                t.model.train()
                if distributed.world_size() > 1:
                    for part in distributed.gather_objects(parts):
                        for k, rows in part.items():
                            parts[k].update(rows)
                old = {k: torch.cat([v[i] for i in range(len(examples))]) for k, v in parts.items() if v}
            # 4. advantages
            adv = token_advantages(cfg, roll, rewards, lengths, old, step_rewards, step_ends)
            per_token = {**old, **adv}  # flat (total tokens,) tensors, completion after completion
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)

            # 5. updates
            rng = random.Random(cfg.seed * 7919 + step)
            # sums (and "#n" counts) over this rank's micro-batches, summed over ranks below
            acc = dict.fromkeys(("loss/policy", "loss/value", *(k + s for k in TOKEN_STATS for s in ("", "#n"))), 0.0)
            n_updates, train_tokens, t_train = 0, 0, time.perf_counter()
            trained = zero_gradient_free(cfg, value_head, adv["adv"], offsets)
            for _ in range(cfg.num_iterations):
                order = list(range(len(examples)))
                if mb < n_completions:
                    rng.shuffle(order)
                for mb_idx in chunks(order, mb):
                    # normalisers count every completion, trained or not, so skipping the ones
                    # with no gradient leaves the update exactly as it was
                    mb_seqs, mb_tokens = len(mb_idx), sum(lengths[i] for i in mb_idx)
                    for idx, w in distributed.even_chunks(by_length([i for i in mb_idx if trained[i]], examples),
                                                         cfg.micro_batch_size):
                        b = micro_batch(examples, idx, row_group, tok.pad_token_id, t.device, pair_cost)
                        extras = ("entropy", "hidden") if value_head is not None else ("entropy",)
                        lp, ent, *h = policy.forward(t.model, b, extras=extras)
                        seq = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([lengths[i] for i in idx]))
                        seq = seq.to(t.device)
                        a = rows_tokens(per_token, offsets, "adv", idx).to(t.device, lp.dtype)
                        old_lp = rows_tokens(per_token, offsets, "logp", idx).to(t.device) if need_old else lp.detach()
                        ref_lp = rows_tokens(per_token, offsets, "ref_logp", idx).to(t.device) if cfg.beta else None
                        in_loss_beta = cfg.beta if cfg.advantage != "gae" else 0.0
                        loss, st = grpo_loss(lp, old_lp, a, seq, len(idx), ref_lp, in_loss_beta, cfg.clip_eps,
                                             cfg.clip_eps_high or None, cfg.loss_agg, cfg.sampling.max_new_tokens,
                                             cfg.kl_estimator, cfg.kl_ratio_correction)
                        # micro-batch share of the minibatch, so accumulation equals one big batch
                        tok_share = sum(lengths[i] for i in idx) / mb_tokens
                        share = tok_share if cfg.loss_agg == "token_mean" else len(idx) / mb_seqs
                        loss = loss * (share * w)  # (w = 0: an FSDP rank's placeholder)
                        acc["loss/policy"] += float(loss.detach())
                        if value_head is not None:
                            v = value_head(h[0], b)
                            vl = clipped_value_loss(v, rows_tokens(per_token, offsets, "values", idx).to(t.device),
                                                    rows_tokens(per_token, offsets, "returns", idx).to(t.device), cfg.value_clip)
                            # a token mean over the minibatch whatever loss_agg is: weighted by tokens
                            vl = aggregate(vl, seq, len(idx), "token_mean") * (tok_share * w)
                            loss = loss + cfg.vf_coef * vl
                            acc["loss/value"] += float(vl.detach())
                        t.backward(loss)
                        for key, x in (("policy/entropy", ent), ("policy/clip_fraction", st["clip_fraction"]),
                                       ("policy/kl", st.get("kl"))):
                            if x is not None and w:
                                acc[key] += float(x.detach().float().sum())
                                acc[key + "#n"] += x.numel()
                        train_tokens += b["n_tokens"] if w else 0
                    if not any(trained[i] for i in mb_idx):
                        # no pass ran: the zero gradients one would have left, so that AdamW's
                        # moments move as they would (it passes over a parameter with no gradient)
                        for p in t.params:
                            if p.grad is None:
                                p.grad = torch.zeros_like(p)
                    grad_norm = t.step(cfg.max_grad_norm)
                    n_updates += 1
            # dynamic sampling may find fewer groups than the batch: fewer minibatches of the
            # configured size ran, and the schedule skips the steps not taken (planned: opt_steps)
            t.skip_schedule(cfg.num_iterations * -(-n_completions // mb) - n_updates)
            t_train = time.perf_counter() - t_train
            acc = distributed.all_sum({**acc, "train_tokens": train_tokens})
            train_tokens = int(acc.pop("train_tokens"))
            dt = time.perf_counter() - t_step

            # 6. log
            rec = step_metrics(cfg, roll, rewards, per_fn, adv["adv"], acc, n_updates, old)
            if cfg.dynamic_sampling:  # what was sampled to find the step's groups
                every = torch.cat([x.rewards for x in sampled])
                rec.update({"rollout/sampling_rounds": len(sampled), "rollout/groups_sampled": len(every) // G,
                            "rollout/groups_with_spread": sum(len(x.with_spread(cfg)) for x in sampled),
                            "reward/sampled_mean": float(every.nanmean()) if every.numel() else 0.0})
            rec.update({"train/grad_norm": grad_norm, "train/lr": t.lr, "train/optimizer_steps": n_updates,
                        "perf/step_s": dt,
                        "train/skipped_frac": 1.0 - sum(trained) / max(len(trained), 1),
                        "perf/rollout_s": roll.seconds, "perf/train_tokens_per_s": train_tokens / max(t_train, 1e-9),
                        "perf/peak_rss_mb": engine.peak_rss_mb()})
            metrics.log_step(step, rec, cfg.log_every, total_steps)
            bar.update(task, advance=1, status=f"reward {rec['reward/mean']:.3f} len {rec['rollout/length_mean']:.0f}")
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1) and engine.is_main_process():
                with open(samples_path, "a") as fh:
                    fh.writelines(json.dumps({"step": step, "prompt": msgs[i][-1]["content"], "completion": roll.texts[i],
                                             "reward": None if torch.isnan(rewards[i]) else float(rewards[i]),
                                             **{k: v[i] for k, v in per_fn.items()}}) + "\n" for i in range(0, len(roll.texts), G))
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps and eval_prompts:
                ev = evaluate(cfg, t.model, tok, eval_prompts, reward_set)
                metrics.log(step, ev)
                log(f"step {step}: eval reward {ev['eval/reward']:.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                engine.save_checkpoint(run_dir, t, tok, {"step": step, "stage": stage}, cfg.keep_last)

    # ---------------------------------------------------------------- finish
    if eval_prompts:
        ev = evaluate(cfg, t.model, tok, eval_prompts, reward_set)
        metrics.log(total_steps, ev)
    model_dir = engine.save_final(run_dir, t, tok, cfg, stage, total_steps)
    if engine.is_main_process() and value_head is not None:
        from safetensors.torch import save_file

        name = "critic.safetensors" if value_head.backbone is not None else "value_head.safetensors"
        save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, str(run_dir / name))
    engine.finish_run(run_dir, metrics)
    log(f"{stage} done: {total_steps} steps" + (f", eval reward {ev['eval/reward']:.3f}" if ev else "")
        + f"; model saved to {model_dir}")
    report_loading(bad, stats)
    return RLResult(run_dir, model_dir, total_steps, ev)


@dataclass
class StepSamples:
    """A step's sampled groups as every rank holds them, in prompt order: the prompt of each
    completion, the rollout, the total and per-function rewards, and a PRM's step scores."""

    prompts: list[Prompt]
    roll: Rollout
    rewards: torch.Tensor
    per_fn: dict[str, list]
    step_rewards: list | None = None
    step_ends: list | None = None

    def n_groups(self, G: int) -> int:
        return len(self.prompts) // G

    def with_spread(self, cfg: RLConfig) -> list[int]:
        """The numbers of the groups whose outcome scores (the rewards less the missing-EOS
        penalty, as the advantages take them) differ: the only ones with a gradient."""
        return groups_with_spread(outcome_scores(cfg, self.rewards, self.roll.truncated),
                                  cfg.group_size).nonzero().flatten().tolist()

    def groups(self, keep: list[int], G: int) -> StepSamples:
        """The groups numbered ``keep``, in that order (the rollout's time and rate kept whole)."""
        rows = [g * G + j for g in keep for j in range(G)]

        def pick(xs):
            return None if xs is None else [xs[i] for i in rows]

        r = self.roll
        roll = Rollout(pick(r.prompt_ids), pick(r.completion_ids), pick(r.texts), pick(r.truncated), r.seconds,
                       dict(r.stats))
        return StepSamples(pick(self.prompts), roll, self.rewards[rows], {k: pick(v) for k, v in self.per_fn.items()},
                           pick(self.step_rewards), pick(self.step_ends))

    @staticmethod
    def concat(parts: list[StepSamples]) -> StepSamples:
        """One batch of several rollouts' groups (the time is theirs summed, the stats the first's)."""
        def cat(xs):
            return None if any(x is None for x in xs) else [v for x in xs for v in x]

        rolls = [p.roll for p in parts]
        roll = Rollout(cat([r.prompt_ids for r in rolls]), cat([r.completion_ids for r in rolls]),
                       cat([r.texts for r in rolls]), cat([r.truncated for r in rolls]),
                       sum(r.seconds for r in rolls), dict(rolls[0].stats))
        names = sorted({k for p in parts for k in p.per_fn})
        per_fn = {k: [v for p in parts for v in p.per_fn.get(k, [None] * len(p.prompts))] for k in names}
        return StepSamples(cat([p.prompts for p in parts]), roll, torch.cat([p.rewards for p in parts]), per_fn,
                           cat([p.step_rewards for p in parts]), cat([p.step_ends for p in parts]))


def zero_gradient_free(cfg: RLConfig, value_head, adv: torch.Tensor, offsets: list[int]) -> list[bool]:
    """Which completions the update pass must run: with no critic and no KL term in the loss,
    a completion whose every token has advantage 0 (a group whose rewards were all equal)
    adds exactly nothing to the loss or its gradient, so its forward and backward are
    skipped (DAPO filters such groups out for the same reason). Under several processes
    every completion is run, so that all ranks do the same passes."""
    n = len(offsets) - 1
    if value_head is not None or cfg.beta or distributed.world_size() > 1:
        return [True] * n
    seq = torch.repeat_interleave(torch.arange(n), torch.tensor(offsets).diff())
    nonzero = torch.zeros(n, dtype=torch.long).index_add(0, seq, (adv.cpu() != 0).long()) > 0
    return nonzero.tolist()


def step_metrics(cfg: RLConfig, roll: Rollout, rewards: torch.Tensor, per_fn: dict, adv: torch.Tensor,
                 acc: dict, n_updates: int, old: dict) -> dict[str, float]:
    """The namespaced metrics of one step (reward/*, rollout/*, loss/*, policy/*)."""
    scored = rewards[~torch.isnan(rewards)]
    out = {"reward/mean": float(scored.mean()) if scored.numel() else 0.0,
           "reward/std": float(scored.std()) if scored.numel() > 1 else 0.0,
           "reward/unscored": int(torch.isnan(rewards).sum()),
           "rollout/length_mean": sum(len(c) for c in roll.completion_ids) / len(roll.completion_ids),
           "rollout/truncated_frac": sum(roll.truncated) / len(roll.truncated),
           # groups whose scores (as the advantages take them) are all equal: no gradient from them
           "rollout/zero_std_groups": 1.0 - float(groups_with_spread(outcome_scores(cfg, rewards, roll.truncated),
                                                                      cfg.group_size).float().mean())
           if cfg.group_size > 1 else 0.0,
           "rollout/tokens_per_s": roll.stats["rollout/tokens_per_s"],
           "advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()) if adv.numel() > 1 else 0.0,
           "loss/policy": acc["loss/policy"] / max(n_updates, 1)}
    if cfg.advantage == "gae":
        out["loss/value"] = acc["loss/value"] / max(n_updates, 1)
        if "ref_logp" in old:
            out["policy/kl"] = float(kl_estimate(old["logp"], old["ref_logp"], "k1").mean())
    for name, vals in per_fn.items():
        v = [x for x in vals if x is not None]
        out[f"reward/{name}"] = sum(v) / max(len(v), 1)
    for k in TOKEN_STATS:
        if acc[k + "#n"]:
            out[k] = acc[k] / acc[k + "#n"]
    return out


def gather_rollout(G: int, roll: Rollout, rewards: torch.Tensor, per_fn: dict[str, list], step_rewards, step_ends,
                   with_steps: bool):
    """The whole step's rollout, rewards and per-function scores on every rank, in prompt order.

    Each rank sampled whole groups (blocks of ``G`` completions) for its strided share of the
    step's prompts; this gathers the blocks and puts them back in the single-process order.
    """
    if distributed.world_size() == 1:
        return roll, rewards, per_fn, step_rewards, step_ends
    mine = {"prompt_ids": roll.prompt_ids, "completion_ids": roll.completion_ids, "texts": roll.texts,
            "truncated": roll.truncated, "rewards": rewards.tolist(), "per_fn": per_fn,
            "step_rewards": step_rewards or [], "step_ends": step_ends or [], "seconds": roll.seconds}
    parts = distributed.gather_objects(mine)
    n_prompts = sum(len(p["texts"]) for p in parts) // G

    def merged(values_per_rank: list[list]) -> list:
        blocks = [[vals[i : i + G] for i in range(0, len(vals), G)] for vals in values_per_rank]
        return [x for block in distributed.unshard(blocks, n_prompts) for x in block]

    field_ = {k: merged([p[k] for p in parts]) for k in ("prompt_ids", "completion_ids", "texts", "truncated",
                                                        "rewards", "step_rewards", "step_ends")
              if k not in ("step_rewards", "step_ends") or with_steps}
    names = sorted({n for p in parts for n in p["per_fn"]})
    per_fn = {n: merged([p["per_fn"].get(n, [None] * len(p["texts"])) for p in parts]) for n in names}
    seconds = max(p["seconds"] for p in parts)
    n_tok = sum(len(c) for c in field_["completion_ids"])
    out = Rollout(field_["prompt_ids"], field_["completion_ids"], field_["texts"], field_["truncated"], seconds,
                  {"rollout/tokens_per_s": n_tok / max(seconds, 1e-9)})
    return (out, torch.tensor(field_["rewards"], dtype=torch.float32), per_fn,
            field_.get("step_rewards"), field_.get("step_ends"))
