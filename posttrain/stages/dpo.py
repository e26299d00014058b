"""Direct preference optimisation: the DPO family against a frozen reference.

Objective per pair (Rafailov et al. 2023): with ``Δ = [log π(y_c|x) - log π_ref(y_c|x)] -
[log π(y_r|x) - log π_ref(y_r|x)]``, log-probs summed over the completion tokens only,
minimise ``-log σ(β Δ)`` (``sigmoid``), ``(Δ̄ - 1/2β)^2`` with per-token averaged
log-ratios (``ipo``), or ``max(0, 1 - β Δ)`` (``hinge``); ``label_smoothing`` ε gives
conservative DPO, and soft labels from an AI judge enter the same way (see
:func:`posttrain.losses.dpo_loss`). Pairs from ranked rows are weighted so that each
prompt counts once.

Reference. The reference log-probs of every train and eval pair are computed once, in a
forward-only pass before training, and cached on disk under
``$POSTTRAIN_HOME/cache/ref_logps/`` keyed by a fingerprint of the reference model's files
and the pairs' token ids: a second epoch, a resumed run, or a sweep over β never
recomputes them, and no reference model is held in memory while training. The reference
is the starting policy (``ref_model`` empty) or another model; under LoRA it is the same
weights with the adapters disabled (one copy of the weights).

The loop, top to bottom: config -> model, tokenizer, pairs -> reference log-probs ->
AdamW + schedule -> for each step: micro-batches of [chosen; rejected] -> sequence
log-probs -> loss -> backward -> clip -> step -> log -> eval / checkpoint -> final model.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from posttrain import distributed, engine
from posttrain.config import ConfigError, doc
from posttrain.data.dataset import PreferenceData, load_preference_data, report_loading
from posttrain.data.preference import PreferencePair, collate_pairs
from posttrain.fileio import atomic_write
from posttrain.log import is_main_process, log
from posttrain.logprobs import sequence_logprobs
from posttrain.losses import DPO_LOSSES, dpo_loss
from posttrain.models import (
    count_parameters,
    load_model,
    posttrain_home,
    prefix_sharing_exact,
    prepare_model,
    resolve_model_path,
)


@dataclass
class DPOConfig(engine.TrainConfig):
    """Direct preference optimisation (``posttrain dpo``)."""

    output_dir: str = doc("Run directory (config, metrics, checkpoints, final model).", "runs/dpo")
    batch_size: int = doc("Preference pairs per micro-batch.", 4)
    lr: float = doc("Peak learning rate (DPO wants small steps: ~1e-6 full, ~1e-5 LoRA).", 1e-6)
    schedule: str = doc("LR schedule after warmup: cosine, linear, constant_with_warmup, constant.", "linear")
    warmup_ratio: float = doc("Share of steps with linear LR warmup.", 0.1)
    beta: float = doc("β: strength of the implicit KL constraint to the reference (higher = closer).", 0.1)
    loss_type: str = doc(f"Preference loss: {', '.join(DPO_LOSSES)}.", "sigmoid")
    label_smoothing: float = doc("Conservative DPO: probability ε that a label is flipped (0 = plain DPO).", 0.0)
    ref_model: str = doc("Reference model (empty = the starting policy; under LoRA, adapters disabled).", "")
    ref_batch_size: int = doc("Sequences per forward pass when computing reference log-probs.", 16)
    ref_cache: bool = doc("Cache reference log-probs on disk (keyed by model and data fingerprints).", True)
    share_prefix: bool = doc("Run each pair as one sequence, the prefix its chosen and rejected sides share (the "
                             "prompt and any identical start of the responses) computed once, each response seeing "
                             "only the prefix and itself; the same log-probs as two sequences.", True)

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing must be in [0, 0.5)")
        if self.beta <= 0:
            raise ConfigError("beta must be positive")


@dataclass
class DPOResult:
    run_dir: Path
    model_dir: Path
    steps: int
    train_loss: float
    eval: dict[str, float]


def pair_logprob_sums(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2B,)`` summed completion log-probs (chosen sides first) and ``(2B,)`` target counts of
    a :func:`~posttrain.data.preference.collate_pairs` batch, in either layout."""
    return sequence_logprobs(model, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})


# --------------------------------------------------------------------------- reference log-probs


def data_fingerprint(pairs: list[PreferencePair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(str((ex.input_ids, ex.labels)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def pair_logprobs(model, pairs: list[PreferencePair], batch_size: int, pad_id: int, device,
                  desc: str = "reference log-probs", share_prefix: bool = False) -> torch.Tensor:
    """``(P, 2)`` summed completion log-probs (chosen, rejected) of every pair, dropout off.

    Under several processes each rank computes its share and the shares are gathered."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    per = max(1, batch_size // 2)
    order = distributed.shard(sorted(range(len(pairs)),
                                     key=lambda i: len(pairs[i].chosen.input_ids) + len(pairs[i].rejected.input_ids)))
    with engine.progress() as bar:
        task = bar.add_task(desc, total=len(order), status="")
        for s in range(0, len(order), per):
            idx = order[s : s + per]
            sums, _ = pair_logprob_sums(model, collate_pairs([pairs[i] for i in idx], pad_id, share_prefix), device)
            out[idx] = sums.float().cpu().view(2, -1).T
            bar.update(task, advance=len(idx))
    model.train(was_training)
    if distributed.world_size() > 1:
        for part in distributed.gather_objects({i: out[i] for i in order}):
            for i, v in part.items():
                out[i] = v
    return out


def reference_logprobs(cfg: DPOConfig, policy, pairs: list[PreferencePair], pad_id: int, device, dtype
                       ) -> torch.Tensor:
    """Reference log-probs of ``pairs`` from the on-disk cache, or computed once and cached."""
    ref_path = resolve_model_path(cfg.ref_model or cfg.model.name_or_path)
    key = hashlib.sha256(
        f"{engine.file_fingerprint(ref_path)}|{data_fingerprint(pairs)}|{dtype}|{bool(cfg.ref_model)}".encode()
    ).hexdigest()[:24]
    cache = posttrain_home() / "cache" / "ref_logps" / f"{key}.pt"
    if cfg.ref_cache and cache.is_file():
        log(f"reference log-probs: cached ({cache})")
        return torch.load(cache)
    t0 = time.perf_counter()
    if cfg.ref_model:
        ref = load_model(cfg.ref_model, dtype, device)
        out = pair_logprobs(ref, pairs, cfg.ref_batch_size, pad_id, device, share_prefix=cfg.share_prefix)
        del ref
    else:  # the policy as it starts, before any update: the same model, no second copy (fresh LoRA
        # adapters add exactly 0; an adapter the run starts from is part of the starting policy)
        out = pair_logprobs(policy, pairs, cfg.ref_batch_size, pad_id, device, share_prefix=cfg.share_prefix)
    log(f"reference log-probs of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s")
    if cfg.ref_cache and is_main_process():
        atomic_write(cache, lambda tmp: torch.save(out, tmp))
    return out


# --------------------------------------------------------------------------- loss on a batch


def batch_loss(cfg: DPOConfig, model, batch: dict[str, torch.Tensor], ref: torch.Tensor, device
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of one micro-batch and its per-pair statistics (detached)."""
    sums, counts = pair_logprob_sums(model, batch, device)
    n = sums.shape[0] // 2
    chosen, rejected = sums[:n], sums[n:]
    ref = ref.to(device=device, dtype=sums.dtype)
    loss, r_c, r_r = dpo_loss(
        chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing,
        label=batch["label"].to(device), weight=batch["weight"].to(device),
        chosen_len=counts[:n], rejected_len=counts[n:],
    )
    stats = {"reward/chosen": r_c, "reward/rejected": r_r, "reward/margin": r_c - r_r,
             "reward/accuracy": (r_c > r_r).float(), "logps/chosen": chosen.detach(),
             "logps/rejected": rejected.detach()}
    return loss, stats


STAT_KEYS = ("reward/chosen", "reward/rejected", "reward/margin", "reward/accuracy", "logps/chosen", "logps/rejected")


@torch.no_grad()
def evaluate(cfg: DPOConfig, model, pairs: list[PreferencePair], ref: torch.Tensor, pad_id: int, device
             ) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and margin (dropout off)."""
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    total, weight, acc, margin = 0.0, 0.0, 0.0, 0.0
    per = max(1, cfg.eval_batch_size // 2)
    mine = distributed.eval_shard(list(range(len(pairs))))
    for s in range(0, len(mine), per):
        idx = mine[s : s + per]
        batch = collate_pairs([pairs[i] for i in idx], pad_id, cfg.share_prefix)
        loss, st = batch_loss(cfg, model, batch, ref[idx], device)
        w = float(batch["weight"].sum())
        total += float(loss) * w
        weight += w
        acc += float(st["reward/accuracy"].sum())
        margin += float(st["reward/margin"].sum())
    model.train(was_training)
    sums = distributed.eval_sum({"total": total, "weight": weight, "acc": acc, "margin": margin})
    return {"loss/eval": sums["total"] / sums["weight"], "eval/reward_accuracy": sums["acc"] / len(pairs),
            "eval/reward_margin": sums["margin"] / len(pairs)}


# --------------------------------------------------------------------------- train


def train(cfg: DPOConfig, data: PreferenceData | None = None) -> DPOResult:
    """Run DPO as ``cfg`` says; ``data`` may be given pre-tokenized (library use)."""
    # ---------------------------------------------------------------- setup
    run_dir = engine.setup_run(cfg.output_dir, "dpo", cfg, [s.path for s in cfg.data.train + cfg.data.eval],
                               check_inputs=data is None)
    engine.seed_everything(cfg.seed)
    model, tok, dtype = prepare_model(cfg.model, lower_frozen=cfg.parallel != "fsdp")
    if data is None:
        data = load_preference_data(tok, cfg.data, cfg.seed)
    longest = max((len(x.input_ids) for p in data.train + data.eval for x in (p.chosen, p.rejected)), default=0)
    if cfg.share_prefix and not prefix_sharing_exact(model.config, longest, "dpo"):
        cfg = replace(cfg, share_prefix=False)
    pad = tok.pad_token_id
    device = next(model.parameters()).device
    ref_train = reference_logprobs(cfg, model, data.train, pad, device, dtype)
    ref_eval = reference_logprobs(cfg, model, data.eval, pad, device, dtype) if data.eval else None
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in data.train]
    batches = engine.EpochBatches.for_config(lengths, cfg)
    total_steps = cfg.total_steps(batches.per_epoch)
    trainable_params, total_params = count_parameters(model)
    t = engine.open_training(cfg, model, total_steps)
    log(f"dpo ({cfg.loss_type}, β={cfg.beta}): {len(data.train)} train / {len(data.eval)} eval pairs, "
        f"{total_steps} steps of {cfg.batch_size}x{cfg.grad_accum} pairs, {trainable_params:,}/{total_params:,} "
        f"params trained{' (LoRA)' if cfg.model.lora else ''}, on {engine.describe_device(t.device, dtype)}")
    start, metrics = engine.resume(cfg, run_dir, t)

    # ---------------------------------------------------------------- train
    t.model.train()
    loss_value = engine.last_train_loss(run_dir, start)
    with engine.progress() as bar:
        task = bar.add_task("dpo", total=total_steps, completed=start, status="")
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            micro = batches.for_step(step, cfg.grad_accum)
            step_weight = sum(data.train[i].weight for idx in micro for i in idx)
            loss_value, tokens, stats = 0.0, 0, []
            for idx, w in distributed.local_micro_batches(micro):
                batch = collate_pairs([data.train[i] for i in idx], pad, cfg.share_prefix)
                loss, st = batch_loss(cfg, t.model, batch, ref_train[idx], t.device)
                # each micro-batch's weighted mean, rescaled so the step is one weighted mean
                loss = loss * (w * float(batch["weight"].sum()) / step_weight)
                t.backward(loss)
                loss_value += float(loss.detach())
                if w:  # (w = 0: an FSDP rank's placeholder, see posttrain.distributed)
                    tokens += batch["n_tokens"]
                    stats.append(st)
            grad_norm = t.step(cfg.max_grad_norm)
            dt = time.perf_counter() - t0
            means = distributed.global_means(stats, STAT_KEYS)
            sums = distributed.all_sum({"loss": loss_value, "tokens": tokens})
            loss_value, tokens = sums["loss"], int(sums["tokens"])
            bar.update(task, advance=1, status=f"loss {loss_value:.4f} acc {means['reward/accuracy']:.2f}")
            metrics.log_step(step, {"loss/train": loss_value, **means, "train/grad_norm": grad_norm,
                                    "train/lr": t.lr, "perf/tokens_per_s": tokens / dt, "perf/step_s": dt,
                                    "perf/peak_rss_mb": engine.peak_rss_mb()}, cfg.log_every, total_steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps and ref_eval is not None:
                ev = evaluate(cfg, t.model, data.eval, ref_eval, pad, t.device)
                metrics.log(step, ev)
                log(f"step {step}: eval loss {ev['loss/eval']:.4f}, accuracy {ev['eval/reward_accuracy']:.2f}")
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
                engine.save_checkpoint(run_dir, t, tok, {"step": step, "stage": "dpo"}, cfg.keep_last)

    # ---------------------------------------------------------------- finish
    ev = evaluate(cfg, t.model, data.eval, ref_eval, pad, t.device) if ref_eval is not None else {}
    if ev:
        metrics.log(total_steps, ev)
    model_dir = engine.save_final(run_dir, t, tok, cfg, "dpo", total_steps)
    engine.finish_run(run_dir, metrics)
    summary = f"dpo done: {total_steps} steps, train loss {loss_value:.4f}"
    if ev:
        summary += f", eval loss {ev['loss/eval']:.4f}, eval accuracy {ev['eval/reward_accuracy']:.2f}"
    log(f"{summary}; model saved to {model_dir}")
    report_loading(data.bad, data.stats)
    return DPOResult(run_dir, model_dir, total_steps, loss_value, ev)
