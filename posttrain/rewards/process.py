"""Process reward model scores: one score per reasoning step.

A PRM is an LM backbone with a scalar head applied at the last token of every step (see
:mod:`posttrain.data.steps` for how steps are tokenized). :func:`step_logits` is the
forward shared by ``posttrain prm`` and :class:`ProcessRewardModel`, whose
``score_steps(prompt, steps)`` gives one reward per step (the probability that the step is
correct), as GRPO's process supervision consumes. Saved as a plain
``AutoModelForTokenClassification`` directory with one label.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.models import (
    apply_head,
    backbone_and_score_head,
    distinct_pad_token,
    final_hidden_states,
    load_tokenizer,
    pick_precision,
    set_precision,
)

PRM_META = "posttrain_prm.json"


def step_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """``(S,)`` logits at the step-end tokens ``(rows[s], positions[s])`` of a padded batch."""
    backbone, head = backbone_and_score_head(model)
    hidden = final_hidden_states(model, backbone, input_ids, attention_mask)
    return apply_head(head, hidden[rows, positions]).squeeze(-1).float()


def step_batch(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask ``(B, T)``, plus flat ``rows``/``positions``/``labels`` ``(S,)``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, pos, labels = [], [], []
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        rows += [i] * len(e.positions)
        pos += e.positions
        labels += e.labels
    return {"input_ids": ids, "attention_mask": mask, "rows": torch.tensor(rows), "positions": torch.tensor(pos),
            "labels": torch.tensor(labels, dtype=torch.float32)}


class ProcessRewardModel:
    """Scores each step of a solution with a trained PRM (``score_steps``)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str = "auto",
                 batch_size: int = 16):
        from transformers import AutoModelForTokenClassification

        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size  # solutions per forward pass
        self.tok = load_tokenizer(self.path)
        distinct_pad_token(self.tok)
        meta = self.path / PRM_META
        self.separator = json.loads(meta.read_text())["step_separator"] if meta.is_file() else "\n\n"
        precision = pick_precision(dtype, self.device)
        self.model = AutoModelForTokenClassification.from_pretrained(self.path, dtype=precision.weights).to(self.device).eval()
        set_precision(self.model, precision)

    @torch.no_grad()
    def score_steps(self, prompt, steps: list[str]) -> list[float]:
        """Probability that each step is correct, one per step (``[]`` for no steps)."""
        return self.score_many([prompt], [steps])[0]

    @torch.no_grad()
    def score_many(self, prompts: list, step_lists: list[list[str]]) -> list[list[float]]:
        from posttrain.data.steps import StepExample, tokenize_steps

        if len(prompts) != len(step_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(step_lists)} step lists")
        examples = []
        for j, (p, steps) in enumerate(zip(prompts, step_lists)):
            empty = [i for i, s in enumerate(steps) if not s.strip()]
            if empty:  # (trained on non-empty steps only: its score would be read off the separator alone)
                raise ValueError(f"solution {j}: step {empty[0]} is empty; a PRM scores non-empty steps (drop the "
                                 "empty ones, as posttrain.stages.online_rl.split_steps does)")
            # stripped as the training rows' steps were (posttrain.data.steps.to_step_record)
            ids, pos = tokenize_steps(self.tok, p, [s.strip() for s in steps], self.separator)
            examples.append(StepExample(ids, pos, [0.0] * len(pos), ""))
        out: list[list[float]] = []
        for s in range(0, len(examples), self.batch_size):  # (a step's rollout holds every group's solutions)
            chunk = examples[s : s + self.batch_size]
            if not any(e.positions for e in chunk):
                out += [[] for _ in chunk]
                continue
            b = step_batch(chunk, self.tok.pad_token_id)
            probs = torch.sigmoid(step_logits(self.model, b["input_ids"].to(self.device),
                                              b["attention_mask"].to(self.device), b["rows"].to(self.device),
                                              b["positions"].to(self.device))).tolist()
            k = 0
            for e in chunk:
                out.append(probs[k : k + len(e.positions)])
                k += len(e.positions)
        return out
