"""Recipe runner (``posttrain run RECIPE.yaml``): stages that feed each other in one run directory.

A recipe names a starting model, the verifiable task suites it works on, and a list of
stages. Each stage runs in ``<output_dir>/<stage name>/`` and, when it finishes, writes
``stage_done.json`` with its outputs; a rerun of the same command skips finished stages
and lets an unfinished training stage continue from its last checkpoint (``resume``), so a
stopped run loses at most the work since that checkpoint. Each stage directory records a
fingerprint of what made it (the starting model, the stage's kind, data and config, the
run's task data, and the stages before it); a rerun whose recipe or task data differ there
stops with an error naming the stage instead of reusing (or overwriting) work made
another way.

Stage kinds (``kind:``) and what flows between them:

* ``eval``: greedy accuracy per task on the held-out questions with the current model
  (:mod:`posttrain.evaluate`); the results of every ``eval`` stage form the final table
  and ``accuracy.png``.
* ``sft``: :mod:`posttrain.stages.sft` on ``data`` (default: the tasks' programmatic worked
  solutions, the cold start; ``@STAGE`` = the rows a synthesis stage wrote, ``+`` joins
  sources); the trained model becomes the current model (merged, under LoRA).
* ``rejection_sampling``: :func:`posttrain.synth.rejection.rejection_sample` with the current
  model on fresh training questions (``one_shot: true`` shows a worked example in the
  prompt); writes ``rows.jsonl``.
* ``grpo`` / ``rloo`` / ``ppo``: :mod:`posttrain.stages.online_rl` on the training questions
  as prompts, rewards from the config (default: ``task_verifier`` + ``think_format``).
* ``dpo`` / ``rm``: the preference stages on ``data`` (``@STAGE.pairs`` = pairs a stage wrote).
* ``cai``: Constitutional AI critique -> revision (:mod:`posttrain.synth.constitutional`) on the
  bundled red-team and helpfulness prompts (the last ``held_out`` of each file are kept for
  evaluation): writes SFT rows (``@STAGE``) and (revision, original) pairs (``@STAGE.pairs``).
* ``judge``: two sampled responses per prompt, judged by an AI judge (``judge:``, default the
  recipe's starting model) from option-letter log-probs in both orders
  (:mod:`posttrain.synth.judge`), red-team prompts on harmlessness and the others on
  helpfulness: soft-labelled pairs (``soft_labels: false``: hard labels).
* ``win_rate``: the current model against the starting one on the held-out prompts, judged in
  both orders: harmlessness (red-team prompts) and helpfulness win rates (share of prompts won)
  and the judge's mean probabilities.

Within a stage, ``config:`` holds the stage's own config keys (dotted keys allowed).
``--quick`` applies the recipe's ``quick:`` block: top-level keys and per-stage ``config``
overrides, for a smoke run in minutes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import ConfigError, config_file, load_config, read_yaml
from posttrain.engine import file_fingerprint, inside, write_status
from posttrain.fileio import atomic_write
from posttrain.log import console, log, warn

KINDS = ("eval", "sft", "rejection_sampling", "grpo", "rloo", "ppo", "dpo", "rm", "cai", "judge", "win_rate")
DONE = "stage_done.json"
FINGERPRINT = "fingerprint.json"


@dataclass
class Stage:
    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    model: str
    output_dir: str
    tasks: list[str]
    n_train: int
    n_test: int
    stages: list[Stage]
    seed: int = 0


def _flatten(prefix: str, d: dict) -> list[str]:
    """``{"a": {"b": 1}}`` -> ``["a.b=1"]`` (override strings for load_config)."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(key + ".", v)
        elif isinstance(v, list):
            out.append(f"{key}={','.join(str(x) for x in v)}")
        else:
            out.append(f"{key}={v}")
    return out


def load_recipe(path: str | Path, quick: bool = False, overrides: list[str] | None = None) -> Recipe:
    """Parse and check a recipe; ``quick`` applies its ``quick:`` block."""
    p = config_file(path, "recipe")
    raw = read_yaml(p) or {}
    quick_block = raw.pop("quick", {}) or {}
    if quick:
        stage_over = quick_block.pop("stages", {}) or {}
        raw.update(quick_block)
        for st in raw.get("stages", []):
            st.setdefault("config", {}).update(stage_over.get(st.get("name"), {}))
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key not in ("model", "output_dir", "n_train", "n_test", "seed"):
            raise ConfigError(f"recipe override '{key}': only model, output_dir, n_train, n_test, seed can be set")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        raw[key] = value  # (checked with the file's values below)
    for key in ("model", "output_dir", "name"):
        if key in raw and (raw[key] is None or not str(raw[key]).strip()):
            raise ConfigError(f"{p}: {key} is empty")
    for key in ("n_train", "n_test", "seed"):
        if key in raw:
            v = raw[key]
            if isinstance(v, float) and v.is_integer():  # (YAML: 1000.0, 1e3)
                v = int(v)
            if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{p}: {key} must be a whole number, not {raw[key]!r}")
            raw[key] = v
            if raw[key] < 0 or (key != "seed" and raw[key] == 0):
                raise ConfigError(f"{p}: {key} must be {'positive' if key != 'seed' else 'at least 0'}, "
                                  f"not {raw[key]}")
    allowed = {"name", "model", "output_dir", "tasks", "n_train", "n_test", "stages", "seed"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{p}: unknown recipe keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    stages = []
    names = set()
    for i, st in enumerate(raw.get("stages") or []):
        if not isinstance(st, dict) or "name" not in st or "kind" not in st:
            raise ConfigError(f"{p}: stage {i} needs a name and a kind")
        if st["kind"] not in KINDS:
            raise ConfigError(f"{p}: stage '{st['name']}': unknown kind {st['kind']!r} (one of {', '.join(KINDS)})")
        if st["name"] in names:
            raise ConfigError(f"{p}: two stages named '{st['name']}'")
        extra = {k: v for k, v in st.items() if k not in ("name", "kind", "config", "data")}
        _check_stage(p, Stage(st["name"], st["kind"], st.get("config") or {}, st.get("data", ""), extra), names)
        names.add(st["name"])
        stages.append(Stage(st["name"], st["kind"], st.get("config") or {}, st.get("data", ""), extra))
    from posttrain.synth.tasks import TASKS

    tasks = raw.get("tasks") or ["arithmetic"]
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"{p}: unknown task {t!r} (known: {sorted(TASKS)})")
    return Recipe(raw.get("name", p.stem), str(raw.get("model", "smollm2-135m-instruct")),
                  str(raw.get("output_dir", f"runs/{p.stem}")), tasks, int(raw.get("n_train", 200)),
                  int(raw.get("n_test", 40)), stages, int(raw.get("seed", 0)))


#: The keys a stage may carry besides name, kind, config and data, by kind.
STAGE_OPTIONS = {"cai": {"prompts", "held_out", "constitution"}, "judge": {"prompts", "held_out", "judge"},
                 "win_rate": {"prompts", "held_out", "judge"}}
EVAL_KEYS = {"max_new_tokens", "batch_size"}
JUDGE_KEYS = {"max_new_tokens", "temperature", "min_confidence", "soft_labels", "n"}
WIN_RATE_KEYS = {"max_new_tokens"}


def _config_keys(kind: str) -> set[str] | None:
    """The ``config`` keys a stage of ``kind`` reads (None: a training stage, checked by its config class)."""
    if kind == "eval":
        return EVAL_KEYS
    if kind == "rejection_sampling":
        from posttrain.synth.rejection import RejectionConfig

        return set(RejectionConfig.__dataclass_fields__) | {"n"}
    if kind == "cai":
        from posttrain.synth.constitutional import CAIConfig

        return set(CAIConfig.__dataclass_fields__) | {"n"}
    return {"judge": JUDGE_KEYS, "win_rate": WIN_RATE_KEYS}.get(kind)


def _check_stage(recipe: Path, stage: Stage, earlier: set[str]) -> None:
    """Errors a stage would otherwise meet only when the stages before it have run: keys of no
    use to its kind, eval settings that are not read, and ``@stage`` data from no earlier stage."""
    where = f"{recipe}: stage '{stage.name}'"
    allowed = STAGE_OPTIONS.get(stage.kind, set())
    if set(stage.options) - allowed:
        raise ConfigError(f"{where}: unknown keys {sorted(set(stage.options) - allowed)} (a stage has name, kind, "
                          f"config, data{''.join(', ' + k for k in sorted(allowed))})")
    if not isinstance(stage.config, dict):
        raise ConfigError(f"{where}: config must be a mapping of keys")
    known = _config_keys(stage.kind)
    if known is not None and set(stage.config) - known:
        raise ConfigError(f"{where}: unknown {stage.kind} keys {sorted(set(stage.config) - known)} ({stage.kind} "
                          f"takes {sorted(known)})")
    if "held_out" in stage.options:
        held, least = stage.options["held_out"], 1 if stage.kind == "win_rate" else 0
        if not isinstance(held, int) or isinstance(held, bool) or held < least:
            raise ConfigError(f"{where}: held_out must be a whole number of prompts per file, at least {least}, "
                              f"not {held!r}")
    for part in str(stage.data or "").split("+"):
        name = part.strip()[1:].partition(".")[0] if part.strip().startswith("@") else None
        if name is not None and name != "cold_start" and name not in earlier:
            raise ConfigError(f"{where}: data '{part.strip()}' names no earlier stage (earlier: "
                              f"{', '.join(['cold_start', *sorted(earlier)])})")


# --------------------------------------------------------------------------- stage runners


class Run:
    """State shared by the stages of one run: directories, the current model, task data, results."""

    def __init__(self, recipe: Recipe):
        from posttrain.synth.rejection import write_rows
        from posttrain.synth.tasks import problems

        self.recipe = recipe
        self.dir = Path(recipe.output_dir).expanduser()
        self.model = recipe.model
        self.outputs: dict[str, dict] = {}
        self.evals: list[tuple[str, dict]] = []
        data = self.dir / "data"
        self.train_questions = [q for t in recipe.tasks for q in problems(t, recipe.n_train, "train", recipe.seed)]
        self.test_questions = [q for t in recipe.tasks for q in problems(t, recipe.n_test, "test", recipe.seed)]
        # fresh questions for synthesis and RL: disjoint from the cold-start ones, the tasks
        # interleaved so that the first n of them (a stage's ``n``) cover every task evenly
        seen = {p.question for p in self.train_questions}
        per_task = [[q for q in problems(t, 2 * recipe.n_train, "train", recipe.seed + 1) if q.question not in seen]
                    for t in recipe.tasks]
        self.fresh_questions = [q for group in itertools.zip_longest(*per_task) for q in group if q is not None]
        rows = {"cold_start": [q.as_sft_row() for q in self.train_questions],
                "prompts": [q.as_prompt_row() for q in self.fresh_questions],
                "test": [q.as_prompt_row() for q in self.test_questions]}
        # what made each stage's directory, checked before anything in the run directory is written
        chain = legacy = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        self.fingerprints: dict[str, str] = {}
        for stage in recipe.stages:
            chain = self.fingerprints[stage.name] = stage_fingerprint(chain, recipe.model, stage, self.dir)
            legacy = stage_fingerprint(legacy, recipe.model, stage, self.dir, with_files=False)
            _check_fingerprint(self.dir / stage.name, chain, stage.name, legacy)
        self.files = {name: write_rows(data / f"{name}.jsonl", r) for name, r in rows.items()}

    def data_files(self, spec: str, allow_empty: bool = False) -> list[str]:
        """``''`` = cold start; ``@stage`` = rows a synthesis stage wrote; ``a+b`` joins them.
        Every source empty is an error unless ``allow_empty`` (then ``[]``)."""
        if not spec:
            return [str(self.files["cold_start"])]
        out = []
        for part in spec.split("+"):
            part = part.strip()
            if part.startswith("@"):
                name, _, key = part[1:].partition(".")
                key = key or "rows"
                if name == "cold_start":
                    out.append(str(self.files["cold_start"]))
                elif name in self.outputs and key in self.outputs[name]:
                    if self.outputs[name].get(f"{key}_count", 1):
                        out.append(self.outputs[name][key])
                    else:
                        warn(f"data '{part}': stage '{name}' wrote no {key}; left out")
                else:
                    raise ConfigError(f"data '{part}': no earlier stage '{name}' wrote {key}")
            else:
                out.append(part)
        if not out and not allow_empty:
            raise ConfigError(f"data '{spec}': every source is empty")
        return out


def run_eval(run: Run, stage: Stage, out: Path) -> dict:
    from posttrain.evaluate import EvalItem, evaluate_items, print_table
    from posttrain.models import load_model

    model, tok = load_model(run.model, with_tokenizer=True, inference=True)
    items = [EvalItem([{"role": "user", "content": q.question}], q.answer, q.task, q.question,
                      {k: v for k, v in q.as_prompt_row().items() if k not in ("prompt", "answer", "task")})
             for q in run.test_questions]
    metrics, samples = evaluate_items(model, tok, items, max_new_tokens=int(stage.config.get("max_new_tokens", 256)),
                                      batch_size=int(stage.config.get("batch_size", 16)))
    print_table(metrics, f"{stage.name}: {run.model}")
    (out / "eval.json").write_text(json.dumps({"model": run.model, "metrics": metrics}, indent=2))
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {"metrics": metrics}


def _train_model_dir(result, lora: bool) -> str:
    merged = result.run_dir / "model-merged"
    return str(merged if lora and merged.is_dir() else result.model_dir)


def _train_overrides(run: Run, out: Path, files: list[str]) -> list[str]:
    """Config keys every training stage of a recipe gets: the run's current model, the stage's
    directory (resumable), its data files, a merged model at the end."""
    return [f"model.name_or_path={run.model}", f"output_dir={out}", "resume=true", "merge_lora=true",
            f"data.train={','.join(files)}", "tensorboard=false"]


def run_sft(run: Run, stage: Stage, out: Path) -> dict:
    from posttrain.stages.sft import SFTConfig, train

    files = run.data_files(stage.data, allow_empty=True)
    if not files:  # e.g. a self-improvement round after rejection sampling kept nothing
        warn(f"stage '{stage.name}': every data source ({stage.data}) is empty; no training, the model goes on "
             "unchanged")
        return {"model": run.model, "train_loss": None, "eval_loss": None, "skipped": "no training rows"}
    cfg = load_config(SFTConfig, None, _train_overrides(run, out, files) + _flatten("", stage.config))
    res = train(cfg)
    return {"model": _train_model_dir(res, cfg.model.lora), "train_loss": res.train_loss, "eval_loss": res.eval_loss}


def run_rejection(run: Run, stage: Stage, out: Path) -> dict:
    from posttrain.models import load_model
    from posttrain.synth.rejection import RejectionConfig, rejection_sample_to

    cfg = RejectionConfig(**{k: v for k, v in stage.config.items() if k != "n"})  # (keys checked at load)
    n = int(stage.config.get("n", len(run.fresh_questions)))
    model, tok = load_model(run.model, with_tokenizer=True, inference=True)
    rows, pairs = out / "rows.jsonl", out / "pairs.jsonl"
    counts, stats = rejection_sample_to(rows, model, tok, run.fresh_questions[:n], cfg,
                                        pairs_path=pairs if cfg.pairs_per_question else None)
    kept = counts["rows"]
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log(f"{stage.name}: kept {stats['kept']} of {stats['sampled']} samples (yield {stats['yield']:.1%}); "
        f"rejected: {stats['rejected']}")
    if not kept:
        warn(f"stage '{stage.name}': no sample passed the filters ({stats['rejected']}); later stages that read "
             "its rows get none (the model needs a cold start first, or more samples: k)")
    outputs = {"rows": str(rows), "rows_count": kept, "stats": stats}
    if cfg.pairs_per_question:
        log(f"{stage.name}: {counts['pairs']} preference pairs (verified against wrong answers) in {pairs}")
        outputs.update(pairs=str(pairs), pairs_count=counts["pairs"])
    return outputs


def run_online_rl(run: Run, stage: Stage, out: Path) -> dict:
    from posttrain.stages import online_rl

    cls = {"grpo": online_rl.GRPOConfig, "rloo": online_rl.RLOOConfig, "ppo": online_rl.PPOConfig}[stage.kind]
    overrides = [f"model.name_or_path={run.model}", f"output_dir={out}", "resume=true", "merge_lora=true",
                 f"data.train={','.join(run.data_files(stage.data)) if stage.data else run.files['prompts']}",
                 "rewards=task_verifier,think_format", "tensorboard=false", "eval_limit=0"]
    cfg = load_config(cls, None, overrides + _flatten("", stage.config))
    res = online_rl.train(cfg)
    return {"model": _train_model_dir(res, cfg.model.lora)}


def run_preference(run: Run, stage: Stage, out: Path) -> dict:
    from posttrain.stages import dpo, reward

    mod, cls = (dpo, dpo.DPOConfig) if stage.kind == "dpo" else (reward, reward.RewardConfig)
    if not stage.data:
        raise ConfigError(f"stage '{stage.name}': {stage.kind} needs data (preference rows)")
    files = run.data_files(stage.data, allow_empty=True)
    if not files:  # e.g. rejection sampling wrote no pairs
        warn(f"stage '{stage.name}': every data source ({stage.data}) is empty; no training"
             + (", the model goes on unchanged" if stage.kind == "dpo" else ", no reward model"))
        return {"model": run.model, "skipped": "no preference rows"} if stage.kind == "dpo" else \
            {"skipped": "no preference rows"}
    cfg = load_config(cls, None, _train_overrides(run, out, files) + _flatten("", stage.config))
    res = mod.train(cfg)
    outputs = {"eval": res.eval}
    if stage.kind == "dpo":
        outputs["model"] = _train_model_dir(res, cfg.model.lora)
    else:
        outputs["reward_model"] = str(res.model_dir)
    return outputs


HELD_OUT = 12  # the last prompts of each bundled prompt file are kept for win rates, never trained on


def _prompt_files(stage: Stage) -> tuple[list[str], int]:
    """(the stage's ``prompts`` files or the bundled red-team and helpfulness ones, how many of
    the last prompts of each file are held out)."""
    from posttrain.synth.constitutional import ASSETS

    files = stage.options.get("prompts") or [str(ASSETS / "red_team_prompts.jsonl"),
                                             str(ASSETS / "helpful_prompts.jsonl")]
    return files, int(stage.options.get("held_out", HELD_OUT))


def _prompt_split(stage: Stage, held_out: bool) -> list[tuple[str, str]]:
    """``(prompt, kind)`` of the red-team and helpfulness prompts (or the stage's ``prompts``
    files); the last ``held_out`` of each file are kept for evaluation and never trained on."""
    from posttrain.synth.constitutional import load_prompt_rows

    files, n_held = _prompt_files(stage)
    per_file = []
    for f in files:
        rows = load_prompt_rows(f)
        cut = max(len(rows) - n_held, 0)  # (held_out 0: all of them trained on, none held out)
        per_file.append(rows[cut:] if held_out else rows[:cut])
    limit = int(stage.config.get("n", 0))
    if not limit:
        return [r for rows in per_file for r in rows]
    # n prompts drawn from the files in turn (the first n of the first file would leave out the others)
    turns = [rows[i] for i in range(max(map(len, per_file), default=0)) for rows in per_file if i < len(rows)]
    return turns[:limit]


def run_cai(run: Run, stage: Stage, out: Path) -> dict:
    from posttrain.models import load_model
    from posttrain.synth.constitutional import CAIConfig, critique_and_revise_to, load_constitution

    cfg = CAIConfig(**{k: v for k, v in stage.config.items() if k != "n"})  # (keys checked at load)
    model, tok = load_model(run.model, with_tokenizer=True, inference=True)
    rows = _prompt_split(stage, held_out=False)
    if not rows:
        raise ConfigError(f"stage '{stage.name}': no training prompts (every prompt is held out)")
    prompts, kinds = map(list, zip(*rows))
    sft, pairs, n = critique_and_revise_to(out, model, tok, prompts,
                                           load_constitution(stage.options.get("constitution")), cfg, kinds=kinds)
    log(f"{stage.name}: {n['sft']} revised responses, {n['pairs']} (revision, original) pairs")
    return {"rows": str(sft), "rows_count": n["sft"], "pairs": str(pairs), "pairs_count": n["pairs"]}


def _aspect(kind: str) -> str:
    """What a prompt's responses are judged on: red-team prompts on harmlessness, others on helpfulness."""
    return "harmlessness" if kind == "harmful" else "helpfulness"


def _judge_path(run: Run, stage: Stage) -> str:
    """The stage's ``judge`` option, else the recipe's starting model (not the model being
    trained: it would judge its own samples)."""
    return str(stage.options.get("judge") or run.recipe.model)


def _load_judge(run: Run, stage: Stage, loaded: dict):
    """``(model, tokenizer)`` of :func:`_judge_path`; ``loaded``: models already in memory by path."""
    from posttrain.models import load_model

    path = _judge_path(run, stage)
    return loaded.get(path) or load_model(path, with_tokenizer=True, inference=True)


def run_judge(run: Run, stage: Stage, out: Path) -> dict:
    """Two sampled responses per prompt from the current model, judged by ``judge`` (default:
    the recipe's starting model) in both orders, red-team prompts on harmlessness and the others
    on helpfulness; writes preference pairs, soft-labelled unless ``soft_labels: false``."""
    from posttrain.models import load_model
    from posttrain.rollout import SamplingConfig, generate
    from posttrain.synth.journal import fingerprint, run_chunks
    from posttrain.synth.judge import QUESTIONS, judge_pairs, judged_preference_rows

    model, tok = load_model(run.model, with_tokenizer=True, inference=True)
    rows = _prompt_split(stage, held_out=False)
    sc = SamplingConfig(max_new_tokens=int(stage.config.get("max_new_tokens", 128)),
                        temperature=float(stage.config.get("temperature", 0.9)), batch_size=16)
    judge, judge_tok = _load_judge(run, stage, {str(run.model): (model, tok)})
    min_conf, chunk = float(stage.config.get("min_confidence", 0.0)), 16
    soft = bool(stage.config.get("soft_labels", True))

    def produce(c, lo, hi):  # two samples per prompt, judged in both orders (a chunk at a time, resumable)
        prompts = [p for p, _ in rows[lo:hi]]
        convs = [[{"role": "user", "content": p}] for p in prompts]
        first = generate(model, tok, convs, SamplingConfig(**{**sc.__dict__, "seed": 1 + 1_000 * c}))
        second = generate(model, tok, convs, SamplingConfig(**{**sc.__dict__, "seed": 2 + 1_000 * c}))
        pairs, js = [], []
        for aspect in ("harmlessness", "helpfulness"):
            idx = [i for i, (_, k) in enumerate(rows[lo:hi]) if _aspect(k) == aspect]
            if not idx:
                continue
            sel = [prompts[i] for i in idx], [first[i] for i in idx], [second[i] for i in idx]
            j = judge_pairs(judge, judge_tok, *sel, question=QUESTIONS[aspect])
            pairs += judged_preference_rows(*sel, j, min_conf, soft_labels=soft)
            js += j
        return {"pairs": pairs}, {"judged": len(js), "confidence": sum(j.confidence for j in js)}

    key = fingerprint("judge", sc.__dict__, rows, min_conf, soft, run.model, _judge_path(run, stage))
    counts, parts = run_chunks({"pairs": out / "pairs.jsonl"}, len(rows), chunk, key, produce, stage.name)
    judged = sum(p["judged"] for p in parts)
    log(f"{stage.name}: judged {judged} pairs, kept {counts['pairs']} (mean confidence "
        f"{sum(p['confidence'] for p in parts) / max(judged, 1):.3f})")
    return {"pairs": str(out / "pairs.jsonl"), "pairs_count": counts["pairs"]}


def run_win_rate(run: Run, stage: Stage, out: Path) -> dict:
    """Greedy responses of the current and the starting model on held-out prompts, judged in both
    orders by the starting model (or ``judge``): per prompt file, the win rate of the current
    model (share of prompts whose response the judge prefers) and the judge's mean probability.
    Red-team prompts (rows of ``kind: harmful``) are judged on harmlessness, the others on
    helpfulness (:data:`posttrain.synth.judge.QUESTIONS`); a file mixing both gets a win rate
    for each (``file:harmlessness``, ``file:helpfulness``)."""
    from posttrain.models import load_model
    from posttrain.rollout import SamplingConfig, generate
    from posttrain.synth.constitutional import load_prompt_rows
    from posttrain.synth.judge import QUESTIONS, judge_pairs, mean_preference, win_rate

    files, n_held = _prompt_files(stage)
    sc = SamplingConfig(max_new_tokens=int(stage.config.get("max_new_tokens", 128)), batch_size=16)
    new, tok = load_model(run.model, with_tokenizer=True, inference=True)
    base, base_tok = load_model(run.recipe.model, with_tokenizer=True, inference=True)
    judge, judge_tok = _load_judge(run, stage, {str(run.recipe.model): (base, base_tok)})
    result, mean_p, samples, judged_on = {}, {}, [], {}
    for f in files:
        rows = load_prompt_rows(f)[-n_held:]
        aspects = sorted({_aspect(k) for _, k in rows})
        for aspect in aspects:  # a file mixing kinds: a win rate for each
            prompts = [p for p, k in rows if _aspect(k) == aspect]
            name = Path(f).stem if len(aspects) == 1 else f"{Path(f).stem}:{aspect}"
            convs = [[{"role": "user", "content": p}] for p in prompts]
            after, before = generate(new, tok, convs, sc), generate(base, base_tok, convs, sc)
            js = judge_pairs(judge, judge_tok, prompts, after, before, question=QUESTIONS[aspect])
            result[name], mean_p[name], judged_on[name] = win_rate(js), mean_preference(js), aspect
            samples += [{"file": Path(f).stem, "judged_on": aspect, "prompt": p, "before": b, "after": a,
                         "p_after_better": j.p_first} for p, a, b, j in zip(prompts, after, before, js)]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    log(f"{stage.name}: win rate of the trained model over the starting one ({n_held} held-out prompts per file): "
        + ", ".join(f"{k} {v:.1%} ({judged_on[k]}; mean judge probability {mean_p[k]:.3f})"
                    for k, v in result.items()))
    return {"win_rate": result, "mean_preference": mean_p, "judged_on": judged_on, "held_out": n_held}


RUNNERS = {"eval": run_eval, "sft": run_sft, "rejection_sampling": run_rejection, "grpo": run_online_rl,
           "rloo": run_online_rl, "ppo": run_online_rl, "dpo": run_preference, "rm": run_preference,
           "cai": run_cai, "judge": run_judge, "win_rate": run_win_rate}


# --------------------------------------------------------------------------- the run


def run_recipe(recipe: Recipe) -> dict:
    """Run (or continue) every stage of ``recipe``; returns the summary written to ``summary.json``."""
    t0 = time.time()
    run = Run(recipe)
    (run.dir / "recipe.yaml").write_text(yaml.safe_dump(_recipe_dict(recipe), sort_keys=False))
    write_status(run.dir, "running")
    log(f"recipe '{recipe.name}': {len(recipe.stages)} stages on {recipe.model}, tasks {recipe.tasks}, "
        f"{len(run.train_questions)} cold-start / {len(run.fresh_questions)} fresh / {len(run.test_questions)} test "
        f"questions; run directory {run.dir}")
    timings, ran = {}, []
    for stage in recipe.stages:
        out = run.dir / stage.name
        done = out / DONE
        if done.is_file():
            record = json.loads(done.read_text())
            outputs = record["outputs"]
            timings[stage.name] = record.get("seconds")  # (the invocation that finished it)
            log(f"stage '{stage.name}' ({stage.kind}): already finished, skipped")
        else:
            console.rule(f"stage {stage.name} ({stage.kind})")
            out.mkdir(parents=True, exist_ok=True)
            (out / FINGERPRINT).write_text(json.dumps({"fingerprint": run.fingerprints[stage.name]}) + "\n")
            ts = time.time()
            outputs = RUNNERS[stage.kind](run, stage, out)
            timings[stage.name] = round(time.time() - ts, 1)
            ran.append(stage.name)
            atomic_write(done, json.dumps({"kind": stage.kind, "seconds": timings[stage.name], "model_in": run.model,
                                           "outputs": outputs}, indent=2))
        run.outputs[stage.name] = outputs
        if "model" in outputs:
            run.model = outputs["model"]
        if stage.kind == "eval":
            run.evals.append((stage.name, outputs["metrics"]))
    # seconds and ran: this invocation; stage_seconds: every stage, those finished by an earlier one
    # included (a stage resumed from a checkpoint counts the invocation that finished it)
    summary = {"recipe": recipe.name, "final_model": run.model, "seconds": round(time.time() - t0, 1),
               "ran": ran, "stage_seconds": timings, "evals": {name: m for name, m in run.evals}}
    if run.evals:
        summary["plot"] = str(plot_accuracy(run.evals, run.dir / "accuracy.png"))
        print_summary(run.evals)
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from posttrain.report import write_report

    report = write_report(run.dir)
    write_status(run.dir, "finished")
    log(f"recipe '{recipe.name}' done in {summary['seconds']:.0f} s; final model {run.model}"
        + (f"; plot {summary['plot']}" if run.evals else "") + f"; report {report}")
    return summary


#: what marks a directory as one a stage reads whole: a model, an adapter, a saved dataset
_READ_DIRS = ("config.json", "adapter_config.json", "dataset_dict.json", "dataset_info.json", "state.json")


def stage_fingerprint(previous: str, model: str, stage: Stage, run_dir: Path | None = None,
                      with_files: bool = True) -> str:
    """What made a stage's directory: the fingerprint before it (for the first stage, the digest
    of the run's task data), the recipe's starting model, and the stage's kind, data and config;
    and (``with_files``) the files outside the run directory that these name (a data file, a
    local model, a judge), by size and modification time, so that a resumed run does not reuse a
    stage made from an older version of one. A directory counts only when it is a model, an
    adapter or a saved dataset (a config string that happens to name a scratch directory does not)."""
    spec = {"previous": previous, "model": model, "kind": stage.kind, "data": stage.data,
            "config": stage.config, "options": stage.options}
    named = [model, *[p for p in stage.data.split("+") if not p.strip().startswith("@")],
             *_strings(stage.config), *_strings(stage.options)] if with_files else []
    files = {}
    for text in named:
        path = Path(text.strip()).expanduser() if 0 < len(text.strip()) < 4096 else None
        if path is None or not path.exists() or (run_dir and inside(path, run_dir)):
            continue
        if path.is_dir() and not any((path / marker).is_file() for marker in _READ_DIRS):
            continue
        files[text.strip()] = file_fingerprint(path)
    if files:  # (absent otherwise: the fingerprints of recipes that name no file stay as they were)
        spec["files"] = files
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _check_fingerprint(out: Path, fingerprint: str, name: str, legacy: str | None = None) -> None:
    """Refuse to reuse a stage directory made by another recipe or other task data. A finished
    stage from before fingerprints were recorded is reused with a warning, as is one whose
    fingerprint is ``legacy`` (recorded before the files a stage names were part of it)."""
    path = out / FINGERPRINT
    if path.is_file():
        made_nothing = all(p.name == FINGERPRINT for p in out.iterdir())  # it stopped before writing anything
        found = json.loads(path.read_text()).get("fingerprint")
        if legacy is not None and found == legacy != fingerprint and not made_nothing:
            warn(f"stage '{name}': made before posttrain recorded the files a stage names; reused as it is (the "
                 f"data files and models it names were not checked for changes)")
            return
        if found != fingerprint and not made_nothing:
            raise ConfigError(
                f"{out}: stage '{name}' in this run directory was made by a different recipe or task data "
                f"(its config, data or model, or an earlier stage's, changed since); nothing was reused or "
                f"deleted. Run into a new directory (output_dir=...) or move {out.parent} aside")
    elif (out / DONE).is_file():
        warn(f"stage '{name}': finished before posttrain recorded what made a stage; reused as it is "
             f"(it may come from another version of the recipe)")


def _recipe_dict(r: Recipe) -> dict:
    return {"name": r.name, "model": r.model, "output_dir": r.output_dir, "tasks": r.tasks, "n_train": r.n_train,
            "n_test": r.n_test, "seed": r.seed,
            "stages": [{"name": s.name, "kind": s.kind, "data": s.data, "config": s.config, **s.options}
                       for s in r.stages]}


def print_summary(evals: list[tuple[str, dict]]) -> None:
    from rich.table import Table

    tasks = [t for t in evals[0][1]]
    table = Table(title="held-out accuracy per stage (greedy; format compliance in brackets)")
    table.add_column("stage")
    for t in tasks:
        table.add_column(t)
    for name, m in evals:
        table.add_row(name, *[f"{m[t]['accuracy']:.1%} ({m[t]['format']:.0%})" if t in m else "-" for t in tasks])
    console.print(table)


def plot_accuracy(evals: list[tuple[str, dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(evals[0][1])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(evals), 3.5))
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        ax.bar([i + j * width for i in range(len(evals))], [m.get(t, {}).get("accuracy", 0) for _, m in evals],
               width, label=t)
    ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(evals))], [n for n, _ in evals])
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
