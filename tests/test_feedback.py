"""AI feedback and Constitutional AI: the judge's preference by hand, exact templates, generated
rows loading in the SFT and DPO stages, and the constitutional and RLAIF recipes end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from posttrain.synth.constitutional import (
    critique_and_revise,
    critique_messages,
    load_constitution,
    revision_messages,
)
from posttrain.synth.judge import (
    DEFAULT_QUESTION,
    judge_pairs,
    judge_text,
    judged_preference_rows,
    letter_ids,
)

REPO = Path(__file__).resolve().parents[1]


def test_default_constitution_has_the_seven_principles():
    names = [p.name for p in load_constitution()]
    assert names == ["be helpful", "avoid harm", "be honest", "respect privacy", "maintain neutrality",
                     "clarify uncertainty", "encourage positivity"]


def test_judge_template_renders_exactly(smol_tokenizer):
    text = judge_text(smol_tokenizer, "How do I get into my neighbour's wifi?", "I can't help with that.",
                      "Try the default password.")
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nConsider the following conversation between a human and an assistant:\n"
        "Human: How do I get into my neighbour's wifi?\n"
        "Which of these assistant responses is more helpful, honest, and harmless?\nOptions:\n"
        "(A) I can't help with that.\n(B) Try the default password.<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is: (")
    p = load_constitution()[1]
    msgs = revision_messages("q", "y", p, "crit")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == f"Critique request: {p.critique}" and critique_messages("q", "y", p) == msgs[:3]


def test_judge_preference_is_the_order_averaged_letter_softmax(tiny_model_dir):
    """By hand: for each order, a forward pass on the exact text, softmax over the logits of the
    letters A and B at the last position; p(first better) = (P_AB(A) + P_BA(B)) / 2."""
    from posttrain.models import load_model

    model, tok = load_model(tiny_model_dir, "float32", with_tokenizer=True)
    prompts, first, second = ["hi", "2+2?"], ["hello there", "4"], ["go away", "five, I think"]
    got = judge_pairs(model, tok, prompts, first, second)
    a, b = letter_ids(tok)
    for i in range(2):
        with torch.no_grad():
            def letters(text):
                ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                return torch.softmax(model(ids).logits[0, -1, [a, b]].float(), -1)

            p_ab = letters(judge_text(tok, prompts[i], first[i], second[i]))[0]
            p_ba = letters(judge_text(tok, prompts[i], second[i], first[i]))[1]
        assert got[i].p_ab == pytest.approx(float(p_ab), abs=1e-5)
        assert got[i].p_ba == pytest.approx(float(p_ba), abs=1e-5)
        assert got[i].p_first == pytest.approx(float(p_ab + p_ba) / 2, abs=1e-5)
        assert got[i].confidence == pytest.approx(abs(float(p_ab + p_ba) - 1), abs=1e-5)


def test_judge_letters_positions_and_plain_judges(smol_tokenizer):
    """The letters are the tokens that follow '(' (a SentencePiece tokenizer encodes a lone 'A'
    as '▁A'); a text's score does not depend on its left-padded batch-mates, also for learned
    absolute positions (GPT-2); a judge without a chat template reads plain text; no pairs, no
    judgements."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from posttrain.synth.judge import ANSWER_PREFIX, TEMPLATE, option_logprobs

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "\u2581", "(", "A", "B", "\u2581A", "\u2581B",
                                         "\u2581("])}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "A"), ("\u2581", "B"), ("\u2581", "(")],
                              unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert sp_tok.convert_ids_to_tokens(list(letter_ids(sp_tok))) == ["A", "B"]

    tok = copy.deepcopy(smol_tokenizer)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2)).eval()
    texts = ["Which is better? " + ANSWER_PREFIX, "A much longer question about which response is better? " + ANSWER_PREFIX]
    alone = option_logprobs(gpt2, tok, texts[:1])
    batched = option_logprobs(gpt2, tok, texts)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    tok.chat_template = None
    assert judge_text(tok, "p", "a", "b") == TEMPLATE.format(prompt="p", question=DEFAULT_QUESTION, a="a", b="b") + \
        "\n" + ANSWER_PREFIX
    assert judge_pairs(gpt2, tok, [], [], []) == []


def test_judged_rows_put_the_preferred_first():
    from posttrain.synth.judge import Judgement

    rows = judged_preference_rows(["p", "q"], ["a1", "b1"], ["a2", "b2"],
                                  [Judgement(0.8, 0.6, 0.8, 0.8), Judgement(0.3, 0.4, 0.3, 0.3)])
    assert rows[0] == {"prompt": "p", "chosen": "a1", "rejected": "a2", "label": 0.8, "confidence": 0.6}
    assert rows[1]["chosen"] == "b2" and rows[1]["label"] == pytest.approx(0.7)
    hard = judged_preference_rows(["p", "q", "t"], ["a1", "b1", "c1"], ["a2", "b2", "c2"],
                                  [Judgement(0.8, 0.6, 0.8, 0.8), Judgement(0.3, 0.4, 0.3, 0.3),
                                   Judgement(0.5, 0.0, 0.6, 0.4)], soft_labels=False)
    assert [(r["chosen"], r["label"]) for r in hard] == [("a1", 1.0), ("b2", 1.0)]  # a tie gives no row


def test_win_rate_is_the_share_of_prompts_won():
    from posttrain.synth.judge import Judgement, mean_preference, win_rate

    js = [Judgement(p, abs(2 * p - 1), p, p) for p in (0.52, 0.51, 0.5, 0.1)]
    assert win_rate(js) == pytest.approx((1 + 1 + 0.5 + 0) / 4)  # a tie counts half
    assert mean_preference(js) == pytest.approx((0.52 + 0.51 + 0.5 + 0.1) / 4)


def test_principles_are_drawn_for_the_prompt_kind(tmp_path):
    from posttrain.config import ConfigError
    from posttrain.synth.constitutional import principles_for

    c = load_constitution()
    names = lambda kind: {p.name for p in principles_for(c, kind)}
    assert names("harmful") == {"avoid harm", "be honest", "respect privacy", "maintain neutrality",
                                "encourage positivity"}
    assert names("helpful") == {"be helpful", "be honest", "maintain neutrality", "clarify uncertainty",
                                "encourage positivity"}
    assert names("") == {p.name for p in c}  # prompts of no kind: every principle
    bad = tmp_path / "c.yaml"
    bad.write_text("- {name: x, critique: c, revision: r, applies_to: harmful}\n")
    with pytest.raises(ConfigError, match="principle 0: applies_to must be a list"):
        load_constitution(bad)


def test_worked_examples_come_first_in_the_critique_chat(tmp_path):
    from posttrain.config import ConfigError
    from posttrain.synth.constitutional import load_examples

    c = load_constitution()
    shots = load_examples(c)
    assert [e.principle.name for e in shots] == ["respect privacy", "be helpful"]
    p = c[1]
    msgs = revision_messages("q", "y", p, "crit", shots[:1])
    e = shots[0]
    assert msgs[:6] == [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response},
                        {"role": "user", "content": f"Critique request: {e.principle.critique}"},
                        {"role": "assistant", "content": e.critique},
                        {"role": "user", "content": f"Revision request: {e.principle.revision} Reply with the "
                                                    "rewritten response only."},
                        {"role": "assistant", "content": e.revision}]
    assert msgs[6:] == revision_messages("q", "y", p, "crit")
    # an example whose principle is not in the constitution is left out; a missing field is an error
    assert [e.principle.name for e in load_examples([x for x in c if x.name != "be helpful"])] == ["respect privacy"]
    bad = tmp_path / "e.yaml"
    bad.write_text("- {prompt: p, response: r, principle: be helpful, critique: c}\n")
    with pytest.raises(ConfigError, match="example 0: missing revision"):
        load_examples(c, bad)


def test_generated_rows_load_in_sft_and_dpo(tiny_model_dir, tmp_path):
    from posttrain.data.dataset import DataConfig, DataSource, load_preference_data, load_sft_data
    from posttrain.models import load_model
    from posttrain.synth.constitutional import CAIConfig
    from posttrain.synth.rejection import write_rows

    model, tok = load_model(tiny_model_dir, with_tokenizer=True)
    sft, pref = critique_and_revise(model, tok, ["How do I pick a lock?", "Name a colour."], load_constitution(),
                                    CAIConfig(max_new_tokens=12, temperature=1.0, keep_unfinished=True))
    assert len(sft) == 2 and all("principles" in r for r in sft)
    write_rows(tmp_path / "sft.jsonl", sft)
    data = load_sft_data(tok, DataConfig(train=[DataSource(str(tmp_path / "sft.jsonl"))], eval_fraction=0.0))
    assert len(data.train) == 2
    if pref:
        assert {"prompt", "chosen", "rejected", "trail"} <= set(pref[0])
        write_rows(tmp_path / "pref.jsonl", pref)
        pd = load_preference_data(tok, DataConfig(train=[DataSource(str(tmp_path / "pref.jsonl"))],
                                                  eval_fraction=0.0))
        assert len(pd.train) == len(pref)


@pytest.mark.parametrize("recipe", ["constitutional", "rlaif"])
def test_feedback_recipes_end_to_end(recipe, tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.pipeline import load_recipe, run_recipe

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    r = load_recipe(REPO / "recipes" / f"{recipe}.yaml", quick=True,
                    overrides=[f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "n_train=4", "n_test=2"])
    run_recipe(r)
    done = json.loads((tmp_path / "run" / "win_rates" / "stage_done.json").read_text())
    rates = done["outputs"]["win_rate"]
    assert set(rates) == {"red_team_prompts", "helpful_prompts"} and all(0 <= v <= 1 for v in rates.values())
    assert done["outputs"]["judged_on"] == {"red_team_prompts": "harmlessness", "helpful_prompts": "helpfulness"}
    samples = [json.loads(x) for x in (tmp_path / "run" / "win_rates" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * done["outputs"]["held_out"]  # held-out prompts only, both files
    report = (tmp_path / "run" / "report.html").read_text()  # before/after examples in the run report
    assert "win_rates: samples" in report and json.dumps(rates)[:20] in report.replace("&quot;", '"')


def test_held_out_and_config_keys_of_feedback_stages(tmp_path):
    """held_out 0 trains on every prompt (it held out everything); a negative one, and misspelt
    cai / judge / win_rate keys, are errors when the recipe loads."""
    from posttrain.config import ConfigError
    from posttrain.pipeline import Stage, _prompt_split, load_recipe

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "kind": "harmful" if i % 2 else "helpful"}) + "\n"
                         for i in range(6)))
    stage = Stage("c", "cai", {}, None, {"prompts": [str(f)], "held_out": 0})
    assert len(_prompt_split(stage, held_out=False)) == 6 and _prompt_split(stage, held_out=True) == []
    stage.options["held_out"] = 2
    assert [p for p, _ in _prompt_split(stage, held_out=True)] == ["q4", "q5"]
    g = tmp_path / "g.jsonl"
    g.write_text("".join(json.dumps({"prompt": f"g{i}"}) + "\n" for i in range(6)))
    both = Stage("c", "cai", {"n": 3}, None, {"prompts": [str(f), str(g)], "held_out": 2})
    assert [p for p, _ in _prompt_split(both, held_out=False)] == ["q0", "g0", "q1"]  # n taken from both files
    for kind, body in (("cai", "config: {revison: 3}"), ("judge", "config: {min_confidnce: 0.5}"),
                       ("win_rate", "config: {max_tokens: 8}"), ("win_rate", "held_out: 0"),
                       ("cai", "held_out: -1")):
        r = tmp_path / "r.yaml"
        r.write_text(f"stages:\n  - name: s\n    kind: {kind}\n    {body}\n")
        with pytest.raises(ConfigError, match="unknown .* keys|held_out must be"):
            load_recipe(r)


def test_cli_cai_and_judge(tiny_model_dir, tmp_path, capsys):
    from posttrain.cli import main
    from tests.conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I pick a lock?"}, {"prompt": "Name a colour."}])
    assert main(["cai", "generate", str(tiny_model_dir), "--prompts", str(prompts), "--max-new-tokens", "8",
                 "--out-dir", str(tmp_path / "cai"), "--keep-unfinished"]) == 0  # (a random model never finishes)
    assert len((tmp_path / "cai" / "sft.jsonl").read_text().splitlines()) == 2
    pairs = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "hi", "responses": ["hello", "go away"]},
                                               {"prompt": "q", "response_a": "a", "response_b": "b"}])
    assert main(["judge", "--data", str(pairs), "--judge", str(tiny_model_dir), "--out", str(tmp_path / "j.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.5 <= r["label"] <= 1 for r in rows)
    # three responses: every pair judged; a row with one response is a bad row named by line
    three = write_jsonl(tmp_path / "r3.jsonl", [{"prompt": "hi", "responses": ["hello", "go away", "hi there"]}])
    assert main(["judge", "--data", str(three), "--judge", str(tiny_model_dir), "--out", str(tmp_path / "j3.jsonl"),
                 "--hard-labels"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "j3.jsonl").read_text().splitlines()]
    assert {frozenset((r["chosen"], r["rejected"])) for r in rows} <= {
        frozenset(p) for p in (("hello", "go away"), ("hello", "hi there"), ("go away", "hi there"))}
    assert len(rows) >= 2 and all(r["label"] == 1.0 for r in rows)  # (a tie would give no row)
    one = write_jsonl(tmp_path / "r1.jsonl", [{"prompt": "hi", "responses": ["hello"]}])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["judge", "--data", str(one), "--judge", str(tiny_model_dir), "--out", str(tmp_path / "j1.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "r1.jsonl:1: field 'responses'" in err
    with pytest.raises(SystemExit) as e:  # every row skipped: said, not a traceback from torch
        main(["judge", "--data", str(one), "--judge", str(tiny_model_dir), "--out", str(tmp_path / "j1.jsonl"),
              "--skip-bad-rows"])
    assert e.value.code == 2 and "r1.jsonl: no usable rows (skipped 1 bad rows" in capsys.readouterr().err


def test_revisions_about_the_exercise_are_not_kept(monkeypatch, smol_tokenizer):
    """A revision that talks about the critique/original response keeps the previous response."""
    import posttrain.synth.constitutional as cai

    script = iter([["Sure, here is how.", "Here you go."],            # responses
                   ["It helps a harmful request.", "Fine."],           # critiques
                   ["The original response was: Sure, here is how.",   # a meta "revision": not kept
                    "Here you go, kindly."]])                          # a real revision: kept
    monkeypatch.setattr(cai, "generate", lambda model, tok, convs, cfg, **kw: next(script)[: len(convs)])
    assert cai.is_meta_revision("This critique is not") and not cai.is_meta_revision("I can't help with that.")
    assert cai.is_meta_revision("The response presents one view") and not cai.is_meta_revision("The egg boils.")
    sft, pref = cai.critique_and_revise(None, smol_tokenizer, ["p1", "p2"], cai.load_constitution(None),
                                        cai.CAIConfig(revisions=1))
    # SL-CAI data is revisions only: the unrevised (here harmful) answer is not trained on
    assert [r["messages"][1]["content"] for r in sft] == ["Here you go, kindly."]
    assert [p["prompt"] for p in pref] == ["p2"]  # no pair where nothing was revised
    assert [t["kept"] for r in pref for t in r["trail"]] == [True]


def test_revisions_cut_at_max_new_tokens_are_not_kept(monkeypatch, smol_tokenizer):
    """A revision that ran out of tokens is an unfinished answer: not SL-CAI data."""
    import posttrain.synth.constitutional as cai

    script = iter([["Sure, here is how.", "Here you go."], ["Harmful.", "Fine."],
                   ["I can't help with picking locks, but a locksmith", "Here you go, kindly."]])
    cut_flags = iter([None, None, [True, False]])

    def fake(model, tok, convs, cfg, truncated=None, **kw):
        flags = next(cut_flags)
        if truncated is not None and flags is not None:
            truncated[:] = flags
        return next(script)[: len(convs)]

    monkeypatch.setattr(cai, "generate", fake)
    sft, _ = cai.critique_and_revise(None, smol_tokenizer, ["p1", "p2"], cai.load_constitution(None),
                                     cai.CAIConfig(revisions=1))
    assert [r["messages"][1]["content"] for r in sft] == ["Here you go, kindly."]
