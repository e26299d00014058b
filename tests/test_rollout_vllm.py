"""The vLLM backend's side of the contract, with a stand-in ``vllm`` module (no GPU here):
weights reach the engine under plain HF names with LoRA merged (and the policy is left
unmerged), prompts go in as token ids with per-request seeds, and outputs come back as a
Rollout cut at EOS with ``truncated`` from the finish reason."""

from __future__ import annotations

import copy
import sys
import types
import typing

import pytest
import torch


class FakeOutput:
    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason, self.text = token_ids, finish_reason, "unused"


class FakeLLM:
    instances: typing.ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs, self.loaded, self.requests = kwargs, {}, []
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        FakeLLM.instances.append(self)

    def _load(self, weights):
        self.loaded.update({k: v.clone() for k, v in weights})

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, params, use_tqdm=False):
        self.requests.append((prompts, params))
        eos = self.kwargs["eos"]
        outs = [[5, 6, eos, 9], [7, 8, 9, 10]]  # one stops at EOS (tokens after it dropped), one hits the length
        return [types.SimpleNamespace(outputs=[FakeOutput(outs[i % 2], "stop" if i % 2 == 0 else "length")])
                for i in range(len(prompts))]


@pytest.fixture
def fake_vllm(monkeypatch, smol_tokenizer):
    mod = types.ModuleType("vllm")
    mod.LLM = lambda **kw: FakeLLM(**kw, eos=smol_tokenizer.eos_token_id)
    mod.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeLLM.instances.clear()
    return mod


def test_vllm_sampler_syncs_merged_weights_and_builds_rollout(fake_vllm, tiny_model_dir, smol_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.rollout import SamplingConfig
    from posttrain.rollout_vllm import VLLMSampler

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()

    sampler = VLLMSampler(str(tiny_model_dir), torch.float32, 0.25, seed=3)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, top_k=0)
    roll = sampler.sample(model, smol_tokenizer, [[1, 2, 3], [4, 5]], cfg, seed=7)

    llm = FakeLLM.instances[0]
    assert llm.kwargs["gpu_memory_utilization"] == 0.25 and llm.kwargs["dtype"] == "float32"
    tied = {"lm_head.weight"} if base.config.tie_word_embeddings else set()
    assert set(llm.loaded) == set(want) - tied  # plain HF names, no peft prefixes or lora matrices
    for k, v in llm.loaded.items():
        torch.testing.assert_close(v, want[k], msg=k)  # LoRA merged into the copy
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)  # the policy is unmerged again
    prompts, params = llm.requests[0]
    assert [p["prompt_token_ids"] for p in prompts] == [[1, 2, 3], [4, 5]]
    assert [p["seed"] for p in params] == [7 * 100_003, 7 * 100_003 + 1] and params[0]["top_k"] == -1
    eos = smol_tokenizer.eos_token_id
    assert roll.completion_ids == [[5, 6, eos], [7, 8, 9, 10]] and roll.truncated == [False, True]
    assert roll.texts[1] == smol_tokenizer.decode([7, 8, 9, 10], skip_special_tokens=True)


def test_vllm_backend_errors_are_clear(monkeypatch):
    from posttrain.config import ConfigError
    from posttrain.rollout_vllm import VLLMSampler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        VLLMSampler("m", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'posttrain\[vllm\]'"):
        VLLMSampler("m", torch.float32)
