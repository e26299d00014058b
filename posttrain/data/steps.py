"""Step-labelled reasoning data for process reward models.

Row format (``steps``)::

    {"prompt": "What is 12 * 3 + 4?", "steps": ["12 * 3 = 36", "36 + 4 = 40"], "labels": [1, 1]}

``prompt`` is a string or a message list; ``steps`` the solution cut into steps (TRL's
``completions`` key is accepted too); ``labels`` one correctness value per step, 0/1 or
booleans, or a float in [0, 1] (e.g. Math-Shepherd's Monte-Carlo estimates).

Tokenization (:func:`tokenize_steps`, shared by training and scoring). The prompt is
rendered by the chat template with its generation prompt; then each step is tokenized as
``step + separator`` on its own, and the step's score is read at that chunk's last token
(the separator), so every step boundary is one token whatever the neighbouring text.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.data.formats import _string
from posttrain.data.loading import BadRowError, BadRows, Row, iter_rows
from posttrain.data.tokenize import TokenizeStats, keeps_enough_prompt
from posttrain.rewards.reward_model import as_messages


@dataclass
class StepRecord:
    origin: str
    prompt: list[dict[str, str]]
    steps: list[str]
    labels: list[float]


@dataclass
class StepExample:
    """Token ids, the index of each step's last token, and each step's label."""

    input_ids: list[int]
    positions: list[int]
    labels: list[float]
    origin: str


def to_step_record(row: Row) -> StepRecord:
    d = row.data
    if isinstance(d.get("prompt"), list):
        from posttrain.data.formats import _messages

        prompt = _messages(row, "prompt", d["prompt"])
    else:
        prompt = as_messages(_string(row, "prompt"))
    key = "steps" if "steps" in d else "completions"
    steps = d.get(key)
    if not isinstance(steps, list) or not steps:
        raise BadRowError(row.origin, key, "expected a non-empty list of step strings")
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s.strip():
            raise BadRowError(row.origin, f"{key}[{i}]", "expected a non-empty string")
    labels = d.get("labels")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise BadRowError(row.origin, "labels", f"expected {len(steps)} labels (one per step), got {labels!r}")
    out = []
    for i, v in enumerate(labels):
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise BadRowError(row.origin, f"labels[{i}]", f"expected 0/1, a boolean or a number in [0, 1], got {v!r}")
        out.append(float(v))
    return StepRecord(row.origin, prompt, [s.strip() for s in steps], out)


def read_step_records(path: str, bad: BadRows) -> list[StepRecord]:
    out = []
    for row in iter_rows(path, bad):
        try:
            out.append(to_step_record(row))
        except BadRowError as e:
            bad.handle(e)
    return out


def tokenize_steps(tok, prompt, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """(token ids, index of each step's last token) for a prompt and its solution steps."""
    text = tok.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    positions = []
    for step in steps:
        ids = ids + tok(step + separator, add_special_tokens=False)["input_ids"]
        positions.append(len(ids) - 1)
    return ids, positions


def tokenize_step_record(tok, rec: StepRecord, separator: str, max_length: int, too_long: str,
                         stats: TokenizeStats) -> StepExample | None:
    """Tokenized record with the too-long policy: error, drop, or truncate_prompt (left)."""
    ids, pos = tokenize_steps(tok, rec.prompt, rec.steps, separator)
    cut = len(ids) - max_length
    if cut <= 0:
        return StepExample(ids, pos, rec.labels, rec.origin)
    if too_long == "error":
        raise BadRowError(rec.origin, "steps", f"too long: {len(ids)} tokens > max_length {max_length} (set "
                          "too_long to truncate_prompt or drop, or skip_bad_rows: true)")
    first_step_start = pos[0] - len(tok(rec.steps[0] + separator, add_special_tokens=False)["input_ids"]) + 1
    if too_long == "truncate_prompt" and keeps_enough_prompt(first_step_start, cut):  # (as SFT rows)
        stats.count("truncated", rec.origin)
        return StepExample(ids[cut:], [p - cut for p in pos], rec.labels, rec.origin)
    stats.count("dropped_too_long", rec.origin)
    return None
