"""Every training stage under mixed precision (``model.dtype=bf16-mixed``: float32 weights,
bf16 autocast), which ``dtype=auto`` picks on CUDA and on CPUs with fast bf16. The rest of
the suite pins float32 (conftest), so this is where the bf16 paths run: a few steps each,
finite losses, float32 weights saved."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from posttrain import engine
from posttrain.config import load_config

MIXED = "model.dtype=bf16-mixed"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(run_dir, key):
    return [m[key] for m in engine.read_metrics(run_dir) if key in m]


def assert_float32_checkpoint(path):
    tensors = load_file(str(path))
    assert tensors and all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in tensors.values())


@pytest.mark.parametrize("extra", [[], ["model.lora=true", "model.lora_r=4", "model.lora_dropout=0"]],
                         ids=["full", "lora"])
def test_dpo_mixed_precision(tiny_model_dir, tmp_path, extra):
    from posttrain.stages.dpo import DPOConfig, train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}, I think"} for i in range(12)])
    res = train(load_config(DPOConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", f"output_dir={tmp_path / 'dpo'}", MIXED,
        "batch_size=4", "max_steps=3", "lr=1e-3", "tensorboard=false", "data.eval_fraction=0", "ref_cache=false",
        *extra]))
    assert len(losses(res.run_dir, "loss/train")) == 3
    assert all(math.isfinite(x) for x in losses(res.run_dir, "loss/train"))
    assert_float32_checkpoint(res.model_dir / ("adapter_model.safetensors" if extra else "model.safetensors"))


@pytest.mark.parametrize("extra", [[], ["frozen_backbone=true", "lr=1e-2"]], ids=["full", "frozen"])
def test_reward_model_mixed_precision(tiny_model_dir, tmp_path, extra):
    from posttrain.rewards.reward_model import RewardModel
    from posttrain.stages.reward import RewardConfig, train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}, I think"} for i in range(12)])
    res = train(load_config(RewardConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", f"output_dir={tmp_path / 'rm'}", MIXED,
        "batch_size=4", "max_steps=3", "lr=1e-3", "tensorboard=false", "data.eval_fraction=0", *extra]))
    assert all(math.isfinite(x) for x in losses(res.run_dir, "loss/train"))
    scores = RewardModel(res.model_dir, dtype="bf16-mixed").score(["What is 3 + 3?"], ["6"])
    assert math.isfinite(scores[0])


def test_prm_mixed_precision(tiny_model_dir, tmp_path):
    from posttrain.rewards.process import ProcessRewardModel
    from posttrain.stages.prm import PRMConfig, train

    rows = [{"prompt": f"What is {i} * 2?", "steps": [f"{i} * 2 = {2 * i + i % 2}"], "labels": [1 - i % 2]}
            for i in range(12)]
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    res = train(load_config(PRMConfig, None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'prm'}", MIXED,
        "batch_size=4", "max_steps=3", "lr=1e-3", "tensorboard=false", "data.eval_fraction=0"]))
    assert all(math.isfinite(x) for x in losses(res.run_dir, "loss/train"))
    scores = ProcessRewardModel(res.model_dir, dtype="bf16-mixed").score_steps("What is 3 * 2?", ["3 * 2 = 6"])
    assert len(scores) == 1 and 0 < scores[0] < 1


@pytest.mark.parametrize("cls,extra", [
    ("GRPOConfig", ["beta=0.04"]),  # full fine-tuning with a frozen reference copy
    ("GRPOConfig", ["model.lora=true", "model.lora_dropout=0", "beta=0.04"]),  # reference = adapters off
    ("PPOConfig", ["batch_size=4", "minibatch_size=4", "critic=separate"]),  # the critic's own backbone
], ids=["grpo-full", "grpo-lora", "ppo-separate-critic"])
def test_online_rl_mixed_precision(tiny_model_dir, tmp_path, cls, extra):
    from posttrain.stages import online_rl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write about topic {i}."} for i in range(8)])

    def e_count(prompts, completions, **_):
        return [float(c.count("e")) for c in completions]

    res = online_rl.train(load_config(getattr(online_rl, cls), None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={prompts}", f"output_dir={tmp_path / 'rl'}", MIXED,
        "sampling.max_new_tokens=8", "group_size=2", "batch_size=2", "max_steps=2", "lr=1e-3", "tensorboard=false",
        *extra]), reward_functions=[e_count])
    policy = losses(res.run_dir, "loss/policy")
    assert len(policy) == 2 and all(math.isfinite(x) for x in policy)
    if cls == "PPOConfig":
        assert all(math.isfinite(x) for x in losses(res.run_dir, "loss/value"))
