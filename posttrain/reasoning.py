"""The reasoning format and its parser.

A response in the reasoning format is::

    <think>
    step-by-step reasoning
    </think>
    <answer>final answer</answer>

:func:`parse_reasoning` is strict by default: exactly one non-empty ``<think>`` block, then
exactly one non-empty ``<answer>`` block, and nothing else but whitespace. When a response
fails it says why (``no <think> block``, ``text after </answer>``, ...), so a format reward,
an evaluation and rejection sampling all report the same reasons. ``strict=False`` only asks
for an ``<answer>`` block (the last one wins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


@dataclass
class Parsed:
    """A parsed response: ``answer`` is None when it did not parse, and ``error`` says why."""

    think: str | None
    answer: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_reasoning(text: str, strict: bool = True) -> Parsed:
    """Split a response into its reasoning and answer (see module docstring)."""
    if not strict:
        found = ANSWER_RE.findall(text)
        if not found or not found[-1].strip():
            return Parsed(None, None, "no <answer> block" if not found else "empty <answer>")
        return Parsed(None, found[-1].strip())
    m = FORMAT_RE.match(text)
    if m:
        think, answer = m.group(1).strip(), m.group(2).strip()
        if any(tag in part for tag in ("<think>", "</think>", "<answer>", "</answer>") for part in (think, answer)):
            return Parsed(None, None, "nested or repeated tags")
        if not think:
            return Parsed(None, None, "empty <think> block")
        if not answer:
            return Parsed(think, None, "empty <answer>")
        return Parsed(think, answer)
    # say what is wrong, in the order a reader would check
    if "<think>" not in text:
        return Parsed(None, None, "no <think> block")
    if "</think>" not in text:
        return Parsed(None, None, "<think> is never closed")
    if text.strip().startswith("<think>") is False:
        return Parsed(None, None, "text before <think>")
    if "<answer>" not in text:
        return Parsed(None, None, "no <answer> block")
    if "</answer>" not in text:
        return Parsed(None, None, "<answer> is never closed")
    if text.rstrip().endswith("</answer>") is False:
        return Parsed(None, None, "text after </answer>")
    return Parsed(None, None, "text between </think> and <answer>")


def extract_answer(response: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, or None (lenient)."""
    return parse_reasoning(response, strict=False).answer


def is_well_formatted(response: str) -> bool:
    """True for exactly ``<think>…</think>`` followed by ``<answer>…</answer>`` and nothing else."""
    return parse_reasoning(response).ok


def format_solution(reasoning: str, answer: str) -> str:
    """A worked solution in the reasoning format."""
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"
