"""Token ids and loss masks from canonical records; batching.

Loss mask. A conversation is rendered once by the model's chat template and tokenized
with character offsets. For each assistant turn ``i`` the template is also rendered for
``messages[:i]`` with the generation prompt and for ``messages[:i+1]``: the characters
between the two are that turn's content and end-of-turn marker. Tokens inside those
spans are trained on, up to and including the first special token after the content (the
template's end-of-turn token, ``<|im_end|>`` for ChatML) and nothing after it (the
newline between turns is not predicted). System and user turns and the generation prompt
(``<|im_start|>assistant\\n``) are never trained on. Plain ``text`` rows train on every
token and end with EOS.

Too long. ``too_long`` says what happens to a conversation longer than ``max_length``:
``error`` (a bad row; with ``skip_bad_rows`` it is counted and skipped), ``drop``
(skipped and counted, with no error), or ``truncate_prompt`` (tokens are removed from the
left of the sequence, never from a trained span; if the trained part alone is too long,
or so little prompt would remain that the reply is conditioned on almost nothing (fewer than
``MIN_PROMPT_TOKENS`` tokens, or all of it if shorter), the row is dropped and counted).
Counts are of rows: a ranked preference row that expands into several pairs counts once.
``text`` rows longer than ``max_length`` are split into consecutive windows, all trained on
(the usual continued pre-training treatment).

Batching. Both collators give the same loss for the same examples:
``pad`` right-pads to the longest row of the batch (batches are grouped by length, so
little is padded); ``flatten`` concatenates the batch into one row with ``position_ids``
restarting at 0 for each sequence, which transformers' attention turns into a
block-diagonal mask, so no sequence sees another.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.data.formats import SFTRecord
from posttrain.data.loading import BadRowError

IGNORE = -100


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or one whose renders do not nest."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained on
    origin: str

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


#: the fewest prompt tokens ``truncate_prompt`` leaves before the first trained token (the
#: generation header, 3-5 tokens in the common templates, and some of the user's text)
MIN_PROMPT_TOKENS = 16


def keeps_enough_prompt(prompt_tokens: int, cut: int) -> bool:
    """Whether cutting ``cut`` tokens from the left leaves enough of a ``prompt_tokens``-token
    prompt: :data:`MIN_PROMPT_TOKENS` of it, or all of it when it is shorter."""
    return prompt_tokens - cut >= min(prompt_tokens, MIN_PROMPT_TOKENS)


@dataclass
class TokenizeStats:
    """What tokenisation did to the data, reported at the end of loading (rows, by origin:
    the pairs of one ranked preference row count once)."""

    truncated: int = 0
    dropped_too_long: int = 0
    split_text: int = 0
    reasons: Counter = field(default_factory=Counter)
    seen: dict = field(default_factory=dict, repr=False)

    def count(self, what: str, origin: str) -> None:
        """One more row of ``what`` (an attribute), unless this origin was counted for it already."""
        done = self.seen.setdefault(what, set())
        if origin not in done:
            done.add(origin)
            setattr(self, what, getattr(self, what) + 1)

    def summary(self) -> str:
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} truncated from the left")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as too long")
        if self.split_text:
            parts.append(f"{self.split_text} long texts split into windows")
        return ", ".join(parts)


def _render(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_strings(tok) -> list[str]:
    """The text of the tokenizer's special tokens (end-of-turn markers among them)."""
    out = set(tok.all_special_tokens)
    out.update(t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return [x for x in out if x]


def _find_content(upto: str, content: str, start: int) -> tuple[int, int]:
    """(where, length) of an assistant message's text in its render, searched from ``start`` (where
    the template's text for the turn ends); templates that trim it (Llama-3, Gemma: ``| trim``)
    are matched by the trimmed text. An empty text is at ``start``. (-1, 0) when the template
    changed it otherwise."""
    if not content.strip():
        return start, 0
    for text in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
        at = upto.find(text, start)
        if at >= 0:
            return at, len(text)
    return -1, 0


_PROBE = "\ue000posttrain-probe\ue000"


def _first_turn_opening(tok, message: dict) -> int:
    """Where the text of a conversation's first message begins in its render: the template's
    opening (BOS, an injected system prompt, the role header) comes before it. Found by rendering
    a probe text in its place (a search for the text itself can stop early, inside the opening)."""
    probe = _render(tok, [{**message, "content": _PROBE}], add_generation_prompt=False)
    return max(probe.find(_PROBE), 0)


def assistant_char_spans(tok, messages: list[dict[str, str]], train_from: int = 0, origin: str = ""
                         ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train on (see module docstring).

    Only assistant turns at index ``>= train_from`` are trained on (preference data trains
    on the completion only, never on assistant turns inside its prompt), and none marked
    ``"weight": 0`` (OpenAI's fine-tuning format). A turn's span ends with the first special
    token after its text (the end-of-turn marker: ``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ``<|end|>``), or where its render ends when there is none.
    """
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateError(
            "the tokenizer has no chat template; conversational data needs one (use a chat model or "
            "'text' rows)"
        )
    full = _render(tok, messages, add_generation_prompt=False)
    spans = []
    eos = tok.eos_token or ""
    special = None
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from or m.get("weight", 1) == 0:
            continue
        before = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if eos and upto.endswith(eos) and not full.startswith(upto):
            upto = upto[: -len(eos)]  # a template that closes the conversation with EOS (Phi-3)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ChatTemplateError(
                "the chat template does not render conversations as prefixes of each other, so assistant "
                "turns cannot be located (templates that rewrite earlier turns are not supported yet)"
            )
        start = len(before) if i else _first_turn_opening(tok, m)
        content_at, n = _find_content(upto, m["content"], start)
        if content_at < 0:
            raise BadRowError(origin, "messages", f"assistant turn {i}: the chat template changed its text, so it "
                              "cannot be located in the rendered conversation")
        end = content_at + n
        special = _special_strings(tok) if special is None else special
        marks = [at + len(x) for x in special if (at := upto.find(x, end)) >= 0]
        end = min(marks) if marks else len(upto.rstrip())
        # a first turn has no render before it: its span starts at its text, not at the
        # template's opening (BOS, an injected system prompt, the assistant header)
        spans.append((start, end))
    return full, spans


def tokenize_conversation(tok, messages: list[dict[str, str]], origin: str = "", train_from: int = 0
                          ) -> TokenizedExample:
    text, spans = assistant_char_spans(tok, messages, train_from, origin)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        for a, b in spans:
            # tokens wholly inside a span: one that starts in the header (a pre-tokenizer merging
            # the header's newline with the text's first whitespace) is not what the model
            # generates after the prompt, which ends with that newline as a token of its own
            if s >= a and e <= b:
                labels[t] = ids[t]
                break
    return TokenizedExample(ids, labels, origin)


def tokenize_text(tok, text: str, origin: str = "") -> TokenizedExample:
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return TokenizedExample(ids, list(ids), origin)


def tokenize_record(
    tok, rec: SFTRecord, max_length: int, too_long: str, stats: TokenizeStats
) -> list[TokenizedExample]:
    """Token ids and labels for one record, with the too-long policy applied.

    Returns zero examples (dropped, counted in ``stats``), one, or several (split text).
    Raises BadRowError for ``too_long='error'``.
    """
    if rec.text is not None:
        ex = tokenize_text(tok, rec.text, rec.origin)
        if len(ex.input_ids) <= max_length:
            return [ex]
        stats.count("split_text", rec.origin)
        return [
            TokenizedExample(ex.input_ids[i : i + max_length], ex.labels[i : i + max_length], rec.origin)
            for i in range(0, len(ex.input_ids), max_length)
            if len(ex.input_ids[i : i + max_length]) > 1
        ]
    ex = tokenize_conversation(tok, rec.messages or [], rec.origin)
    if ex.num_trained == 0:
        raise BadRowError(rec.origin, "messages", "no trained tokens after applying the chat template")
    cut = length_cut([ex], max_length, too_long, stats, rec.origin)
    return [] if cut is None else [TokenizedExample(ex.input_ids[cut:], ex.labels[cut:], rec.origin)]


def length_cut(examples: list[TokenizedExample], max_length: int, too_long: str, stats: TokenizeStats,
               origin: str, field: str = "messages") -> int | None:
    """How many tokens to remove from the left of each of ``examples`` (0 if all fit), or None to drop.

    Several examples (the chosen and rejected sides of a preference pair) share one cut, so
    a shared prompt stays identical. Applies the ``too_long`` policy of the module docstring.
    """
    n = max(len(e.input_ids) for e in examples)
    if n <= max_length:
        return 0
    if too_long == "error":
        raise BadRowError(
            origin, field,
            f"too long: {n} tokens > max_length {max_length} (set too_long to truncate_prompt or drop, "
            "or skip_bad_rows: true)",
        )
    cut = n - max_length
    first_trained = min(next(i for i, x in enumerate(e.labels) if x != IGNORE) for e in examples)
    if too_long == "truncate_prompt" and keeps_enough_prompt(first_trained, cut):
        stats.count("truncated", origin)
        return cut
    stats.count("dropped_too_long", origin)
    return None


# --------------------------------------------------------------------------- batching


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega: int = 64) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Indices are shuffled with ``seed``, cut into windows of ``mega`` batches, each window
    sorted by length and cut into batches, and the batch order shuffled again: random
    across the epoch, with little padding inside a batch. The batch with the most tokens then
    moves to the front (as transformers' ``LengthGroupedSampler`` does): an out-of-memory shows
    at the first step, and the heap and CPU kernel caches reach their size there, not inside a
    timed or long-running stretch later.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * mega
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if batches:
        biggest = max(range(len(batches)), key=lambda b: (max(lengths[i] for i in batches[b]) * len(batches[b]), -b))
        batches.insert(0, batches.pop(biggest))
    return batches


def collate_pad(examples: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shared_prefix_length(examples: list[TokenizedExample]) -> int:
    """Number of leading tokens equal in id and label in all ``examples``: their prompt, and the
    identical start of their responses where they have one."""
    first, n = examples[0], min(len(e.input_ids) for e in examples)
    i = 0
    while i < n and all(e.input_ids[i] == first.input_ids[i] and e.labels[i] == first.labels[i] for e in examples):
        i += 1
    return i


def collate_shared_prefix(examples: list[TokenizedExample], groups: list[int], pad_id: int,
                          pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Prefix sharing: one row per group (the examples with the same ``groups`` value, e.g. a
    DPO pair's two sides or the completions of one prompt), the prefix they all share
    (:func:`shared_prefix_length`) once, then each member's suffix.

    Each suffix continues the prefix's positions and attends to the prefix and to itself, never
    to another member (``attention_mask`` is a ``(B, 1, T, T)`` boolean mask, True where a key is
    seen): every token sees what it sees in its own sequence, so the log-probs are those of
    separate rows (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
    Sharing"). Targets: ``sources`` (flat indices into the ``(B, T)`` batch: the position whose
    state predicts the token) and ``targets``, each distinct one once (a target inside the shared
    prefix serves every member; the last prefix token predicts the first token of each suffix);
    ``member_targets`` lists every example's targets, example after example in the given order,
    as indices into them, and ``member_of`` the example of each; ``members``: the number of
    examples; ``n_tokens``: positions computed.
    """
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    row_ids, row_pos, row_seg, slot_of = [], [], [], {}
    for members in rows.values():
        L = shared_prefix_length([examples[i] for i in members])
        ids, pos, seg = list(examples[members[0]].input_ids[:L]), list(range(L)), [0] * L
        for k, i in enumerate(members):
            e, start = examples[i], len(ids)
            # where each position of example i sits in the row: the prefix, then its own suffix
            slot_of[i] = (len(row_ids), L, start - L)
            ids += e.input_ids[L:]
            pos += range(L, len(e.input_ids))
            seg += [k + 1] * (len(e.input_ids) - L)
        row_ids.append(ids)
        row_pos.append(pos)
        row_seg.append(seg)
    width = -(-max(len(r) for r in row_ids) // pad_to_multiple_of) * pad_to_multiple_of
    unique: dict[tuple[int, int], int] = {}
    member_targets, member_of = [], []
    for i, e in enumerate(examples):
        row, L, shift = slot_of[i]
        for t in range(1, len(e.input_ids)):
            if e.labels[t] != IGNORE:
                src = row * width + (t - 1 if t - 1 < L else t - 1 + shift)
                member_targets.append(unique.setdefault((src, e.labels[t]), len(unique)))
                member_of.append(i)
    B = len(row_ids)
    ids_t = torch.full((B, width), pad_id, dtype=torch.long)
    pos_t = torch.zeros((B, width), dtype=torch.long)
    seg_t = torch.full((B, width), -1, dtype=torch.long)
    for b in range(B):
        n = len(row_ids[b])
        ids_t[b, :n], pos_t[b, :n], seg_t[b, :n] = (torch.tensor(x) for x in (row_ids[b], row_pos[b], row_seg[b]))
    q = torch.arange(width)
    seg_q, seg_k = seg_t[:, :, None], seg_t[:, None, :]
    mask = (q[:, None] >= q[None, :]) & (seg_k >= 0) & (seg_q >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    mask |= torch.eye(width, dtype=torch.bool)  # a padding position sees itself: no empty softmax row
    src_tgt = torch.tensor(list(unique), dtype=torch.long).reshape(-1, 2)
    return {"input_ids": ids_t, "position_ids": pos_t, "attention_mask": mask[:, None],
            "sources": src_tgt[:, 0].contiguous(), "targets": src_tgt[:, 1].contiguous(),
            "member_targets": torch.tensor(member_targets, dtype=torch.long),
            "member_of": torch.tensor(member_of, dtype=torch.long), "members": torch.tensor(len(examples)),
            "n_tokens": int((seg_t >= 0).sum())}


def collate_flatten(examples: list[TokenizedExample]) -> dict[str, Any]:
    """Padding-free batch: all sequences in one row (1, sum T_i) with restarting position_ids.

    The first label of every sequence is IGNORE so no token is predicted across a boundary.
    """
    ids, labels, pos = [], [], []
    for e in examples:
        ids.extend(e.input_ids)
        labels.extend([IGNORE] + e.labels[1:])
        pos.extend(range(len(e.input_ids)))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
    }


def collate(examples: list[TokenizedExample], mode: str, pad_id: int) -> dict[str, Any]:
    if mode == "flatten":
        return collate_flatten(examples)
    if mode == "pad":
        return collate_pad(examples, pad_id)
    raise ValueError(f"unknown batching mode {mode!r} (pad or flatten)")
