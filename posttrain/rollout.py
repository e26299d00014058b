"""Text generation from chat prompts (the seed of the RL rollout engine).

:func:`generate` renders each conversation with the chat template and its generation
prompt, left-pads the batch (so every row's continuation starts at the same column),
and samples with the HF ``generate`` loop and its KV cache: greedy when
``temperature == 0``, otherwise temperature / top-p / top-k sampling, seeded. It stops
at EOS (the end-of-turn token for chat models) and at any of ``stop`` strings, which are
cut from the returned text. Prompts are processed longest-first in batches so that
little padding is generated.

Implemented so far: text in, text out. Behaviour log-probs for RL come with the online
RL stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import doc


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    max_new_tokens: int = doc("Maximum tokens generated per completion.", 256)
    temperature: float = doc("Sampling temperature; 0 = greedy.", 0.0)
    top_p: float = doc("Nucleus sampling mass (1 = off).", 1.0)
    top_k: int = doc("Sample among the k most likely tokens (0 = off).", 0)
    stop: list[str] = doc("Extra stop strings (EOS always stops).", default_factory=list)
    batch_size: int = doc("Prompts generated together.", 16)
    seed: int = doc("Sampling seed.", 0)


def render_prompts(tok, conversations: list[list[dict[str, str]]]) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def generate(model, tok, conversations: list[list[dict[str, str]]], cfg: SamplingConfig | None = None,
             streamer=None) -> list[str]:
    """Completions (text, special tokens removed) for chat ``conversations``, in input order."""
    cfg = cfg or SamplingConfig()
    texts = render_prompts(tok, conversations)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    padding_side = tok.padding_side
    tok.padding_side = "left"
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, streamer=streamer)
            if cfg.stop:
                kwargs.update(stop_strings=cfg.stop, tokenizer=tok)
            if cfg.temperature > 0:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k or None)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            for row, i in enumerate(idx):
                results[i] = _cut_at_stop(tok.decode(new[row], skip_special_tokens=True), cfg.stop)
    finally:
        tok.padding_side = padding_side
        model.train(was_training)
    return results


