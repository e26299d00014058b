"""The command line: help for every command, data inspect, sft from a recipe, generate, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import build_parser, main
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [[], ["sft"], ["rm"], ["prm"], ["dpo"], ["data", "inspect"], ["chat"], ["generate"], ["demo"], ["report"],
                                  ["synth"], ["config"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: posttrain" in out
    if argv == ["sft"]:
        assert "model.lora_r" in out and "data.too_long" in out  # every config key documented


def test_overrides_may_follow_options(capsys):
    from posttrain.cli import parse_args

    args = parse_args(["run", "recipes/reasoning.yaml", "--quick", "model=m", "output_dir=o"])
    assert args.quick and args.overrides == ["model=m", "output_dir=o"]
    assert parse_args(["sft", "--resume", "lr=1e-4"]).overrides == ["lr=1e-4"]
    with pytest.raises(SystemExit):
        parse_args(["run", "recipes/reasoning.yaml", "--quick", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_data_inspect_good_and_bad(tiny_model_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "2+2?", "completion": "4"}] * 3)
    assert main(["data", "inspect", str(good), "--model", str(tiny_model_dir)]) == 0
    err = capsys.readouterr().err
    assert "prompt_completion" in err and "⟦4<|im_end|>⟧" in err and "token lengths" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2+2?", "completion": "4"}, "{oops",
                                               {"prompt": "q", "completion": 7}])
    assert main(["data", "inspect", str(bad), "--model", str(tiny_model_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid JSON" in err and f"{bad}:3: field 'completion': wrong type" in err
    # a first row of no known format: the format comes from the next one, as training reads the file,
    # and every later bad row is listed too
    junk = write_jsonl(tmp_path / "junk.jsonl", [{"id": 1}, {"prompt": "2+2?", "completion": "4"},
                                                 {"messages": [{"role": "user", "content": "q"}]}])
    assert main(["data", "inspect", str(junk), "--model", str(tiny_model_dir)]) == 1
    err = capsys.readouterr().err
    assert f"recognised from the keys of {junk}:2" in err and "1 rows read" in err
    assert f"{junk}:1: unrecognised row format" in err and f"{junk}:3: field 'prompt': missing field" in err


def test_sft_from_recipe_with_overrides(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    code = main(["sft", "--config", str(REPO / "recipes" / "sft.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.train={REPO / 'examples/data/arithmetic_train.jsonl'}",
                 f"data.eval={REPO / 'examples/data/arithmetic_test.jsonl'}", f"output_dir={out}", "max_steps=2",
                 "batch_size=2", "save_every=0", "tensorboard=false"])
    assert code == 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "report.html").is_file()
    assert (out / "report.png").is_file()


def test_config_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "lrr=1"])
    assert e.value.code == 2
    assert "unknown config key 'lrr'. Did you mean 'lr'?" in capsys.readouterr().err


def test_generate(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "id": 1}, {"prompt": "Hello there", "id": 2}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "5"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and all(isinstance(r["completion"], str) for r in rows)
    # a prompt/completion file: the model's output is the completion, the file's is the reference;
    # the output folder is made first
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 2+2?", "completion": "REFERENCE ANSWER"}])
    out = tmp_path / "new" / "out.jsonl"
    assert main(["generate", str(tiny_model_dir), "--prompts", str(pc), "--out", str(out), "--max-new-tokens", "3"]) == 0
    row = json.loads(out.read_text())
    assert row["reference"] == "REFERENCE ANSWER" and row["completion"] != "REFERENCE ANSWER"


def test_override_values_keep_their_text():
    """key=value: text fields take the text as written (YAML read '###' as nothing, 'Question:' as
    a mapping, a date as a date, 1.10 as 1.1); lists from [a, b] or a,b; unreadable YAML is a
    config error naming the key."""
    from posttrain.config import ConfigError, load_config
    from posttrain.stages.online_rl import GRPOConfig

    cfg = load_config(GRPOConfig, None, ["sampling.stop=###", "output_dir=2024-01-01", "model.name_or_path=1.10",
                                         "model.lora_target_modules=[q_proj, v_proj]", "lr=3e-4", "model.lora=true"])
    assert (cfg.sampling.stop, cfg.output_dir, cfg.model.name_or_path) == (["###"], "2024-01-01", "1.10")
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"] and cfg.lr == 3e-4 and cfg.model.lora is True
    assert load_config(GRPOConfig, None, ["sampling.stop=Question:"]).sampling.stop == ["Question:"]
    assert load_config(GRPOConfig, None, ['sampling.stop="\\n\\n"']).sampling.stop == ["\n\n"]  # YAML's escapes
    assert load_config(GRPOConfig, None, ["output_dir='runs/my run'"]).output_dir == "runs/my run"
    with pytest.raises(ConfigError, match=r"sampling.stop: cannot read '\['"):
        load_config(GRPOConfig, None, ["sampling.stop=["])


def test_plausible_mistakes_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    """Each of these was a traceback (or a hang): now a one-line error and exit 2."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv, msg in ((["synth", "arithmetic", "--digits", "1", "--split", "test", "--n", "30", "--out",
                        str(tmp_path / "s.jsonl")], "too few distinct questions"),
                      (["synth", "arithmetic", "--digits", "3-2"], "--digits"),
                      (["synth", "arithmetic", "--ops", "x"], "--ops"),
                      (["eval", str(tiny_model_dir), "--data", str(empty)], "no eval rows"),
                      (["data", "inspect", str(empty), "--format", "xyz", "--model", str(tiny_model_dir)],
                       "--format: 'xyz' is not a sft format"),
                      (["run", str(REPO / "recipes" / "reasoning.yaml"), "n_train=1e3"], "n_train must be a whole"),
                      (["eval", str(tiny_model_dir), "--data", str(empty), "--dtype", "bf16"], "invalid choice")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv


def test_runs_and_reports_survive_a_cut_off_metrics_line(tmp_path):
    """A metrics.jsonl whose last line a crash cut off: runs, report and resume read the rest."""
    from posttrain import engine
    from posttrain.report import plot_metrics
    from posttrain.runs import find_runs

    run = tmp_path / "r"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/train": 2.0}\n{"step": 2, "loss/train": 1.5}\n{"step": 3, "ti')
    assert [r["step"] for r in engine.read_metrics(run)] == [1, 2]
    assert find_runs([tmp_path])[0]["headline"] == "loss/train 1.5"
    engine.Metrics(run, tensorboard=False).truncate_after(1)
    assert [r["step"] for r in engine.read_metrics(run)] == [1]
    (run / "metrics.jsonl").write_text('{"step": 1, "eval/accuracy": 0.5}\n')
    assert plot_metrics(run) is None  # one point of one metric: nothing to draw, no error


def test_log_every_logs_the_mean_of_the_window(tmp_path):
    """log_every=2: each record is the mean of the steps since the last one (HF logs the mean
    loss, not the last step's), lr and peak RSS as they stand; the last step closes its window."""
    from posttrain import engine

    m = engine.Metrics(tmp_path, tensorboard=False)
    for step, (loss, lr, acc) in enumerate([(4.0, 1.0, 0.5), (2.0, 0.5, None), (1.0, 0.25, 1.0),
                                            (3.0, 0.125, 0.0), (7.0, 0.0625, 1.0)], start=1):
        m.log_step(step, {"loss/train": loss, "train/lr": lr, "perf/peak_rss_mb": 10.0 * step,
                          **({"reward/accuracy": acc} if acc is not None else {})}, every=2, last=5)
    recs = engine.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [2, 4, 5]
    assert [r["loss/train"] for r in recs] == [3.0, 2.0, 7.0]
    assert [r["train/lr"] for r in recs] == [0.5, 0.125, 0.0625]
    assert [r["perf/peak_rss_mb"] for r in recs] == [20.0, 40.0, 50.0]
    assert [r["reward/accuracy"] for r in recs] == [0.5, 0.5, 1.0]  # step 2 had none: step 1's alone


def test_synth_writes_rows(tmp_path):
    out = tmp_path / "s.jsonl"
    assert main(["synth", "arithmetic", "--n", "5", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 5


def test_parser_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("sft", "rm", "prm", "dpo", "data", "chat", "generate", "demo", "report", "synth", "config"):
        assert cmd in text


@pytest.mark.parametrize("stage,data", [
    ("rm", "arithmetic_pairs"), ("prm", "arithmetic_steps"), ("dpo", "arithmetic_pairs")])
def test_preference_stages_from_recipes(stage, data, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    code = main([stage, "--config", str(REPO / "recipes" / f"{stage}.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"data.train={REPO / 'examples/data' / (data + '_train.jsonl')}",
                 f"data.eval={REPO / 'examples/data' / (data + '_test.jsonl')}", f"output_dir={out}", "max_steps=2",
                 "epochs=0", "batch_size=2", "data.max_examples=8", "tensorboard=false"])
    # rm / prm save merged scoring models; dpo under LoRA saves a peft adapter
    saved = "adapter_config.json" if stage == "dpo" else "config.json"
    assert code == 0 and (out / "model" / saved).is_file() and (out / "report.html").is_file()


def test_data_inspect_preference(tiny_model_dir, capsys):
    f = REPO / "examples/data/arithmetic_preference_test.jsonl"
    assert main(["data", "inspect", str(f), "--kind", "preference", "--model", str(tiny_model_dir), "-n", "1"]) == 0
    err = capsys.readouterr().err
    assert "format: pair" in err and "chosen" in err and "rejected" in err and "</answer><|im_end|>⟧" in err


def test_eval_reports_accuracy_per_task(tiny_model_dir, tmp_path, monkeypatch):
    import posttrain.evaluate as ev
    from posttrain.synth.tasks import arithmetic_problems

    probs = arithmetic_problems(3, "test")
    data = write_jsonl(tmp_path / "q.jsonl", [p.as_prompt_row() for p in probs])
    # a model that answers the first question with its worked solution, the second wrongly and
    # the third rightly but without the format (counted by the lenient accuracy only)
    answers = iter([probs[0].solution, "<think>\nx\n</think>\n<answer>0</answer>", f"It is {probs[2].answer}."])
    monkeypatch.setattr(ev, "generate", lambda model, tok, convs, cfg, **kw: [next(answers) for _ in convs])
    assert main(["eval", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    out = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]
    assert out["arithmetic"]["accuracy"] == pytest.approx(1 / 3) and out["all"]["format"] == pytest.approx(2 / 3)
    assert out["arithmetic"]["lenient"] == pytest.approx(2 / 3)
    # last_number: the task verifier's verdict, or else the last number (a tagged x = 3 counts)
    from posttrain.data.loading import BadRowError, BadRows
    from posttrain.synth.tasks import problems

    lin = problems("linear", 1, "test")[0]
    items = ev.load_eval_items(write_jsonl(tmp_path / "l.jsonl", [lin.as_prompt_row()]), BadRows())
    monkeypatch.setattr(ev, "generate", lambda model, tok, convs, cfg, **kw: [
        f"<think>x</think><answer>x = {lin.answer}</answer>"] * len(convs))
    from posttrain.models import load_model

    model, tok = load_model(str(tiny_model_dir), with_tokenizer=True, inference=True)
    metrics, _ = ev.evaluate_items(model, tok, items, answer_format="last_number")
    assert metrics["linear"]["accuracy"] == 1.0
    # last_number takes a decimal reference (scored by the last number); tagged refuses it at load
    dec = write_jsonl(tmp_path / "dec.jsonl", [{"prompt": "half of 7?", "answer": "3.5"}])
    items = ev.load_eval_items(dec, BadRows(), "last_number")
    monkeypatch.setattr(ev, "generate", lambda model, tok, convs, cfg, **kw: ["It is 3.5."] * len(convs))
    assert ev.evaluate_items(model, tok, items, answer_format="last_number")[0]["all"]["accuracy"] == 1.0
    # a reference its own task's verifier cannot read is a bad row, not a crash at scoring time
    row = {**probs[0].as_prompt_row(), "answer": "5.0"}
    with pytest.raises(BadRowError, match=r"q2.jsonl:1: field 'answer': the reference answer '5.0' is not an integer"):
        ev.load_eval_items(write_jsonl(tmp_path / "q2.jsonl", [row]), BadRows())


def test_pass_at_k_by_hand():
    from posttrain.evaluate import pass_at_k

    # n=4 samples, c=1 correct, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5) and pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError, match="needs"):  # fewer samples than k: undefined (it said 1.0 for c=0)
        pass_at_k(1, 0, 2)
    # from 8 samples with 2 right: pass@4 = 1 - C(6,4)/C(8,4) = 1 - 15/70
    assert pass_at_k(8, 2, 4) == pytest.approx(55 / 70)
    from posttrain.evaluate import pass_ks

    assert pass_ks(1) == [] and pass_ks(2) == [2] and pass_ks(8) == [2, 4, 8] and pass_ks(12) == [2, 4, 8, 12]


def test_recipes_ship_in_the_package_and_are_found_by_name(tmp_path, monkeypatch, capsys):
    """An installed wheel has no checkout around it: the demo's recipe lies inside the package
    (it was read from the checkout's recipes/, missing from a wheel), the recipes are package
    data, and a recipe or stage config is found by name from any directory."""
    import tomllib

    import posttrain
    from posttrain.config import BUNDLED_RECIPES, ConfigError, config_file
    from posttrain.demo import RECIPE
    from posttrain.pipeline import load_recipe

    package = Path(posttrain.__file__).resolve().parent
    assert RECIPE.is_file() and package in RECIPE.parents and BUNDLED_RECIPES.parent == package
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["posttrain"]
    assert "recipes/*.yaml" in data and "py.typed" in data and (package / "py.typed").is_file()
    assert (REPO / "recipes" / "reasoning.yaml").resolve() == RECIPE  # the checkout's path still works
    monkeypatch.chdir(tmp_path)
    for name in ("reasoning", "reasoning.yaml", "recipes/reasoning.yaml"):
        assert config_file(name) == RECIPE
    assert load_recipe("reasoning", quick=True).stages
    capsys.readouterr()
    assert config_file("recipes/sft.yaml") == BUNDLED_RECIPES / "sft.yaml"
    assert "recipes/sft.yaml: not in" in capsys.readouterr().err  # a path not found here: says what is read
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "sft.yaml").write_text("lr: 1.0e-4\n")  # a file of that name wins
    assert config_file("recipes/sft.yaml") == Path("recipes/sft.yaml")
    with pytest.raises(ConfigError, match=r"recipe not found: nope.*bundled recipes, by name: .*reasoning"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="config file not found: other/dir/sft.yaml"):
        config_file("other/dir/sft.yaml")


def test_readme_config_reference_is_current():
    """README's config tables are `posttrain config all`; regenerate them when a key changes."""
    from posttrain.cli import config_reference

    readme = (REPO / "README.md").read_text()
    a, b = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    assert readme[readme.index(a) + len(a) : readme.index(b)].strip() == config_reference().strip()
    assert readme.lstrip().startswith("# posttrain") and "make demo" in readme[:600] and "make test" in readme[:600]
