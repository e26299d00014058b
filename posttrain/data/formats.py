"""Raw rows -> canonical records.

Supervised (SFT) row formats, recognised from the first row of a file unless given:

=================  ==============================================================================
``messages``       ``{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}``
``prompt_completion`` ``{"prompt": "2+2?", "completion": "4"}`` (strings or message lists)
``alpaca``         ``{"instruction": "Add", "input": "2 and 2", "output": "4"}`` (``input`` optional)
``sharegpt``       ``{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}``
``text``           ``{"text": "raw document"}``: continued pre-training, loss on every token
=================  ==============================================================================

Every conversational format becomes a list of ``{"role", "content"}`` messages, to be
rendered by the model's chat template; the loss later covers every assistant turn.
Prompt-only formats (for online RL) are ``prompt`` (string or messages) or ``messages``
ending in a user turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.data.loading import BadRowError, Row

SFT_FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system", "tool": "tool"}


@dataclass
class SFTRecord:
    """One supervised example: a conversation (chat template) or a plain text."""

    origin: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None


@dataclass
class PromptRecord:
    """One prompt for generation or online RL; ``fields`` keeps the row's other columns."""

    origin: str
    messages: list[dict[str, str]]
    fields: dict[str, Any]


def detect_sft_format(row: dict[str, Any], origin: str = "") -> str:
    """The SFT format of ``row`` from its keys (most specific first)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise BadRowError(
        origin, None,
        f"unrecognised row format: keys {sorted(row)}; expected one of messages, conversations, "
        "prompt+completion, instruction+output, text (or set the dataset's format explicitly)",
    )


def _string(row: Row, key: str, *, allow_empty: bool = False) -> str:
    if key not in row.data or row.data[key] is None:
        raise BadRowError(row.origin, key, "missing field")
    value = row.data[key]
    if not isinstance(value, str):
        raise BadRowError(row.origin, key, f"wrong type: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRowError(row.origin, key, "empty")
    return value


def _alpaca_prompt(row: Row) -> str:
    """The user turn of an Alpaca row: ``instruction``, then ``input`` (optional) after a blank line."""
    instruction, extra = _string(row, "instruction"), row.data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRowError(row.origin, "input", f"wrong type: expected a string, got {type(extra).__name__}")
    return instruction if not (extra or "").strip() else f"{instruction}\n\n{extra}"


def _alpaca_history(row: Row) -> list[dict[str, str]]:
    """An Alpaca row's earlier turns (``history``: ``[[instruction, output], ...]``, as in
    LLaMA-Factory's Alpaca format), each a user and an assistant turn (trained, like every
    assistant turn of a conversation)."""
    history = row.data.get("history")
    if history is None or history == "" or history == []:  # (an empty CSV cell)
        return []
    if not isinstance(history, list):
        raise BadRowError(row.origin, "history", f"expected a list of [instruction, output] pairs, got "
                          f"{type(history).__name__}")
    out = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRowError(row.origin, f"history[{i}]", "expected an [instruction, output] pair of strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _messages(row: Row, key: str, value: Any, *, role_key="role", content_key="content",
              role_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    if value is None:
        raise BadRowError(row.origin, key, "missing field" + ("" if key in row.data else f" (keys: {sorted(row.data)})"))
    if not isinstance(value, list) or not value:
        raise BadRowError(row.origin, key, "expected a non-empty list of messages"
                          + ("" if isinstance(value, list) else f", got {type(value).__name__}"))
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise BadRowError(row.origin, where, f"expected an object, got {type(m).__name__}")
        role, content = m.get(role_key), m.get(content_key)
        if m.get("tool_calls") or m.get("function_call"):
            raise BadRowError(row.origin, f"{where}.{'tool_calls' if m.get('tool_calls') else 'function_call'}",
                              "tool calls are not supported yet (the row would train without them)")
        if role is None and "type" in m and role_key not in m:
            raise BadRowError(row.origin, where, f"a content part ({{'type': {m['type']!r}, ...}}), not a message with "
                              "a role: content parts are not supported; give the text as a string")
        if role_map is not None and role is None and m.get("role") is not None and m.get("content") is not None:
            raise BadRowError(row.origin, f"{where}.{role_key}", f"missing field: this message has 'role' and "
                              f"'content' keys (OpenAI style): name the column 'messages', not '{key}'")
        if role_map is not None:
            role = role_map.get(str(role).lower()) if role is not None else None
            if role is None:
                raise BadRowError(row.origin, f"{where}.{role_key}",
                                  f"unknown speaker {m.get(role_key)!r} (expected one of {sorted(role_map)})")
        if role not in ROLES:
            raise BadRowError(row.origin, f"{where}.{role_key}", f"unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise BadRowError(row.origin, f"{where}.{content_key}",
                              "missing field" if content is None else
                              f"wrong type: expected a string, got {type(content).__name__}")
        msg = {"role": role, "content": content}
        if "weight" in m and m["weight"] is not None:  # OpenAI's fine-tuning format: 0 = not trained on
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise BadRowError(row.origin, f"{where}.weight", f"expected 0 or 1 on an assistant message, got "
                                  f"{m['weight']!r}" + ("" if role == "assistant" else f" on a {role} message"))
            if m["weight"] == 0:
                msg["weight"] = 0
        out.append(msg)
    return out


def _check_assistant_turns(row: Row, key: str, messages: list[dict[str, str]]) -> None:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise BadRowError(row.origin, key, "no assistant turn to train on")
    if all(messages[i].get("weight", 1) == 0 for i in turns):
        raise BadRowError(row.origin, key, "no assistant turn to train on (every one has weight 0)")
    for i in turns:
        if not messages[i]["content"].strip():
            raise BadRowError(row.origin, f"{key}[{i}].content", "empty assistant message")


def to_sft_record(row: Row, fmt: str) -> SFTRecord:
    """Canonical record of ``row`` in format ``fmt``; raises BadRowError naming the field."""
    d = row.data
    if fmt == "messages":
        msgs = _messages(row, "messages", d.get("messages"))
        _check_assistant_turns(row, "messages", msgs)
        return SFTRecord(row.origin, messages=msgs)
    if fmt == "sharegpt":
        msgs = _messages(row, "conversations", d.get("conversations"), role_key="from", content_key="value",
                         role_map=SHAREGPT_ROLES)
        _check_assistant_turns(row, "conversations", msgs)
        return SFTRecord(row.origin, messages=msgs)
    if fmt == "prompt_completion":
        prompt, completion = d.get("prompt"), d.get("completion")
        if isinstance(prompt, list):  # turns given as context: an assistant turn among them is not trained
            p_msgs = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in _messages(row, "prompt", prompt)]
        else:
            p_msgs = [{"role": "user", "content": _string(row, "prompt")}]
        if isinstance(completion, list):
            c_msgs = _messages(row, "completion", completion)
            _check_assistant_turns(row, "completion", c_msgs)
        else:
            c_msgs = [{"role": "assistant", "content": _string(row, "completion")}]
        return SFTRecord(row.origin, messages=p_msgs + c_msgs)
    if fmt == "alpaca":
        msgs = [*_alpaca_history(row), {"role": "user", "content": _alpaca_prompt(row)},
                {"role": "assistant", "content": _string(row, "output")}]
        system = d.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRowError(row.origin, "system", f"wrong type: expected a string, got {type(system).__name__}")
        if system and system.strip():
            msgs.insert(0, {"role": "system", "content": system})
        return SFTRecord(row.origin, messages=msgs)
    if fmt == "text":
        return SFTRecord(row.origin, text=_string(row, "text"))
    raise ValueError(f"unknown SFT format {fmt!r}; expected one of {SFT_FORMATS}")


def to_prompt_record(row: Row) -> PromptRecord:
    """A prompt row: ``prompt`` (string or messages), or ``messages`` ending in a user turn."""
    d = row.data
    if "prompt" in d:
        if isinstance(d["prompt"], list):
            msgs = _messages(row, "prompt", d["prompt"])
        else:
            msgs = [{"role": "user", "content": _string(row, "prompt")}]
        rest = {k: v for k, v in d.items() if k != "prompt"}
    elif "messages" in d:
        msgs = _messages(row, "messages", d["messages"])
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # the reference answer is kept as a field, the model answers anew
            rest = {k: v for k, v in d.items() if k != "messages"}
            rest.setdefault("reference", d["messages"][-1]["content"])
        else:
            rest = {k: v for k, v in d.items() if k != "messages"}
        if not msgs:
            raise BadRowError(row.origin, "messages", "no prompt before the assistant turn")
    elif "instruction" in d:
        msgs = [{"role": "user", "content": _alpaca_prompt(row)}]
        rest = {k: v for k, v in d.items() if k not in ("instruction", "input")}
    else:
        raise BadRowError(row.origin, "prompt", f"missing field (a prompt row needs 'prompt' or 'messages'; "
                          f"keys: {sorted(d)})")
    key = "prompt" if "prompt" in d else "messages"
    if msgs[-1]["role"] == "assistant":
        raise BadRowError(row.origin, key, "the prompt ends with an assistant turn (a messages row may end with "
                          "one, the reference answer; not with two)")
    if not any(m["role"] in ("user", "tool") for m in msgs):
        raise BadRowError(row.origin, key, "no user turn: nothing for the model to answer")
    return PromptRecord(row.origin, msgs, rest)
