"""Reward-model scores: the forward used in training and the batched scorer used by RL.

An outcome reward model is an LM backbone with a scalar head, read at the last non-padding
token of ``prompt + completion`` rendered by the chat template (the end-of-turn token of
the response). :func:`sequence_rewards` is that forward, shared by ``posttrain rm`` and
:class:`RewardModel`. A saved reward model is a plain ``AutoModelForSequenceClassification``
directory (one label); a frozen-backbone model trained with an MLP head additionally
holds ``reward_head.safetensors``, which only :class:`RewardModel` applies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from posttrain.data.tokenize import IGNORE, collate_pad, tokenize_conversation
from posttrain.models import (
    apply_head,
    backbone_and_score_head,
    distinct_pad_token,
    final_hidden_states,
    load_tokenizer,
    pick_precision,
    resolve_model_path,
    set_precision,
)

REWARD_META = "posttrain_reward.json"
MLP_HEAD_FILE = "reward_head.safetensors"


def mlp_head(hidden: int, width: int) -> nn.Module:
    """Two-layer MLP head on frozen features: Linear(H, width) -> GELU -> Linear(width, 1)."""
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 1))


def last_token_states(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, model=None) -> torch.Tensor:
    """``(B, H)`` final hidden state at each row's last real token (right-padded batch);
    ``model`` (the whole scoring model) routes the call through its forward under FSDP."""
    hidden = final_hidden_states(model if model is not None else backbone, backbone, input_ids, attention_mask)
    last = attention_mask.sum(1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     head: nn.Module | None = None) -> torch.Tensor:
    """``(B,)`` scalar rewards of a right-padded batch (``head`` overrides the model's own)."""
    backbone, score = backbone_and_score_head(model)
    h = last_token_states(backbone, input_ids, attention_mask, model)
    return apply_head(head or score, h).squeeze(-1).float()


def as_messages(prompt) -> list[dict[str, str]]:
    """A prompt given as a string (one user turn) or a message list."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class RewardModel:
    """Batched scorer of (prompt, completion) pairs with a trained outcome reward model.

    Also a reward function in the RL sense: ``rm(prompts, completions) -> list[float]``.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str = "auto",
                 batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification

        from posttrain.config import ConfigError

        self.path = resolve_model_path(str(path))
        if (self.path / "adapter_config.json").is_file():
            raise ConfigError(f"{self.path} is a LoRA adapter; score with a whole reward model (a posttrain rm run's "
                              "model/ directory: the adapter merged, with its score head)")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tok = load_tokenizer(self.path)
        precision = pick_precision(dtype, self.device)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=precision.weights).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{self.path}: a classifier of {self.model.config.num_labels} labels, not a reward model "
                              "(one scalar score)")
        set_precision(self.model, precision)
        self.head = None
        meta = self.path / REWARD_META
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        # a reward model from elsewhere (no posttrain metadata) is read as transformers reads it: at
        # the last token that is not its config's pad token (with pad = EOS, before a closing EOS)
        self.own_forward = not info and self.model.config.pad_token_id is not None
        if not self.own_forward:
            distinct_pad_token(self.tok)
        if info.get("head") == "mlp":
            from safetensors.torch import load_file

            self.head = mlp_head(self.model.config.hidden_size, info["head_hidden"])
            self.head.load_state_dict(load_file(str(self.path / MLP_HEAD_FILE)))
            self.head.to(self.device, next(self.model.parameters()).dtype).eval()
        self.__name__ = f"reward_model({self.path.name})"

    def tokenize(self, prompt, completion: str) -> list[int]:
        msgs = as_messages(prompt) + [{"role": "assistant", "content": completion}]
        return tokenize_conversation(self.tok, msgs, train_from=len(msgs) - 1).input_ids

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str]) -> list[float]:
        """One scalar reward per (prompt, completion); prompts are strings or message lists."""
        from posttrain.data.tokenize import TokenizedExample

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        examples = [TokenizedExample(ids, [IGNORE] * len(ids), "")
                    for ids in (self.tokenize(p, c) for p, c in zip(prompts, completions))]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        out = [0.0] * len(examples)
        pad = self.model.config.pad_token_id if self.own_forward else self.tok.pad_token_id
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            batch = collate_pad([examples[i] for i in idx], pad)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            if self.own_forward:
                r = self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
            else:
                r = sequence_rewards(self.model, ids, mask, self.head)
            for i, v in zip(idx, r.tolist()):
                out[i] = v
        return out

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        return self.score(prompts, completions)
