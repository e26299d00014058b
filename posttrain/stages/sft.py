"""Supervised fine-tuning: next-token loss on demonstrations, prompt tokens masked.

Objective: minimise ``-sum_t log p(y_t | y_<t) / N`` over the trained tokens of each
optimizer step (every assistant turn and its end-of-turn token for conversations,
every token for ``text`` rows), where ``N`` counts those tokens over all
gradient-accumulation micro-batches of the step, so accumulation equals one big batch.

The loop, top to bottom: config -> model, tokenizer, data -> AdamW + warmup/decay
schedule -> for each step: micro-batches -> log-probs -> loss -> backward -> clip ->
step -> log -> eval / checkpoint -> final model.

Data order is a pure function of (seed, epoch): batch ``m`` of the run is batch
``m % batches_per_epoch`` of epoch ``m // batches_per_epoch``. A resumed run therefore
only needs the step number to continue exactly where it stopped; with the RNG states
restored it reaches the same weights as an uninterrupted run (CPU, fixed seed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import distributed, engine
from posttrain.config import ConfigError, doc
from posttrain.data.dataset import SFTData, load_sft_data, report_loading
from posttrain.data.tokenize import TokenizedExample, collate
from posttrain.log import log
from posttrain.logprobs import batch_logprobs, num_targets
from posttrain.losses import sft_loss
from posttrain.models import count_parameters, prepare_model


@dataclass
class SFTConfig(engine.TrainConfig):
    """Supervised fine-tuning (``posttrain sft``)."""

    output_dir: str = doc("Run directory (config, metrics, checkpoints, final model).", "runs/sft")
    batching: str = doc("pad (length-grouped, right-padded) or flatten (padding-free, one packed row).", "pad")

    def validate(self) -> None:
        super().validate()
        if self.batching not in ("pad", "flatten"):
            raise ConfigError(f"batching: {self.batching!r} is not pad or flatten")


@dataclass
class SFTResult:
    run_dir: Path
    model_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float


@torch.no_grad()
def evaluate(model, examples: list[TokenizedExample], batch_size: int, batching: str, pad_id: int,
             device) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity (dropout off)."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    order = distributed.eval_shard(sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids)))
    total, count = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[s : s + batch_size]], batching, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        lp = batch_logprobs(model, batch)
        total -= float(lp.sum())
        count += lp.numel()
    model.train(was_training)
    summed = distributed.eval_sum({"total": total, "count": count})
    total, count = summed["total"], int(summed["count"])
    loss = total / max(count, 1)
    return {"loss/eval": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": count}


def train(cfg: SFTConfig, data: SFTData | None = None) -> SFTResult:
    """Run SFT as ``cfg`` says; ``data`` may be given pre-tokenized (library use)."""
    # ---------------------------------------------------------------- setup
    run_dir = engine.setup_run(cfg.output_dir, "sft", cfg, [s.path for s in cfg.data.train + cfg.data.eval],
                               check_inputs=data is None)
    engine.seed_everything(cfg.seed)
    model, tok, dtype = prepare_model(cfg.model, lower_frozen=cfg.parallel != "fsdp")
    trainable_params, total_params = count_parameters(model)
    if data is None:
        data = load_sft_data(tok, cfg.data, cfg.seed)
    batches = engine.EpochBatches.for_config([len(e.input_ids) for e in data.train], cfg)
    total_steps = cfg.total_steps(batches.per_epoch)
    t = engine.open_training(cfg, model, total_steps)
    log(f"sft: {len(data.train)} train / {len(data.eval)} eval examples, {total_steps} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum}, {trainable_params:,}/{total_params:,} params trained"
        f"{' (LoRA)' if cfg.model.lora else ''}, on {engine.describe_device(t.device, dtype)}")

    start, metrics = engine.resume(cfg, run_dir, t)

    # ---------------------------------------------------------------- train
    t.model.train()
    loss_value, tokens_seen, t_start = engine.last_train_loss(run_dir, start), 0, time.perf_counter()
    with engine.progress("sft") as bar:
        task = bar.add_task("sft", total=total_steps, completed=start, status="")
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            micro = batches.for_step(step, cfg.grad_accum)
            # the step's target tokens over all micro-batches (and ranks): the loss normaliser
            n_targets = sum(num_targets(collate([data.train[i] for i in idx], cfg.batching, tok.pad_token_id)["labels"])
                            for idx in micro)
            step_loss, step_tokens = 0.0, 0
            for idx, weight in distributed.local_micro_batches(micro):
                b = collate([data.train[i] for i in idx], cfg.batching, tok.pad_token_id)
                b = {k: v.to(t.device) for k, v in b.items()}
                loss = sft_loss(batch_logprobs(t.model, b), n_targets) * weight
                t.backward(loss)
                step_loss += float(loss.detach())
                n_tok = int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                step_tokens += n_tok if weight else 0
            grad_norm = t.step(cfg.max_grad_norm)
            summed = distributed.all_sum({"loss": step_loss, "tokens": step_tokens})
            step_loss, step_tokens = summed["loss"], int(summed["tokens"])
            dt = time.perf_counter() - t0
            loss_value, tokens_seen = step_loss, tokens_seen + step_tokens
            rate = step_tokens / dt
            bar.update(task, advance=1, status=f"loss {loss_value:.4f}  {rate:,.0f} tok/s")
            metrics.log_step(step, {
                "loss/train": loss_value, "train/grad_norm": grad_norm, "train/lr": t.lr,
                "train/trained_tokens": n_targets, "perf/tokens_per_s": rate, "perf/step_s": dt,
                "perf/peak_rss_mb": engine.peak_rss_mb(),
            }, cfg.log_every, total_steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                ev = evaluate(t.model, data.eval, cfg.eval_batch_size, cfg.batching, tok.pad_token_id, t.device)
                if ev:
                    metrics.log(step, ev)
                    log(f"step {step}: eval loss {ev['loss/eval']:.4f} (ppl {ev['eval/perplexity']:.2f})")
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                engine.save_checkpoint(run_dir, t, tok, {"step": step, "stage": "sft"}, cfg.keep_last)

    # ---------------------------------------------------------------- finish
    elapsed = time.perf_counter() - t_start
    ev = evaluate(t.model, data.eval, cfg.eval_batch_size, cfg.batching, tok.pad_token_id, t.device)
    if ev:
        metrics.log(total_steps, ev)
    model_dir = engine.save_final(run_dir, t, tok, cfg, "sft", total_steps)
    engine.finish_run(run_dir, metrics)
    tps = tokens_seen / elapsed if tokens_seen else 0.0
    summary = f"sft done: {total_steps} steps{' (finished before: nothing trained now)' if start == total_steps else ''}" \
        f", train loss {loss_value:.4f}"
    if ev:
        summary += f", eval loss {ev['loss/eval']:.4f} (ppl {ev['eval/perplexity']:.2f})"
    log(f"{summary}, {tps:,.0f} tok/s; model saved to {model_dir}")
    report_loading(data.bad, data.stats)
    return SFTResult(run_dir, model_dir, total_steps, loss_value, ev.get("loss/eval") if ev else None, tps)
