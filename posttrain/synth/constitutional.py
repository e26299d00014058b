"""Constitutional AI, supervised phase: response -> critique (a principle) -> revision.

For every prompt ``x`` (Bai et al. 2022, "Constitutional AI", §3):

1. the model answers: ``y``;
2. a principle is drawn from the constitution (seeded); its critique request is appended as
   a user turn after ``y`` and the model critiques its own response;
3. the principle's revision request is appended and the model rewrites: ``y'``;
4. with ``revisions > 1`` steps 2–3 repeat on ``y'`` with a newly drawn principle.

Outputs: SFT rows ``(x, y')`` (SL-CAI) and preference rows ``(x, chosen = y', rejected = y)``,
each keeping the principle, critique and revision for inspection. Every step is a batched,
text-in text-out call of :func:`posttrain.rollout.generate`. The constitution is a YAML list
of ``{name, critique, revision}``; the default (seven principles) is
``posttrain/assets/constitution.yaml``.

Simplification: the paper prepends few-shot examples of critiques and revisions to help a
weak model follow the requests; we rely on the instruct model's chat format alone.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.config import ConfigError
from posttrain.rollout import SamplingConfig, generate

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_CONSTITUTION = ASSETS / "constitution.yaml"


@dataclass
class Principle:
    name: str
    critique: str
    revision: str


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """Principles from a YAML list of ``{name, critique, revision}`` (the default when None)."""
    p = Path(path) if path else DEFAULT_CONSTITUTION
    if not p.is_file():
        raise ConfigError(f"constitution not found: {p}")
    raw = yaml.safe_load(p.read_text())
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{p}: a constitution is a non-empty YAML list of principles")
    out = []
    for i, item in enumerate(raw):
        missing = [k for k in ("name", "critique", "revision") if not (isinstance(item, dict) and item.get(k))]
        if missing:
            raise ConfigError(f"{p}: principle {i}: missing {', '.join(missing)}")
        out.append(Principle(str(item["name"]), str(item["critique"]).strip(), str(item["revision"]).strip()))
    return out


def critique_messages(prompt: str, response: str, principle: Principle) -> list[dict[str, str]]:
    """The conversation that asks the model to critique its response under ``principle``."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
            {"role": "user", "content": f"Critique request: {principle.critique}"}]


def revision_messages(prompt: str, response: str, principle: Principle, critique: str) -> list[dict[str, str]]:
    """The conversation that asks for a revision after the critique."""
    return critique_messages(prompt, response, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": f"Revision request: {principle.revision} Reply with the rewritten response "
                                    "only."}]


# A "revision" that talks about the exercise instead of answering the user ("The original
# response was ...", "This critique ..."). A 135M model writes these often (15 of 56 in the
# first full run), and SL-CAI trained on them taught the model to answer every prompt so.
META_RE = re.compile(r"\b(original|previous|revised|rewritten) response\b|\bcritique\b|\brevision request\b", re.IGNORECASE)


def is_meta_revision(text: str) -> bool:
    """True when a revision refers to the critique/revision exercise itself."""
    return bool(META_RE.search(text))


@dataclass
class CAIConfig:
    revisions: int = 1
    max_new_tokens: int = 160
    temperature: float = 0.7
    batch_size: int = 16
    seed: int = 0


def critique_and_revise(model, tok, prompts: list[str], constitution: list[Principle], cfg: CAIConfig
                        ) -> tuple[list[dict], list[dict]]:
    """(SFT rows, preference rows) for ``prompts`` (see module docstring)."""
    rng = random.Random(cfg.seed)

    def gen(convs, seed):
        return [t.strip() for t in generate(model, tok, convs, SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed))]

    original = gen([[{"role": "user", "content": p}] for p in prompts], cfg.seed)
    current = list(original)
    trail: list[list[dict]] = [[] for _ in prompts]
    for r in range(cfg.revisions):
        principles = [rng.choice(constitution) for _ in prompts]
        critiques = gen([critique_messages(p, y, c) for p, y, c in zip(prompts, current, principles)],
                        cfg.seed + 2 * r + 1)
        revised = gen([revision_messages(p, y, c, k) for p, y, c, k in zip(prompts, current, principles, critiques)],
                      cfg.seed + 2 * r + 2)
        for i in range(len(prompts)):
            kept = bool(revised[i]) and not is_meta_revision(revised[i])
            trail[i].append({"principle": principles[i].name, "critique": critiques[i], "revision": revised[i],
                             "kept": kept})
            if kept:  # an empty revision, or one about the exercise, keeps the previous response
                current[i] = revised[i]
    sft, pref = [], []
    for p, y, y2, t in zip(prompts, original, current, trail):
        sft.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": y2}],
                    "principles": [s["principle"] for s in t]})
        if y2 != y and y and y2:
            pref.append({"prompt": p, "chosen": y2, "rejected": y, "trail": t})
    return sft, pref


def load_prompt_rows(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, kind)`` of each row of a JSONL prompt file (``kind``: harmful, helpful or '')."""
    from posttrain.data.formats import to_prompt_record
    from posttrain.data.loading import BadRows, iter_rows

    out = []
    for row in iter_rows(path, BadRows()):
        rec = to_prompt_record(row)
        out.append((rec.messages[-1]["content"], str(row.data.get("kind", ""))))
    return out


def load_prompt_texts(path: str | Path) -> list[str]:
    """The ``prompt`` strings of a JSONL file (red-team and helpfulness prompts)."""
    return [p for p, _ in load_prompt_rows(path)]


def critique_and_revise_to(out_dir: str | Path, model, tok, prompts: list[str], constitution: list[Principle],
                           cfg: CAIConfig, chunk: int = 16) -> tuple[Path, Path, dict[str, int]]:
    """:func:`critique_and_revise` in chunks of ``chunk`` prompts appended to ``out_dir/sft.jsonl``
    and ``out_dir/pairs.jsonl`` with a progress marker: a killed run resumes where it stopped."""
    from dataclasses import asdict, replace

    from posttrain.synth.journal import fingerprint, run_chunks

    out = Path(out_dir)
    paths = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl"}

    def produce(c, lo, hi):
        sft, pref = critique_and_revise(model, tok, prompts[lo:hi], constitution,
                                        replace(cfg, seed=cfg.seed + 1_000 * c))
        return {"sft": sft, "pairs": pref}, {}

    key = fingerprint("cai", asdict(cfg), prompts, [asdict(p) for p in constitution], chunk, model.name_or_path)
    counts, _ = run_chunks(paths, len(prompts), chunk, key, produce, "critique and revision")
    return paths["sft"], paths["pairs"], counts
