"""Process reward model: one correctness score per reasoning step.

Objective (Lightman et al. 2023, "Let's verify step by step"; Math-Shepherd, Wang et al.
2023): for every step ``k`` of a solution, a logit ``s_k`` read at the step's last token
(its separator), and the binary cross-entropy of ``σ(s_k)`` against the step's label
(0/1, or a soft estimate), averaged over all steps of the batch. Same head placement as
TRL's ``PRMTrainer`` (a token-classification head at each step separator), with one
logit and BCE instead of two-class cross-entropy, so soft labels work.

Reported: step accuracy (σ(s_k) >= 0.5 agrees with label >= 0.5, the rule of first_wrong) and solution accuracy (the
first step predicted wrong, or none, is the first step labelled wrong, or none: the
question a verifier asks of a PRM). The result is ``model/``, loadable with
``AutoModelForTokenClassification`` and by :class:`posttrain.rewards.ProcessRewardModel`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import distributed, engine
from posttrain.config import ConfigError, doc
from posttrain.data.dataset import report_loading, split_records, tokenize_split
from posttrain.data.loading import BadRows
from posttrain.data.steps import StepExample, read_step_records, tokenize_step_record
from posttrain.data.tokenize import TokenizeStats
from posttrain.log import log
from posttrain.losses import step_bce_loss
from posttrain.models import count_parameters, prepare_scoring_model
from posttrain.rewards.process import PRM_META, step_batch, step_logits


@dataclass
class PRMConfig(engine.TrainConfig):
    """Process reward model training (``posttrain prm``)."""

    output_dir: str = doc("Run directory (config, metrics, checkpoints, final model).", "runs/prm")
    lr: float = doc("Peak learning rate (~1e-5 full, ~1e-4 LoRA).", 1e-5)
    schedule: str = doc("LR schedule after warmup: cosine, linear, constant_with_warmup, constant.", "linear")
    warmup_ratio: float = doc("Share of steps with linear LR warmup.", 0.05)
    step_separator: str = doc("Text appended to every step; the step's score is read at its last token.", "\n\n")

    def validate(self) -> None:
        super().validate()
        if not self.step_separator:
            raise ConfigError("step_separator must not be empty")


@dataclass
class PRMResult:
    run_dir: Path
    model_dir: Path
    steps: int
    train_loss: float
    eval: dict[str, float]


def load_step_data(tok, cfg: PRMConfig) -> tuple[list[StepExample], list[StepExample], BadRows]:
    bad = BadRows(skip=cfg.data.skip_bad_rows)
    stats = TokenizeStats()
    read = lambda s: read_step_records(s.path, bad)
    records, eval_records = split_records([read(s) for s in cfg.data.train], cfg.data, cfg.seed, read, bad)

    train, evals = tokenize_split(
        records, eval_records,
        lambda r: tokenize_step_record(tok, r, cfg.step_separator, cfg.data.max_length, cfg.data.too_long, stats),
        bad, stats, "solutions")
    return train, evals, bad


def steps_right(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Steps whose prediction agrees with the label: a step is right at >= 0.5 (a logit >= 0),
    the rule of :func:`first_wrong` (a soft label of exactly 0.5 counts as right in both)."""
    return int(((logits >= 0) == (labels >= 0.5)).sum())


def first_wrong(probs_or_labels: list[float]) -> int:
    """Index of the first step below 0.5, or the number of steps when all pass."""
    return next((k for k, v in enumerate(probs_or_labels) if v < 0.5), len(probs_or_labels))


@torch.no_grad()
def evaluate(model, examples: list[StepExample], batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Held-out BCE, step accuracy and solution (first-wrong-step) accuracy; dropout off."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    loss_sum, steps, step_ok, sol_ok = 0.0, 0, 0, 0
    mine = distributed.eval_shard(examples)  # each rank scores its share; the sums are combined
    for s in range(0, len(mine), batch_size):
        chunk = mine[s : s + batch_size]
        b = step_batch(chunk, pad_id)
        logits = step_logits(model, b["input_ids"].to(device), b["attention_mask"].to(device),
                             b["rows"].to(device), b["positions"].to(device))
        labels = b["labels"].to(device)
        loss_sum += float(step_bce_loss(logits, labels)) * labels.numel()
        steps += labels.numel()
        step_ok += steps_right(logits, labels)
        probs, k = torch.sigmoid(logits).tolist(), 0
        for e in chunk:
            sol_ok += first_wrong(probs[k : k + len(e.labels)]) == first_wrong(e.labels)
            k += len(e.labels)
    model.train(was_training)
    sums = distributed.eval_sum({"loss": loss_sum, "steps": steps, "step_ok": step_ok, "sol_ok": sol_ok})
    loss_sum, steps, step_ok, sol_ok = sums["loss"], sums["steps"], sums["step_ok"], sums["sol_ok"]
    return {"loss/eval": loss_sum / steps, "eval/step_accuracy": step_ok / steps,
            "eval/solution_accuracy": sol_ok / len(examples)}


def train(cfg: PRMConfig) -> PRMResult:
    """Train a process reward model as ``cfg`` says."""
    # ---------------------------------------------------------------- setup
    run_dir = engine.setup_run(cfg.output_dir, "prm", cfg, [s.path for s in cfg.data.train + cfg.data.eval])
    engine.seed_everything(cfg.seed)
    model, tok, dtype = prepare_scoring_model(cfg.model, "token", lower_frozen=cfg.parallel != "fsdp")
    train_ex, eval_ex, bad = load_step_data(tok, cfg)
    pad = tok.pad_token_id
    batches = engine.EpochBatches.for_config([len(e.input_ids) for e in train_ex], cfg)
    total_steps = cfg.total_steps(batches.per_epoch)
    trainable_params, total_params = count_parameters(model)
    t = engine.open_training(cfg, model, total_steps)
    log(f"prm: {len(train_ex)} train / {len(eval_ex)} eval solutions, {total_steps} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum}, {trainable_params:,}/{total_params:,} params trained"
        f"{' (LoRA)' if cfg.model.lora else ''}, on {engine.describe_device(t.device, dtype)}")
    start, metrics = engine.resume(cfg, run_dir, t)

    # ---------------------------------------------------------------- train
    t.model.train()
    loss_value = engine.last_train_loss(run_dir, start)
    with engine.progress() as bar:
        task = bar.add_task("prm", total=total_steps, completed=start, status="")
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            micro = batches.for_step(step, cfg.grad_accum)
            n_steps = sum(len(train_ex[i].labels) for idx in micro for i in idx)
            loss_value, correct = 0.0, 0
            for idx, w in distributed.local_micro_batches(micro):
                b = step_batch([train_ex[i] for i in idx], pad)
                logits = step_logits(t.model, b["input_ids"].to(t.device), b["attention_mask"].to(t.device),
                                     b["rows"].to(t.device), b["positions"].to(t.device))
                labels = b["labels"].to(t.device)
                # per-step mean over the whole optimizer step (all micro-batches)
                loss = step_bce_loss(logits, labels) * (w * labels.numel() / n_steps)
                t.backward(loss)
                loss_value += float(loss.detach())
                correct += steps_right(logits.detach(), labels) if w else 0
            grad_norm = t.step(cfg.max_grad_norm)
            sums = distributed.all_sum({"loss": loss_value, "correct": correct})
            loss_value, correct = sums["loss"], int(sums["correct"])
            dt = time.perf_counter() - t0
            bar.update(task, advance=1, status=f"loss {loss_value:.4f}")
            metrics.log_step(step, {"loss/train": loss_value, "train/step_accuracy": correct / n_steps,
                                    "train/grad_norm": grad_norm, "train/lr": t.lr, "perf/step_s": dt,
                                    "perf/peak_rss_mb": engine.peak_rss_mb()}, cfg.log_every, total_steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps and eval_ex:
                ev = evaluate(t.model, eval_ex, cfg.eval_batch_size, pad, t.device)
                metrics.log(step, ev)
                log(f"step {step}: eval step accuracy {ev['eval/step_accuracy']:.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                engine.save_checkpoint(run_dir, t, tok, {"step": step, "stage": "prm"}, cfg.keep_last)

    # ---------------------------------------------------------------- finish
    ev = evaluate(t.model, eval_ex, cfg.eval_batch_size, pad, t.device)
    if ev:
        metrics.log(total_steps, ev)
    engine.save_checkpoint(run_dir, t, tok, {"step": total_steps, "stage": "prm"}, cfg.keep_last)
    model_dir = run_dir / "model"
    state = t.full_state()
    if t.accelerator.is_main_process:
        meta = {"kind": "process", "step_separator": cfg.step_separator, "eval": ev}
        engine.save_model_dir(t.unwrapped(), tok, model_dir, merge_lora=cfg.model.lora, state_dict=state,
                              extra=lambda d: (d / PRM_META).write_text(json.dumps(meta, indent=2)))
    engine.finish_run(run_dir, metrics)
    summary = f"prm done: {total_steps} steps, train loss {loss_value:.4f}"
    if ev:
        summary += (f", eval step accuracy {ev['eval/step_accuracy']:.3f}, solution accuracy "
                    f"{ev['eval/solution_accuracy']:.3f}")
    log(f"{summary}; PRM saved to {model_dir}")
    report_loading(bad)
    return PRMResult(run_dir, model_dir, total_steps, loss_value, ev)
