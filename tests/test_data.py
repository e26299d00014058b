"""Readers, row formats, bad-row reporting, loss masks (decoded) and batching."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from posttrain.config import ConfigError, load_config
from posttrain.data.dataset import DataConfig, DataSource, load_sft_data, mix, read_sft_records
from posttrain.data.formats import detect_sft_format, to_prompt_record, to_sft_record
from posttrain.data.loading import BadRowError, BadRows, Row, iter_rows
from posttrain.data.tokenize import (
    IGNORE,
    MIN_PROMPT_TOKENS,
    TokenizeStats,
    collate_flatten,
    collate_pad,
    length_grouped_batches,
    tokenize_conversation,
    tokenize_record,
)
from tests.conftest import write_jsonl

ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello!"}]},
    "prompt_completion": {"prompt": "2+2?", "completion": "4"},
    "alpaca": {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    "text": {"text": "Once upon a time."},
}


def trained_text(tok, ex) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("fmt", list(ROWS))
def test_detect_and_convert(fmt):
    row = Row(ROWS[fmt], "f.jsonl:1")
    assert detect_sft_format(row.data) == fmt
    rec = to_sft_record(row, fmt)
    if fmt == "text":
        assert rec.text == "Once upon a time." and rec.messages is None
    else:
        assert rec.messages[-1]["role"] == "assistant"


def test_alpaca_joins_input_and_prompt_completion_messages():
    rec = to_sft_record(Row(ROWS["alpaca"], "x"), "alpaca")
    assert rec.messages == [{"role": "user", "content": "Add the numbers\n\n2 and 3"},
                            {"role": "assistant", "content": "5"}]
    row = Row({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
              "x")
    assert to_sft_record(row, "prompt_completion").messages[1] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("fmt,expected", [
    ("messages", ["Hello!<|im_end|>"]),
    ("prompt_completion", ["4<|im_end|>"]),
    ("alpaca", ["5<|im_end|>"]),
    ("sharegpt", ["Hello!<|im_end|>"]),
])
def test_loss_mask_is_exactly_the_assistant_reply(smol_tokenizer, fmt, expected):
    rec = to_sft_record(Row(ROWS[fmt], "x"), fmt)
    ex = tokenize_conversation(smol_tokenizer, rec.messages)
    assert trained_text(smol_tokenizer, ex) == expected
    # everything else (system, user turns, the '<|im_start|>assistant\n' header) is untrained
    full = smol_tokenizer.decode(ex.input_ids)
    assert full.endswith("<|im_end|>\n") and "<|im_start|>assistant\n" in full


def test_loss_mask_multi_turn(smol_tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"}]
    ex = tokenize_conversation(smol_tokenizer, msgs)
    assert trained_text(smol_tokenizer, ex) == ["first answer<|im_end|>", "second answer<|im_end|>"]


def test_prompt_turns_are_context_tool_calls_refused_and_alpaca_history_kept(smol_tokenizer):
    """prompt/completion: an assistant turn inside a message-list prompt is context, not trained
    (as TRL trains only the completion); assistant tool calls, which no format here carries
    to the template, are a bad row rather than dropped; Alpaca's ``history`` pairs become
    earlier turns, and a non-string ``system`` is a bad row."""
    row = Row({"prompt": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "WRONG"},
                          {"role": "user", "content": "2+2?"}], "completion": "4"}, "x:1")
    ex = tokenize_conversation(smol_tokenizer, to_sft_record(row, "prompt_completion").messages)
    assert trained_text(smol_tokenizer, ex) == ["4<|im_end|>"]
    call = {"role": "assistant", "content": "Let me check.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    row = Row({"messages": [{"role": "user", "content": "weather?"}, call, {"role": "tool", "content": "sun"},
                            {"role": "assistant", "content": "Sunny."}]}, "x:2")
    with pytest.raises(BadRowError, match=r"x:2: field 'messages\[1\].tool_calls': tool calls are not supported"):
        to_sft_record(row, "messages")
    row = Row({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "x:3")
    with pytest.raises(BadRowError, match=r"'role' and 'content' keys \(OpenAI style\): name the column 'messages'"):
        to_sft_record(row, "sharegpt")
    row = Row({"instruction": "and 3 + 3?", "output": "6", "history": ""}, "x:4")  # an empty CSV cell
    assert len(to_sft_record(row, "alpaca").messages) == 2
    row = Row({"instruction": "and 3 + 3?", "output": "6", "history": [["1 + 1?", "2"]]}, "x:4")
    assert [m["content"] for m in to_sft_record(row, "alpaca").messages] == ["1 + 1?", "2", "and 3 + 3?", "6"]
    for bad_row, field in (({"instruction": "q", "output": "a", "system": {"x": 1}}, "system"),
                           ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"history\[0\]")):
        with pytest.raises(BadRowError, match=f"field '{field}'"):
            to_sft_record(Row(bad_row, "x:5"), "alpaca")


# chat templates of other model families, on the SmolLM2 tokenizer with their special tokens added
QWEN2 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
         "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\\n' }}"
         "{%- endif %}{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
         "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
         "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<start_of_turn>model\\n' }}{% endif %}")
TEMPLATES = {  # template, special tokens added, bos, eos, end-of-turn marker
    "chatml": (None, [], None, None, "<|im_end|>"),
    "qwen2": (QWEN2, [], None, None, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>", "<|end|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
}


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_loss_mask_under_other_families_templates(smol_tokenizer, family):
    """Multi-turn masks cover each assistant text and its end-of-turn marker, nothing else, with
    templates that inject a system prompt (Qwen2), trim the text (Llama-3, Gemma) or close the
    conversation with EOS (Phi-3); a conversation may open with an assistant turn."""
    template, added, bos, eos, eot = TEMPLATES[family]
    tok = copy.deepcopy(smol_tokenizer)
    if template:
        tok.chat_template = template
        tok.add_special_tokens({"additional_special_tokens": added})
        if bos:
            tok.bos_token = bos
        if eos:
            tok.eos_token = eos
    trims = family in ("llama3", "gemma")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer\n"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"}]
    first = "first answer" if trims else "first answer\n"
    ex = tokenize_conversation(tok, msgs)
    assert trained_text(tok, ex) == [first + eot, "second answer" + eot]
    opening = [{"role": "assistant", "content": "I greet first"}, {"role": "user", "content": "ok"},
               {"role": "assistant", "content": "fine"}]
    assert trained_text(tok, tokenize_conversation(tok, opening)) == ["I greet first" + eot, "fine" + eot]
    # a one-letter text found where it is, not inside the closing marker; an empty reply trains
    # the end-of-turn marker alone (a reward model scores empty completions)
    one = [{"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}, {"role": "assistant", "content": "d"}]
    assert trained_text(tok, tokenize_conversation(tok, one)) == ["d" + eot, "d" + eot]
    empty = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    assert trained_text(tok, tokenize_conversation(tok, empty)) == [eot]


def test_a_template_that_rewrites_a_reply_makes_a_bad_row(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                         "{% endif %}")
    with pytest.raises(BadRowError, match=r"f.jsonl:3: field 'messages': assistant turn 1"):
        tokenize_conversation(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                              "f.jsonl:3")


def test_assistant_turns_with_weight_0_are_not_trained(smol_tokenizer):
    """OpenAI's fine-tuning format: an assistant message with "weight": 0 is context only."""
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "weight": 0},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second", "weight": 1}]}
    rec = to_sft_record(Row(row, "x:1"), "messages")
    ex = tokenize_conversation(smol_tokenizer, rec.messages)
    assert trained_text(smol_tokenizer, ex) == ["second<|im_end|>"]
    assert "first" in smol_tokenizer.decode(ex.input_ids)  # still in the context
    for weight, msg in ((0, "every one has weight 0"), (0.5, "expected 0 or 1")):
        bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "weight": weight}]}
        with pytest.raises(BadRowError, match=msg):
            to_sft_record(Row(bad, "x:1"), "messages")


def test_text_rows_train_every_token(smol_tokenizer):
    stats = TokenizeStats()
    (ex,) = tokenize_record(smol_tokenizer, to_sft_record(Row(ROWS["text"], "x"), "text"), 64, "error", stats)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == smol_tokenizer.eos_token_id
    long = to_sft_record(Row({"text": "word " * 100}, "x"), "text")
    windows = tokenize_record(smol_tokenizer, long, 32, "error", stats)
    assert len(windows) > 2 and all(len(w.input_ids) <= 32 for w in windows) and stats.split_text == 1
    assert sum(len(w.input_ids) for w in windows) == len(tokenize_record(smol_tokenizer, long, 10**6, "error",
                                                                         stats)[0].input_ids)


def test_too_long_policies(smol_tokenizer):
    rec = to_sft_record(Row({"prompt": "long question " * 30, "completion": "short"}, "f.jsonl:7"),
                        "prompt_completion")
    with pytest.raises(BadRowError, match=r"f.jsonl:7: field 'messages': too long: \d+ tokens > max_length 40"):
        tokenize_record(smol_tokenizer, rec, 40, "error", TokenizeStats())
    stats = TokenizeStats()
    (ex,) = tokenize_record(smol_tokenizer, rec, 40, "truncate_prompt", stats)
    assert len(ex.input_ids) == 40 and trained_text(smol_tokenizer, ex) == ["short<|im_end|>"]
    assert stats.truncated == 1
    assert tokenize_record(smol_tokenizer, rec, 40, "drop", stats) == [] and stats.dropped_too_long == 1
    # when the trained part alone is too long, truncation would cut trained tokens: dropped and counted
    rec2 = to_sft_record(Row({"prompt": "q", "completion": "answer " * 50}, "x"), "prompt_completion")
    assert tokenize_record(smol_tokenizer, rec2, 40, "truncate_prompt", stats) == []
    assert stats.dropped_too_long == 2
    # a cut that would leave fewer than MIN_PROMPT_TOKENS of prompt before the first trained
    # token (the reply conditioned on a header and nothing else): dropped; at that many, kept
    (full,) = tokenize_record(smol_tokenizer, rec, 10**6, "error", TokenizeStats())
    first = next(i for i, x in enumerate(full.labels) if x != IGNORE)
    answer = len(full.labels) - first
    stats = TokenizeStats()
    assert tokenize_record(smol_tokenizer, rec, answer + MIN_PROMPT_TOKENS - 1, "truncate_prompt", stats) == []
    (kept,) = tokenize_record(smol_tokenizer, rec, answer + MIN_PROMPT_TOKENS, "truncate_prompt", stats)
    assert kept.labels[:MIN_PROMPT_TOKENS] == [IGNORE] * MIN_PROMPT_TOKENS and kept.labels[MIN_PROMPT_TOKENS] != IGNORE
    assert stats.dropped_too_long == 1 and stats.truncated == 1


def test_readers_agree(tmp_path):
    import datasets
    import pandas as pd

    rows = [ROWS["prompt_completion"], {"prompt": "3+3?", "completion": "6"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d_arrow"))
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "d_arrow"):
        got = [r.data for r in iter_rows(tmp_path / name, BadRows())]
        assert got == rows, name
    origins = [r.origin for r in iter_rows(tmp_path / "d.csv", BadRows())]
    assert origins[0].endswith("d.csv:2")  # line 1 is the header


def test_csv_messages_column_is_decoded(tmp_path):
    import pandas as pd

    pd.DataFrame([{"messages": json.dumps(ROWS["messages"]["messages"])}]).to_csv(tmp_path / "m.csv", index=False)
    recs = read_sft_records(DataSource(path=str(tmp_path / "m.csv")), BadRows())
    assert recs[0].messages[-1]["content"] == "Hello!"


def test_bad_rows_error_names_file_line_field(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [
        ROWS["messages"],
        '{"messages": [ broken',
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
    ])
    with pytest.raises(BadRowError, match=r"bad.jsonl:2: invalid JSON"):
        read_sft_records(DataSource(path=str(f)), BadRows())
    bad = BadRows(skip=True)
    recs = read_sft_records(DataSource(path=str(f)), bad)
    assert len(recs) == 1 and bad.total == 5
    text = "\n".join(bad.errors)
    assert f"{f}:3: field 'messages[1].content': wrong type: expected a string, got int" in text
    assert f"{f}:4: field 'messages': no assistant turn" in text
    assert f"{f}:5: field 'messages[0].role': unknown role 'robot'" in text
    assert f"{f}:6: field 'messages[1].content': empty assistant message" in text
    assert "skipped 5 bad rows" in bad.summary()


def test_undecodable_files_and_rows_name_their_line(tmp_path):
    """Bytes that are not UTF-8, a byte-order mark, lone surrogates, CSV rows that do not fit the
    header (at the line they start on, after a quoted cell that spans lines), and files that
    are not what their suffix says: errors that name the file and line, or counted skips."""
    good = json.dumps(ROWS["prompt_completion"]).encode()
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b'\xe9"}\n'
                                       + b'{"prompt": "q \\ud800", "completion": "a"}\n' + good + b"\n")
    bad = BadRows(skip=True)
    rows = list(iter_rows(tmp_path / "b.jsonl", bad))
    assert [r.origin.rsplit(":", 1)[1] for r in rows] == ["1", "4"]  # the BOM is not part of row 1
    assert bad.errors == [f"{tmp_path / 'b.jsonl'}:2: not UTF-8 text: byte 0xe9 at column {len(good) - 1}",
                          (f"{tmp_path / 'b.jsonl'}:3: field 'prompt': text that is not valid Unicode (a lone "
                          "surrogate code point)")]
    assert bad.counts == {"not UTF-8 text": 1, "text that is not valid Unicode": 1}
    (tmp_path / "c.csv").write_text('prompt,completion\n"two\nlines",a\nq,a,extra\n\nq\nq,"a"\n')
    bad = BadRows(skip=True)
    rows = list(iter_rows(tmp_path / "c.csv", bad))
    assert [(r.origin.rsplit(":", 1)[1], r.data) for r in rows] == [
        ("2", {"prompt": "two\nlines", "completion": "a"}), ("7", {"prompt": "q", "completion": "a"})]
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in bad.errors] == ["4", "6"]
    assert "wrong number of cells: 3 where the header has 2 (prompt, completion)" in bad.errors[0]
    assert bad.counts == {"wrong number of cells": 2}  # (one kind of problem, whatever the counts)
    (tmp_path / "latin1.csv").write_bytes("prompt,completion\ncaf\u00e9,a\n".encode("latin-1"))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "fake.parquet").write_text("not parquet")
    (tmp_path / "l.json").write_bytes(b'[{"prompt": "caf\xe9"}]')
    for name, msg in (("latin1.csv", r"latin1.csv:2: not UTF-8 text: byte 0xe9"),
                      ("empty.csv", r"empty.csv: empty CSV file"),
                      ("fake.parquet", r"fake.parquet: not a readable Parquet file"),
                      ("l.json", r"l.json:1: not UTF-8 text")):
        with pytest.raises(BadRowError, match=msg):
            list(iter_rows(tmp_path / name, BadRows(skip=True)))


def test_csv_long_cells_json_looking_text_and_repeated_columns(tmp_path):
    """A cell past Python's default CSV field limit (131,072 characters) is read, with the row
    after it; JSON-looking text stays text where the column is not structured (a JSON-output
    completion); a column named twice is an error at the header; a JSON array in a .jsonl
    file, JSON lines in a .json file and UTF-16 text say what the file is."""
    import csv as csv_module

    long = "word " * 40_000
    with open(tmp_path / "long.csv", "w", newline="") as fh:
        w = csv_module.writer(fh)
        w.writerows([["prompt", "completion"], ["p1", "c1"], [long + "\nmore", "c2"], ["p3", "c3"]])
    bad = BadRows()
    rows = list(iter_rows(tmp_path / "long.csv", bad))
    assert [r.data["completion"] for r in rows] == ["c1", "c2", "c3"] and bad.total == 0
    assert len(rows[1].data["prompt"]) == len(long) + 5
    msgs = json.dumps([{"role": "user", "content": "q"}])
    with open(tmp_path / "js.csv", "w", newline="") as fh:
        csv_module.writer(fh).writerows([["prompt", "completion"], ['{"name": "x"}', "[1, 2, 3]"], [msgs, "a"]])
    rows = list(iter_rows(tmp_path / "js.csv", BadRows()))
    assert rows[0].data == {"prompt": '{"name": "x"}', "completion": "[1, 2, 3]"}
    assert rows[1].data["prompt"] == [{"role": "user", "content": "q"}]  # a prompt given as turns
    (tmp_path / "dup.csv").write_text("prompt,completion,completion\nq,a,b\n")
    (tmp_path / "array.jsonl").write_text(json.dumps([ROWS["prompt_completion"]]) + "\n")
    (tmp_path / "lines.json").write_text(json.dumps(ROWS["prompt_completion"]) + "\n" +
                                         json.dumps(ROWS["prompt_completion"]) + "\n")
    (tmp_path / "u16.jsonl").write_bytes(json.dumps(ROWS["prompt_completion"]).encode("utf-16"))
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    for name, msg in (("dup.csv", r"dup.csv:1: field 'completion': column 'completion' appears 2 times"),
                      ("array.jsonl", r"array.jsonl:1: not a JSON object: got list \(the file holds one JSON array"),
                      ("lines.json", r"lines.json:2: invalid JSON: Extra data \(one JSON object per line\?"),
                      ("u16.jsonl", r"u16.jsonl: UTF-16 text"),
                      ("deep.jsonl", r"deep.jsonl:1: invalid JSON: nested too deeply")):
        with pytest.raises(BadRowError, match=msg):
            list(iter_rows(tmp_path / name, BadRows()))


def test_missing_and_empty_fields(tmp_path):
    with pytest.raises(BadRowError, match="field 'completion': missing field"):
        to_sft_record(Row({"prompt": "q", "completion": None}, "x:1"), "prompt_completion")
    with pytest.raises(BadRowError, match="field 'output': empty"):
        to_sft_record(Row({"instruction": "q", "output": ""}, "x:1"), "alpaca")
    with pytest.raises(BadRowError, match="unrecognised row format"):
        detect_sft_format({"question": "q"}, "x:1")
    for fmt in ("alpaca", None):  # SFT and prompt rows: the same check of the optional input
        row = Row({"instruction": "q", "input": 5, "output": "a"}, "x:1")
        with pytest.raises(BadRowError, match="field 'input': wrong type: expected a string, got int"):
            to_sft_record(row, fmt) if fmt else to_prompt_record(row)


def test_a_file_with_no_usable_row_says_why(tmp_path, smol_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": ""}] * 3)
    cfg = load_config(DataConfig, None, ["skip_bad_rows=true"])
    cfg.train = [DataSource(str(tmp_path / "a.jsonl"))]
    with pytest.raises(ConfigError, match=r"no usable rows \(skipped 3 bad rows \(3 empty\); the first: .*a.jsonl:1: "
                                          r"field 'completion': empty\)"):
        load_sft_data(smol_tokenizer, cfg)


def test_prompt_records():
    rec = to_prompt_record(Row({"prompt": "q", "answer": "4"}, "x"))
    assert rec.messages == [{"role": "user", "content": "q"}] and rec.fields == {"answer": "4"}
    rec = to_prompt_record(Row(ROWS["messages"], "x"))
    assert rec.messages[-1]["role"] == "user" and rec.fields["reference"] == "Hello!"
    sys_only = {"messages": [{"role": "system", "content": "be nice"}]}
    two = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                        {"role": "assistant", "content": "a2"}]}
    parts = {"prompt": [{"type": "text", "text": "q"}]}
    for data, msg in ((sys_only, "no user turn"), (two, "ends with an assistant turn"),
                      (parts, r"field 'prompt\[0\]': a content part \({'type': 'text'")):
        with pytest.raises(BadRowError, match=msg):
            to_prompt_record(Row(data, "x"))


def test_mixture_weights():
    a, b = list(range(100)), list(range(1000, 1010))
    out = mix([a, b], [3.0, 1.0], seed=0, total=80)
    assert len(out) == 80
    assert sum(x >= 1000 for x in out) == 20  # b is repeated to reach its share
    assert mix([a, b], [3.0, 1.0], seed=0, total=80) == out  # seeded


def test_mixture_composition_is_reported_and_a_vanishing_source_warned(tmp_path, capsys):
    """Each source's rows and share are logged; a source whose weight rounds to no example is
    warned about; an eval split too small to make says so; an empty given eval set is an error."""
    from posttrain.data.dataset import split_records

    a, b = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(5)]
    cfg = DataConfig(train=[DataSource(path="x/srcA.jsonl"), DataSource(path="srcB.jsonl", weight=0.004)],
                     eval_fraction=0.0)
    records, _ = split_records([a, b], cfg, 0, read_eval=None)
    err = capsys.readouterr().err
    assert "data mixture: srcA.jsonl 100 rows -> 105 (repeated), srcB.jsonl 5 rows -> 0 (sampled)" in err
    assert "srcB.jsonl gives the mixture no example at weight 0.004" in err and len(records) == 105
    cfg = DataConfig(train=[DataSource(path="a.jsonl")], eval_fraction=0.5)
    split_records([a[:19]], cfg, 0, read_eval=None)
    assert "eval_fraction 0.5 not applied: 19 rows are too few" in capsys.readouterr().err
    cfg = DataConfig(train=[DataSource(path="a.jsonl")], eval=[DataSource(path="e.jsonl")])
    with pytest.raises(ConfigError, match="data.eval: no usable rows in e.jsonl"):
        split_records([a], cfg, 0, read_eval=lambda s: [])


def test_load_sft_data_mixture_and_skip(tmp_path, smol_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [ROWS["messages"]] * 30 + ["not json"])
    write_jsonl(tmp_path / "b.jsonl", [ROWS["text"]] * 10)
    cfg = load_config(DataConfig, None, ["skip_bad_rows=true", "eval_fraction=0.1", "mixture_size=40"])
    cfg.train = [DataSource(str(tmp_path / "a.jsonl"), weight=1), DataSource(str(tmp_path / "b.jsonl"), weight=1)]
    data = load_sft_data(smol_tokenizer, cfg, seed=0)
    assert len(data.train) == 40 and len(data.eval) == 4  # 3 of a's 30 rows and 1 of b's 10 held out first
    assert data.bad.total == 1
    assert sum(ex.labels == ex.input_ids for ex in data.train) == 20  # b repeated to its half of the mixture
    assert sum(ex.labels == ex.input_ids for ex in data.eval) == 1


def test_rows_held_out_of_a_repeated_source_stay_out_of_training(tmp_path, smol_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": f"x{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": f"y{i}"} for i in range(100)])
    cfg = load_config(DataConfig, None, ["eval_fraction=0.1"])
    cfg.train = [DataSource(str(tmp_path / "a.jsonl"), weight=3), DataSource(str(tmp_path / "b.jsonl"), weight=1)]
    data = load_sft_data(smol_tokenizer, cfg, seed=0)
    train, held = ({tuple(ex.input_ids) for ex in part} for part in (data.train, data.eval))
    assert len(held) == 11 and not train & held


def test_length_grouped_batches_cover_everything_once():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47, 100, 1]
    batches = length_grouped_batches(lengths, 2, seed=3, mega=2)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == length_grouped_batches(lengths, 2, seed=3, mega=2)
    assert batches != length_grouped_batches(lengths, 2, seed=4, mega=2)


def test_flatten_equals_pad_no_cross_contamination(smol_tokenizer, tiny_model_dir):
    """Packed sequences see only themselves: per-token log-probs equal the padded batch's."""
    from posttrain.logprobs import batch_logprobs
    from posttrain.models import load_model

    model = load_model(tiny_model_dir, "float32")
    msgs = [[{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": "answer " * (i + 1)}]
            for i in range(4)]
    exs = [tokenize_conversation(smol_tokenizer, m) for m in msgs]
    with torch.no_grad():
        padded = batch_logprobs(model, collate_pad(exs, smol_tokenizer.pad_token_id))
        flat = batch_logprobs(model, collate_flatten(exs))
        single = torch.cat([batch_logprobs(model, collate_pad([e], 0)) for e in exs])
    assert padded.shape == flat.shape == single.shape
    torch.testing.assert_close(flat, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)
