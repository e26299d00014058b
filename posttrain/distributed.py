"""Multi-process data parallelism: which share of the work this process does, and how
the shares are combined.

A stage launched by ``torchrun --nproc_per_node N`` or ``accelerate launch`` runs the same
loop in every process (rank). The rules, in one place:

* **Batch sizes are global.** ``batch_size`` is the micro-batch of the whole job; each
  rank takes a strided share of it (:func:`local_micro_batches`), so a recipe gives the
  same optimisation on 1 or N processes (same weights up to float rounding) and more
  processes make each step faster rather than changing it.
* **Losses are normalised by global counts** (tokens, pairs, weights of the whole
  optimizer step), so each rank's loss is its share of the step loss, and
* **gradients are summed over ranks once per optimizer step**
  (:func:`all_reduce_grads_`, called by :meth:`posttrain.engine.Trainable.step`): the
  result is exactly the gradient of one big batch, ranks may do different numbers of
  micro-batches (or none), and the models' own forward is used unwrapped (our log-prob
  path calls the decoder and the LM head separately, which a DDP wrapper would not see).
  This is the all-reduce DDP does, without its overlap of communication with backward.
* **Online RL** splits the *prompts* of a step across ranks (every rank samples whole
  groups), then gathers the rollout and rewards, so group statistics are always computed
  over whole groups and every rank holds the same advantages.
* Only rank 0 writes checkpoints, logs and metrics; every rank resumes from them.

On CPU the process group uses gloo, on CUDA NCCL (accelerate picks; :func:`init` asks it
for CPU when no GPU is present, which it otherwise would not do under ``torchrun``).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``), whether or not the group is up yet."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    """Start the process group when launched with several processes (idempotent)."""
    if launched_world_size() > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def shard(items: list[T], r: int | None = None, n: int | None = None) -> list[T]:
    """This rank's strided share of ``items`` (``items[rank::world]``)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    return items[r::n]


def local_micro_batches(micro: list[list[int]], r: int | None = None, n: int | None = None) -> list[list[int]]:
    """This rank's share of a step's micro-batches: each split across ranks, empty shares dropped."""
    return [s for s in (shard(idx, r, n) for idx in micro) if s]


def broadcast_(params: list[torch.Tensor]) -> None:
    """Overwrite ``params`` with rank 0's values (in place)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def all_reduce_grads_(params: list[torch.Tensor], bucket_elems: int = 32 * 1024 * 1024) -> None:
    """Sum the gradients of ``params`` over ranks, in place, in flat buckets of at most
    ``bucket_elems`` elements (a missing gradient counts as zeros)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in [*params, None]:
        if p is not None and (not bucket or (size + p.numel() <= bucket_elems and p.grad.dtype == bucket[0].dtype)):
            bucket.append(p.grad)
            size += p.numel()
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        off = 0
        for g in bucket:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()
        if p is not None:
            bucket, size = [p.grad], p.numel()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum of ``values`` over ranks (same keys on every rank)."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def global_means(stats: list[dict[str, torch.Tensor]], keys: tuple[str, ...]) -> dict[str, float]:
    """Means of per-example statistics (``keys`` of each dict, one value per example) over all
    micro-batches of all ranks (a rank may have none)."""
    sums = {k: float(sum(float(s[k].float().sum()) for s in stats)) for k in keys}
    sums["#n"] = float(sum(s[keys[0]].numel() for s in stats))
    total = all_sum(sums)
    return {k: total[k] / max(total["#n"], 1.0) for k in keys}


def unshard(parts: list[list[T]], n_items: int) -> list[T]:
    """Inverse of :func:`shard`: the items of every rank's share, back in their original order."""
    out: list[Any] = [None] * n_items
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()
