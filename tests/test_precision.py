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


@pytest.mark.parametrize("base_dtype,fused", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_decode_copy_follows_the_weights_in_bf16(tiny_model_dir, base_dtype, fused, monkeypatch):
    """Under mixed precision the rollout decodes from a bf16 copy of the current LoRA-merged
    weights, refreshed on every rollout (a training step in between is seen), with tied
    weights still tied and buffers in float32; it decodes exactly like a bf16 cast of the
    merged model (peft's own merge), and the trained weights are never touched; the copy's
    weights are freed after each rollout and made again for the next. With the
    frozen projections stored in bf16 (``store_frozen_base``) the same, from those weights."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import Precision, set_precision, store_frozen_base
    from posttrain.rollout import decode, decode_dtype, generation_model

    if not fused:  # HF's forward decodes (no fused q/k/v views to free and make again)
        monkeypatch.setenv("POSTTRAIN_FUSED_DECODE", "0")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "up_proj"]))
    set_precision(model, Precision(torch.float32, torch.bfloat16))
    if base_dtype == "bfloat16":
        assert store_frozen_base(model, torch.bfloat16) > 0
    assert decode_dtype(model) == torch.bfloat16 and decode_dtype(model, "float32") == torch.float32
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask = torch.arange(3, 13).repeat(2, 1), torch.ones(2, 10, dtype=torch.long)
    copies = set()
    for step in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cast = copy.deepcopy(model)
        for p in cast.parameters():
            p.data = p.data.float()
        cast = cast.merge_and_unload()
        for p in cast.parameters():
            p.data = p.data.to(torch.bfloat16)
        want = decode(cast.eval(), ids, mask, 6, eos=-1, pad=0)
        with generation_model(model, torch.bfloat16) as gen:
            copies.add(id(gen))
            assert not any(hasattr(m, "lora_A") for m in gen.modules())  # a plain model
            assert all(p.dtype == torch.bfloat16 for p in gen.parameters())
            assert all(b.dtype == torch.float32 for b in gen.buffers())
            assert gen.get_output_embeddings().weight is gen.get_input_embeddings().weight
            merged = dict(cast.named_parameters())
            assert set(merged) == {n for n, _ in gen.named_parameters()}
            for n, p in gen.named_parameters():
                assert torch.equal(p, merged[n]), n
            at = gen.model.layers[0].self_attn  # fused q/k/v: views of one tensor, also when made again
            same = at.q_proj.weight.untyped_storage().data_ptr() == at.v_proj.weight.untyped_storage().data_ptr()
            assert same == fused and hasattr(gen, "_posttrain_fused") == fused
            got = decode(gen.eval(), ids, mask, 6, eos=-1, pad=0)
        assert torch.equal(got, want)
        assert all(p.numel() == 0 for p in gen.parameters())  # weights freed between rollouts
        for n, p in model.named_parameters():  # the trained weights are untouched
            assert p.requires_grad == ("lora_" in n)
            assert p.dtype == (torch.bfloat16 if "base_layer" in n and base_dtype == "bfloat16" else torch.float32)
            assert torch.equal(p, before[n]), n
        with torch.no_grad():  # a training step moves the weights: the next rollout's copy follows
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(-2.0)
    assert len(copies) == 1  # made once, refreshed in place


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_frozen_base_in_bf16_changes_nothing(tiny_model_dir, tmp_path, stage):
    """LoRA under mixed precision with the frozen projections stored in bf16 (the default)
    trains to exactly the same adapter weights and losses as with them in float32 (autocast
    casts them to bf16 in every pass anyway; DPO's reference, the adapters disabled, too); the
    merged export reloads the float32 base, so it equals peft's merge of the same adapter into
    the float32 model. (Online RL samples from a copy merged from the rounded weights, so its
    completions may differ by bf16 rounding: ``test_decode_copy_follows_the_weights_in_bf16``.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models import lora_layers, prepare_model
    from posttrain.stages import dpo, reward, sft

    def run(base_dtype):
        common = [f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path / base_dtype}", MIXED,
                  "model.lora=true", "model.lora_r=4", "model.lora_dropout=0", f"model.lora_base_dtype={base_dtype}",
                  "max_steps=3", "batch_size=2", "lr=1e-2", "tensorboard=false", "merge_lora=true"]
        if stage == "sft":
            data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{i} + {i}?", "completion": f"{2 * i}"}
                                                        for i in range(8)])
            res = sft.train(load_config(sft.SFTConfig, None, [*common, f"data.train={data}"]))
        else:
            data = write_jsonl(tmp_path / "pairs.jsonl", [
                {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}, I think"}
                for i in range(8)])
            extra = [f"data.train={data}", "data.eval_fraction=0"]
            if stage == "dpo":
                res = dpo.train(load_config(dpo.DPOConfig, None, [*common, *extra, "ref_cache=false"]))
            else:  # the reward model is saved merged: compare the merged exports
                res = reward.train(load_config(reward.RewardConfig, None, [*common[:-1], *extra]))
                return res, losses(res.run_dir, "loss/train"), load_file(str(res.model_dir / "model.safetensors"))
        return res, losses(res.run_dir, "loss/train"), load_file(str(res.model_dir / "adapter_model.safetensors"))

    cfg = load_config(sft.SFTConfig, None, [f"model.name_or_path={tiny_model_dir}", MIXED, "model.lora=true"])
    model, _, _ = prepare_model(cfg.model)
    assert {m.base_layer.weight.dtype for m in lora_layers(model)} == {torch.bfloat16}
    res32, loss32, ad32 = run("float32")
    res16, loss16, ad16 = run("auto")
    assert loss16 == loss32 and len(loss16) == 3
    assert ad16.keys() == ad32.keys() and all(torch.equal(ad16[k], ad32[k]) for k in ad16)
    if stage == "rm":
        return
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(res32.model_dir))
    want = want.merge_and_unload().state_dict()
    got = load_file(str(res16.run_dir / "model-merged" / "model.safetensors"))
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in got)


def test_inference_load_is_bf16_and_merged(tiny_model_dir, tmp_path):
    """``load_model(inference=True)`` under mixed precision: bf16 parameters (float32 buffers),
    a LoRA adapter directory merged into them, nothing trainable, no autocast mark."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    x = torch.arange(10)[None]
    want = peft_model.eval()(input_ids=x).logits
    m = load_model(tmp_path / "adapter", "bf16-mixed", inference=True)
    assert not hasattr(m, "peft_config") and getattr(m, "posttrain_autocast", None) is None
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())
    assert all(b.dtype == torch.float32 for b in m.buffers())
    torch.testing.assert_close(m(input_ids=x).logits.float(), want, rtol=0.05, atol=0.05)
    assert next(load_model(tmp_path / "adapter", "float32", inference=True).parameters()).dtype == torch.float32


def test_frozen_base_in_bf16_releases_the_checkpoint_map(tiny_model_dir):
    """transformers loads weights as views of the safetensors file's memory map; once the frozen
    projections are stored in bf16, no parameter or buffer may still point into that map (it
    would keep the whole file's pages resident: 505 MB for the embedded model's 113 MB of
    embeddings)."""
    import re
    from pathlib import Path

    import torch

    from posttrain.models import ModelConfig, prepare_model

    def mapped_ranges():
        out = []
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.endswith(".safetensors") and str(tiny_model_dir) in line:
                lo, hi = (int(x, 16) for x in re.match(r"([0-9a-f]+)-([0-9a-f]+)", line).groups())
                out.append((lo, hi))
        return out

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    model, _, _ = prepare_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bf16-mixed", lora=True,
                                            lora_r=4))
    tensors = [*model.parameters(), *model.buffers()]
    assert any(t.dtype == torch.bfloat16 for t in tensors)  # the frozen base was lowered
    inside = [t.shape for t in tensors for lo, hi in mapped_ranges() if lo <= t.data_ptr() < hi]
    assert not inside


def test_bf16_probe_stops_at_the_small_round_when_bf16_is_emulated(monkeypatch):
    """The small round answers for a CPU that emulates bf16 (the large one took 49 s on every
    load there); otherwise the large round decides, bf16 winning by 1.3x."""
    from posttrain import models

    calls = []

    def timed(ratios):
        def probe(n, rounds, gen):
            calls.append(n)
            return ratios[n]
        return probe

    for ratios, want, sizes in [({256: 43.0}, False, [256]), ({256: 0.6, 1024: 0.5}, True, [256, 1024]),
                                ({256: 1.1, 1024: 0.9}, False, [256, 1024])]:
        calls.clear()
        models._cpu_bf16_is_faster.cache_clear()
        monkeypatch.setattr(models, "_bf16_over_fp32_time", timed(ratios))
        assert models._cpu_bf16_is_faster() is want and calls == sizes
    models._cpu_bf16_is_faster.cache_clear()
