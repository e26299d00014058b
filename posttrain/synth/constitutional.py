"""Constitutional AI, supervised phase: response -> critique (a principle) -> revision.

For every prompt ``x`` (Bai et al. 2022, "Constitutional AI", §3):

1. the model answers: ``y``;
2. a principle is drawn from the constitution (seeded; among the principles that apply to the
   prompt's kind, ``harmful`` or ``helpful``); its critique request is appended as a user turn
   after ``y`` and the model critiques its own response;
3. the principle's revision request is appended and the model rewrites: ``y'``;
4. with ``revisions > 1`` steps 2–3 repeat on ``y'`` with a newly drawn principle.

Outputs: SFT rows ``(x, y')`` (SL-CAI; only where a revision was kept: an answer no revision
changed is not SL-CAI data) and preference rows ``(x, chosen = y', rejected = y)``, each
keeping the principle, critique and revision for inspection. Every step is a batched,
text-in text-out call of :func:`posttrain.rollout.generate`. The constitution is a YAML list
of ``{name, critique, revision}``; the default (seven principles) is
``posttrain/assets/constitution.yaml``.

As in the paper, worked examples of the whole exchange (prompt, response, critique request,
critique, revision request, revision; ``posttrain/assets/cai_examples.yaml``) are shown as earlier
turns of the same chat before every critique and revision request (``few_shot`` of them), so a
small model sees what is asked. Revisions that talk about the exercise instead of answering
(:func:`is_meta_revision`), and revisions cut off at ``max_new_tokens``, are not kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import ConfigError, read_yaml
from posttrain.rollout import SamplingConfig, generate

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_CONSTITUTION = ASSETS / "constitution.yaml"
DEFAULT_EXAMPLES = ASSETS / "cai_examples.yaml"


@dataclass
class Principle:
    name: str
    critique: str
    revision: str
    applies_to: tuple[str, ...] = ()  # prompt kinds ('harmful', 'helpful'); empty: every prompt


@dataclass
class Example:
    """One worked critique -> revision exchange, shown before the real requests."""
    prompt: str
    response: str
    principle: Principle
    critique: str
    revision: str


def _yaml_list(p: Path, what: str) -> list:
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    raw = read_yaml(p)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{p}: {what} is a non-empty YAML list")
    return raw


def _missing(item, keys) -> list[str]:
    return [k for k in keys if not (isinstance(item, dict) and item.get(k))]


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """Principles from a YAML list of ``{name, critique, revision}`` (the default when None)."""
    p = Path(path) if path else DEFAULT_CONSTITUTION
    out = []
    for i, item in enumerate(_yaml_list(p, "constitution")):
        if missing := _missing(item, ("name", "critique", "revision")):
            raise ConfigError(f"{p}: principle {i}: missing {', '.join(missing)}")
        kinds = item.get("applies_to") or []
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ConfigError(f"{p}: principle {i}: applies_to must be a list of prompt kinds")
        out.append(Principle(str(item["name"]), str(item["critique"]).strip(), str(item["revision"]).strip(),
                             tuple(kinds)))
    return out


def principles_for(constitution: list[Principle], kind: str) -> list[Principle]:
    """The principles that apply to a prompt of ``kind``: those without ``applies_to`` and those
    naming ``kind`` (every principle for no kind, or when none fits)."""
    fit = [c for c in constitution if not c.applies_to or kind in c.applies_to] if kind else constitution
    return fit or constitution


def load_examples(constitution: list[Principle], path: str | Path | None = None) -> list[Example]:
    """Worked examples from a YAML list of ``{prompt, response, principle, critique, revision}``
    (the bundled ones when None). An example whose principle is not in ``constitution`` is left out,
    so the bundled examples work with any constitution that shares their principles."""
    p = Path(path) if path else DEFAULT_EXAMPLES
    by_name = {c.name: c for c in constitution}
    out = []
    for i, item in enumerate(_yaml_list(p, "critique/revision examples")):
        if missing := _missing(item, ("prompt", "response", "principle", "critique", "revision")):
            raise ConfigError(f"{p}: example {i}: missing {', '.join(missing)}")
        if item["principle"] in by_name:
            out.append(Example(str(item["prompt"]).strip(), str(item["response"]).strip(), by_name[item["principle"]],
                               str(item["critique"]).strip(), str(item["revision"]).strip()))
    return out


def _revision_request(principle: Principle) -> str:
    return f"Revision request: {principle.revision} Reply with the rewritten response only."


def _shots(examples: list[Example]) -> list[dict[str, str]]:
    """The worked examples as earlier turns of the chat."""
    out = []
    for e in examples:
        out += [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response},
                {"role": "user", "content": f"Critique request: {e.principle.critique}"},
                {"role": "assistant", "content": e.critique},
                {"role": "user", "content": _revision_request(e.principle)},
                {"role": "assistant", "content": e.revision}]
    return out


def critique_messages(prompt: str, response: str, principle: Principle, examples: list[Example] = ()
                      ) -> list[dict[str, str]]:
    """The conversation that asks the model to critique its response under ``principle``
    (after the worked ``examples``)."""
    return _shots(list(examples)) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response},
        {"role": "user", "content": f"Critique request: {principle.critique}"}]


def revision_messages(prompt: str, response: str, principle: Principle, critique: str,
                      examples: list[Example] = ()) -> list[dict[str, str]]:
    """The conversation that asks for a revision after the critique."""
    return critique_messages(prompt, response, principle, examples) + [
        {"role": "assistant", "content": critique}, {"role": "user", "content": _revision_request(principle)}]


# A "revision" that talks about the exercise instead of answering the user ("The original
# response was ...", "This critique ...", "The response presents ..."). A 135M model writes
# these often (15 of 56 in the first full run), and SL-CAI trained on them taught the model to
# answer every prompt so.
META_RE = re.compile(r"\b(original|previous|revised|rewritten) response\b|\bcritique\b|\brevision request\b"
                     r"|^\W*(the|this) (assistant's )?(last )?response\b", re.IGNORECASE)


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
    few_shot: int = 2  # worked examples shown before each critique and revision request (0: none)
    examples: str = ""  # YAML of worked examples (default: the bundled ones)
    keep_unfinished: bool = False  # keep revisions cut off at max_new_tokens (unfinished answers)


def worked_examples(constitution: list[Principle], cfg: CAIConfig) -> list[Example]:
    """The ``cfg.few_shot`` worked examples shown before each request (none when 0)."""
    return load_examples(constitution, cfg.examples or None)[: cfg.few_shot] if cfg.few_shot > 0 else []


def critique_and_revise(model, tok, prompts: list[str], constitution: list[Principle], cfg: CAIConfig,
                        kinds: list[str] | None = None, shots: list[Example] | None = None
                        ) -> tuple[list[dict], list[dict]]:
    """(SFT rows, preference rows) for ``prompts`` of ``kinds`` (see module docstring); ``shots``:
    the worked examples, read as ``cfg`` says when None."""
    rng = random.Random(cfg.seed)
    kinds = kinds or [""] * len(prompts)
    shots = worked_examples(constitution, cfg) if shots is None else shots

    def gen(convs, seed, cut=None):
        return [t.strip() for t in generate(model, tok, convs, SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed),
            truncated=cut)]

    original = gen([[{"role": "user", "content": p}] for p in prompts], cfg.seed)
    current = list(original)
    trail: list[list[dict]] = [[] for _ in prompts]
    for r in range(cfg.revisions):
        principles = [rng.choice(principles_for(constitution, k)) for k in kinds]
        critiques = gen([critique_messages(p, y, c, shots) for p, y, c in zip(prompts, current, principles)],
                        cfg.seed + 2 * r + 1)
        cut: list[bool] = []
        revised = gen([revision_messages(p, y, c, k, shots)
                       for p, y, c, k in zip(prompts, current, principles, critiques)], cfg.seed + 2 * r + 2, cut)
        cut = cut or [False] * len(prompts)
        for i in range(len(prompts)):
            kept = bool(revised[i]) and not is_meta_revision(revised[i]) and (cfg.keep_unfinished or not cut[i])
            trail[i].append({"principle": principles[i].name, "critique": critiques[i], "revision": revised[i],
                             "kept": kept, "cut_at_max_new_tokens": cut[i]})
            # an empty revision, one about the exercise, or one cut off at max_new_tokens (an
            # unfinished answer) keeps the previous response
            if kept:
                current[i] = revised[i]
    sft, pref = [], []
    for p, y, y2, t in zip(prompts, original, current, trail):
        if not any(s["kept"] for s in t):  # no revision kept: y2 is the unrevised answer, not SL-CAI data
            continue
        sft.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": y2}],
                    "principles": [s["principle"] for s in t if s["kept"]]})
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


def critique_and_revise_to(out_dir: str | Path, model, tok, prompts: list[str], constitution: list[Principle],
                           cfg: CAIConfig, chunk: int = 16, kinds: list[str] | None = None
                           ) -> tuple[Path, Path, dict[str, int]]:
    """:func:`critique_and_revise` in chunks of ``chunk`` prompts appended to ``out_dir/sft.jsonl``
    and ``out_dir/pairs.jsonl`` with a progress marker: a killed run resumes where it stopped."""
    from dataclasses import asdict, replace

    from posttrain.synth.journal import fingerprint, run_chunks

    out = Path(out_dir)
    paths = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl"}

    kinds = kinds or [""] * len(prompts)
    shots = worked_examples(constitution, cfg)

    def produce(c, lo, hi):
        sft, pref = critique_and_revise(model, tok, prompts[lo:hi], constitution,
                                        replace(cfg, seed=cfg.seed + 1_000 * c), kinds[lo:hi], shots)
        return {"sft": sft, "pairs": pref}, {}

    key = fingerprint("cai", asdict(cfg), prompts, kinds, [asdict(p) for p in constitution],
                      [asdict(e) for e in shots], chunk, model.name_or_path)
    counts, _ = run_chunks(paths, len(prompts), chunk, key, produce, "critique and revision")
    return paths["sft"], paths["pairs"], counts
