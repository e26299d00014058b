"""vLLM rollout backend (CUDA only; ``pip install posttrain[vllm]``), behind the same
interface as the HF backend: :meth:`VLLMSampler.sample` returns a
:class:`posttrain.rollout.Rollout`.

The engine runs in the trainer's process ("colocated", as TRL's ``vllm_mode="colocate"``),
one per rank, with ``gpu_memory_utilization`` of the GPU for its weights and KV cache. Before
each rollout the trainer's current weights are copied into it (:meth:`sync_weights`): each
LoRA-adapted weight is sent with its adapter merged (``W + B A s``, the policy itself left
as it is) and the parameter names are mapped back to the plain HF names vLLM's loader expects. Sampling runs on
token ids (no re-tokenisation), seeded per request, and stops at EOS and the stop strings.
The behaviour log-probs are still recomputed by the trainer (as with the HF backend), so the
importance ratio starts at exactly 1 whatever vLLM's kernels round differently.

Status: written against vLLM's ``LLM`` / ``SamplingParams`` API and tested here with a stand-in
module (no GPU in CI); run it on a CUDA machine before relying on it.
"""

from __future__ import annotations

import time

import torch

from posttrain.config import ConfigError
from posttrain.rollout import Rollout, SamplingConfig, _cut_at_stop


def hf_parameter_names(model):
    """``(name, tensor)`` of ``model``'s weights under their plain HF names, one at a time: a peft
    wrapper's prefixes and ``base_layer`` segments removed, LoRA matrices merged into the
    weights they adapt (each merged tensor made when it is reached, the policy unchanged)."""
    from posttrain.models import lora_layers
    from posttrain.rollout import merged_weight

    layer_of = {id(m.base_layer.weight): m for m in lora_layers(model)}
    for name, p in model.named_parameters():
        if "lora_" in name or ".original_module." in name:  # adapters (merged) and replaced copies
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        name = name.replace(".modules_to_save.default.", ".")
        yield name, merged_weight(p.detach(), layer_of.get(id(p)))


class VLLMSampler:
    """A colocated vLLM engine that samples completions of token-id prompts."""

    def __init__(self, model_path: str, dtype: torch.dtype, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0):
        if not torch.cuda.is_available():
            raise ConfigError("sampling.backend=vllm needs a CUDA GPU; use sampling.backend=hf on this machine")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError("sampling.backend=vllm needs vLLM: pip install 'posttrain[vllm]'") from e
        self.llm = LLM(model=str(model_path), dtype=str(dtype).removeprefix("torch."),
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                       enable_prefix_caching=True)

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Copy ``model``'s current weights (LoRA merged) into the engine."""
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        runner.load_weights(hf_parameter_names(model))
        self.llm.reset_prefix_cache()

    def sample(self, model, tok, prompt_ids: list[list[int]], cfg: SamplingConfig, seed: int = 0) -> Rollout:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        self.sync_weights(model)
        params = [SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1,
                                 max_tokens=cfg.max_new_tokens, stop=list(cfg.stop) or None,
                                 seed=seed * 100_003 + i) for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        eos = tok.eos_token_id
        completion_ids, texts, truncated = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            completion_ids.append(ids)
            texts.append(_cut_at_stop(tok.decode(ids, skip_special_tokens=True), cfg.stop))
            truncated.append(c.finish_reason == "length")
        dt = time.perf_counter() - t0
        n_tok = sum(len(c) for c in completion_ids)
        return Rollout(prompt_ids, completion_ids, texts, truncated, dt, {"rollout/tokens_per_s": n_tok / max(dt, 1e-9)})
