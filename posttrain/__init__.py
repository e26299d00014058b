"""posttrain: post-train a pretrained causal language model into an assistant."""

import os as _os

# Nothing is fetched from the Hugging Face hub at run time: models come from local
# directories, the local HF cache or the embedded default (see posttrain.models).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers' per-shard progress bars would interleave with ours.
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CPU matmul kernel caches capped (see posttrain.allocator.limit_kernel_caches); before torch runs any.
from posttrain.allocator import limit_kernel_caches as _limit_kernel_caches

_limit_kernel_caches()

__version__ = "0.1.0"
