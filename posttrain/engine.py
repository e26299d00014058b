"""Shared plumbing of every training stage (not an algorithm, nothing a stage inherits).

* :func:`setup_run`: the run directory with the resolved ``config.yaml`` and ``manifest.json``.
* :class:`Trainable`: the accelerate ``Accelerator``, model, AdamW and LR schedule.
* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`latest_checkpoint`: a
  checkpoint is a directory ``checkpoints/step-N`` holding the model as a plain HF
  directory (a peft adapter under LoRA), the optimizer and scheduler states, the RNG
  states of python/numpy/torch, and ``trainer_state.json`` (step, data position,
  config). It is written under a temporary name and renamed into place, so a directory
  named ``step-N`` is always complete; the last ``keep_last`` are kept.
* :class:`Metrics`: ``metrics.jsonl`` (one JSON object per logged step, namespaced keys
  such as ``loss/train``, ``perf/tokens_per_s``) mirrored to TensorBoard.
* :func:`progress`: a rich progress bar with rate and ETA.
* :class:`TrainConfig`: the optimisation, schedule, eval and checkpoint keys every
  training stage shares (each stage's config adds its own); :class:`EpochBatches`, the
  resumable data order; :func:`open_training` / :func:`resume`: the setup lines every
  stage's loop starts with.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from posttrain import allocator, distributed, faults
from posttrain.config import ConfigError, check_bounds, doc
from posttrain.data.dataset import DataConfig
from posttrain.fileio import atomic_write, replace_tree
from posttrain.log import is_main_process, log, warn
from posttrain.models import ModelConfig, lora_shape, unwrap_peft

CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------- seeds and RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- run directory


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "missing"
    from posttrain import __version__

    out["posttrain"] = __version__
    return out


def file_fingerprint(path: str | Path) -> str:
    """Cheap fingerprint of a data file or directory: size and mtime of its files."""
    p = Path(path)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    parts = [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.is_file()]
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def check_run_dir(out: Path, stage: str, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run where it would take another run's results: a directory holding a
    run of another stage, or (unless ``resume`` or ``overwrite``) a run of this one. A fresh
    start would replace the finished model, and its old checkpoints would be what a later
    ``resume`` continues from."""
    held = [f"{d}/" for d in ("model", "model-merged") if (out / d).is_dir()]
    held += [f"{CHECKPOINT_DIR}/{c.name}" for c in checkpoints(out)]
    if not held:
        return
    try:
        previous = json.loads((out / "manifest.json").read_text()).get("stage")
    except (OSError, ValueError):
        previous = None
    what = f"{out} holds {'a ' + previous + ' run' if previous else 'results of another run'} ({', '.join(held)})"
    if previous != stage:
        raise ConfigError(f"output_dir: {what}; a {stage} run needs a directory of its own")
    if not resume and not overwrite:
        raise ConfigError(f"output_dir: {what}: pass resume=true to continue it, overwrite=true to start over "
                          "(its checkpoints, models and metrics are deleted), or choose another output_dir")


def inside(path: str | Path, directory: Path) -> bool:
    """Whether the local path ``path`` lies inside ``directory``."""
    try:
        return bool(str(path)) and Path(path).expanduser().resolve().is_relative_to(Path(directory).resolve())
    except (OSError, ValueError):
        return False


def setup_run(output_dir: str | Path, stage: str, cfg: Any, inputs: list[str] | None = None,
              check_inputs: bool = True) -> Path:
    """Create ``output_dir`` (``~`` expanded) with ``config.yaml`` and ``manifest.json``; returns
    it (see :func:`check_run_dir` for the directories it refuses). With ``check_inputs`` a
    missing input file is an error before anything is written."""
    distributed.init()
    allocator.keep_freed_memory()
    if not str(output_dir).strip():
        raise ConfigError("output_dir: empty (give the run a directory of its own)")
    out = Path(output_dir).expanduser()
    missing = [p for p in inputs or [] if check_inputs and not Path(p).expanduser().exists()]
    if missing:
        raise ConfigError(f"data file not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                  if len(missing) > 1 else ""))
    resume, overwrite = getattr(cfg, "resume", False), getattr(cfg, "overwrite", False)
    check_run_dir(out, stage, resume, overwrite)
    distributed.barrier()  # every rank has looked before rank 0 deletes anything
    if is_main_process():
        if overwrite and not resume:  # the old run's results, so that none outlives it
            # (its models are kept when the new run starts from one of them: model/ is then
            # replaced whole when the new one is saved)
            start = getattr(getattr(cfg, "model", None), "name_or_path", "")
            models = () if inside(start, out) else ("model", "model-merged", "adapter")
            for d in (CHECKPOINT_DIR, "cache", "tensorboard", *models):
                shutil.rmtree(out / d, ignore_errors=True)  # (cache: a stage's cached features)
            for f in ("metrics.jsonl", "samples.jsonl"):
                (out / f).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        manifest = {
            "stage": stage,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
            "inputs": {p: file_fingerprint(Path(p).expanduser()) for p in (inputs or [])
                       if Path(p).expanduser().exists()},
            "seed": getattr(cfg, "seed", None),
            "versions": _versions(),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                     "world_size": distributed.world_size()},
        }
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=2))
        write_status(out, "running")
    distributed.barrier()
    return out


STATUS_FILE = "status.json"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and why."""


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch; Linux ``/proc``), None where unknown:
    with the pid it tells a run's process from a later one that reuses its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return round(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def write_status(run_dir: Path, state: str) -> None:
    """``status.json``: ``running`` (with this process's pid, its start time and the host) or
    ``finished``; a run whose status says running but whose process is gone was killed (see
    ``posttrain runs``)."""
    status = {"state": state, "pid": os.getpid(), "pid_started": process_start_time(os.getpid()),
              "host": platform.node(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(Path(run_dir) / STATUS_FILE, json.dumps(status))


def finish_run(run_dir: Path, metrics: Metrics) -> None:
    """End of a stage, after its outputs are saved: close the metrics, mark the run finished."""
    metrics.close()
    if is_main_process():
        write_status(run_dir, "finished")


# --------------------------------------------------------------------------- shared training config


@dataclass
class TrainConfig:
    """Keys shared by every training stage (a stage's config adds its own and may change defaults)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = doc("Run directory (config, metrics, checkpoints, final model).", "runs/train")
    seed: int = doc("Seed for data order, dropout and initialisation.", 0)
    epochs: float = doc("Passes over the training data (ignored when max_steps > 0).", 1.0)
    max_steps: int = doc("Optimizer steps to run (0 = from epochs).", 0)
    batch_size: int = doc("Examples (or pairs) per micro-batch.", 8)
    grad_accum: int = doc("Micro-batches per optimizer step.", 1)
    lr: float = doc("Peak learning rate (LoRA usually wants ~10x the full fine-tuning rate).", 2e-5)
    weight_decay: float = doc("AdamW weight decay (not applied to norms and biases).", 0.0)
    adam_beta1: float = doc("AdamW beta1.", 0.9)
    adam_beta2: float = doc("AdamW beta2.", 0.999)
    schedule: str = doc("LR schedule after warmup: cosine, linear, constant_with_warmup, constant.", "cosine")
    warmup_ratio: float = doc("Share of steps with linear LR warmup (rounded up, as HF's get_warmup_steps).", 0.03)
    max_grad_norm: float = doc("Gradient clipping norm (0 = off).", 1.0)
    eval_every: int = doc("Evaluate on held-out data every N steps (0 = at the end only).", 0)
    eval_batch_size: int = doc("Examples per eval batch.", 16)
    save_every: int = doc("Write a resumable checkpoint every N steps (0 = only at the end).", 0)
    keep_last: int = doc("Checkpoints to keep (older ones are deleted; 0 = keep all).", 2)
    resume: bool = doc("Continue from the last complete checkpoint in output_dir.", False)
    overwrite: bool = doc("Start over in an output_dir that holds a run of this stage (without it that is an "
                          "error): its checkpoints, models, metrics and caches are deleted first.", False)
    merge_lora: bool = doc("Under LoRA, also save the adapter merged into the base as model-merged/.", False)
    log_every: int = doc("Log metrics every N steps (each value the mean over those steps; lr as it stands).", 1)
    tensorboard: bool = doc("Also write TensorBoard event files.", True)
    parallel: str = doc("Under several processes (torchrun / accelerate launch): ddp (each rank holds the model, "
                        "gradients summed) or fsdp (parameters, gradients and optimizer state sharded; full "
                        "fine-tuning).", "ddp")

    def validate(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant_with_warmup", "constant"):
            raise ConfigError(f"schedule: {self.schedule!r} is not cosine, linear, constant_with_warmup, constant")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be at least 1")
        check_bounds(self, max_steps=">= 0", epochs=">= 0", lr=">= 0", weight_decay=">= 0", adam_beta1="in [0, 1)",
                     adam_beta2="in [0, 1)", warmup_ratio="in [0, 1]", max_grad_norm=">= 0", eval_every=">= 0",
                     eval_batch_size=">= 1", save_every=">= 0", keep_last=">= 0", log_every=">= 1")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel: {self.parallel!r} is not ddp or fsdp")

    def total_steps(self, batches_per_epoch: int) -> int:
        return self.max_steps or max(1, math.ceil(batches_per_epoch * self.epochs / self.grad_accum))


class EpochBatches:
    """Micro-batch ``m`` of the run as example indices; a pure function of (seed, m).

    Batch ``m`` is batch ``m % per_epoch`` of epoch ``m // per_epoch``, each epoch a seeded
    length-grouped shuffle, so a resumed run needs only the step number to continue.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, epochs: float | None = None):
        self.lengths = lengths
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = math.ceil(len(lengths) / batch_size)
        # a run planned in epochs ends with its last micro-batch: its last optimizer step is short
        # when the micro-batches do not fill grad_accum evenly (as in HF's Trainer), instead of
        # taking batches of a further epoch (rows trained once more than the rest)
        self.limit = math.ceil(self.per_epoch * epochs) if epochs else None
        self._cache: dict[int, list[list[int]]] = {}

    @classmethod
    def for_config(cls, lengths: list[int], cfg: TrainConfig) -> EpochBatches:
        """The batches of a stage run by ``cfg``: bounded by its epochs unless it counts max_steps."""
        return cls(lengths, cfg.batch_size, cfg.seed, None if cfg.max_steps else cfg.epochs)

    def __getitem__(self, m: int) -> list[int]:
        from posttrain.data.tokenize import length_grouped_batches

        epoch, i = divmod(m, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: length_grouped_batches(self.lengths, self.batch_size, self.seed + epoch)}
        return self._cache[epoch][i]

    def for_step(self, step: int, grad_accum: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step`` (1-based)."""
        first = (step - 1) * grad_accum
        end = first + grad_accum if self.limit is None else min(first + grad_accum, self.limit)
        return [self[m] for m in range(first, end)]


# --------------------------------------------------------------------------- model + optimizer


class Trainable:
    """Accelerator, model, optimizer and LR schedule of one training stage.

    Several processes: with ``parallel="ddp"`` every rank holds the whole model and
    :meth:`step` sums the gradients over ranks; with ``parallel="fsdp"`` the model is sharded
    with FSDP2 (:func:`posttrain.distributed.fsdp_wrap`) before the optimizer is built, so
    the optimizer state is sharded too.
    """

    def __init__(self, model, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
                 total_steps: int, schedule: str, mixed_precision: str = "no",
                 extra: dict[str, torch.nn.Module] | None = None, parallel: str = "ddp"):
        from accelerate import Accelerator
        from transformers import get_scheduler

        distributed.init()
        self.total_steps = total_steps
        self.plan: dict[str, Any] = {}  # what fixes the data order (open_training fills it; checkpoints record it)
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
        self.world_size = distributed.world_size()
        self.device = self.accelerator.device
        self.fsdp = parallel == "fsdp" and self.world_size > 1
        distributed.set_fsdp(self.fsdp)
        # extra modules trained alongside the model (a PPO value head), checkpointed with it
        self.extra = dict(extra or {})
        for m in self.extra.values():
            m.to(self.device)
        extra_params = [p for m in self.extra.values() for p in m.parameters() if p.requires_grad]
        distributed.broadcast_([p for p in model.parameters() if p.requires_grad] + extra_params)
        if self.fsdp:
            if getattr(model, "peft_config", None):
                raise ConfigError("parallel=fsdp is for full fine-tuning; with LoRA use parallel=ddp (the adapter is "
                                  "small, and the frozen base is not trained)")
            model.to(self.device)
            distributed.fsdp_wrap(model)
            self.model = model
        else:
            # device placement and mixed precision only: no DDP wrapper, the gradients are
            # summed across ranks once per optimizer step in :meth:`step`
            self.model = self.accelerator.prepare_model(model, evaluation_mode=True)
        if not self.fsdp:
            sparse_tied_embedding_grad(self.model)
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]
        self.extra_params = extra_params
        params = self.model_params + extra_params
        if not params:
            raise ValueError("the model has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
        # fused AdamW: one kernel over all tensors. On the 2-core CPU its step over SmolLM2's
        # 134.5M parameters took 0.048 s against 0.212 s for the default per-tensor loop
        # (benchmarks/precision_probe.py). Not under FSDP (sharded DTensor parameters take the default path).
        fused = not self.fsdp and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=betas, fused=fused or None,
        )
        self.scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps,
                                       num_training_steps=total_steps)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.params = params

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the step loss (normalised by *global* counts);
        FSDP averages gradients over ranks, so its loss is scaled back to a sum."""
        self.accelerator.backward(loss * self.world_size if self.fsdp else loss)

    def step(self, max_grad_norm: float) -> float:
        """Sum gradients over ranks, clip, step optimizer and schedule, zero grads; returns
        the pre-clip grad norm."""
        faults.point("step")
        distributed.all_reduce_grads_(self.extra_params if self.fsdp else self.params)
        if self.fsdp and self.world_size > 1:  # their loss was scaled up for FSDP's mean: a sum of those
            for p in self.extra_params:        # is world_size times the step's gradient
                if p.grad is not None:
                    p.grad.div_(self.world_size)
        norm = _clip_grad_norm([self.model_params, self.extra_params], max_grad_norm)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"optimizer step {self.scheduler.last_epoch + 1}: the gradient norm is {norm} (the loss is not a "
                "finite number); the weights were not updated, and the last checkpoint, if any, is the last good "
                "state. Usual causes: a learning rate too high, or a non-finite value in the data")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_owner(self) -> torch.nn.Module:
        """The module holding every parameter the optimizer steps (the model, and the extra
        modules beside it): what torch's distributed optimizer state dict is read against."""
        if not self.extra:
            return self.model
        return torch.nn.ModuleDict({"model": self.model, **self.extra})

    def skip_schedule(self, n: int) -> None:
        """Advance the learning-rate schedule by ``n`` optimizer steps that were planned but not
        taken (online RL's dynamic sampling, when a step found fewer groups than its batch), so
        that the schedule still ends where it was planned to."""
        import warnings

        with warnings.catch_warnings():  # (torch warns when the optimizer has not stepped yet)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(n):
                self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the whole model's state dict on rank 0 (a collective: every rank calls
        it); None otherwise (the model's own ``state_dict`` is complete)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sparse_tied_embedding_grad(model) -> bool:
    """Make the input embedding's gradient sparse when it is tied to the LM head; True if done.

    A dense embedding backward zero-fills a ``(vocab, hidden)`` matrix and adds the rows of the
    step's tokens into it; with tied weights that matrix is then added to the head's (dense)
    gradient. Sparse, only the step's rows are added, in place into the head's gradient: the
    same sum, without the fill and the second (vocab, hidden) pass (the fill alone was 0.175 s
    of a 4.7 s SFT step of SmolLM2 on 2 cores in benchmarks/profile_step.py). Only when tied
    and trained: an untied embedding would be left with a sparse gradient, which AdamW does
    not take.
    """
    base = unwrap_peft(model)
    if not hasattr(base, "get_input_embeddings"):  # a bare head (frozen-backbone reward model)
        return False
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if (isinstance(emb, torch.nn.Embedding) and isinstance(head, torch.nn.Linear) and emb.weight is head.weight
            and emb.weight.requires_grad):
        emb.sparse = True
        return True
    return False


def _clip_grad_norm(groups: list[list[torch.Tensor]], max_norm: float) -> float:
    """Global L2 norm of the gradients of ``groups`` (FSDP-sharded or plain), clipped to
    ``max_norm`` when it is > 0; returns the norm before clipping."""
    grads = [[p.grad for p in g if p.grad is not None] for g in groups]
    norms = []
    for g in grads:
        if g:
            n = torch.nn.utils.get_total_norm(g)
            norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if not norms:
        return 0.0
    total = float(torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms])))
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            for t in g:
                t.mul_(coef)
    return total


def open_training(cfg: TrainConfig, model, total_steps: int, extra: dict | None = None) -> Trainable:
    """AdamW + warmup/decay schedule for ``model`` (and ``extra`` modules) as ``cfg`` says."""
    t = Trainable(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                  warmup_steps=math.ceil(cfg.warmup_ratio * total_steps), total_steps=total_steps,
                  schedule=cfg.schedule, extra=extra, parallel=cfg.parallel)
    t.plan = {k: getattr(cfg, k) for k in ("batch_size", "grad_accum", "seed") if hasattr(cfg, k)}
    return t


def resume(cfg: TrainConfig, run_dir: Path, trainable: Trainable) -> tuple[int, Metrics]:
    """(step to continue after, metrics log): restores the last complete checkpoint when
    ``cfg.resume`` and drops logged records past it (the resumed run rewrites them)."""
    start = 0
    if cfg.resume and is_main_process():
        recover_checkpoints(run_dir)
    distributed.barrier()
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        changed = {k: (v, trainable.plan.get(k)) for k, v in (saved.get("plan") or {}).items()
                   if k in trainable.plan and trainable.plan[k] != v}
        if changed:  # the data position of the checkpoint is that of its own batches
            raise ConfigError(f"{ckpt} was written with " + ", ".join(f"{k}={a}" for k, (a, _) in changed.items())
                              + "; this run has " + ", ".join(f"{k}={b}" for k, (_, b) in changed.items())
                              + ": resume with the run's own settings (its config.yaml) or start over (overwrite=true)")
        if saved["step"] > trainable.total_steps:
            raise ConfigError(f"{ckpt} is at step {saved['step']}, past this run's {trainable.total_steps} steps: resume "
                              "with at least as many steps (max_steps / epochs), or start over (overwrite=true)")
        start = load_checkpoint(ckpt, trainable)["step"]
        log(f"resumed from {ckpt} (step {start})")
    elif cfg.resume:
        log("resume: no complete checkpoint found, starting from step 0")
    metrics = Metrics(run_dir, cfg.tensorboard)
    metrics.truncate_after(start, drop_eval_at_end=start > 0 and start == trainable.total_steps)
    return start, metrics


# --------------------------------------------------------------------------- checkpoints


def clear_leftovers(parent: Path, name: str) -> None:
    """Delete the ``.tmp-NAME-*`` and ``.old-NAME-*`` directories a killed :func:`posttrain.fileio.replace_tree`
    write left in ``parent``."""
    for kind in (".tmp", ".old"):
        for stale in parent.glob(f"{kind}-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def save_model_dir(model, tokenizer, out: Path, merge_lora: bool = False,
                   state_dict: dict[str, torch.Tensor] | None = None, atomic: bool = True,
                   extra: Callable[[Path], None] | None = None) -> None:
    """Save a plain HF directory (safetensors + tokenizer); a peft adapter under LoRA.

    With ``merge_lora`` a LoRA model is saved merged into its base weights instead;
    ``state_dict`` (an FSDP model's gathered weights, :meth:`Trainable.full_state`) replaces
    the model's own. ``atomic``: written beside ``out`` and moved in whole (:func:`posttrain.fileio.replace_tree`),
    so a model saved over another leaves none of its files (an old adapter beside new full
    weights loaded as the adapter). ``extra(dir)`` writes further files (a reward model's
    metadata and head) into the directory before it is moved in.
    """
    final, out = out, out.with_name(f".tmp-{out.name}-{os.getpid()}") if atomic else out
    if atomic:
        clear_leftovers(final.parent, final.name)
    out.mkdir(parents=True, exist_ok=True)
    if merge_lora and hasattr(model, "merge_and_unload"):
        from posttrain.models import merged_for_export

        model = merged_for_export(model)
    if state_dict is not None:
        if getattr(model.config, "tie_word_embeddings", False):  # stored once, as the embeddings
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    else:
        model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if extra is not None:
        extra(out)
    if atomic:
        replace_tree(out, final)


def save_final(run_dir: Path, trainable: Trainable, tokenizer, cfg: TrainConfig, stage: str, step: int) -> Path:
    """End of a policy stage: the last checkpoint, ``model/`` (a peft adapter under LoRA) and,
    with LoRA and ``merge_lora``, ``model-merged/``; returns the ``model/`` path."""
    save_checkpoint(run_dir, trainable, tokenizer, {"step": step, "stage": stage}, cfg.keep_last)
    model_dir = Path(run_dir) / "model"
    state = trainable.full_state()
    if trainable.accelerator.is_main_process:
        save_model_dir(trainable.unwrapped(), tokenizer, model_dir, state_dict=state)
        if cfg.model.lora and cfg.merge_lora:
            save_model_dir(trainable.unwrapped(), tokenizer, Path(run_dir) / "model-merged", merge_lora=True)
    return model_dir


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit() and (d / "trainer_state.json").is_file():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[5:]))


def recover_checkpoints(run_dir: Path) -> None:
    """A checkpoint written again was renamed aside (``.old-step-N-PID``) before the new one took
    its name: killed between the two renames, the old complete one is put back."""
    root = Path(run_dir) / CHECKPOINT_DIR
    for old in sorted(root.glob(".old-step-*")) if root.is_dir() else []:
        step = old.name[len(".old-step-"):].split("-")[0]
        final = root / f"step-{step}"
        if step.isdigit() and not final.exists() and (old / "trainer_state.json").is_file():
            os.replace(old, final)
            log(f"recovered {final} (a write of it was killed)")


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, trainable: Trainable, tokenizer, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically and prune old ones; returns its path."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}-{os.getpid()}"
    model_state, optim_state = trainable.full_state(), None
    rngs = distributed.gather_objects(rng_state())  # each rank's own (its dropout masks), rank order
    if trainable.fsdp:  # gather the sharded optimizer state to rank 0 (a collective)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(trainable.optimizer_owner(), trainable.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable.accelerator.is_main_process:
        clear_leftovers(root, "step")  # (every step's: .tmp-step-N-PID, .old-step-N-PID)
        try:
            save_model_dir(trainable.unwrapped(), tokenizer, tmp, state_dict=model_state, atomic=False)
            faults.point("checkpoint")
            torch.save(optim_state if trainable.fsdp else trainable.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainable.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs[0], tmp / "rng_state.pt")
            for r, rank_rng in enumerate(rngs[1:], start=1):
                torch.save(rank_rng, tmp / f"rng_state_{r}.pt")
            if trainable.extra:
                torch.save({k: m.state_dict() for k, m in trainable.extra.items()}, tmp / "extra_modules.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "plan": trainable.plan}, indent=2))
            replace_tree(tmp, final)  # (a resumed run writes its last step again)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                f"could not write checkpoint {final} ({e.strerror or e}); the last complete checkpoint is "
                f"{latest_checkpoint(run_dir) or 'none'}"
            ) from e
        for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            (old / "trainer_state.json").unlink(missing_ok=True)  # no longer complete, then gone
            shutil.rmtree(old, ignore_errors=True)
    trainable.accelerator.wait_for_everyone()
    return final


def load_checkpoint(ckpt: Path, trainable: Trainable) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; returns its trainer state."""
    model = trainable.unwrapped()
    if (ckpt / "adapter_config.json").is_file() != bool(getattr(model, "peft_config", None)):
        written, now = ("LoRA", "full fine-tuning") if (ckpt / "adapter_config.json").is_file() else \
            ("full fine-tuning", "LoRA")
        raise ConfigError(f"{ckpt} was written by {written}, and this run is set up for {now}: resume with the "
                          "run's own settings (its config.yaml), or start over (overwrite=true)")
    if (ckpt / "adapter_config.json").is_file():
        was = lora_shape(json.loads((ckpt / "adapter_config.json").read_text()))
        now_set = lora_shape(model.peft_config["default"])
        if was != now_set:
            raise ConfigError(f"{ckpt} holds a LoRA adapter of r={was[0]}, alpha={was[1]}, targets {was[2]}, and this "
                              f"run is set up for r={now_set[0]}, alpha={now_set[1]}, targets {now_set[2]}: resume with "
                              "the run's own settings (its config.yaml), or start over (overwrite=true)")
    if trainable.fsdp:  # every rank reads the full state and keeps its shards
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            state.update(load_file(str(f)))
        if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state, options=opts)
        set_optimizer_state_dict(trainable.optimizer_owner(), trainable.optimizer,
                                 torch.load(ckpt / "optimizer.pt", weights_only=False), options=opts)
    elif (ckpt / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    else:
        from safetensors.torch import load_file

        state = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = getattr(model.config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
        if missing or unexpected:
            raise ConfigError(f"checkpoint {ckpt} does not match the model: missing={missing[:5]} "
                               f"unexpected={unexpected[:5]}")
    if not trainable.fsdp:
        trainable.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    trainable.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    mine = ckpt / f"rng_state_{distributed.rank()}.pt"
    set_rng_state(torch.load(mine if mine.is_file() else ckpt / "rng_state.pt", weights_only=False))
    if trainable.extra:
        states = torch.load(ckpt / "extra_modules.pt", weights_only=False)
        for k, m in trainable.extra.items():
            m.load_state_dict(states[k])
    return json.loads((ckpt / "trainer_state.json").read_text())


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Append-only ``metrics.jsonl`` plus TensorBoard scalars (main process only)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.active = is_main_process()
        self.tb = None
        self._window: dict[str, list] = {}  # the values of the train steps not yet logged (log_step)
        if self.active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience, not a must
                warn(f"TensorBoard logging disabled: {e}")

    def truncate_after(self, step: int, drop_eval_at_end: bool = False) -> None:
        """Drop records past ``step`` (a resumed run rewrites them); with ``drop_eval_at_end`` (a
        finished run resumed, whose final evaluation runs again) also the eval records at ``step``."""
        if not (self.active and self.path.is_file()):
            return
        keep = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", 0) < step or (
            r.get("step", 0) == step and not (drop_eval_at_end and any(k.startswith("eval/") or k == "loss/eval"
                                                                       for k in r)))]
        atomic_write(self.path, "".join(k + "\n" for k in keep))

    # a train step's values logged as they stand at the logged step, not as the window's mean
    CURRENT = frozenset({"train/lr", "perf/peak_rss_mb"})

    def log_step(self, step: int, values: dict[str, Any], every: int, last: int) -> None:
        """One training step's values; every ``every`` steps (and at step ``last``) the record of
        the steps since the last one logged: each value's mean over them (as the HF Trainer logs
        the loss, and TRL its other metrics), ``CURRENT`` ones as they are now. A value missing
        in some steps (e.g. an accuracy over no pairs) is averaged over the steps that have it."""
        for k, v in values.items():
            self._window.setdefault(k, []).append(_num(v))
        if step % every and step != last:
            return
        window, self._window = self._window, {}
        self.log(step, {k: v[-1] if k in self.CURRENT or not all(isinstance(x, (int, float)) for x in v)
                        else sum(v) / len(v) for k, v in window.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        rec = {"step": step, "time": round(time.time(), 3), **{k: _num(v) for k, v in values.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _num(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def last_train_loss(run_dir: Path, start: int) -> float:
    """The train loss a resumed run (``start`` > 0) reports until a step logs its own: the last
    logged one (a finished run resumed trains nothing); NaN for a fresh run."""
    losses = [r["loss/train"] for r in read_metrics(run_dir) if "loss/train" in r] if start else []
    return losses[-1] if losses else float("nan")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log this project appends to (metrics, samples); a line cut off by a
    crash or a full disk (the last one) is passed over, not an error that hides the rest."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


# --------------------------------------------------------------------------- progress


def progress(description: str = "train"):
    """A rich progress bar: bar, steps, rate, elapsed, ETA and a free-text status field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from posttrain.log import console

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not is_main_process(), transient=False,
    )


def peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def describe_device(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({dtype})"
    return f"CPU, {torch.get_num_threads()} threads ({str(dtype).replace('torch.', '')})"


__all__ = [
    "EpochBatches",
    "Metrics",
    "TrainConfig",
    "Trainable",
    "checkpoints",
    "describe_device",
    "file_fingerprint",
    "finish_run",
    "latest_checkpoint",
    "load_checkpoint",
    "log",
    "open_training",
    "peak_rss_mb",
    "progress",
    "read_metrics",
    "resume",
    "rng_state",
    "save_checkpoint",
    "save_final",
    "save_model_dir",
    "seed_everything",
    "set_rng_state",
    "setup_run",
]
