"""Recipe runner: the reasoning recipe end to end on a tiny model (quick mode), resume, errors;
rejection sampling filters on literal responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", ["reasoning", "r1_zero"])
def test_recipe_runs_end_to_end_and_resumes(recipe, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    r = load_recipe(REPO / "recipes" / f"{recipe}.yaml", quick=True,
                    overrides=[f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}"])
    summary = run_recipe(r)
    run = tmp_path / "run"
    for s in r.stages:
        assert (run / s.name / "stage_done.json").is_file(), s.name
    assert list(summary["evals"]) == [s.name for s in r.stages if s.kind == "eval"]
    assert (run / "accuracy.png").is_file() and (run / "summary.json").is_file()
    assert summary["final_model"] != str(tiny_model_dir)  # the trained model flows to the end
    done = {s.name: json.loads((run / s.name / "stage_done.json").read_text())["outputs"] for s in r.stages}
    if done.get("rejection_sampling", {}).get("rows_count") == 0:  # a random tiny model keeps nothing:
        assert done["sft_round2"]["skipped"] == "no training rows"  # round 2 has no rows and passes the model on
    from posttrain.report import write_report
    from posttrain.runs import find_runs

    page = write_report(run).read_text()
    assert "accuracy.png" in page and all(s.name in page for s in r.stages)
    rows = find_runs([tmp_path])
    assert [(x["kind"], x["state"], x["progress"]) for x in rows] == [("recipe", "finished",
                                                                      f"{len(r.stages)}/{len(r.stages)} stages")]
    # a second run finds every stage finished and redoes nothing ...
    again = run_recipe(r)
    assert again["ran"] == [] and again["final_model"] == summary["final_model"]
    assert again["stage_seconds"] == summary["stage_seconds"]  # the times of the run that made them
    # ... and a stage killed before it finished (no marker) is run again, alone
    (run / r.stages[-1].name / "stage_done.json").unlink()
    third = run_recipe(r)
    assert third["ran"] == [r.stages[-1].name] and list(third["stage_seconds"]) == [s.name for s in r.stages]


def test_recipe_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("stages:\n  - {name: a, kind: sft}\n  - {name: a, kind: eval}\n")
    with pytest.raises(ConfigError, match="two stages named 'a'"):
        load_recipe(bad)
    bad.write_text("stages:\n  - {name: a, kind: train}\n")
    with pytest.raises(ConfigError, match="unknown kind 'train'"):
        load_recipe(bad)
    bad.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        load_recipe(bad)
    # found before any stage runs: a data reference to no earlier stage, keys of no use, eval typos
    for body, msg in (("  - {name: a, kind: sft, data: '@rs'}\n  - {name: rs, kind: rejection_sampling}\n",
                       r"stage 'a': data '@rs' names no earlier stage"),
                      ("  - {name: a, kind: sft, dat: '@cold_start'}\n", r"stage 'a': unknown keys \['dat'\]"),
                      ("  - {name: e, kind: eval, config: {max_new_token: 8}}\n", r"unknown eval keys \['max_new_token'\]"),
                      ("  - {name: r, kind: rejection_sampling, config: {kk: 2}}\n", r"unknown rejection_sampling keys \['kk'\]")):
        bad.write_text("stages:\n" + body)
        with pytest.raises(ConfigError, match=msg):
            load_recipe(bad)


def test_preference_stage_on_no_pairs_is_passed_over(tmp_path):
    """Rejection sampling that wrote no pairs leaves a following DPO stage nothing to train on:
    passed over with a warning (as an SFT stage is), the model going on unchanged."""
    import types

    from posttrain.pipeline import Stage, run_preference

    run = types.SimpleNamespace(model="m", data_files=lambda spec, allow_empty=False: [])
    out = run_preference(run, Stage("dpo", "dpo", {}, "@rs.pairs", {}), tmp_path)
    assert out == {"model": "m", "skipped": "no preference rows"}


def test_a_stage_that_stopped_before_writing_anything_does_not_pin_the_recipe(tmp_path):
    from posttrain.pipeline import _check_fingerprint

    stage = tmp_path / "round2"
    stage.mkdir()
    (stage / "fingerprint.json").write_text(json.dumps({"fingerprint": "old"}))
    _check_fingerprint(stage, "new", "round2")  # nothing made by the old recipe: no refusal
    (stage / "config.yaml").write_text("x: 1\n")
    with pytest.raises(ConfigError, match="made by a different recipe"):
        _check_fingerprint(stage, "new", "round2")


def test_a_stage_fingerprint_covers_the_files_outside_the_run_it_names(tmp_path, monkeypatch):
    import os

    from posttrain.pipeline import Stage, stage_fingerprint

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "data").mkdir(parents=True)
    ext = tmp_path / "extra.jsonl"
    ext.write_text('{"text": "a"}\n')
    inner = run_dir / "data" / "test.jsonl"
    inner.write_text("x\n")
    sft = Stage("sft", "sft", {"data.eval": str(inner), "sampling": {"stop": "."}}, f"@rs+{ext}", {})
    plain = Stage("sft", "sft", {"lr": 1e-4}, "", {})
    before = stage_fingerprint("p", "smollm2-135m-instruct", sft, run_dir)
    plain_before = stage_fingerprint("p", "smollm2-135m-instruct", plain, run_dir)
    assert plain_before == stage_fingerprint("p", "smollm2-135m-instruct", plain)  # no file named: as before
    inner.write_text("rewritten by the run\n")  # the run's own files are the chain's business
    os.utime(inner, (1, 1))
    assert stage_fingerprint("p", "smollm2-135m-instruct", sft, run_dir) == before
    ext.write_text('{"text": "changed"}\n')
    os.utime(ext, (2, 2))
    assert stage_fingerprint("p", "smollm2-135m-instruct", sft, run_dir) != before
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    fp = stage_fingerprint("p", str(model), plain, run_dir)
    (model / "model.safetensors").write_text("w")
    assert stage_fingerprint("p", str(model), plain, run_dir) != fp
    scratch = tmp_path / "scratch"  # a directory that is no model or dataset: not read whole, not counted
    scratch.mkdir()
    named = Stage("sft", "sft", {"note": str(scratch)}, "", {})
    assert stage_fingerprint("p", "m", named, run_dir) == stage_fingerprint("p", "m", named, run_dir,
                                                                            with_files=False)


def test_a_stage_made_before_files_were_fingerprinted_is_reused_with_a_warning(tmp_path, capsys):
    from posttrain.pipeline import _check_fingerprint

    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "fingerprint.json").write_text(json.dumps({"fingerprint": "legacy"}))
    (stage / "config.yaml").write_text("x: 1\n")
    _check_fingerprint(stage, "new", "sft", legacy="legacy")
    assert "made before posttrain recorded the files a stage names" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="made by a different recipe"):
        _check_fingerprint(stage, "new", "sft", legacy="other")


def test_rejection_filters(monkeypatch, smol_tokenizer):
    import posttrain.synth.rejection as rej
    from posttrain.synth.tasks import problems

    q = problems("arithmetic", 1, "train")[0]
    good = q.solution
    responses = [good, good + " ", "The answer is " + q.answer, q.solution.replace(q.answer, "1", 1)
                 if q.solution.count(q.answer) else "x"]
    # one question, k=4: the same good response twice (a duplicate), an unformatted one, a wrong one
    responses[3] = good.replace(f"<answer>{q.answer}</answer>", "<answer>0</answer>")
    monkeypatch.setattr(rej, "generate", lambda model, tok, convs, cfg: responses[: len(convs)])
    res = rej.rejection_sample(None, smol_tokenizer, [q], rej.RejectionConfig(k=4, keep_per_question=2))
    assert len(res.rows) == 1 and res.rows[0]["messages"][1]["content"] == good.strip()
    assert res.stats["rejected"] == {"duplicate": 1, "format: no <think> block": 1, "wrong answer": 1}
    assert res.stats["per_task"]["arithmetic"]["yield"] == 0.25


def test_rejection_difficulty_filter(monkeypatch, smol_tokenizer):
    """max_pass_rate: a question right in every sample keeps nothing; one right in 1 of 2 keeps it."""
    import posttrain.synth.rejection as rej
    from posttrain.synth.tasks import problems

    easy, hard = problems("addition", 2, "train")
    wrong = hard.solution.replace(f"<answer>{hard.answer}</answer>", "<answer>0</answer>")
    responses = [easy.solution, easy.solution + "\n", hard.solution, wrong]
    monkeypatch.setattr(rej, "generate", lambda model, tok, convs, cfg: responses[: len(convs)])
    cfg = rej.RejectionConfig(k=2, keep_per_question=2, max_pass_rate=0.5, pairs_per_question=1)
    res = rej.rejection_sample(None, smol_tokenizer, [easy, hard], cfg)
    assert [r["messages"][0]["content"] for r in res.rows] == [hard.question]
    assert res.stats["rejected"] == {"question too easy": 1, "duplicate": 1, "wrong answer": 1}
    # the one question with a right and a wrong sample gives the one preference pair
    assert res.pairs == [{"prompt": hard.question, "chosen": hard.solution.strip(), "rejected": wrong.strip(),
                          "task": "addition", "answer": hard.answer}]
    t = res.stats["per_task"]["addition"]
    assert (t["questions"], t["questions_solved"], t["questions_too_easy"], t["correct"], t["pairs"]) == (2, 2, 1, 3, 1)
    assert t["sample_accuracy"] == 0.75 and t["yield"] == 0.25
    res = rej.rejection_sample(None, smol_tokenizer, [easy, hard], rej.RejectionConfig(k=2, keep_per_question=2))
    assert len(res.rows) == 2  # by default both questions keep theirs (the second easy one is a duplicate)


def test_rejection_repairs_a_wrong_response_at_its_first_false_claim(monkeypatch, smol_tokenizer):
    """repair_rounds: a response with a miswritten column digit is cut at that claim, the true
    column written in its place, and the model's continuation kept when it then verifies; a
    wrong response with no false claim (only its answer is wrong) is left alone."""
    import random

    import posttrain.synth.rejection as rej
    from posttrain.synth.claims import first_false_claim
    from posttrain.synth.tasks import corrupt_solution, problems

    fixable, unfixable = problems("addition", 2, "train")
    _, _, wrong = corrupt_solution(fixable, random.Random(0))
    claim = first_false_claim(wrong)
    assert claim is not None and fixable.solution.startswith(wrong[: claim.start] + claim.corrected)
    no_claim = unfixable.solution.replace(f"<answer>{unfixable.answer}</answer>", "<answer>0</answer>")
    seen_prefixes, stops = [], []

    def fake_generate(model, tok, convs, cfg, prefixes=None, stop_when=None):
        if prefixes is None:
            return [wrong, no_claim]
        seen_prefixes.extend(prefixes)  # the model continues the cut text the right way
        stops.append(stop_when)
        return [fixable.solution[len(p):] for p in prefixes]

    monkeypatch.setattr(rej, "generate", fake_generate)
    res = rej.rejection_sample(None, smol_tokenizer, [fixable, unfixable],
                               rej.RejectionConfig(k=1, repair_rounds=2))
    assert seen_prefixes == [wrong[: claim.start] + claim.corrected]  # one cut, for the one repairable response
    # a continuation ends at the line of its first false claim (counted with the prefix's text)
    rest = fixable.solution[len(seen_prefixes[0]):]
    assert not stops[0](0, rest) and stops[0](0, rest[: rest.index("\n") + 1] + "Tens: 1 + 1 = 3\n")
    rej.rejection_sample(None, smol_tokenizer, [fixable, unfixable],
                         rej.RejectionConfig(k=1, repair_rounds=2, check_steps=False))
    assert stops[1] is None  # without the step check a right answer through a false claim is kept: decode it out
    assert res.rows == [{"messages": [{"role": "user", "content": fixable.question},
                                      {"role": "assistant", "content": fixable.solution.strip()}],
                         "task": "addition", "answer": fixable.answer, "repaired": True}]
    t = res.stats["per_task"]["addition"]
    assert (t["repair_attempted"], t["repaired"], t["kept_repaired"], t["repair_cuts"], t["correct"]) == (1, 1, 1, 1, 0)
    assert res.stats["rejected"] == {"wrong answer": 2}
    # as a preference pair the repair stands against the wrong response it came from (step-level)
    res = rej.rejection_sample(None, smol_tokenizer, [fixable, unfixable],
                               rej.RejectionConfig(k=1, repair_rounds=2, pairs_per_question=1))
    assert res.pairs == [{"prompt": fixable.question, "chosen": fixable.solution.strip(), "rejected": wrong.strip(),
                          "task": "addition", "answer": fixable.answer}]
    # a repair the length filter turns away is no chosen response either
    res = rej.rejection_sample(None, smol_tokenizer, [fixable, unfixable],
                               rej.RejectionConfig(k=1, repair_rounds=2, pairs_per_question=1, max_tokens=20))
    assert res.rows == [] and res.pairs == [] and res.stats["rejected"]["too long"] == 1
    seen_prefixes.clear()
    # without repair_rounds (the default) nothing of the kind happens
    res = rej.rejection_sample(None, smol_tokenizer, [fixable, unfixable], rej.RejectionConfig(k=1))
    assert res.rows == [] and seen_prefixes == []


def test_repair_gives_up_after_its_rounds(monkeypatch, smol_tokenizer):
    """A continuation that makes a new mistake is cut again, up to repair_rounds times."""
    import random

    import posttrain.synth.rejection as rej
    from posttrain.synth.tasks import corrupt_solution, problems

    q = problems("addition", 1, "train", seed=3)[0]
    _, _, wrong = corrupt_solution(q, random.Random(1))
    calls = []

    def fake_generate(model, tok, convs, cfg, prefixes=None, stop_when=None):
        calls.append(prefixes)
        return [wrong] if prefixes is None else [" and 2 + 2 = 5, so <answer>1</answer>" for _ in prefixes]

    monkeypatch.setattr(rej, "generate", fake_generate)
    res = rej.rejection_sample(None, smol_tokenizer, [q], rej.RejectionConfig(k=1, repair_rounds=3))
    assert len(calls) == 4 and res.rows == []  # the first sampling, then three cuts
    assert calls[2][0].endswith("2 + 2 = 4") and calls[3][0].count("2 + 2 = 4") == 2
    assert res.stats["per_task"]["addition"]["repaired"] == 0


def test_generate_continues_an_assistant_prefix(monkeypatch, tiny_model_dir):
    """generate(prefixes=...): the prompt the model continues is the chat-templated
    conversation followed by the prefix; what comes back is the continuation alone."""
    import posttrain.rollout as ro
    from posttrain.models import load_model

    model, tok = load_model(str(tiny_model_dir), with_tokenizer=True, inference=True)
    convs = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}]]
    prefixes = ["<think>\n2 + 3 = 5", ""]
    seen = []
    real = ro.continue_batch

    def spy(gen, tok_, ids, mask, *a, **k):
        seen.extend(tok.decode(row[m.bool()]) for row, m in zip(ids, mask))
        return real(gen, tok_, ids, mask, *a, **k)

    monkeypatch.setattr(ro, "continue_batch", spy)
    cfg = ro.SamplingConfig(max_new_tokens=4, temperature=0.0, batch_size=4)
    out = ro.generate(model, tok, convs, cfg, prefixes=prefixes)
    rendered = ro.render_prompts(tok, convs)
    assert sorted(seen) == sorted([rendered[0] + prefixes[0], rendered[1]])
    assert len(out) == 2 and out[1] == ro.generate(model, tok, convs[1:], cfg)[0]
    with pytest.raises(ValueError, match="1 prefixes for 2"):
        ro.generate(model, tok, convs, cfg, prefixes=prefixes[:1])


def test_rejection_pairs_feed_a_dpo_stage(tiny_model_dir, tmp_path, monkeypatch):
    """A recipe's DPO stage trains on the pairs its rejection-sampling stage wrote (``@rs.pairs``)."""
    import posttrain.synth.rejection as rej
    from posttrain.synth.tasks import problems

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    by_question = {p.question: p for p in problems("addition", 8, "train", 1)}

    def fake_generate(model, tok, convs, cfg):  # per question: one right, one wrong worked solution
        out = []
        for i, conv in enumerate(convs):
            p = by_question[conv[-1]["content"]]
            out.append(p.solution if i % 2 == 0 else p.solution.replace(f"<answer>{p.answer}<", "<answer>0<"))
        return out

    monkeypatch.setattr(rej, "generate", fake_generate)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\noutput_dir: {tmp_path / 'run'}\ntasks: [addition]\nn_train: 4\n"
                      "n_test: 2\nstages:\n"
                      "  - {name: rs, kind: rejection_sampling, config: {n: 3, k: 2, pairs_per_question: 1}}\n"
                      "  - {name: dpo, kind: dpo, data: '@rs.pairs', config: {max_steps: 2, batch_size: 2, "
                      "data.eval_fraction: 0.0, save_every: 0}}\n")
    summary = run_recipe(load_recipe(recipe))
    rs = json.loads((tmp_path / "run" / "rs" / "stage_done.json").read_text())["outputs"]
    assert rs["pairs_count"] == 3 and rs["rows_count"] == 3
    pairs = [json.loads(x) for x in Path(rs["pairs"]).read_text().splitlines()]
    assert all(p["chosen"].endswith(f"<answer>{p['answer']}</answer>") and p["rejected"].endswith("<answer>0</answer>")
               for p in pairs)
    assert summary["final_model"].startswith(str(tmp_path / "run" / "dpo"))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss/train" in m] == [1, 2]


def test_one_shot_prompt_shows_an_exemplar():
    from posttrain.synth.rejection import one_shot_messages
    from posttrain.synth.tasks import problems

    ex = problems("gcd", 1, "train")[0]
    (msg,) = one_shot_messages("What is the greatest common divisor of 8 and 12?", ex)
    assert ex.solution in msg["content"] and msg["content"].endswith("8 and 12?\nResponse:")


def test_fresh_questions_interleave_tasks(tmp_path):
    """A stage that takes the first n fresh questions (rejection sampling's ``n``) gets every task."""
    from posttrain.pipeline import Run

    bad = tmp_path / "r.yaml"
    bad.write_text(f"tasks: [addition, subtraction, gcd]\nn_train: 6\nn_test: 2\noutput_dir: {tmp_path / 'run'}\n"
                   "stages:\n  - {name: e, kind: eval}\n")
    run = Run(load_recipe(bad))
    assert [q.task for q in run.fresh_questions[:6]] == ["addition", "subtraction", "gcd"] * 2
    assert not {q.question for q in run.fresh_questions} & {q.question for q in run.train_questions}
    assert {q.task for q in run.test_questions} == {"addition", "subtraction", "gcd"}


def test_rerun_with_a_changed_recipe_stops_before_writing(tmp_path):
    """A run directory made by one recipe is not reused (nor its data overwritten) by another."""
    from posttrain.pipeline import DONE, FINGERPRINT, Run

    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    body = ("tasks: [addition]\nn_train: {}\nn_test: 2\noutput_dir: {}\nstages:\n"
            "  - {{name: e, kind: eval, config: {{max_new_tokens: 64}}}}\n"
            "  - {{name: s, kind: sft, config: {{lr: {}}}}}\n")
    recipe.write_text(body.format(4, run_dir, 1e-4))
    run = Run(load_recipe(recipe))
    for name in ("e", "s"):  # as run_recipe leaves a finished stage
        (run_dir / name).mkdir()
        (run_dir / name / FINGERPRINT).write_text(json.dumps({"fingerprint": run.fingerprints[name]}))
        (run_dir / name / DONE).write_text("{}")
    assert Run(load_recipe(recipe)).fingerprints == run.fingerprints  # the same recipe again: reused
    data = (run_dir / "data" / "cold_start.jsonl").read_text()
    recipe.write_text(body.format(4, run_dir, 2e-4))  # the last stage's config
    with pytest.raises(ConfigError, match="stage 's' in this run directory was made by a different recipe"):
        Run(load_recipe(recipe))
    recipe.write_text(body.format(5, run_dir, 1e-4))  # the task data: every stage
    with pytest.raises(ConfigError, match="stage 'e'"):
        Run(load_recipe(recipe))
    assert (run_dir / "data" / "cold_start.jsonl").read_text() == data  # nothing written
