"""Preference data formats, preference losses by hand, TRL cross-checks, and RM / PRM / DPO smoke runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.data.loading import BadRowError, BadRows, Row
from posttrain.data.preference import (
    detect_preference_format,
    read_preference_records,
    to_preference_records,
    tokenize_pair,
)
from posttrain.data.tokenize import TokenizeStats
from posttrain.losses import bradley_terry_loss, dpo_loss, step_bce_loss
from tests.conftest import write_jsonl
from tests.test_data import trained_text

U = "user"
A = "assistant"


def msg(role, content):
    return {"role": role, "content": content}


# --------------------------------------------------------------------------- formats


def test_pair_strings_and_full_conversation_form():
    (r,) = to_preference_records(Row({"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5}, "f:1"), "pair")
    assert r.prompt == [msg(U, "2+2?")] and r.chosen == [msg(A, "4")] and r.rejected == [msg(A, "5")]
    assert r.margin == 1.5 and r.weight == 1.0 and r.label == 1.0
    # chosen/rejected repeat the whole conversation and no prompt is given: the shared prefix is the prompt
    conv = [msg(U, "hi"), msg(A, "hello"), msg(U, "2+2?")]
    row = Row({"chosen": conv + [msg(A, "4")], "rejected": conv + [msg(A, "5")]}, "f:2")
    (r,) = to_preference_records(row, "pair")
    assert r.prompt == conv and r.chosen == [msg(A, "4")] and r.rejected == [msg(A, "5")]
    # explicit prompt repeated inside chosen/rejected is cut off
    row = Row({"prompt": conv, "chosen": conv + [msg(A, "4")], "rejected": conv + [msg(A, "5")]}, "f:3")
    (r,) = to_preference_records(row, "pair")
    assert r.prompt == conv and r.chosen == [msg(A, "4")]


def test_hh_transcripts_split_shared_prefix():
    row = {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast.\n\nHuman: Then?"
                     "\n\nAssistant: Knead and bake.",
           "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast.\n\nHuman: Then?"
                       "\n\nAssistant: Buy some."}
    assert detect_preference_format(row) == "hh"
    (r,) = to_preference_records(Row(row, "hh:1"), "hh")
    assert r.prompt == [msg(U, "How do I bake bread?"), msg(A, "Mix flour, water, yeast."), msg(U, "Then?")]
    assert r.chosen == [msg(A, "Knead and bake.")] and r.rejected == [msg(A, "Buy some.")]


def test_ranked_rows_expand_to_weighted_pairs():
    row = Row({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}, "r:1")
    assert detect_preference_format(row.data) == "ranked"
    pairs = to_preference_records(row, "ranked")
    got = {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs}
    assert got == {("c", "a"), ("c", "b"), ("a", "b")}
    assert all(math.isclose(p.weight, 1 / 3) for p in pairs)  # the prompt counts once in total
    pairs = to_preference_records(Row({"prompt": "q", "responses": ["a", "b", "c", "d"],
                                       "scores": [0.1, 0.9, 0.5, 0.5]}, "r:2"), "ranked")
    got = {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs}
    assert got == {("b", "a"), ("c", "a"), ("d", "a"), ("b", "c"), ("b", "d")}  # the c/d tie gives no pair
    assert all(math.isclose(p.weight, 1 / 5) for p in pairs)
    pairs = to_preference_records(Row({"prompt": "q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}, "r:3"),
                                  "ranked")  # the a/a pair is no preference: the prompt still counts once
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("a", "b"), ("b", "a")]
    assert all(math.isclose(p.weight, 1 / 2) for p in pairs)


@pytest.mark.parametrize("row,field,reason", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical to chosen"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "wrong type"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": 2}, "label", "out of range"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking", "permutation"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin", "not a finite number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": float("nan")}, "label", "not a finite number"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [float("inf"), 0]}, "scores", "finite numbers"),
    ({"prompt": "q", "responses": ["a", "a"], "ranking": [1, 0]}, "responses", "same response twice"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1.0]}, "ranking", "permutation"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, "1"]}, "ranking", "permutation"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [None, 0]}, "ranking", "permutation"),
])
def test_bad_preference_rows_name_file_line_field(tmp_path, row, field, reason):
    fmt = "ranked" if "responses" in row else "auto"
    good = {"prompt": "q", "responses": ["a", "b"], "scores": [1, 0]} if fmt == "ranked" else \
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    f = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(BadRowError) as e:
        read_preference_records(str(f), fmt, BadRows())
    assert "p.jsonl:2: field '" + field + "'" in str(e.value) and reason in str(e.value)
    bad = BadRows(skip=True)
    assert len(read_preference_records(str(f), fmt, bad)) == 1 and bad.total == 1


def test_pair_tokens_train_on_completion_only(smol_tokenizer):
    rec = to_preference_records(Row({"prompt": [msg(U, "hi"), msg(A, "hello"), msg(U, "2+2?")],
                                     "chosen": "4", "rejected": "five"}, "x"), "pair")[0]
    pair = tokenize_pair(smol_tokenizer, rec, 512, "error", TokenizeStats())
    assert trained_text(smol_tokenizer, pair.chosen) == ["4<|im_end|>"]  # not the 'hello' inside the prompt
    assert trained_text(smol_tokenizer, pair.rejected) == ["five<|im_end|>"]
    # a shared left cut keeps both prompts identical
    stats = TokenizeStats()
    n = max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
    cut = tokenize_pair(smol_tokenizer, rec, n - 3, "truncate_prompt", stats)
    assert stats.truncated == 1 and cut.chosen.input_ids[:5] == cut.rejected.input_ids[:5]
    assert tokenize_pair(smol_tokenizer, rec, n - 3, "drop", stats) is None and stats.dropped_too_long == 1


# --------------------------------------------------------------------------- losses by hand


def test_bradley_terry_by_hand():
    """r_c - r_r = [2, 0] -> -log σ(2) = log(1 + e^-2) = 0.126928, -log σ(0) = log 2 = 0.693147.

    Mean 0.410038. Margin 1 on both: log(1 + e^-1) = 0.313262 and log(1 + e^1) = 1.313262,
    mean 0.813262. Weights (3, 1): (3 * 0.126928 + 0.693147) / 4 = 0.268483.
    Centering 0.1 with r_c + r_r = [2, 0]: + 0.1 * (4 + 0) / 2 = 0.2.
    """
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 0.5])
    assert math.isclose(float(bradley_terry_loss(rc, rr)), 0.410038, abs_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(rc, rr, margin=torch.ones(2))), 0.813262, abs_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(rc, rr, weight=torch.tensor([3.0, 1.0]))), 0.268483, abs_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(rc, rr, center_coef=0.1)), 0.410038 + 0.1 * (4 + 1) / 2,
                        abs_tol=1e-6)
    # soft label q = 0.5 on a gap of 0: -(0.5 log σ(0) + 0.5 log σ(0)) = log 2
    assert math.isclose(float(bradley_terry_loss(torch.zeros(1), torch.zeros(1), label=0.5)), math.log(2),
                        abs_tol=1e-6)
    # margin 1 with q = 0.5: either side must win by the margin, so a tie is the minimum:
    # 0.5 log(1 + e^(1 - d)) + 0.5 log(1 + e^(1 + d)) at d = 0 is log(1 + e) = 1.313262, and at
    # d = +1: 0.5 log 2 + 0.5 log(1 + e^2) = 0.5 * 0.693147 + 0.5 * 2.126928 = 1.410038
    m = torch.ones(1)
    assert math.isclose(float(bradley_terry_loss(torch.zeros(1), torch.zeros(1), margin=m, label=0.5)), 1.313262,
                        abs_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(torch.ones(1), torch.zeros(1), margin=m, label=0.5)), 1.410038,
                        abs_tol=1e-6)
    # q = 0 (rejected is better) with chosen ahead by 0.5: -log σ(-0.5 - 1) = log(1 + e^1.5) = 1.701413
    assert math.isclose(float(bradley_terry_loss(torch.full((1,), 0.5), torch.zeros(1), margin=m, label=0.0)),
                        1.701413, abs_tol=1e-6)


def test_dpo_family_by_hand():
    """Policy log-probs c = -10, r = -12; reference c = -11, r = -11; β = 0.5.

    Log-ratios: chosen +1, rejected -1, Δ = 2, βΔ = 1.
    sigmoid: -log σ(1) = log(1 + e^-1) = 0.313262.
    cDPO ε = 0.1: 0.9 * 0.313262 + 0.1 * log(1 + e^1) = 0.281936 + 0.131326 = 0.413262.
    hinge: max(0, 1 - 1) = 0.
    ipo with lengths 2 and 4: Δ̄ = 1/2 - (-1/4) = 0.75; (0.75 - 1/(2*0.5))^2 = 0.0625.
    Implicit rewards: β * ratio = 0.5 and -0.5.
    """
    c, r, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    loss, rew_c, rew_r = dpo_loss(c, r, rc, rr, beta=0.5)
    assert math.isclose(float(loss), 0.313262, abs_tol=1e-6)
    assert float(rew_c) == 0.5 and float(rew_r) == -0.5
    assert math.isclose(float(dpo_loss(c, r, rc, rr, 0.5, label_smoothing=0.1)[0]), 0.413262, abs_tol=1e-6)
    assert float(dpo_loss(c, r, rc, rr, 0.5, "hinge")[0]) == 0.0
    ipo = dpo_loss(c, r, rc, rr, 0.5, "ipo", chosen_len=torch.tensor([2]), rejected_len=torch.tensor([4]))[0]
    assert math.isclose(float(ipo), 0.0625, abs_tol=1e-6)
    with pytest.raises(ValueError, match="ipo needs"):
        dpo_loss(c, r, rc, rr, 0.5, "ipo")


def test_step_bce_by_hand():
    """logits [0, 2], labels [1, 0]: (log 2 + log(1 + e^2)) / 2 = (0.693147 + 2.126928) / 2 = 1.410038."""
    assert math.isclose(float(step_bce_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))), 1.410038,
                        abs_tol=1e-6)


def test_sequence_logprobs_sum_token_logprobs(tiny_model_dir):
    from posttrain.data.tokenize import IGNORE
    from posttrain.logprobs import sequence_logprobs, token_logprobs
    from posttrain.models import load_model

    model = load_model(tiny_model_dir, "float32")
    ids = torch.tensor([[5, 17, 200, 31, 2, 0], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :2] = IGNORE
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        want = [token_logprobs(model, ids[i : i + 1, : int(mask[i].sum())], labels[i : i + 1, : int(mask[i].sum())])
                .sum() for i in range(2)]
    torch.testing.assert_close(sums, torch.stack(want), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [3, 4]


def _pair(ids_c, ids_r, prompt_len):
    from posttrain.data.preference import PreferencePair
    from posttrain.data.tokenize import IGNORE, TokenizedExample

    ex = lambda ids: TokenizedExample(ids, [IGNORE] * prompt_len + ids[prompt_len:], "x")
    return PreferencePair(ex(ids_c), ex(ids_r), 0.0, 1.0, 1.0, "x")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prefix_batch_equals_two_sequences(tiny_model_dir, lora):
    """A pair packed as prefix + chosen suffix + rejected suffix gives the log-prob sums, counts
    and gradients of the chosen and rejected sequences run on their own."""
    from posttrain.data.preference import collate_pairs
    from posttrain.data.tokenize import collate_shared_prefix, shared_prefix_length
    from posttrain.models import ModelConfig, prepare_model
    from posttrain.stages.dpo import pair_logprob_sums

    pairs = [
        _pair([5, 17, 200, 31, 2, 40, 41, 42, 2], [5, 17, 200, 31, 2, 40, 43, 44, 45, 46, 2], 4),  # shared start
        _pair([5, 17, 9, 300, 301, 2], [5, 17, 9, 500, 2], 3),  # only the prompt shared
        _pair([7, 8, 9, 10, 11], [7, 8, 9, 10, 11, 12, 13], 2),  # chosen is a prefix of rejected
        _pair([7, 8, 9, 60, 61], [7, 8, 9, 60, 61], 3),  # identical sides
    ]
    assert [shared_prefix_length([p.chosen, p.rejected]) for p in pairs] == [6, 3, 5, 5]
    packed = collate_shared_prefix([p.chosen for p in pairs] + [p.rejected for p in pairs], [0, 1, 2, 3] * 2, 0)
    assert packed["input_ids"].shape == (4, 14) and packed["n_tokens"] == 14 + 8 + 7 + 5
    assert packed["input_ids"][0].tolist() == [5, 17, 200, 31, 2, 40, 41, 42, 2, 43, 44, 45, 46, 2]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10]
    seen = packed["attention_mask"][0, 0]
    assert seen[9, :6].all() and not seen[9, 6:9].any() and seen[9, 9]  # rejected suffix: prefix + itself
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", lora=lora, lora_r=4, lora_dropout=0.0)
    results = []
    for share in (False, True):
        torch.manual_seed(0)
        model, _, _ = prepare_model(cfg)
        if lora:  # non-zero adapters, so the adapted path is exercised
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        sums, counts = pair_logprob_sums(model, collate_pairs(pairs, 0, share), "cpu")
        (sums * torch.arange(1.0, 9.0)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sums.detach(), counts, grads))
    (s0, c0, g0), (s1, c1, g1) = results
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    assert c1.tolist() == c0.tolist() == [5, 3, 3, 2, 7, 2, 5, 2]
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5 * float(g0[n].abs().max()), rtol=1e-4, msg=n)


# --------------------------------------------------------------------------- cross-checks against TRL


def test_dpo_loss_matches_trl(tiny_model_dir, smol_tokenizer, tmp_path):
    """TRL's DPOTrainer and ours on the same tiny policy, perturbed reference and batch."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from posttrain.logprobs import sequence_logprobs

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = Dataset.from_list([
        {"prompt": [msg(U, "What is 2+2?")], "chosen": [msg(A, "4")], "rejected": [msg(A, "5 probably")]},
        {"prompt": [msg(U, "Name a colour.")], "chosen": [msg(A, "Blue.")], "rejected": [msg(A, "No.")]},
    ])
    for loss_type, beta in (("sigmoid", 0.3), ("hinge", 0.3), ("ipo", 0.5)):
        args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, beta=beta,
                             report_to=[], bf16=False, use_cpu=True, loss_type=[loss_type])
        trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds,
                                 processing_class=smol_tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        with torch.no_grad():
            want = trainer.compute_loss(trainer.model, dict(batch))
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
            pol, counts = sequence_logprobs(policy, ours)
            rf, _ = sequence_logprobs(ref, ours)
            got, _, _ = dpo_loss(pol[:2], pol[2:], rf[:2], rf[2:], beta, loss_type,
                                 chosen_len=counts[:2], rejected_len=counts[2:])
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5, msg=loss_type)


def test_reward_loss_matches_trl(tiny_model_dir, tmp_path):
    """TRL's RewardTrainer.compute_loss and our read-out + Bradley–Terry loss on the same batch."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from posttrain.models import ModelConfig, prepare_scoring_model
    from posttrain.stages.reward import pair_rewards

    model, tok, _ = prepare_scoring_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), "sequence")
    ds = Dataset.from_list([
        {"prompt": [msg(U, "What is 2+2?")], "chosen": [msg(A, "4")], "rejected": [msg(A, "5 probably")],
         "margin": 0.5},
        {"prompt": [msg(U, "Name a colour.")], "chosen": [msg(A, "Blue.")], "rejected": [msg(A, "No.")],
         "margin": 0.0},
    ])
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[],
                            bf16=False, use_cpu=True, center_rewards_coefficient=0.01)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, dict(batch))
        r_c, r_r = pair_rewards(model, batch, "cpu")
        got = bradley_terry_loss(r_c, r_r, margin=batch["margin"], center_coef=0.01)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- stages on a tiny model


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}, I think"}
            for i in range(40)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def stage_cfg(cls, model_dir, data, out, *extra):
    return load_config(cls, None, [f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}",
                                   "batch_size=4", "max_steps=6", "tensorboard=false", "data.eval_fraction=0.1",
                                   *extra])


@pytest.mark.parametrize("extra", [[], ["model.lora=true", "model.lora_r=4", "lr=1e-2"],
                                   ["frozen_backbone=true", "lr=1e-2"],
                                   ["frozen_backbone=true", "head_hidden=8", "lr=1e-2"]],
                         ids=["full", "lora", "frozen-linear", "frozen-mlp"])
def test_reward_model_trains_and_scores(tiny_model_dir, pairs_file, tmp_path, extra):
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.reward_model import RewardModel
    from posttrain.stages.reward import RewardConfig, train

    res = train(stage_cfg(RewardConfig, tiny_model_dir, pairs_file, tmp_path / "rm", "lr=1e-3", *extra))
    assert res.eval["eval/accuracy"] >= 0.75 and res.eval["eval/margin"] > 0
    rm = RewardModel(res.model_dir)
    prompts = ["What is 3 + 3?", "What is 3 + 3?"]
    scores = rm.score(prompts, ["6", "7, I think"])
    assert scores[0] > scores[1]
    assert rm(prompts[:1], ["6"]) == pytest.approx(scores[:1], abs=1e-5)  # a reward function in the RL sense
    if "head_hidden=8" not in extra:  # a linear head: transformers alone gives the same score
        hf = AutoModelForSequenceClassification.from_pretrained(res.model_dir)
        with torch.no_grad():
            hf_score = hf(torch.tensor([rm.tokenize(prompts[0], "6")])).logits.item()
        assert math.isclose(hf_score, scores[0], abs_tol=1e-4)


def test_frozen_reward_model_resumed_logs_each_step_once(tiny_model_dir, pairs_file, tmp_path):
    """The frozen mode's head has no checkpoints: ``resume=true`` trains it again, and its
    metrics replace the earlier run's instead of following them."""
    from posttrain.stages.reward import RewardConfig, train

    out = tmp_path / "rm"
    args = ("frozen_backbone=true", "lr=1e-2", "log_every=1")
    train(stage_cfg(RewardConfig, tiny_model_dir, pairs_file, out, *args))
    train(stage_cfg(RewardConfig, tiny_model_dir, pairs_file, out, *args, "resume=true"))
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in recs if "loss/train" in r]
    assert train_steps == list(range(1, 7))


def test_prm_trains_and_scores_steps(tiny_model_dir, tmp_path):
    from transformers import AutoModelForTokenClassification

    from posttrain.rewards.process import ProcessRewardModel
    from posttrain.stages.prm import PRMConfig, first_wrong, steps_right, train

    rows = []
    for i in range(40):
        ok = i % 2 == 0
        rows.append({"prompt": f"What is {i} * 2 + 1?",
                     "steps": [f"{i} * 2 = {2 * i}", f"{2 * i} + 1 = {2 * i + 1 if ok else 2 * i + 5}"],
                     "labels": [1, 1 if ok else 0]})
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    res = train(stage_cfg(PRMConfig, tiny_model_dir, data, tmp_path / "prm", "lr=1e-3", "max_steps=10"))
    assert 0 <= res.eval["eval/step_accuracy"] <= 1 and "eval/solution_accuracy" in res.eval
    prm = ProcessRewardModel(res.model_dir)
    scores = prm.score_steps("What is 3 * 2 + 1?", ["3 * 2 = 6", "6 + 1 = 7"])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    prompts, solutions = ["What is 3 * 2 + 1?", "What is 2 + 2?", "q"], [["3 * 2 = 6", "6 + 1 = 7"], ["2 + 2 = 4"], []]
    together = prm.score_many(prompts, solutions)
    prm.batch_size = 1  # one solution a pass: the same scores
    alone = prm.score_many(prompts, solutions)
    assert [len(x) for x in alone] == [2, 1, 0]
    assert [x for r in alone for x in r] == pytest.approx([x for r in together for x in r], abs=1e-5)
    assert AutoModelForTokenClassification.from_pretrained(res.model_dir).config.num_labels == 1
    assert first_wrong([0.9, 0.2, 0.8]) == 1 and first_wrong([1, 1]) == 2
    # one rule for a step's rightness: a soft label of 0.5 is right, for step and solution accuracy alike
    logits, labels = torch.tensor([0.3, -0.1]), torch.tensor([1.0, 0.5])
    assert steps_right(logits, labels) == 1 and first_wrong(labels.tolist()) == 2
    assert first_wrong(torch.sigmoid(logits).tolist()) == 1
    # steps are scored stripped, as they were trained
    assert prm.score_steps("What is 3 * 2 + 1?", ["3 * 2 = 6\n", " 6 + 1 = 7"]) == pytest.approx(scores)
    with pytest.raises(ValueError, match="solution 0: step 1 is empty"):  # (was scored off the separator)
        prm.score_steps("What is 3 * 2 + 1?", ["3 * 2 = 6", "  ", "6 + 1 = 7"])


def test_prm_bad_rows(tmp_path):
    from posttrain.data.steps import read_step_records

    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "steps": ["a", "b"], "labels": [1]}])
    with pytest.raises(BadRowError, match=r"s.jsonl:1: field 'labels': expected 2 labels"):
        read_step_records(str(f), BadRows())


@pytest.mark.parametrize("extra", [[], ["model.lora=true", "model.lora_r=4"]], ids=["full", "lora"])
def test_dpo_learns_and_caches_reference(tiny_model_dir, pairs_file, tmp_path, monkeypatch, extra):
    from posttrain.stages import dpo

    calls = {"n": 0}
    real = dpo.pair_logprobs

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dpo, "pair_logprobs", counting)
    cfg = stage_cfg(dpo.DPOConfig, tiny_model_dir, pairs_file, tmp_path / "dpo", "lr=1e-3", "max_steps=8", *extra)
    res = dpo.train(cfg)
    assert calls["n"] == 2  # train and eval pairs, once each
    metrics = [m for m in __import__("posttrain").engine.read_metrics(res.run_dir) if "loss/train" in m]
    assert metrics[-1]["loss/train"] < metrics[0]["loss/train"] and res.eval["eval/reward_accuracy"] >= 0.75
    assert metrics[0]["loss/train"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    dpo.train(stage_cfg(dpo.DPOConfig, tiny_model_dir, pairs_file, tmp_path / "dpo2", "beta=0.5", *extra))
    assert calls["n"] == 2  # a second run on the same model and data reuses the cached reference
    if extra:  # starting from a trained adapter: it is part of the reference (not the bare base)
        start = dpo.train(stage_cfg(dpo.DPOConfig, tiny_model_dir, pairs_file, tmp_path / "dpo3", "lr=1e-2",
                                    "max_steps=2", *extra, "model.lora_dropout=0"))  # (with dropout train != eval)
        again = dpo.train(stage_cfg(dpo.DPOConfig, start.model_dir, pairs_file, tmp_path / "dpo4", "lr=0",
                                    "max_steps=1", *extra))
        first = next(m for m in __import__("posttrain").engine.read_metrics(again.run_dir) if "loss/train" in m)
        assert first["loss/train"] == pytest.approx(math.log(2), abs=1e-4)


def test_dpo_resume_reaches_same_weights(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from posttrain import engine
    from posttrain.stages import dpo
    from tests.test_sft import _interrupt_after

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    args = ("lr=1e-3", "save_every=2")
    ref = dpo.train(stage_cfg(dpo.DPOConfig, tiny_model_dir, pairs_file, tmp_path / "ref", *args))
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            dpo.train(stage_cfg(dpo.DPOConfig, tiny_model_dir, pairs_file, tmp_path / "cut", *args))
    res = dpo.train(stage_cfg(dpo.DPOConfig, tiny_model_dir, pairs_file, tmp_path / "cut", *args, "resume=true"))
    a, b = load_file(str(ref.model_dir / "model.safetensors")), load_file(str(res.model_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [m.get("loss/train") for m in engine.read_metrics(tmp_path / "ref")] == \
        [m.get("loss/train") for m in engine.read_metrics(tmp_path / "cut")]


def test_a_ranked_row_too_long_counts_once(tmp_path, smol_tokenizer):
    """Its three pairs are one row: one bad row (skipped) or one drop, not three."""
    from posttrain.data.dataset import DataConfig, DataSource, load_preference_data

    rows = [{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}] * 4 + [
        {"prompt": "q", "responses": ["long " * 40, "x " * 40, "y " * 40], "ranking": [0, 1, 2]}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    for too_long, skip in (("error", True), ("drop", False)):
        cfg = DataConfig(train=[DataSource(path=str(f))], max_length=60, too_long=too_long, skip_bad_rows=skip,
                         eval_fraction=0.0)
        data = load_preference_data(smol_tokenizer, cfg)
        assert len(data.train) == 4
        assert (data.bad.total, data.stats.dropped_too_long) == ((1, 0) if too_long == "error" else (0, 1))


def test_prm_truncation_keeps_the_same_prompt_floor_as_sft(smol_tokenizer):
    from posttrain.data.steps import StepRecord, tokenize_step_record, tokenize_steps
    from posttrain.data.tokenize import MIN_PROMPT_TOKENS

    rec = StepRecord("s:1", "a long question " * 10, ["12 * 3 = 36", "36 + 4 = 40"], [1.0, 1.0])
    ids, pos = tokenize_steps(smol_tokenizer, rec.prompt, rec.steps, "\n")
    steps_len = len(ids) - (pos[0] - len(smol_tokenizer("12 * 3 = 36\n", add_special_tokens=False)["input_ids"]) + 1)
    stats = TokenizeStats()
    assert tokenize_step_record(smol_tokenizer, rec, "\n", steps_len + MIN_PROMPT_TOKENS - 1, "truncate_prompt",
                                stats) is None
    kept = tokenize_step_record(smol_tokenizer, rec, "\n", steps_len + MIN_PROMPT_TOKENS, "truncate_prompt", stats)
    assert kept is not None and len(kept.input_ids) == steps_len + MIN_PROMPT_TOKENS
    assert (stats.dropped_too_long, stats.truncated) == (1, 1)


def test_reward_model_from_elsewhere_reads_as_transformers_and_adapters_are_refused(smol_tokenizer, tmp_path):
    """An RM with no posttrain metadata whose pad token is its EOS (TRL's usual setup) scores as
    transformers' forward does (at the last non-pad token), in a batch of unequal rows; a LoRA
    adapter directory is refused with a pointer to the whole model."""
    import copy

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.config import ConfigError
    from posttrain.rewards.reward_model import RewardModel

    tok = copy.deepcopy(smol_tokenizer)  # a template that ends the conversation on its EOS (as Llama-3's)
    tok.chat_template = tok.chat_template.replace("'<|im_end|>' + '\n'}}", "'<|im_end|>'}}")
    assert tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False).endswith("<|im_end|>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_labels=1, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "ext")
    tok.save_pretrained(tmp_path / "ext")
    rm = RewardModel(tmp_path / "ext")
    prompts, completions = ["What is 3 + 3?"] * 2, ["6", "It is six, as 3 + 3 = 6."]
    got = rm.score(prompts, completions)
    with torch.no_grad():
        want = [rm.model(torch.tensor([rm.tokenize(p, c)])).logits.item() for p, c in zip(prompts, completions)]
    assert rm.tokenize(prompts[0], completions[0])[-1] == tok.eos_token_id  # read before it, as transformers does
    assert got == pytest.approx(want, abs=1e-5)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a LoRA adapter; score with a whole reward model"):
        RewardModel(tmp_path / "adapter")


def test_reward_model_eval_accuracy_follows_soft_labels():
    """A pair whose label prefers the 'rejected' side (0.1) is right when that side scores
    higher; a tie (0.5) is left out of the accuracy."""
    from posttrain.stages.reward import RewardConfig, evaluate

    r_c, r_r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0])
    batch = {"margin": torch.zeros(3), "weight": torch.ones(3), "label": torch.tensor([0.9, 0.1, 0.5])}
    ev = evaluate(RewardConfig(), lambda idx: (r_c, r_r, batch), [None] * 3)
    assert ev["eval/accuracy"] == 1.0
