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
  over whole groups and every rank holds the same advantages. Each rank samples its groups
  with its own seed, so sampled (not greedy) rollouts on N processes are other draws than
  on one, and the weights then differ as two seeds' do; from the same samples the update
  is the same.
* Only rank 0 writes checkpoints, logs and metrics; every rank resumes from them (each rank
  its own random state: ``rng_state_R.pt``, so dropout continues as it would have).

**FSDP** (``parallel=fsdp``, full fine-tuning): each decoder layer and the root model are
wrapped with PyTorch's ``fully_shard`` (FSDP2), so parameters, gradients and AdamW state are
split across ranks and gathered layer by layer for each forward and backward. FSDP's
collectives need every rank to run the same number of forward/backward passes, so under
FSDP: a rank's share of a micro-batch that is empty becomes one example with loss weight 0
(:func:`local_micro_batches`, :func:`even_chunks`); evaluation runs the whole eval set on
every rank (:func:`eval_shard`); and sampling runs inside :func:`full_params`, which gathers
the whole model once so generation (a different number of decoding steps per rank) needs
no collective. FSDP reduces gradients by their mean, so the loss is scaled by the world
size there too. Checkpoints gather the full state dict to rank 0 and stay plain HF
directories.

On CPU the process group uses gloo, on CUDA NCCL (accelerate picks; :func:`init` asks it
for CPU when no GPU is present, which it otherwise would not do under ``torchrun``).
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``), whether or not the group is up yet."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    """Start the process group when launched with several processes (idempotent), and have it
    destroyed at a normal exit (:func:`_destroy_at_exit`)."""
    if launched_world_size() > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    """Destroy the process group before the interpreter tears down. Left alive, gloo's worker
    threads can abort a finished process at exit (``terminate called without an active
    exception``, exit code -6: a 2-process GRPO test failed so once in a fresh-clone run, after its
    model was saved). After an unhandled error (``sys.last_value`` set) it is left alone:
    destroying a group while the other ranks wait in a collective can hang."""
    if torch.distributed.is_initialized() and getattr(sys, "last_value", None) is None:
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def shard(items: list[T], r: int | None = None, n: int | None = None) -> list[T]:
    """This rank's strided share of ``items`` (``items[rank::world]``)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    return items[r::n]


_MODE = {"fsdp": False}


def set_fsdp(on: bool) -> None:
    _MODE["fsdp"] = bool(on)


def fsdp() -> bool:
    """Whether the model of this process is sharded with FSDP (several processes only)."""
    return _MODE["fsdp"] and world_size() > 1


def local_micro_batches(micro: list[list[int]], r: int | None = None, n: int | None = None,
                        even: bool | None = None) -> list[tuple[list[int], float]]:
    """This rank's share of a step's micro-batches as ``(indices, loss weight)``: each split
    across ranks; an empty share is dropped, or under FSDP (``even``) replaced by one example
    with weight 0, so that every rank runs one pass per micro-batch."""
    even = fsdp() if even is None else even
    out = []
    for idx in micro:
        mine = shard(idx, r, n)
        if mine:
            out.append((mine, 1.0))
        elif even:
            out.append((idx[:1], 0.0))
    return out


def even_chunks(items: list[T], size: int) -> list[tuple[list[T], float]]:
    """This rank's share of ``items`` in chunks of ``size``, as ``(chunk, weight)``; under FSDP
    padded with weight-0 placeholder chunks to the largest share's number of chunks."""
    mine = shard(items)
    out = [(mine[i : i + size], 1.0) for i in range(0, len(mine), size)]
    if fsdp() and items:
        largest = -(-len(items) // world_size())
        n_chunks = -(-largest // size)
        out += [([items[0]], 0.0)] * (n_chunks - len(out))
    return out


def eval_shard(items: list[T]) -> list[T]:
    """What this rank evaluates: its share, or everything under FSDP (see module docstring)."""
    return list(items) if fsdp() else shard(items)


def eval_sum(values: dict[str, float]) -> dict[str, float]:
    """Totals of an evaluation split by :func:`eval_shard`."""
    return dict(values) if fsdp() else all_sum(values)


def fsdp_wrap(model) -> None:
    """Shard ``model`` in place with ``fully_shard``: each decoder layer (the classes the HF
    model lists in ``_no_split_modules``), then the root."""
    from torch.distributed.fsdp import fully_shard

    from posttrain.models import unwrap_peft

    base = unwrap_peft(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(base).__name__} does not list its decoder layers (_no_split_modules); "
                         "FSDP needs them to shard layer by layer: use parallel=ddp")
    for m in list(model.modules()):
        if type(m).__name__ in names:
            fully_shard(m)
    fully_shard(model)
    # our callers read hidden states out of the root's output and never modify it in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@contextmanager
def full_params(model):
    """Gather an FSDP model's full parameters for the duration (generation); no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)] if fsdp() else []
    # the root (the outermost) keeps its own setting: FSDP leaves it gathered after its forward,
    # which the training passes rely on (its head weight is applied to its output states);
    # set to reshard, its head's gradient stayed one rank's slice, never summed
    inner = mods[1:]
    for m in inner:
        m.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
        for m in inner:
            m.set_reshard_after_forward(True)


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
    if world_size() == 1 or not params:
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
