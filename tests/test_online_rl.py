"""Online RL: advantage estimators, KL estimators and clipped losses by hand, a GRPO loss
cross-check against TRL, reward functions on literal strings, and learning / resume runs
of the shared loop on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain import engine
from posttrain.advantages import (
    gae,
    group_advantages,
    groups_with_spread,
    process_advantages,
    rloo_advantages,
    whiten,
)
from posttrain.config import ConfigError, load_config
from posttrain.losses import aggregate, clipped_policy_loss, clipped_value_loss, grpo_loss, kl_estimate
from posttrain.rewards import RewardError, RewardSet, exact_answer, math_equal, tagged_answer, think_format
from tests.conftest import write_jsonl

NAN = float("nan")


# --------------------------------------------------------------------------- advantages by hand


def test_group_advantages_by_hand():
    """Groups [1, 0] and [3, 3]: mean 0.5, unbiased std √0.5 = 0.707107 -> ±0.5/0.707107 = ±0.707107;
    the tied group has std 0 -> 0 (no signal). 'none' only centres: [0.5, -0.5, 0, 0]."""
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    torch.testing.assert_close(group_advantages(r, 2, eps=0.0)[:2], torch.tensor([0.707107, -0.707107]))
    assert group_advantages(r, 2)[2:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(group_advantages(r, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # batch scaling divides by the std of all four rewards: std([1,0,3,3]) = 1.5 -> [0.5/1.5, -0.5/1.5, 0, 0]
    torch.testing.assert_close(group_advantages(r, 2, "batch", eps=0.0), torch.tensor([1 / 3, -1 / 3, 0.0, 0.0]))
    # an unscored completion gets 0 and is left out of its group's statistics
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, NAN, 2.0, 0.0]), 2, "none"),
                               torch.tensor([0.0, 0.0, 1.0, -1.0]))


def test_rloo_by_hand():
    """[1, 2, 3]: baselines (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5 -> [-1.5, 0, 1.5]."""
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.5, 0.0, 1.5]))
    # with one unscored member the baseline is the other scored one: [4, nan, 2] -> [2, 0, -2]
    torch.testing.assert_close(rloo_advantages(torch.tensor([4.0, NAN, 2.0]), 3), torch.tensor([2.0, 0.0, -2.0]))


def test_groups_with_spread_by_hand():
    """Groups of 3: [1, 0, 1] differ; [2, 2, 2] tie; [5, nan, 5] tie among the scored; [nan, 3, nan]
    has one score; [nan, 1, 0] differ among the scored. Exactly the groups whose advantages are
    not all 0."""
    r = torch.tensor([1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0, NAN, 5.0, NAN, 3.0, NAN, NAN, 1.0, 0.0])
    assert groups_with_spread(r, 3).tolist() == [True, False, False, False, True]
    nonzero = (group_advantages(r, 3).view(-1, 3) != 0).any(1)
    assert nonzero.tolist() == groups_with_spread(r, 3).tolist()
    assert ((rloo_advantages(r, 3).view(-1, 3) != 0).any(1)).tolist() == groups_with_spread(r, 3).tolist()


def test_process_advantages_by_hand():
    """One group of two completions. A: steps rewards [1, 0] ending at tokens 1 and 3 (4 tokens);
    B: one step reward 1 ending at token 2 (3 tokens). All step rewards R = [1, 0, 1]: mean 2/3,
    std (unbiased) = √(((1/3)² + (2/3)² + (1/3)²) / 2) = √(1/3) = 0.577350.
    Normalised: 1 -> 0.577350, 0 -> -1.154701. A's tokens 0-1 see both steps: -0.577350;
    tokens 2-3 only the second: -1.154701. B's tokens 0-2: 0.577350."""
    a, b = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], [4, 3], group_size=2, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([-0.577350, -0.577350, -1.154701, -1.154701]))
    torch.testing.assert_close(b, torch.tensor([0.577350, 0.577350, 0.577350]))


def test_process_advantages_leave_unscored_steps_out():
    """The group of test_process_advantages_by_hand with a third, unscored (NaN) step on B: it
    adds nothing to B's tokens and is left out of the statistics, so every advantage is as
    there; before, a NaN step made the whole group's advantages NaN."""
    a, b = process_advantages([[1.0, 0.0], [1.0, float("nan")]], [[1, 3], [2, 2]], [4, 3], group_size=2, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([-0.577350, -0.577350, -1.154701, -1.154701]))
    torch.testing.assert_close(b, torch.tensor([0.577350, 0.577350, 0.577350]))


def test_step_scores_take_the_missing_eos_penalty_and_leave_unscored_outcomes_out():
    """Process supervision with outcome rewards as the last step. A (2 tokens, cut at the
    limit): steps [1, outcome 1]; B (2 tokens): steps [1, outcome NaN]. With penalty 1, A's
    last step scores 0 and B's outcome is left out: R = [1, 0, 1], mean 2/3, std √(1/3).
    A: token 0 sees both steps (0.577350 - 1.154701), token 1 the last (-1.154701); B: its one
    scored step (0.577350) on both tokens. Without the penalty all of R is 1: zero advantages."""
    from posttrain.rollout import Rollout
    from posttrain.stages.online_rl import GRPOConfig, token_advantages

    roll = Rollout([[1], [1]], [[5, 6], [7, 8]], ["a", "b"], [True, False], 0.0, {})
    steps, ends = [[1.0, 1.0], [1.0, float("nan")]], [[0, 1], [1, 1]]
    for penalty, want in ((1.0, [-0.577350, -1.154701, 0.577350, 0.577350]), (0.0, [0.0] * 4)):
        cfg = GRPOConfig(group_size=2, missing_eos_penalty=penalty)
        adv = token_advantages(cfg, roll, torch.tensor([1.0, float("nan")]), [2, 2], {}, steps, ends)["adv"]
        torch.testing.assert_close(adv, torch.tensor(want), atol=1e-3, rtol=0)


def test_gae_matches_plain_loop():
    torch.manual_seed(0)
    B, T, gamma, lam = 3, 6, 0.9, 0.8
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = [6, 4, 1]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    adv, ret = gae(rewards * mask, values, mask, gamma, lam)
    for i, n in enumerate(lengths):  # textbook recursion per sequence, terminal value 0
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            running = delta + gamma * lam * running
            assert adv[i, t].item() == pytest.approx(running, abs=1e-5)
            assert ret[i, t].item() == pytest.approx(running + values[i, t].item(), abs=1e-5)
        assert adv[i, n:].abs().sum() == 0


def test_ppo_leaves_an_unscored_completion_out_of_its_advantages_and_whitening():
    """γ = λ = 1, β = 0, values 0: the scored completions (rewards 0 and 1, 3 tokens each) have
    GAE advantages 0 and 1 on every token, whitened over those 6 tokens to -1 and +1; the
    unscored one (NaN) gets advantage 0 and its own values as returns, whatever they are."""
    from posttrain.rollout import Rollout
    from posttrain.stages.online_rl import PPOConfig, token_advantages

    roll = Rollout([[1]] * 3, [[5, 6, 7]] * 3, ["a", "b", "c"], [False] * 3, 0.0, {})
    cfg = PPOConfig(group_size=1, gamma=1.0, lam=1.0, beta=0.0)
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.2, 0.1])
    out = token_advantages(cfg, roll, torch.tensor([0.0, 1.0, float("nan")]), [3, 3, 3], {"values": values})
    torch.testing.assert_close(out["adv"], torch.tensor([-1.0] * 3 + [1.0] * 3 + [0.0] * 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["returns"], torch.tensor([0.0] * 3 + [1.0] * 3 + [0.3, 0.2, 0.1]))


def test_whiten_masked():
    x, m = torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])
    torch.testing.assert_close(whiten(x, m), torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- losses by hand


def test_kl_estimators_by_hand():
    """π(y) = 0.5, π_ref(y) = 0.25: log r = log 0.5 = -0.693147.
    k1 = 0.693147, k2 = 0.240227, k3 = 0.5 - 1 + 0.693147 = 0.193147."""
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_estimate(lp, lp).item() == 0.0


def test_clipped_loss_values_and_gradients():
    """ε = 0.2. Token 1: ratio 1.5, A = +1 -> min(1.5, 1.2) = 1.2: clipped, no gradient.
    Token 2: ratio 0.5, A = +1 -> min(0.5, 0.8) = 0.5: unclipped, d(-ρA)/dlogp = -ρA = -0.5.
    Token 3: ratio 0.5, A = -1 -> min(-0.5, -0.8) = -0.8: clipped, no gradient."""
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, -0.5, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 1.0]
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 0.0]))


def test_aggregation_and_value_clip_by_hand():
    """Tokens [1, 3 | 5] of two sequences: seq_mean = (2 + 5)/2 = 3.5, token_mean = 9/3 = 3,
    constant with max_len 4: 9 / (2 * 4) = 1.125.
    Value clip ε 0.2: V = 1.0, V_old = 0.5, R = 2 -> max((1-2)², (0.7-2)²)/2 = 1.69/2 = 0.845."""
    x, seq = torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1])
    assert aggregate(x, seq, 2, "seq_mean").item() == 3.5
    assert aggregate(x, seq, 2, "token_mean").item() == 3.0
    assert aggregate(x, seq, 2, "constant", max_len=4).item() == 1.125
    vl = clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]), 0.2)
    assert vl.item() == pytest.approx(0.845)


def test_grpo_loss_matches_trl(tiny_model_dir, tmp_path):
    """TRL's GRPOTrainer._compute_loss and ours on the same model, completions, advantages,
    old and reference log-probs (β = 0.1, ε = 0.2), for its grpo / bnpo / dr_grpo losses, with
    and without its importance-ratio correction of the KL term."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from posttrain.data.tokenize import IGNORE
    from posttrain.logprobs import token_logprobs
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    B, P, T = 4, 5, 6
    prompt_ids = torch.randint(10, 1000, (B, P))
    completion_ids = torch.randint(10, 1000, (B, T))
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])
    # old and reference log-probs near the policy's own (~ -10.8 for a random model over 49k tokens),
    # so that some ratios leave the clip range and some do not
    old = torch.randn(B, T) * 0.3 - 10.8
    ref = torch.randn(B, T) * 0.3 - 10.8
    cases = (("grpo", "seq_mean", False), ("bnpo", "token_mean", False), ("dr_grpo", "constant", False),
             ("grpo", "seq_mean", True))
    for loss_type, agg, corr in cases:
        args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                              max_completion_length=T, beta=0.1, epsilon=0.2, loss_type=loss_type, report_to=[],
                              bf16=False, use_cpu=True, use_bias_correction_kl=corr)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                                  args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
                                  processing_class=tok)
        trainer.model.eval()  # mode 'eval': no gradient-accumulation normaliser
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones(B, P, dtype=torch.long),
                  "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": advantages,
                  "old_per_token_logps": old, "ref_per_token_logps": ref,
                  "num_items_in_batch": completion_mask.sum()}
        with torch.no_grad():
            want = trainer._compute_loss(trainer.model, inputs)
            ids = torch.cat([prompt_ids, completion_ids], 1)
            labels = torch.cat([torch.full((B, P), IGNORE), completion_ids.masked_fill(completion_mask == 0, IGNORE)], 1)
            mask = torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1)
            lp = token_logprobs(model, ids, labels, mask)
            sel = completion_mask.bool()
            seq = torch.arange(B).unsqueeze(1).expand(B, T)[sel]
            got, st = grpo_loss(lp, old[sel], advantages[seq], seq, B, ref[sel], 0.1, 0.2, None, agg, T,
                                kl_ratio_correction=corr)
        assert 0 < st["clip_fraction"].mean() < 1  # both branches of the clip are exercised
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5, msg=f"{loss_type} correction={corr}")


# --------------------------------------------------------------------------- rewards on literal strings


def test_reward_functions_on_strings():
    completions = ["<think>\n2+3=5\n</think>\n<answer>5</answer>", "I think it is 5.", "It is 6, not 5... wait 7",
                   "<answer>1,000</answer>", ""]
    answers = ["5", "5", "5", "1000", "5"]
    assert exact_answer(None, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert tagged_answer(None, completions, answer=answers) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert think_format(None, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert math_equal(None, ["<answer>1/2</answer>", "<answer>0.5</answer>", "<answer>2/3</answer>"],
                      answer=["2/4", "1/2", "0.6"]) == [1.0, 1.0, 0.0]
    assert exact_answer(None, ["5"], answer=[None]) == [None]  # no reference: no score


def test_math_equal_never_evaluates_model_text(tmp_path, monkeypatch):
    """Without math-verify the answer goes to sympy as a plain expression only: no code runs,
    exponent towers are refused instead of computed, thousands separators are numbers."""
    import builtins

    real_import = builtins.__import__

    def no_math_verify(name, *a, **k):
        if name.startswith("math_verify"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    marker = tmp_path / "ran"
    attacks = [f"<answer>__import__('os').system('touch {marker}')</answer>", "<answer>exec(chr(112))</answer>",
               "<answer>9^9^9^9</answer>", "<answer>9^(999*999*999)</answer>", "<answer>x.subs(x, 0)</answer>"]
    assert math_equal(None, attacks, answer=["0", "0", "1", "1", "0"]) == [0.0] * 5
    assert not marker.exists()
    good = ["The total is 1,234.", "<answer>x^2 + 2*x + 1</answer>", "<answer>2^10</answer>", "<answer>2**-3</answer>",
            "<answer>2^(1/2)</answer>", "<answer>x^(2)</answer>"]
    assert math_equal(None, good, answer=["1234", "(x+1)^2", "1024", "1/8", "sqrt(2)", "x^2"]) == [1.0] * 6
    assert math_equal(None, ["<answer>1,2</answer>", "<answer>9^(9^9)</answer>"], answer=["12", "1"]) == [0.0, 0.0]


def test_reward_set_weights_and_errors():
    rs = RewardSet.build([exact_answer, think_format], [1.0, 0.5])
    total, per_fn = rs(["q", "q"], ["<think>x</think><answer>4</answer>", "4"], {"answer": ["4", "5"]})
    assert total.tolist() == [1.5, 0.0] and per_fn["think_format"] == [1.0, 0.0]

    def broken(prompts, completions, **kw):
        raise ZeroDivisionError("oops")

    def wrong_type(prompts, completions, **kw):
        return ["high"] * len(completions)

    with pytest.raises(RewardError, match="reward function 'broken' raised ZeroDivisionError: oops"):
        RewardSet.build([broken])(["q"], ["a"], {})
    with pytest.raises(RewardError, match="'wrong_type' returned 'high' for sample 0"):
        RewardSet.build([wrong_type])(["q"], ["a"], {})
    none = RewardSet.build([lambda p, c, **k: [None, 1.0]])(["q", "q"], ["a", "b"], {})[0]
    assert math.isnan(none[0]) and none[1] == 1.0
    with pytest.raises(ConfigError, match="reward_weights: 2 weights for 1 reward functions"):
        RewardSet.build([broken], [1.0, 2.0])
    with pytest.raises(FileNotFoundError, match="model '/no/such/rm' not found"):
        RewardSet.build(["rm:/no/such/rm"])
    import numpy as np

    def scalar(prompts, completions, **kw):
        return 1.0

    def text(prompts, completions, **kw):
        return "10"

    for fn, msg in ((scalar, "'scalar' raised TypeError"), (text, "'text' raised TypeError: returned str")):
        with pytest.raises(RewardError, match=msg):
            RewardSet.build([fn])(["q", "q"], ["a", "b"], {})
    numpy_total = RewardSet.build([lambda p, c, **k: [np.float32(0.5), np.int64(1)]])(["q", "q"], ["a", "b"], {})[0]
    assert numpy_total.tolist() == [0.5, 1.0]
    with pytest.raises(ConfigError, match="reward_weights: nan is not a finite number"):
        RewardSet.build([exact_answer], [float("nan")])


# --------------------------------------------------------------------------- the loop on a tiny model


def e_fraction(prompts, completions, **kw):
    """Share of the letter 'e' in the completion: smooth and learnable from random tokens."""
    return [sum(ch == "e" for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture
def prompt_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write about topic {i}.", "answer": str(i)}
                                                    for i in range(32)])


def rl_cfg(cls, model_dir, data, out, *extra):
    return load_config(cls, None, [f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}",
                                   "sampling.max_new_tokens=12", "sampling.top_k=20", "tensorboard=false",
                                   "group_size=4", "lr=3e-3", *extra])


def reward_curve(run_dir) -> list[float]:
    return [json.loads(x)["reward/mean"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "reward/mean" in x]


def test_grpo_learns_a_reward(tiny_model_dir, prompt_file, tmp_path):
    from posttrain.stages.online_rl import GRPOConfig, train

    res = train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "grpo", "max_steps=24"),
                reward_functions=[e_fraction])
    curve = reward_curve(res.run_dir)
    assert len(curve) == 24
    assert sum(curve[-4:]) / 4 > 1.5 * sum(curve[:2]) / 2  # the reward rises well above where it started
    samples = [json.loads(x) for x in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward", "e_fraction"} <= set(samples[0])
    m = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("policy/kl", "policy/entropy", "policy/clip_fraction", "rollout/zero_std_groups",
                "rollout/tokens_per_s", "perf/train_tokens_per_s", "advantage/std", "reward/e_fraction"):
        assert key in m, key


@pytest.mark.parametrize("cls,extra", [("PPOConfig", ["batch_size=4", "num_iterations=2", "minibatch_size=2"]),
                                       ("RLOOConfig", ["model.lora=true", "model.lora_dropout=0", "lr=1e-2"])],
                         ids=["ppo", "rloo-lora"])
def test_other_estimators_run(tiny_model_dir, prompt_file, tmp_path, cls, extra):
    from posttrain.stages import online_rl

    res = online_rl.train(rl_cfg(getattr(online_rl, cls), tiny_model_dir, prompt_file, tmp_path / "run",
                                 "max_steps=3", *extra), reward_functions=[e_fraction])
    m = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 3 and all(math.isfinite(x["loss/policy"]) for x in m)
    if cls == "PPOConfig":
        assert "loss/value" in m[-1] and (res.run_dir / "value_head.safetensors").is_file()


def test_ppo_separate_critic_trains_its_own_backbone(tiny_model_dir, prompt_file, tmp_path):
    """critic=separate: a value head on its own copy of the decoder, trained fully, next to a
    LoRA policy; the policy's base weights stay untouched by the value loss."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain.stages import online_rl

    res = online_rl.train(rl_cfg(online_rl.PPOConfig, tiny_model_dir, prompt_file, tmp_path / "run", "max_steps=6",
                                 "batch_size=4", "minibatch_size=4", "critic=separate", "vf_coef=1.0",
                                 "model.lora=true", "model.lora_dropout=0", "lr=3e-3"),
                          reward_functions=[e_fraction])
    m = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines() if "loss/value" in x]
    assert len(m) == 6 and m[-1]["loss/value"] < m[0]["loss/value"]  # the critic fits the returns
    critic = load_file(str(res.run_dir / "critic.safetensors"))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.state_dict()
    w = "layers.0.mlp.up_proj.weight"
    assert {"head.weight", "head.bias", f"backbone.{w}"} <= set(critic)
    assert not torch.equal(critic[f"backbone.{w}"], start[w])  # the critic's own decoder was trained
    assert (res.run_dir / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("dynamic", [False, True], ids=["plain", "dynamic-sampling"])
def test_grpo_resume_reaches_same_weights(tiny_model_dir, prompt_file, tmp_path, monkeypatch, dynamic):
    from safetensors.torch import load_file

    from posttrain.stages.online_rl import GRPOConfig, train
    from tests.test_sft import _interrupt_after

    args = ("max_steps=5", "save_every=2", "sample_every=0", *(["dynamic_sampling=true"] if dynamic else []))
    fn = half_constant if dynamic else e_fraction  # (further prompts drawn at the resumed step too)
    ref = train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "ref", *args), [fn])
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)  # dies in step 4, after the step-2 checkpoint
        with pytest.raises(KeyboardInterrupt):
            train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "cut", *args), [fn])
    res = train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "cut", *args, "resume=true"), [fn])
    a, b = load_file(str(ref.model_dir / "model.safetensors")), load_file(str(res.model_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert reward_curve(tmp_path / "ref") == reward_curve(tmp_path / "cut")
    assert engine.latest_checkpoint(tmp_path / "cut").name == "step-5"


def test_bad_reward_stops_with_named_function(tiny_model_dir, prompt_file, tmp_path):
    from posttrain.stages.online_rl import GRPOConfig, train

    def needs_field(prompts, completions, **kw):
        return [float(kw["difficulty"][0])] * len(completions)

    with pytest.raises(RewardError, match="reward function 'needs_field' raised KeyError"):
        train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "r", "max_steps=1"), [needs_field])


def test_online_rl_mixes_its_prompt_sources_as_every_stage(tiny_model_dir, prompt_file, tmp_path, capsys):
    """Weights, mixture_size and eval_fraction apply to prompt sources as to SFT data."""
    from posttrain.stages.online_rl import GRPOConfig, train

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(4)])
    seen = []

    def record(prompts, completions, **kw):
        seen.extend(prompts)
        return [0.0] * len(completions)

    cfg = rl_cfg(GRPOConfig, tiny_model_dir, f"[{{path: {prompt_file}, weight: 0.01}}, {{path: {other}, weight: 10}}]",
                 tmp_path / "r", "max_steps=1", "batch_size=2", "group_size=2", "data.mixture_size=6",
                 "data.eval_fraction=0.2", "eval_every=0")
    train(cfg, [record])
    err = capsys.readouterr().err
    assert "data mixture: prompts.jsonl 26 rows -> 0 (sampled), other.jsonl 3 rows -> 6 (repeated)" in err
    assert "grpo: 6 prompts (7 eval)" in err  # (6 + 1 held out of the two sources)
    assert all("Say" in str(p) for p in seen[:4])  # the step's 2 x 2 (the final eval follows)


def test_an_unknown_reward_is_an_error_before_the_run_starts(tiny_model_dir, prompt_file, tmp_path):
    from posttrain.stages.online_rl import GRPOConfig, train

    with pytest.raises(ConfigError, match="unknown reward 'exact_answr'"):
        train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "r", "rewards=[exact_answr]"))
    assert not (tmp_path / "r").exists()  # nothing written, no model loaded


def test_step_end_tokens(smol_tokenizer):
    from posttrain.stages.online_rl import split_steps, step_end_tokens

    text = "First add 2 and 3.\nThat gives 5.\nDone"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    steps = split_steps(text, "\n")
    ends = step_end_tokens(smol_tokenizer, ids, steps, "\n")
    assert len(ends) == 3 and ends[-1] == len(ids) - 1 and ends == sorted(ends)
    for step, end in zip(steps, ends):  # decoding up to a step's end token shows the whole step
        assert smol_tokenizer.decode(ids[: end + 1]).rstrip().endswith(step)


def test_grpo_with_process_reward_model(tiny_model_dir, prompt_file, tmp_path):
    from posttrain.models import ModelConfig, prepare_scoring_model
    from posttrain.stages.online_rl import GRPOConfig, train

    prm, tok, _ = prepare_scoring_model(ModelConfig(name_or_path=str(tiny_model_dir)), "token")
    prm.save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    res = train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "run", "max_steps=2",
                       f"process_reward_model={tmp_path / 'prm'}", "step_separator=e"), [e_fraction])
    m = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and m[-1]["advantage/std"] > 0  # per-token process advantages vary within completions


def test_decode_loop_matches_hf_generate(tiny_model_dir, smol_tokenizer):
    """Our KV-cache decode loop: greedy tokens equal HF generate's on a left-padded batch, and
    the sampling filter equals HF's temperature -> top-k -> top-p warpers."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from posttrain.rollout import decode, filter_logits, left_pad

    tok = smol_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": "hi " * (i + 1)}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for i in range(4)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, width:]
    got = decode(model, ids, mask, 10, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(got, want)
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    hf = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, x.clone())))
    ours = filter_logits(x, 0.7, 10, 0.8)
    assert torch.equal(torch.isinf(hf), torch.isinf(ours))
    torch.testing.assert_close(hf.softmax(-1), ours.softmax(-1))
    # a prefix that reaches top_p exactly is the whole kept set, as in HF
    exact = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isinf(filter_logits(exact, 1.0, 0, 0.5)).tolist() == [[False, True, True]]
    assert torch.equal(torch.isinf(TopPLogitsWarper(0.5)(None, exact.clone())), torch.isinf(filter_logits(exact, 1.0, 0, 0.5)))


def test_sampling_with_stop_strings_ends_the_ids_where_the_text_stops(tiny_model_dir, smol_tokenizer, monkeypatch):
    """With stop strings the HF path fills a stopped row with pad, which is SmolLM2's EOS: the
    completion's ids must end at the stop string's last token, not at an EOS the model never
    sampled (a real EOS before the stop string still ends the row). And HF's path takes
    nothing from the model's generation_config (a repetition penalty there would apply on that
    path only)."""
    from transformers import AutoModelForCausalLM

    from posttrain import rollout
    from posttrain.rollout import SamplingConfig, sample

    tok = smol_tokenizer
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    words = tok(" one two three four", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    hf_rows = [words[:3] + [eos] * 3,  # stopped at " three": HF padded the rest
               words[:1] + [eos] * 5]  # a real EOS before any stop string
    monkeypatch.setattr(rollout, "continue_batch", lambda *a, **k: [list(r) for r in hf_rows])
    got = sample(model, tok, [prompt, prompt], SamplingConfig(max_new_tokens=6, stop=["thr"]))
    assert got.completion_ids == [words[:3], words[:1] + [eos]] and got.truncated == [False, False]
    assert got.texts == [" one two ", " one"]
    monkeypatch.undo()
    plain = sample(model, tok, [prompt], SamplingConfig(max_new_tokens=12)).completion_ids
    model.generation_config.repetition_penalty = 3.0  # ignored by our loop, and now by HF's path too
    assert sample(model, tok, [prompt], SamplingConfig(max_new_tokens=12, stop=["@@@@"])).completion_ids == plain


def test_decode_prefills_each_distinct_prompt_once(tiny_model_dir, smol_tokenizer, monkeypatch):
    """A batch holding copies of prompts (GRPO groups) prefills each distinct prompt once and
    copies its cache: greedy tokens equal HF generate's on the whole batch, and a seeded sample
    equals the one drawn with every copy prefilled."""
    from transformers import AutoModelForCausalLM

    from posttrain import rollout
    from posttrain.rollout import decode, left_pad

    tok = smol_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": "hi " * (i + 1)}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for i in range(2)]
    ids, mask = left_pad([prompts[i] for i in (1, 0, 0, 1, 0)], tok.pad_token_id)
    seen = []
    real = rollout.prefill

    def spy(model, cache, **inputs):
        seen.append(inputs["input_ids"].shape[0])
        return real(model, cache, **inputs)

    monkeypatch.setattr(rollout, "prefill", spy)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    got = decode(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id)
    assert seen == [2] and torch.equal(got, want[:, : got.shape[1]])
    sampled = decode(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                     generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(rollout.torch, "unique", lambda x, **kw: (x, torch.arange(len(x))))  # every row its own
    every = decode(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                   generator=torch.Generator().manual_seed(3))
    assert seen == [2, 2, 5] and torch.equal(sampled, every)


def test_decode_drops_ended_rows_and_matches_hf_generate(tiny_model_dir, smol_tokenizer):
    """Rows that reach EOS leave the batch (the cache is compacted); every row's tokens still
    equal HF generate's, with pads after each row's EOS, greedy and sampled-with-seed alike."""
    from transformers import AutoModelForCausalLM

    from posttrain.rollout import decode, left_pad

    tok = smol_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok.encode(f"row {i}: " + "x " * (i % 3)) for i in range(8)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]
    free = decode(model, ids, mask, 12, eos=-1, pad=tok.pad_token_id)
    # an EOS that some rows emit after a few tokens and others never: those rows end and the
    # batch is compacted while the rest go on decoding
    eos = next(t for t in free.unique().tolist()
               if 0 < int((free == t).any(1).sum()) < len(free) and not bool((free[:, 0] == t).any()))
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=eos)[:, width:]
    got = decode(model, ids, mask, 12, eos, tok.pad_token_id)
    assert 0 < int((got == eos).any(1).sum()) < len(got) and got.shape == want.shape
    assert torch.equal(got, want)
    a = decode(model, ids, mask, 12, eos, tok.pad_token_id, 1.0, generator=torch.Generator().manual_seed(3))
    b = decode(model, ids, mask, 12, eos, tok.pad_token_id, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for row in a.tolist():  # nothing but pads after a row's EOS
        if eos in row:
            assert set(row[row.index(eos) + 1:]) <= {tok.pad_token_id}


def test_generate_says_which_completions_ran_out_of_tokens(tiny_model_dir):
    """generate(truncated=[...]): True where a completion hit max_new_tokens without EOS or a
    stop string (the tiny model's greedy text here is newlines: cut at 3 tokens, or stopped at
    the first newline by a stop string)."""
    from posttrain.models import load_model
    from posttrain.rollout import SamplingConfig, generate

    model, tok = load_model(tiny_model_dir, "float32", with_tokenizer=True, inference=True)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello there"}]]
    flags: list[bool] = []
    texts = generate(model, tok, convs, SamplingConfig(max_new_tokens=3, temperature=0), truncated=flags)
    assert len(flags) == 2 and all(flags) and all(texts)
    generate(model, tok, convs, SamplingConfig(max_new_tokens=3, temperature=0, stop=["\n"]), truncated=flags)
    assert flags == [False, False]


def test_decode_line_check_ends_a_row_where_it_says(tiny_model_dir, smol_tokenizer, monkeypatch):
    """line_check: asked at each line-end token of a row with its new ids so far; True ends
    the row there (token kept, pads after), the other rows decode on unchanged; in generate
    as stop_when(i, text) per conversation."""
    from transformers import AutoModelForCausalLM

    from posttrain import rollout
    from posttrain.rollout import SamplingConfig, decode, generate, left_pad, line_end_tokens

    tok = smol_tokenizer
    ends = line_end_tokens(tok)
    assert ends[tok.encode("\n")[0]] and not ends[tok.encode("x")[0]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, mask = left_pad([tok.encode(f"row {i}: " + "x " * i) for i in range(4)], tok.pad_token_id)
    free = decode(model, ids, mask, 10, eos=-1, pad=tok.pad_token_id)
    asked = []

    def check(row, new_ids):  # every token counts as a line end here; rows 1 and 3 end after 4 tokens
        asked.append((row, len(new_ids)))
        return row % 2 == 1 and len(new_ids) == 4

    got = decode(model, ids, mask, 10, eos=-1, pad=tok.pad_token_id, line_check=(torch.ones_like(ends), check))
    assert torch.equal(got[[0, 2]], free[[0, 2]]) and torch.equal(got[[1, 3], :4], free[[1, 3], :4])
    assert (got[[1, 3], 4:] == tok.pad_token_id).all()
    assert max(n for r, n in asked if r % 2) == 4 and max(n for r, n in asked if not r % 2) == 10
    convs = [[{"role": "user", "content": "count " * (i + 1)}] for i in range(3)]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, batch_size=2, dtype="float32")
    texts = generate(model, tok, convs, cfg)
    monkeypatch.setattr(rollout, "_line_ends", lambda tok: torch.ones_like(ends))  # every token ends a line
    seen = []
    assert generate(model, tok, convs, cfg, stop_when=lambda i, text: seen.append((i, text)) or False) == texts
    assert {i for i, _ in seen} == {0, 1, 2} and all(texts[i].startswith(text) for i, text in seen)
    cut = generate(model, tok, convs, cfg, stop_when=lambda i, text: i == 1)  # conversation 1 ends at its first token
    assert cut[0] == texts[0] and cut[2] == texts[2] and texts[1].startswith(cut[1]) and len(cut[1]) < len(texts[1])
    # a row stop_when ended is not "truncated", also where padding is not the EOS token (Qwen2.5)
    import copy

    padded = copy.deepcopy(tok)
    padded.pad_token = "<|endoftext|>"
    assert padded.pad_token_id != padded.eos_token_id
    flags: list[bool] = []
    generate(model, padded, convs, cfg, stop_when=lambda i, text: i == 1, truncated=flags)
    assert flags == [True, False, True]  # (the tiny model's rows 0 and 2 run to max_new_tokens)


def decoding_model(arch: str, tiny_model_dir, tok):
    """The tiny llama of ``tiny_model_dir``, or a tiny Qwen2 (q/k/v biases), in eval mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "llama":
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decoding_step_matches_hf_forward(arch, tiny_model_dir, smol_tokenizer):
    """The fused one-token step (q/k/v and gate/up as one matmul each, views of the decoding
    copy's weights) gives HF's logits on a left-padded batch, step after step, with the cache
    compacted in between; Qwen2 has q/k/v biases. In float32, so to rounding only."""
    from posttrain.decode_step import FusedDecoder
    from posttrain.rollout import _cache_argument, decode, decode_copy, left_pad, preallocated_cache, prefill

    model = decoding_model(arch, tiny_model_dir, smol_tokenizer)
    fast = decode_copy(model, torch.float32)
    assert fast is not model and FusedDecoder.build(fast, preallocated_cache(fast, 8)) is not None
    at = fast.model.layers[0].self_attn
    assert at.q_proj.weight.untyped_storage().data_ptr() == at.v_proj.weight.untyped_storage().data_ptr()
    prompts = [smol_tokenizer.encode("x " * (i + 1)) for i in range(4)]
    ids, mask0 = left_pad(prompts, smol_tokenizer.pad_token_id)
    mask, pos = mask0, (mask0.cumsum(-1) - 1).clamp(min=0)
    key = _cache_argument(model)
    with torch.no_grad():
        ref_cache, _ = prefill(model, preallocated_cache(model, 20), input_ids=ids, attention_mask=mask, position_ids=pos)
        cache, _ = prefill(fast, preallocated_cache(fast, 20), input_ids=ids, attention_mask=mask, position_ids=pos)
        step = FusedDecoder.build(fast, cache)
        tok, nxt = torch.tensor([5, 6, 7, 8]), pos[:, -1:] + 1
        for t in range(4):
            if t == 2:  # rows leave the batch: both caches compacted the same way
                keep = torch.tensor([0, 2, 3])
                tok, nxt, mask = tok[keep], nxt[keep], mask[keep]
                ref_cache.batch_select_indices(keep)
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones(len(tok), 1, dtype=mask.dtype)], 1)
            want = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, use_cache=True,
                         **{key: ref_cache}).logits[:, -1]
            got = step.step(tok, nxt, mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tok, nxt = want.argmax(-1), nxt + 1
    # the whole decoding loop on the fused copy gives HF generate's greedy tokens
    want = model.generate(input_ids=ids, attention_mask=mask0, max_new_tokens=8, do_sample=False,
                          pad_token_id=smol_tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(decode(fast, ids, mask0, 8, -1, smol_tokenizer.pad_token_id), want[:, :8])


@pytest.mark.skipif(not __import__("posttrain.decode_step").decode_step.fp16_packing_available(),
                    reason="no fbgemm float16 linear in this torch")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp16_packed_decoding_step_is_float32_to_float16_weight_rounding(arch, tiny_model_dir, smol_tokenizer):
    """The fused step on float16 weights packed for fbgemm: logits of HF's float32 forward to
    the rounding of float16 weights (relative < 3e-3 here; float32 to 1e-5 above), step after
    step, nonzero (it is not the float32 path). Qwen2 has q/k/v biases."""
    from posttrain import decode_step
    from posttrain.rollout import _cache_argument, left_pad, preallocated_cache, prefill

    model = decoding_model(arch, tiny_model_dir, smol_tokenizer)
    assert decode_step.pack_fp16(model)
    prompts = [smol_tokenizer.encode("x " * (i + 1)) for i in range(4)]
    ids, mask = left_pad(prompts, smol_tokenizer.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    key = _cache_argument(model)
    with torch.no_grad():
        ref_cache, _ = prefill(model, preallocated_cache(model, 20), input_ids=ids, attention_mask=mask, position_ids=pos)
        cache, _ = prefill(model, preallocated_cache(model, 20), input_ids=ids, attention_mask=mask, position_ids=pos)
        step = decode_step.FusedDecoder.build(model, cache)
        tok, nxt = torch.tensor([5, 6, 7, 8]), pos[:, -1:] + 1
        for _ in range(4):
            mask = torch.cat([mask, torch.ones(len(tok), 1, dtype=mask.dtype)], 1)
            want = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, use_cache=True,
                         **{key: ref_cache}).logits[:, -1]
            got = step.step(tok, nxt, mask)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert 0 < err < 3e-3, err
            tok, nxt = want.argmax(-1), nxt + 1
    decode_step.unpack_fp16(model)
    assert decode_step.FusedDecoder.build(model, preallocated_cache(model, 8)) is None  # unpacked: HF's forward


@pytest.mark.skipif(not __import__("posttrain.decode_step").decode_step.onednn_packing_available(torch.bfloat16),
                    reason="no native bf16 oneDNN matmuls on this CPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_onednn_packed_bf16_decoding_step_matches_plain_linear(arch, tiny_model_dir, smol_tokenizer, monkeypatch):
    """On bf16 weights the fused step's projections run on weights packed for oneDNN: the same
    logits as the plain ``F.linear`` step (bit for bit here), step after step; the packs are
    reused while the weights are unchanged, made again once they change, and a decoding copy's
    packs are freed with its weights after the rollout."""
    from posttrain import decode_step
    from posttrain.rollout import decode_copy, generation_model, left_pad, preallocated_cache, prefill

    model = decoding_model(arch, tiny_model_dir, smol_tokenizer)
    copy_ = decode_copy(model, torch.bfloat16)
    prompts = [smol_tokenizer.encode("x " * (i + 1)) for i in range(4)]
    ids, mask = left_pad(prompts, smol_tokenizer.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def steps(packed: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("POSTTRAIN_ONEDNN_PACK", "1" if packed else "0")
        with torch.no_grad():
            cache, _ = prefill(copy_, preallocated_cache(copy_, 20), input_ids=ids, attention_mask=mask, position_ids=pos)
            step = decode_step.FusedDecoder.build(copy_, cache)
            assert isinstance(step.head, decode_step._OnednnProjection) == packed
            tok, nxt, m, out = torch.tensor([5, 6, 7, 8]), pos[:, -1:] + 1, mask, []
            for _ in range(4):
                m = torch.cat([m, torch.ones(len(tok), 1, dtype=m.dtype)], 1)
                out.append(step.step(tok, nxt, m))
                tok, nxt = out[-1].argmax(-1), nxt + 1
        return out

    plain, packed = steps(False), steps(True)
    for a, b in zip(plain, packed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    first = decode_step.ONEDNN[copy_][1]
    steps(True)
    assert decode_step.ONEDNN[copy_][1] is first  # unchanged weights: packed once
    with torch.no_grad():
        copy_.lm_head.weight.mul_(2)
    steps(True)
    assert decode_step.ONEDNN[copy_][1] is not first  # changed: packed again
    with generation_model(model, torch.bfloat16) as gen:
        assert gen is copy_
        decode_step.FusedDecoder.build(gen, prefill(gen, preallocated_cache(gen, 20), input_ids=ids, attention_mask=mask,
                                                    position_ids=pos)[0])
        assert gen in decode_step.ONEDNN
    assert copy_ not in decode_step.ONEDNN  # freed with the copy's weights


def test_auto_decodes_float32_cpu_models_with_packed_fp16_weights_and_restores_lora(tiny_model_dir):
    """``sampling.dtype: auto`` on a float32 CPU model is float16 (packed) where fbgemm has it;
    inside :func:`generation_model` a LoRA model keeps its adapters unmerged and has packed
    weights attached (the fused step then gives the peft model's logits to float16 rounding),
    detached after (kept for the next rollout: the base is frozen); its weights are unchanged."""
    from posttrain import decode_step
    from posttrain.models import ModelConfig, prepare_model
    from posttrain.rollout import decode_dtype, generation_model, preallocated_cache, prefill

    model, _, _ = prepare_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", lora=True, lora_r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = torch.float16 if decode_step.fp16_packing_available() else torch.float32
    assert decode_dtype(model) == want and decode_dtype(model, "float32") == torch.float32
    base = model.get_base_model()
    model.eval()  # no LoRA dropout (sample and generate decode in eval mode)
    ids = torch.tensor([[5, 6, 7, 8]])
    for _ in range(2):
        with generation_model(model, decode_dtype(model)) as gen, torch.no_grad():
            assert gen is model
            if want == torch.float32:
                assert all(m.merged for m in base.modules() if hasattr(m, "lora_A"))
                continue
            assert not any(m.merged for m in base.modules() if hasattr(m, "lora_A"))
            cache = preallocated_cache(base, 8)
            cache, _ = prefill(model, cache, input_ids=ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long),
                               position_ids=torch.arange(3)[None])
            step = decode_step.FusedDecoder.build(base, cache)
            got = step.step(ids[:, 3], torch.tensor([[3]]), torch.ones(1, 4, dtype=torch.long))
            ref = model(input_ids=ids).logits[:, -1]
            assert ((got - ref).abs().max() / ref.abs().max()).item() < 3e-3
            packs = decode_step.PACKED[base]["packs"]
        assert base not in decode_step.PACKED or decode_step.PACKED[base]["layers"] is None
    if want == torch.float16:
        assert decode_step.PACKED[base]["packs"] is packs  # the frozen base was packed once
    assert not any(m.merged for m in base.modules() if hasattr(m, "lora_A"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def half_constant(prompts, completions, answer, **kw):
    """e_fraction for even-numbered prompts, a constant for odd ones (their groups have no spread)."""
    return [0.5 if int(a) % 2 else f for a, f in zip(answer, e_fraction(prompts, completions))]


def test_grpo_skips_zero_advantage_completions_without_changing_the_update(tiny_model_dir, prompt_file, tmp_path,
                                                                           monkeypatch):
    from safetensors.torch import load_file

    from posttrain.stages import online_rl

    args = ("max_steps=3", "sample_every=0", "micro_batch_size=3", "loss_agg=token_mean", "beta=0")
    fast = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "skip", *args),
                           [half_constant])
    m = [r for r in engine.read_metrics(fast.run_dir) if "reward/mean" in r]
    assert all(0 < r["train/skipped_frac"] < 1 for r in m)
    monkeypatch.setattr(online_rl, "zero_gradient_free", lambda cfg, vh, adv, offsets: [True] * (len(offsets) - 1))
    full = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "all", *args),
                           [half_constant])
    m_full = [r for r in engine.read_metrics(full.run_dir) if "reward/mean" in r]
    assert all(r["train/skipped_frac"] == 0 for r in m_full)
    # the same gradients (their norm is taken before clipping) and so the same weights
    for x, y in zip(m, m_full):
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-5)
    a, b = load_file(str(fast.model_dir / "model.safetensors")), load_file(str(full.model_dir / "model.safetensors"))
    # a skipped completion that mattered would move whole rows by ~lr
    assert_same_adam_update(a, b, load_file(str(tiny_model_dir / "model.safetensors")), lr=3e-3, steps=3)


def test_a_step_with_no_gradient_moves_adam_as_a_zero_gradient_would(tiny_model_dir, prompt_file, tmp_path,
                                                                       monkeypatch):
    """A step whose groups are all flat runs no pass when zero-advantage completions are
    skipped; AdamW must still take the step that zero gradients give (its momentum moves the
    weights), as it does when every completion is run."""
    from safetensors.torch import load_file

    from posttrain.stages import online_rl

    def flat_after_first():
        calls = []

        def reward(prompts, completions, **kw):  # spread in the first step, none after it
            calls.append(1)
            return e_fraction(prompts, completions) if len(calls) == 1 else [0.5] * len(completions)
        return reward

    args = ("max_steps=3", "sample_every=0", "beta=0")
    fast = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "skip", *args),
                           [flat_after_first()])
    m = [r for r in engine.read_metrics(fast.run_dir) if "reward/mean" in r]
    assert [r["train/skipped_frac"] for r in m][1:] == [1.0, 1.0]
    monkeypatch.setattr(online_rl, "zero_gradient_free", lambda cfg, vh, adv, offsets: [True] * (len(offsets) - 1))
    full = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "all", *args),
                           [flat_after_first()])
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    a, b = load_file(str(fast.model_dir / "model.safetensors")), load_file(str(full.model_dir / "model.safetensors"))
    assert_same_adam_update(a, b, init, lr=3e-3, steps=3)


def test_step_samples_pick_and_join_whole_groups():
    from posttrain.rollout import Rollout
    from posttrain.stages.online_rl import StepSamples

    def samples(tag, n_groups, G=2):
        n = n_groups * G
        roll = Rollout([[1]] * n, [[i] for i in range(n)], [f"{tag}{i}" for i in range(n)], [False] * n, 2.0,
                       {"rollout/tokens_per_s": 1.0})
        return StepSamples([f"p{tag}{i // G}" for i in range(n)], roll, torch.arange(n, dtype=torch.float32),
                           {"fn": [f"{tag}{i}" for i in range(n)]})

    a, b = samples("a", 3), samples("b", 2)
    picked = a.groups([2, 0], 2)
    assert picked.roll.texts == ["a4", "a5", "a0", "a1"] and picked.prompts == ["pa2", "pa2", "pa0", "pa0"]
    assert picked.rewards.tolist() == [4.0, 5.0, 0.0, 1.0] and picked.per_fn["fn"] == picked.roll.texts
    joined = StepSamples.concat([picked, b.groups([1], 2)])
    assert joined.roll.texts == ["a4", "a5", "a0", "a1", "b2", "b3"] and joined.n_groups(2) == 3
    assert joined.rewards.tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0] and joined.roll.seconds == 4.0
    assert joined.per_fn["fn"] == joined.roll.texts and joined.step_rewards is None


def test_dynamic_sampling_trains_only_groups_with_spread(tiny_model_dir, prompt_file, tmp_path):
    """With half the prompts' groups flat (half_constant), each step samples groups of further
    prompts until its batch holds only groups with spread: no completion is skipped, every
    sampled prompt is an even one, and the metrics say how much was sampled."""
    from posttrain.stages import online_rl

    res = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "ds", "max_steps=3",
                                 "batch_size=4", "dynamic_sampling=true", "sample_every=1"), [half_constant])
    m = [r for r in engine.read_metrics(res.run_dir) if "reward/mean" in r]
    assert len(m) == 3
    for r in m:
        assert r["rollout/zero_std_groups"] == 0 and r["train/skipped_frac"] == 0
        assert r["rollout/groups_sampled"] == 4 * r["rollout/sampling_rounds"]
        assert r["rollout/groups_with_spread"] >= 4  # the batch was filled
    assert any(r["rollout/sampling_rounds"] > 1 for r in m)  # the first rollout alone never sufficed
    samples = [json.loads(x) for x in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 4 and all(int(s["prompt"].split()[-1].rstrip(".")) % 2 == 0 for s in samples)
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        rl_cfg(online_rl.PPOConfig, tiny_model_dir, prompt_file, tmp_path / "x", "dynamic_sampling=true")


def test_kl_reference_of_a_run_continuing_an_adapter_is_where_it_starts(tiny_model_dir, prompt_file, tmp_path):
    """GRPO under LoRA from another run's adapter continues it; the KL reference is the starting
    policy (the adapter merged), not the bare base the adapter was trained from: the first
    step's KL is 0, as from a plain model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.stages import online_rl

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lcfg).save_pretrained(tmp_path / "adapter")  # B != 0: not the base
    res = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "g", "max_steps=1",
                                 "beta=0.1", "model.lora=true", "model.lora_r=4", "model.lora_alpha=8",
                                 "model.lora_target_modules=[q_proj,v_proj]", "sample_every=0",
                                 f"model.name_or_path={tmp_path / 'adapter'}"), [e_fraction])
    m = [r for r in engine.read_metrics(res.run_dir) if "policy/kl" in r]
    assert m[0]["policy/kl"] == pytest.approx(0.0, abs=1e-6)


def test_dynamic_sampling_short_of_groups_keeps_the_schedule(tiny_model_dir, prompt_file, tmp_path):
    """One rollout a step finds about half the batch's groups with spread: the step runs fewer
    optimizer steps of minibatch_size, and the learning-rate schedule still ends at zero on the
    last step (it skipped the steps not taken)."""
    from posttrain.stages import online_rl

    res = online_rl.train(rl_cfg(online_rl.GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "ds", "max_steps=3",
                                 "batch_size=4", "dynamic_sampling=true", "max_sampling_rounds=1",
                                 "minibatch_size=4", "sample_every=0", "schedule=linear", "warmup_ratio=0"),
                          [half_constant])
    m = [r for r in engine.read_metrics(res.run_dir) if "reward/mean" in r]
    planned = 4 * 4 // 4  # batch 4 x group 4 completions in minibatches of 4
    assert any(r["train/optimizer_steps"] < planned for r in m)  # a step came up short
    assert m[-1]["train/lr"] == 0.0  # the linear schedule ran to its end


@pytest.mark.parametrize("estimator", ["grpo", "ppo"])
def test_micro_batches_sum_to_the_whole_batch_update(tiny_model_dir, prompt_file, tmp_path, estimator):
    """Passes of 1 completion (or 3, grouped shortest first) accumulate to the update of one pass
    over all of them: the same gradient norms and weights to float summation order (PPO: the
    value loss, a token mean, included, under the default seq_mean policy loss)."""
    from safetensors.torch import load_file

    from posttrain.stages import online_rl

    runs = {}
    for micro in (1, 3, 16):
        if estimator == "grpo":
            cls, args = online_rl.GRPOConfig, ("beta=0.1", "num_iterations=2")
        else:
            cls, args = online_rl.PPOConfig, ("group_size=1", "batch_size=8", "minibatch_size=8", "beta=0.1")
        args = ("max_steps=2", "sample_every=0", f"micro_batch_size={micro}", *args)
        res = online_rl.train(rl_cfg(cls, tiny_model_dir, prompt_file, tmp_path / f"m{micro}", *args), [e_fraction])
        m = [r for r in engine.read_metrics(res.run_dir) if "reward/mean" in r]
        runs[micro] = ([r["train/grad_norm"] for r in m], load_file(str(res.model_dir / "model.safetensors")))
    norms, weights = runs[16]
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    for micro in (1, 3):
        assert runs[micro][0] == pytest.approx(norms, rel=1e-4)
        assert_same_adam_update(runs[micro][1], weights, init, lr=3e-3, steps=2)


def assert_same_adam_update(got: dict, want: dict, init: dict, lr: float, steps: int) -> None:
    """Weights after ``steps`` Adam steps from ``init`` that differ only by float summation order:
    the updates agree to 1e-3 of their norm, and all but a few in a million elements to 5e-5.
    Adam divides each gradient by its own running scale, so an element whose gradient is at
    rounding level moves by up to ``lr`` a step in a direction the rounding picks (seen on an
    AVX2 CPU: one embedding element of 3.1M, 6.9e-5 apart); those may differ by up to that."""
    diff = torch.cat([(got[k] - want[k]).flatten() for k in want]).double()
    update = torch.cat([(want[k] - init[k].to(want[k].dtype)).flatten() for k in want]).double()
    assert diff.norm() <= 1e-3 * update.norm()
    loose = diff.abs() > 5e-5
    assert int(loose.sum()) <= max(1, diff.numel() // 200_000) and float(diff.abs().max()) <= 2 * lr * steps


@pytest.mark.parametrize("estimator", ["grpo", "ppo"])
def test_shared_prompt_rows_change_nothing(tiny_model_dir, prompt_file, tmp_path, estimator, monkeypatch):
    """The completions of a prompt packed into one row, the prompt once (share_prefix, the
    default), train to the weights of padded rows, one completion each (GRPO with a KL term and
    two passes; PPO with its value head on the shared backbone)."""
    from safetensors.torch import load_file

    from posttrain.stages import online_rl

    cls = online_rl.GRPOConfig if estimator == "grpo" else online_rl.PPOConfig
    rows = []  # (members, rows) of each packed micro-batch
    real = online_rl.collate_shared_prefix

    def spy(examples, groups, pad_id, *rest):
        rows.append((len(examples), len(set(groups))))
        return real(examples, groups, pad_id, *rest)

    monkeypatch.setattr(online_rl, "collate_shared_prefix", spy)
    monkeypatch.setattr(online_rl, "attention_pair_cost", lambda config: 0.0)  # share every group's prompt
    runs = {}
    for share in (True, False):
        args = ("max_steps=2", "sample_every=0", "micro_batch_size=3", "beta=0.1", "num_iterations=2",
                f"share_prefix={str(share).lower()}", *(["group_size=2"] if estimator == "ppo" else []))
        res = online_rl.train(rl_cfg(cls, tiny_model_dir, prompt_file, tmp_path / f"s{share}", *args), [e_fraction])
        m = [r for r in engine.read_metrics(res.run_dir) if "reward/mean" in r]
        runs[share] = ([r["train/grad_norm"] for r in m], [r["reward/mean"] for r in m],
                       load_file(str(res.model_dir / "model.safetensors")))
    (n1, r1, w1), (n0, r0, w0) = runs[True], runs[False]
    assert rows and any(m > r for m, r in rows)  # some rows held several completions
    assert r1 == r0  # the same rollouts
    assert n1 == pytest.approx(n0, rel=1e-4)
    for k in w0:  # rounding, amplified by Adam in tiny gradients: under a tenth of one lr=3e-3 step
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=2e-4)


def test_prefix_sharing_only_where_it_saves_flops():
    """A prompt's completions share one row while the prompt computed once outweighs the
    attention over the longer row, by hand, each layout priced as padded to its longest row:
    (P + sum c) + k (P + sum c)^2 against n (W + k W^2), W the longest P + c; micro_batch
    falls back to padded rows otherwise."""
    from types import SimpleNamespace

    from posttrain.data.tokenize import TokenizedExample
    from posttrain.stages.online_rl import attention_pair_cost, micro_batch, sharing_pays

    smollm = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                             intermediate_size=1536)
    k = attention_pair_cost(smollm)
    assert k == pytest.approx(4 * 9 * 64 / (2 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)))  # 1 / 3072

    def group(P, c, first=0):
        return [TokenizedExample(list(range(first, first + P)) + [900 + i] * c, [0] * (P + c), "") for i in range(8)]

    # P=60, c=64: shared 572 + 572^2 k = 678.5 < separate 8 (124 + 124^2 k) = 1032.0
    assert sharing_pays([group(60, 64)], k)
    # P=60, c=200: shared 1660 + 1660^2 k = 2557.0 > separate 8 (260 + 260^2 k) = 2256.0
    assert not sharing_pays([group(60, 200)], k)
    # mixed lengths, padded rows pad to the longest: 7 x 50 + 1 x 600 tokens behind P=60:
    # shared 1010 + 1010^2 k = 1342.1 < separate 8 (660 + 660^2 k) = 6414.4
    mixed = group(60, 50)[:7] + [TokenizedExample(list(range(60)) + [990] * 600, [0] * 660, "")]
    assert sharing_pays([mixed], k)
    assert sharing_pays([group(60, 200)], 0.0)  # attention free: sharing always saves
    short, long = group(60, 64), group(60, 600, first=100)
    assert "sources" in micro_batch(short, list(range(8)), 8, 0, "cpu", k)  # one shared row
    b = micro_batch(long, list(range(8)), 8, 0, "cpu", k)
    assert "sources" not in b and b["input_ids"].shape[0] == 8  # a padded row each
    assert "sources" in micro_batch(long, list(range(8)), 8, 0, "cpu")  # pair_cost 0: always shared


def test_by_length_orders_shortest_first():
    from posttrain.data.tokenize import TokenizedExample
    from posttrain.stages.online_rl import by_length, chunks

    ex = [TokenizedExample([1] * n, [1] * n, "") for n in (5, 2, 9, 2, 7)]
    assert by_length([0, 1, 2, 3, 4], ex) == [1, 3, 0, 4, 2]  # ties keep their order
    assert chunks(by_length([4, 2, 0], ex), 2) == [[0, 4], [2]]


def test_generation_model_merges_lora_for_the_rollout_only(tiny_model_dir):
    """Adapters are merged into the base weights inside the ``with`` (same outputs as the
    unmerged model) and unmerged after, also on error; the base weights come back to within
    float rounding and the LoRA weights still get gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.rollout import generation_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "up_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    x = torch.arange(10)[None]
    want = model(input_ids=x).logits
    with generation_model(model) as gen:
        assert any(m.merged for m in gen.modules() if hasattr(m, "merged"))
        torch.testing.assert_close(gen(input_ids=x).logits, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError), generation_model(model):
        raise RuntimeError("stopped mid-rollout")
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)
    model(input_ids=x).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_draw_follows_the_distribution():
    from posttrain.rollout import draw

    p = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]).repeat(10_000, 1)
    tokens = draw(p, torch.Generator().manual_seed(0))
    first, second = tokens[0::2], tokens[1::2]
    assert set(first.tolist()) <= {0, 2, 3} and set(second.tolist()) == {3}  # never a zero-probability token
    freq = torch.bincount(first, minlength=5).float() / len(first)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), rtol=0, atol=0.015)
    again = draw(p, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


def test_grpo_with_arithmetic_step_verifier(tiny_model_dir, prompt_file, tmp_path):
    """``step_verifier: arithmetic`` feeds rule-based step scores to the same process advantages."""
    from posttrain.config import ConfigError
    from posttrain.stages.online_rl import GRPOConfig, train
    from posttrain.synth.claims import ArithmeticStepVerifier

    assert ArithmeticStepVerifier().score_many([None], [["2 + 3 = 5.", "5 * 2 = 11.", "Done."]]) == [[1.0, 0.0, 1.0]]
    res = train(rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "run", "max_steps=1",
                       "step_verifier=arithmetic", "step_separator=e"), [e_fraction])
    m = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 1 and m[-1]["advantage/std"] > 0
    with pytest.raises(ConfigError, match="step_verifier"):
        rl_cfg(GRPOConfig, tiny_model_dir, prompt_file, tmp_path / "bad", "step_verifier=prm")
