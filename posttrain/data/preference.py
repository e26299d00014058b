"""Preference data: rows -> pair records -> tokenized pairs, for reward models and DPO.

Row formats, recognised from the first row of a file unless given:

==========  =====================================================================================
``pair``    ``{"prompt": "2+2?", "chosen": "4", "rejected": "5"}``; each field a string or a list
            of messages; ``chosen``/``rejected`` may repeat the whole conversation (then the
            shared prefix, or the given ``prompt``, is split off as the prompt)
``hh``      Anthropic-HH transcripts: ``{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!",
            "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}``; the shared turns are the prompt
``ranked``  ``{"prompt": "...", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}`` (indices,
            best first) or ``"scores": [0.1, 0.9, 0.5]`` (higher is better): expanded into every
            ordered pair as InstructGPT does; tied scores give no pair
==========  =====================================================================================

Optional fields on any row: ``margin`` (float, the Bradley-Terry margin: the chosen reward
must exceed the rejected by it), and ``label`` (probability in [0, 1] that ``chosen`` is
preferred; 1 by default; an AI judge writes soft labels, see the losses).

Weights. Every pair carries ``weight``; the losses take a weighted mean. A ranked row with
K responses yields K(K-1)/2 pairs of weight 1/(K(K-1)/2) each, so every prompt counts once
whatever its number of responses (InstructGPT puts all pairs of a prompt in one batch
element for the same reason). Plain pairs have weight 1.

Tokenization. Each side is the conversation ``prompt + completion`` rendered by the chat
template; the labels cover only the completion's assistant turns (never assistant turns
inside the prompt), with their end-of-turn token. Both sides of a pair share one
left-truncation so their prompts stay identical (``too_long`` as for SFT).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from posttrain.data.formats import _messages, _string
from posttrain.data.loading import BadRowError, BadRows, Row, iter_rows
from posttrain.data.tokenize import TokenizedExample, TokenizeStats, length_cut, tokenize_conversation

PREFERENCE_FORMATS = ("pair", "hh", "ranked")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class PreferenceRecord:
    """One comparison: the same prompt, a preferred and a dispreferred completion."""

    origin: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]  # assistant turn(s) only
    rejected: list[dict[str, str]]
    margin: float = 0.0
    weight: float = 1.0
    label: float = 1.0  # P(chosen preferred)


@dataclass
class PreferencePair:
    """Tokenized comparison (see module docstring)."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float
    weight: float
    label: float
    origin: str


def detect_preference_format(row: dict[str, Any], origin: str = "") -> str:
    if "responses" in row:
        return "ranked"
    if "chosen" in row and "rejected" in row:
        c = row["chosen"]
        if "prompt" not in row and isinstance(c, str) and HH_TURN.search(c):
            return "hh"
        return "pair"
    raise BadRowError(origin, None, f"unrecognised preference row: keys {sorted(row)}; expected prompt+chosen+"
                      "rejected, chosen+rejected transcripts (HH), or prompt+responses+ranking/scores")


def _completion(row: Row, key: str) -> list[dict[str, str]]:
    """A completion as assistant messages (a string is one assistant turn)."""
    value = row.data.get(key)
    if isinstance(value, list):
        return _messages(row, key, value)
    return [{"role": "assistant", "content": _string(row, key)}]


def _prompt(row: Row) -> list[dict[str, str]] | None:
    if row.data.get("prompt") is None:
        return None
    if isinstance(row.data["prompt"], list):
        return _messages(row, "prompt", row.data["prompt"])
    return [{"role": "user", "content": _string(row, "prompt")}]


def split_shared_prefix(row: Row, prompt: list | None, chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) where chosen/rejected hold only the completion turns.

    With an explicit prompt, sides that repeat it are cut after it; without one, the turns
    both sides share up to their last common user turn are the prompt.
    """
    if prompt is not None:
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
        return prompt, chosen, rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the completion starts at the first assistant turn after the last shared user turn
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0:
        raise BadRowError(row.origin, "chosen", "no prompt: give 'prompt', or chosen/rejected conversations that "
                          "share their first user turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_hh(row: Row, key: str) -> list[dict[str, str]]:
    """An Anthropic-HH transcript ``\\n\\nHuman: ...\\n\\nAssistant: ...`` as messages."""
    text = _string(row, key)
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise BadRowError(row.origin, key, "HH transcript must start with '\\n\\nHuman:'")
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    if not msgs:
        raise BadRowError(row.origin, key, "no Human/Assistant turns found")
    return msgs


def _check_completion(row: Row, key: str, msgs: list[dict[str, str]]) -> None:
    if not msgs or msgs[0]["role"] != "assistant":
        raise BadRowError(row.origin, key, "completion must start with an assistant turn")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRowError(row.origin, key, "empty completion")


def _number(row: Row, key: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    v = row.data.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRowError(row.origin, key, f"wrong type: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise BadRowError(row.origin, key, f"not a finite number: {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRowError(row.origin, key, f"out of range: {v} (expected {lo}..{hi})")
    return float(v)


def _pair_record(row: Row, prompt, chosen, rejected, weight: float = 1.0) -> PreferenceRecord:
    prompt, chosen, rejected = split_shared_prefix(row, prompt, chosen, rejected)
    _check_completion(row, "chosen", chosen)
    _check_completion(row, "rejected", rejected)
    if chosen == rejected:
        raise BadRowError(row.origin, "rejected", "identical to chosen (no preference signal)")
    return PreferenceRecord(row.origin, prompt, chosen, rejected, margin=_number(row, "margin", 0.0),
                            weight=weight, label=_number(row, "label", 1.0, 0.0, 1.0))


def to_preference_records(row: Row, fmt: str) -> list[PreferenceRecord]:
    """The comparisons of ``row`` in format ``fmt`` (one, or all pairs of a ranked row)."""
    if fmt == "pair":
        return [_pair_record(row, _prompt(row), _completion(row, "chosen"), _completion(row, "rejected"))]
    if fmt == "hh":
        return [_pair_record(row, None, parse_hh(row, "chosen"), parse_hh(row, "rejected"))]
    if fmt == "ranked":
        return ranked_pairs(row)
    raise ValueError(f"unknown preference format {fmt!r}; expected one of {PREFERENCE_FORMATS}")


def ranked_pairs(row: Row) -> list[PreferenceRecord]:
    prompt = _prompt(row)
    if prompt is None:
        raise BadRowError(row.origin, "prompt", "missing field")
    responses = row.data.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadRowError(row.origin, "responses", "expected a list of at least 2 responses")
    comps = []
    for i, r in enumerate(responses):
        if not isinstance(r, (str, list)):
            raise BadRowError(row.origin, f"responses[{i}]", f"wrong type: expected a string, got {type(r).__name__}")
        comps.append(_messages(row, f"responses[{i}]", r) if isinstance(r, list) else
                     [{"role": "assistant", "content": r}])
        _check_completion(row, f"responses[{i}]", comps[-1])
    k = len(comps)
    if "ranking" in row.data:
        ranking = row.data["ranking"]
        if (not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking)
                or sorted(ranking) != list(range(k))):
            raise BadRowError(row.origin, "ranking", f"expected a permutation of 0..{k - 1} (best first), got {ranking!r}")
        better = [(ranking[a], ranking[b]) for a, b in itertools.combinations(range(k), 2)]
    elif "scores" in row.data:
        scores = row.data["scores"]
        if (not isinstance(scores, list) or len(scores) != k
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           for s in scores)):
            raise BadRowError(row.origin, "scores", f"expected {k} finite numbers, got {scores!r}")
        better = [(i, j) if scores[i] > scores[j] else (j, i)
                  for i, j in itertools.combinations(range(k), 2) if scores[i] != scores[j]]
    else:
        raise BadRowError(row.origin, "ranking", "missing field: a ranked row needs 'ranking' or 'scores'")
    if not better:
        raise BadRowError(row.origin, "scores", "all scores tie: no pair to learn from")
    better = [(i, j) for i, j in better if comps[i] != comps[j]]  # the same text twice: no preference
    if not better:
        raise BadRowError(row.origin, "responses", "every ordered pair holds the same response twice: no pair "
                          "to learn from")
    w = 1.0 / len(better)
    margin = _number(row, "margin", 0.0)
    return [PreferenceRecord(row.origin, prompt, comps[i], comps[j], margin=margin, weight=w) for i, j in better]


def read_preference_records(path: str, fmt: str, bad: BadRows) -> list[PreferenceRecord]:
    """All comparisons of one file; the format is detected from its first row if 'auto'."""
    chosen_fmt = None if fmt == "auto" else fmt
    out: list[PreferenceRecord] = []
    for row in iter_rows(path, bad):
        try:
            if chosen_fmt is None:
                chosen_fmt = detect_preference_format(row.data, row.origin)
            out.extend(to_preference_records(row, chosen_fmt))
        except BadRowError as e:
            bad.handle(e)
    return out


def tokenize_pair(tok, rec: PreferenceRecord, max_length: int, too_long: str,
                  stats: TokenizeStats) -> PreferencePair | None:
    """Both sides tokenized with completion-only labels; None when dropped as too long."""
    n = len(rec.prompt)
    c = tokenize_conversation(tok, rec.prompt + rec.chosen, rec.origin, train_from=n)
    r = tokenize_conversation(tok, rec.prompt + rec.rejected, rec.origin, train_from=n)
    for side, ex in (("chosen", c), ("rejected", r)):
        if ex.num_trained == 0:
            raise BadRowError(rec.origin, side, "no trained tokens after applying the chat template")
    cut = length_cut([c, r], max_length, too_long, stats, rec.origin, field="chosen/rejected")
    if cut is None:
        return None
    c = TokenizedExample(c.input_ids[cut:], c.labels[cut:], rec.origin)
    r = TokenizedExample(r.input_ids[cut:], r.labels[cut:], rec.origin)
    return PreferencePair(c, r, rec.margin, rec.weight, rec.label, rec.origin)


# --------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[PreferencePair], pad_id: int, share_prefix: bool = False) -> dict[str, Any]:
    """A micro-batch of pairs: ``2B`` right-padded rows, chosen sides first, then rejected; or with
    ``share_prefix`` one row per pair, the prefix both sides share once
    (:func:`~posttrain.data.tokenize.collate_shared_prefix`, members in the same order). Plus the
    pair fields ``margin``, ``weight``, ``label`` and ``n_tokens`` (positions computed)."""
    import torch

    from posttrain.data.tokenize import collate_pad, collate_shared_prefix

    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if share_prefix:
        batch = collate_shared_prefix(sides, list(range(len(pairs))) * 2, pad_id)
    else:
        batch = collate_pad(sides, pad_id)
        batch["n_tokens"] = int(batch["attention_mask"].sum())
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    batch["label"] = torch.tensor([p.label for p in pairs], dtype=torch.float32)
    return batch
