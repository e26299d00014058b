"""Several reward functions as one: a weighted sum with per-function values kept for metrics.

:class:`RewardSet` calls each function on the whole batch, checks what comes back (one
``float`` or ``None`` per completion), and sums ``weight * value`` over the functions that
scored a completion; a completion no function scored gets ``NaN`` ("no score", zero
advantage). A function that raises, or returns the wrong number or type of values, stops
the run with an error naming the function and the offending sample.

Functions are named in configs by :data:`posttrain.rewards.functions.REWARD_FUNCTIONS`
keys, or ``rm:PATH`` (an outcome reward model, :class:`posttrain.rewards.RewardModel`);
library users pass callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


class RewardError(RuntimeError):
    """A reward function failed; the message names the function and the sample."""


def reward_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def resolve_reward(spec: str | Callable, device: str | torch.device = "cpu") -> Callable:
    """A reward callable from a config name (see module docstring) or a callable; a reward model
    (``rm:PATH``) is loaded on ``device`` (the policy's)."""
    if callable(spec):
        return spec
    from posttrain.rewards.functions import REWARD_FUNCTIONS

    if spec.startswith("rm:"):
        from posttrain.rewards.reward_model import RewardModel

        return RewardModel(spec[3:], device=device)
    if spec not in REWARD_FUNCTIONS:
        from posttrain.config import ConfigError

        raise ConfigError(f"unknown reward {spec!r}: use one of {sorted(REWARD_FUNCTIONS)} or rm:PATH")
    return REWARD_FUNCTIONS[spec]


@dataclass
class RewardSet:
    functions: list[Callable]
    weights: list[float]

    @staticmethod
    def check(specs: list, weights: list[float] | None = None) -> None:
        """The errors :meth:`build` would raise, without loading any reward model (a run says
        them before it loads its own model)."""
        from posttrain.config import ConfigError
        from posttrain.models import resolve_model_path
        from posttrain.rewards.functions import REWARD_FUNCTIONS

        for spec in specs:
            if isinstance(spec, str) and spec.startswith("rm:"):
                resolve_model_path(spec[3:])
            elif isinstance(spec, str) and spec not in REWARD_FUNCTIONS:
                raise ConfigError(f"unknown reward {spec!r}: use one of {sorted(REWARD_FUNCTIONS)} or rm:PATH")
        weights = list(weights) if weights else [1.0] * len(specs)
        if len(weights) != len(specs):
            raise ConfigError(f"reward_weights: {len(weights)} weights for {len(specs)} reward functions")
        bad = [w for w in weights if not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise ConfigError(f"reward_weights: {bad[0]!r} is not a finite number")

    @classmethod
    def build(cls, specs: list, weights: list[float] | None = None, device: str | torch.device = "cpu") -> RewardSet:
        cls.check(specs, weights)
        fns = [resolve_reward(s, device) for s in specs]
        weights = list(weights) if weights else [1.0] * len(fns)
        names = [reward_name(f) for f in fns]
        for i, f in enumerate(fns):  # two reward models both named after a "model" directory: told apart
            if names.count(names[i]) > 1 and hasattr(f, "path"):
                f.__name__ = f"reward_model({f.path})"
        return cls(fns, weights)

    def __call__(self, prompts: list, completions: list[str], fields: dict[str, list]
                 ) -> tuple[torch.Tensor, dict[str, list[float | None]]]:
        """(total ``(N,)`` with NaN for unscored, per-function values by name)."""
        per_fn: dict[str, list[float | None]] = {}
        total = [0.0] * len(completions)
        scored = [False] * len(completions)
        for fn, w in zip(self.functions, self.weights):
            name = reward_name(fn)
            try:
                values = fn(prompts, completions, **fields)
                if isinstance(values, (str, bytes)):
                    raise TypeError(f"returned {type(values).__name__} {values[:20]!r}, not a list of floats")
                values = list(values)
            except Exception as e:
                raise RewardError(f"reward function '{name}' raised {type(e).__name__}: {e} (batch of "
                                  f"{len(completions)}; first completion: {completions[0][:80]!r})") from e
            if len(values) != len(completions):
                raise RewardError(f"reward function '{name}' returned {len(values)} values for "
                                  f"{len(completions)} completions")
            for i, v in enumerate(values):
                if v is None:
                    continue
                if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # a numpy or torch scalar
                    v = values[i] = v.item()
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                    raise RewardError(f"reward function '{name}' returned {v!r} for sample {i} (prompt "
                                      f"{str(prompts[i])[:60]!r}); expected a float or None")
                total[i] += w * float(v)
                scored[i] = True
            per_fn[name] = values
        out = torch.tensor([t if s else float("nan") for t, s in zip(total, scored)], dtype=torch.float32)
        return out, per_fn
