"""The main job (``make demo`` / ``posttrain demo``): the reasoning recipe on the embedded model.

Runs ``recipes/reasoning.yaml`` (baseline eval -> cold-start SFT on programmatic worked
solutions -> eval -> rejection sampling -> SFT on the kept samples -> eval -> GRPO with
correctness and format rewards -> final eval) on the embedded SmolLM2-135M-Instruct, then
prints held-out questions answered before and after, the accuracy table per stage, and the
plot's path.
``--quick`` runs the recipe's quick block (minutes, for smoke tests). A stopped demo
continues where it stopped when run again.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import BUNDLED_RECIPES
from posttrain.log import console
from posttrain.models import EMBEDDED_NAME

RECIPE = BUNDLED_RECIPES / "reasoning.yaml"  # package data: found from an installed wheel too


def run_demo(output_dir: str | None = None, quick: bool = False, model: str = EMBEDDED_NAME) -> dict:
    from posttrain.pipeline import load_recipe, run_recipe

    overrides = [f"model={model}"] + ([f"output_dir={output_dir}"] if output_dir else [])
    recipe = load_recipe(RECIPE, quick=quick, overrides=overrides)
    summary = run_recipe(recipe)
    evals = [s for s in recipe.stages if s.kind == "eval"]
    if len(evals) >= 2:
        show_before_after(Path(recipe.output_dir).expanduser(), evals[0].name, evals[-1].name)
    return summary


def show_before_after(run_dir: Path, first: str, last: str, n: int = 3) -> None:
    """A few held-out questions with the first and the last model's answers."""
    from posttrain.engine import read_jsonl

    before, after = (read_jsonl(run_dir / name / "samples.jsonl") for name in (first, last))
    for b, a in list(zip(before, after))[:n]:
        console.rule(f"{b['prompt']}  (answer {b['answer']})")
        console.print(f"[bold]{first}[/bold] " + ("✓" if b["correct"] else "✗"), highlight=False)
        console.print(b["response"].strip() or "(empty)", markup=False, highlight=False)
        console.print(f"[bold]{last}[/bold] " + ("✓" if a["correct"] else "✗"), highlight=False)
        console.print(a["response"].strip() or "(empty)", markup=False, highlight=False)
