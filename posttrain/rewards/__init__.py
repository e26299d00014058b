"""Rewards: rule-based functions, reward models, process reward models, and their weighted sum."""

from posttrain.rewards.combine import RewardError, RewardSet, resolve_reward
from posttrain.rewards.functions import (
    REWARD_FUNCTIONS,
    exact_answer,
    math_equal,
    tagged_answer,
    think_format,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "ProcessRewardModel",
    "RewardError",
    "RewardModel",
    "RewardSet",
    "exact_answer",
    "math_equal",
    "resolve_reward",
    "tagged_answer",
    "think_format",
]


def __getattr__(name):  # the model-backed scorers import transformers lazily
    if name == "RewardModel":
        from posttrain.rewards.reward_model import RewardModel

        return RewardModel
    if name == "ProcessRewardModel":
        from posttrain.rewards.process import ProcessRewardModel

        return ProcessRewardModel
    raise AttributeError(name)
