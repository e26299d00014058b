"""Outcome reward model: a scalar head on the LM, trained with the Bradley–Terry loss.

Objective (InstructGPT, Ouyang et al. 2022): for each comparison, minimise
``-log σ(r(x, y_c) - r(x, y_r) - m)`` with the optional per-pair margin ``m`` (Llama 2) and
soft label (AI feedback), as a weighted mean in which each prompt of a ranked row counts
once; ``center_coef`` adds ``η · (r_c + r_r)^2`` so that rewards stay centred at zero
(Eisenstein et al. 2023). The reward is read at the last token of the chat-rendered
conversation (see :mod:`posttrain.rewards.reward_model`).

Three ways to train:

* ``full``: every weight (``model.lora: false``);
* ``lora``: LoRA adapters on the backbone and the head in full (``model.lora: true``);
* ``frozen``: the backbone is frozen, the features it gives at the read position are
  computed once (cached on disk in the run directory), and only the head is trained on
  them: a linear head (``head_hidden: 0``, saved as a plain sequence-classification
  model) or an MLP (``head_hidden: N``). Seconds per epoch instead of minutes.

Reported: train loss, held-out pairwise accuracy (r_c > r_r) and mean margin. The result is
``model/``, loadable with ``AutoModelForSequenceClassification`` and by
:class:`posttrain.rewards.RewardModel` (batched ``score(prompts, completions)``).
"""

from __future__ import annotations

import hashlib
import json
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
from posttrain.losses import bradley_terry_loss
from posttrain.models import autocast, backbone_and_score_head, count_parameters, prepare_scoring_model
from posttrain.rewards.reward_model import (
    MLP_HEAD_FILE,
    REWARD_META,
    last_token_states,
    mlp_head,
    sequence_rewards,
)
from posttrain.stages.dpo import data_fingerprint


@dataclass
class RewardConfig(engine.TrainConfig):
    """Outcome reward model training (``posttrain rm``)."""

    output_dir: str = doc("Run directory (config, metrics, checkpoints, final model).", "runs/rm")
    batch_size: int = doc("Preference pairs per micro-batch.", 8)
    lr: float = doc("Peak learning rate (~1e-5 full, ~1e-4 LoRA, ~1e-3 frozen head).", 1e-5)
    schedule: str = doc("LR schedule after warmup: cosine, linear, constant_with_warmup, constant.", "linear")
    warmup_ratio: float = doc("Share of steps with linear LR warmup.", 0.05)
    frozen_backbone: bool = doc("Freeze the LM, cache its features once, train only the head.", False)
    head_hidden: int = doc("Frozen mode: width of an MLP head (0 = linear head, HF-loadable).", 0)
    center_coef: float = doc("Reward-centering coefficient η (0 = off).", 0.0)

    def validate(self) -> None:
        super().validate()
        if self.frozen_backbone and self.model.lora:
            raise ConfigError("frozen_backbone and model.lora exclude each other")
        if self.head_hidden and not self.frozen_backbone:
            raise ConfigError("head_hidden (an MLP head) needs frozen_backbone: true")


@dataclass
class RewardResult:
    run_dir: Path
    model_dir: Path
    steps: int
    train_loss: float
    eval: dict[str, float]


def pair_rewards(model, batch, device, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each ``(B,)``, for a [chosen; rejected] batch."""
    r = sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), head)
    n = r.shape[0] // 2
    return r[:n], r[n:]


def bt_loss(cfg: RewardConfig, r_c: torch.Tensor, r_r: torch.Tensor, batch) -> torch.Tensor:
    dev = r_c.device
    return bradley_terry_loss(r_c, r_r, batch["margin"].to(dev), batch["weight"].to(dev), batch["label"].to(dev),
                              cfg.center_coef)


STAT_KEYS = ("reward/chosen", "reward/rejected", "reward/margin", "reward/accuracy")


def pair_metrics(r_c: torch.Tensor, r_r: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"reward/chosen": r_c.detach(), "reward/rejected": r_r.detach(),
            "reward/margin": (r_c - r_r).detach(), "reward/accuracy": (r_c > r_r).float()}


@torch.no_grad()
def evaluate(cfg: RewardConfig, score_batch, pairs: list[PreferencePair]) -> dict[str, float]:
    """Held-out Bradley–Terry loss, pairwise accuracy and mean margin; ``score_batch(indices)``
    returns (r_c, r_r, batch) for those eval pairs."""
    if not pairs:
        return {}
    total, weight, acc, decided, margin = 0.0, 0.0, 0.0, 0.0, 0.0
    mine = distributed.eval_shard(list(range(len(pairs))))  # each rank scores its share; the sums are combined
    for s in range(0, len(mine), cfg.eval_batch_size):
        r_c, r_r, batch = score_batch(mine[s : s + cfg.eval_batch_size])
        w = float(batch["weight"].sum())
        total += float(bt_loss(cfg, r_c, r_r, batch)) * w
        weight += w
        # accuracy: the side the label prefers scores higher (a soft label below 0.5 prefers the
        # "rejected" side; a tie, 0.5, prefers neither and is left out)
        label = batch["label"].to(r_c.device)
        prefers_chosen, tie = label > 0.5, label == 0.5
        acc += float(((r_c > r_r) == prefers_chosen)[~tie].float().sum())
        decided += float((~tie).sum())
        margin += float((r_c - r_r).sum())
    sums = distributed.eval_sum({"total": total, "weight": weight, "acc": acc, "decided": decided, "margin": margin})
    out = {"loss/eval": sums["total"] / sums["weight"], "eval/margin": sums["margin"] / len(pairs)}
    if sums["decided"]:  # (every label a tie: no accuracy to give)
        out["eval/accuracy"] = sums["acc"] / sums["decided"]
    return out


# --------------------------------------------------------------------------- frozen backbone


@torch.no_grad()
def pair_features(model, pairs: list[PreferencePair], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """``(P, 2, H)`` backbone features at the read position of both sides of every pair."""
    backbone, _ = backbone_and_score_head(model)
    model.eval()
    out = None
    with engine.progress() as bar:
        task = bar.add_task("features", total=len(pairs), status="")
        for s in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[s : s + batch_size], pad_id)
            with autocast(model, device):  # the precision the scorer will read them in
                h = last_token_states(backbone, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            h = h.float().cpu().view(2, -1, h.shape[-1]).transpose(0, 1)  # (b, 2, H)
            out = h if out is None else torch.cat([out, h])
            bar.update(task, advance=h.shape[0])
    if out is None:  # no pairs (a rank whose share of a small set is empty)
        out = torch.empty(0, 2, model.config.hidden_size)
    return out


def cached_features(run_dir: Path, model, pairs, pad_id, batch_size, device, name: str) -> torch.Tensor:
    # the backbone's files (retrained in place, it is another backbone) and precision, and the data
    src = Path(model.config._name_or_path)
    weights = engine.file_fingerprint(src) if src.exists() else ""
    precision = f"{next(model.parameters()).dtype}|{getattr(model, 'posttrain_autocast', None)}"
    key = hashlib.sha256(f"{src}|{weights}|{precision}|{data_fingerprint(pairs)}".encode()).hexdigest()[:16]
    path = run_dir / "cache" / f"features-{name}-{key}.pt"
    if path.is_file():
        log(f"{name} features: cached ({path})")
        return torch.load(path)
    t0 = time.perf_counter()
    mine = distributed.shard(list(range(len(pairs))))  # each rank its share, then gathered
    feats = pair_features(model, [pairs[i] for i in mine], pad_id, batch_size, device)
    if distributed.world_size() > 1:
        parts = distributed.gather_objects((mine, feats))
        feats = torch.empty(len(pairs), *feats.shape[1:], dtype=feats.dtype)
        for idx, part in parts:
            feats[idx] = part
    log(f"{name} features of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s")
    if is_main_process():
        atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


# --------------------------------------------------------------------------- train


def train(cfg: RewardConfig, data: PreferenceData | None = None) -> RewardResult:
    """Train a reward model as ``cfg`` says; ``data`` may be given pre-tokenized (library use)."""
    # ---------------------------------------------------------------- setup
    run_dir = engine.setup_run(cfg.output_dir, "rm", cfg, [s.path for s in cfg.data.train + cfg.data.eval],
                               check_inputs=data is None)
    engine.seed_everything(cfg.seed)
    model, tok, dtype = prepare_scoring_model(cfg.model, "sequence", lower_frozen=cfg.parallel != "fsdp")
    if data is None:
        data = load_preference_data(tok, cfg.data, cfg.seed)
    pad = tok.pad_token_id
    device = next(model.parameters()).device
    mode = "frozen" if cfg.frozen_backbone else "lora" if cfg.model.lora else "full"

    head = None  # frozen mode: the module that is trained
    if cfg.frozen_backbone:
        feats = cached_features(run_dir, model, data.train, pad, cfg.eval_batch_size, device, "train")
        eval_feats = (cached_features(run_dir, model, data.eval, pad, cfg.eval_batch_size, device, "eval")
                      if data.eval else None)
        _, score = backbone_and_score_head(model)
        if cfg.head_hidden:
            head = mlp_head(feats.shape[-1], cfg.head_hidden)
        else:
            head = torch.nn.Linear(feats.shape[-1], 1, bias=False)
            head.weight.data.copy_(score.weight.data.float())
        head.to(device)

        def score_train(idx):
            f = feats[idx].to(device)
            return head(f[:, 0]).squeeze(-1), head(f[:, 1]).squeeze(-1)

        def score_eval(idx):
            f = eval_feats[idx].to(device)
            return head(f[:, 0]).squeeze(-1), head(f[:, 1]).squeeze(-1), collate_pairs([data.eval[i] for i in idx], pad)
    else:
        def score_train(idx):
            return pair_rewards(t.model, collate_pairs([data.train[i] for i in idx], pad), t.device)

        def score_eval(idx):
            batch = collate_pairs([data.eval[i] for i in idx], pad)
            was = t.model.training
            t.model.eval()
            r_c, r_r = pair_rewards(t.model, batch, t.device)
            t.model.train(was)
            return r_c, r_r, batch

    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in data.train]
    batches = engine.EpochBatches.for_config(lengths, cfg)
    total_steps = cfg.total_steps(batches.per_epoch)
    trained = head if head is not None else model
    trainable_params, _ = count_parameters(trained)
    # the frozen mode trains only a small head: data parallel (fsdp has nothing to shard)
    t = engine.open_training(replace(cfg, parallel="ddp") if head is not None else cfg, trained, total_steps)
    log(f"rm ({mode}): {len(data.train)} train / {len(data.eval)} eval pairs, {total_steps} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum} pairs, {trainable_params:,} params trained, on "
        f"{engine.describe_device(t.device, dtype)}")
    # the frozen mode's head has no checkpoints: a resumed run trains it again from step 0, its
    # earlier records dropped (the features come back from the cache)
    start, metrics = engine.resume(replace(cfg, resume=False) if head is not None else cfg, run_dir, t)

    # ---------------------------------------------------------------- train
    t.model.train()
    loss_value = engine.last_train_loss(run_dir, start)
    with engine.progress() as bar:
        task = bar.add_task("rm", total=total_steps, completed=start, status="")
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            micro = batches.for_step(step, cfg.grad_accum)
            step_weight = sum(data.train[i].weight for idx in micro for i in idx)
            loss_value, stats = 0.0, []
            for idx, w in distributed.local_micro_batches(micro):
                batch = collate_pairs([data.train[i] for i in idx], pad)
                r_c, r_r = score_train(idx)
                loss = bt_loss(cfg, r_c, r_r, batch) * (w * float(batch["weight"].sum()) / step_weight)
                t.backward(loss)
                loss_value += float(loss.detach())
                if w:  # (w = 0: an FSDP rank's placeholder, see posttrain.distributed)
                    stats.append(pair_metrics(r_c, r_r))
            grad_norm = t.step(cfg.max_grad_norm)
            dt = time.perf_counter() - t0
            means = distributed.global_means(stats, STAT_KEYS)
            loss_value = distributed.all_sum({"loss": loss_value})["loss"]
            bar.update(task, advance=1, status=f"loss {loss_value:.4f} acc {means['reward/accuracy']:.2f}")
            metrics.log_step(step, {"loss/train": loss_value, **means, "train/grad_norm": grad_norm,
                                    "train/lr": t.lr, "perf/step_s": dt, "perf/peak_rss_mb": engine.peak_rss_mb()},
                             cfg.log_every, total_steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps and data.eval:
                ev = evaluate(cfg, score_eval, data.eval)
                metrics.log(step, ev)
                log(f"step {step}: eval accuracy {ev.get('eval/accuracy', float('nan')):.3f}, margin "
                    f"{ev['eval/margin']:.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step != total_steps and head is None:
                engine.save_checkpoint(run_dir, t, tok, {"step": step, "stage": "rm"}, cfg.keep_last)

    # ---------------------------------------------------------------- finish
    ev = evaluate(cfg, score_eval, data.eval) if data.eval else {}
    if ev:
        metrics.log(total_steps, ev)
    model_dir = run_dir / "model"
    if head is None:
        engine.save_checkpoint(run_dir, t, tok, {"step": total_steps, "stage": "rm"}, cfg.keep_last)
    state = t.full_state()
    if engine.is_main_process():
        save_reward_model(model if head is not None else t.unwrapped(), tok, model_dir, head, cfg, ev, state)
        if cfg.model.lora:
            engine.save_model_dir(t.unwrapped(), tok, run_dir / "adapter")
    engine.finish_run(run_dir, metrics)
    summary = f"rm done: {total_steps} steps, train loss {loss_value:.4f}"
    if ev:
        summary += f", eval accuracy {ev.get('eval/accuracy', float('nan')):.3f}, margin {ev['eval/margin']:.3f}"
    log(f"{summary}; reward model saved to {model_dir}")
    report_loading(data.bad, data.stats)
    return RewardResult(run_dir, model_dir, total_steps, loss_value, ev)


def save_reward_model(model, tok, out: Path, head, cfg: RewardConfig, ev: dict,
                      state_dict: dict | None = None) -> None:
    """``out`` as an ``AutoModelForSequenceClassification`` directory (LoRA merged) + metadata."""
    info = {"kind": "outcome", "read_at": "last token of the chat-rendered conversation", "head": "linear",
            "mode": "frozen" if cfg.frozen_backbone else "lora" if cfg.model.lora else "full", "eval": ev}
    if head is not None and not cfg.head_hidden:
        _, score = backbone_and_score_head(model)
        score.weight.data.copy_(head.weight.data.to(score.weight.dtype))
    def metadata(d: Path) -> None:  # written into the directory before it is moved in whole
        if head is not None and cfg.head_hidden:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(d / MLP_HEAD_FILE))
            info.update(head="mlp", head_hidden=cfg.head_hidden,
                        note="the MLP head is in reward_head.safetensors; load with posttrain.rewards.RewardModel")
        (d / REWARD_META).write_text(json.dumps(info, indent=2))

    engine.save_model_dir(model, tok, out, merge_lora=cfg.model.lora, state_dict=state_dict, extra=metadata)
