"""Two gloo processes on CPU reach what one process reaches with the same global batch.

Each test launches ``torchrun --nproc_per_node 2 -m posttrain STAGE`` (the command users
run) and the same stage in one process, then compares the saved weights (allclose: the
ranks see differently padded shares of each batch, so sums round differently) and the
logged metrics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from posttrain import distributed, engine

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(stage: str, args: list[str], nproc: int) -> list[str]:
    """``posttrain STAGE args`` in ``nproc`` processes (torchrun) or one (python -m)."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "posttrain", stage, *args]
    return [sys.executable, "-m", "posttrain", stage, *args]


def launch(stage: str, args: list[str], nproc: int, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "POSTTRAIN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = command(stage, args, nproc)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def train_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss/train" in x]


def assert_same_weights(a_dir: Path, b_dir: Path, name: str = "model.safetensors", atol: float = 1e-5) -> None:
    a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def one_vs_two(stage: str, args: list[str], tmp_path: Path, home: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    launch(stage, [*args, f"output_dir={one}"], 1, home)
    launch(stage, [*args, f"output_dir={two}"], 2, home)
    assert json.loads((two / "manifest.json").read_text())["host"]["world_size"] == 2
    return one, two


# --------------------------------------------------------------------------- pure sharding rules


def test_shards_cover_each_micro_batch_once():
    micro = [[5, 1, 7, 2, 9], [3], [4, 8]]
    shares = [distributed.local_micro_batches(micro, r, 2, even=False) for r in range(2)]
    assert shares == [[([5, 7, 9], 1.0), ([3], 1.0), ([4], 1.0)], [([1, 2], 1.0), ([8], 1.0)]]  # none of [3]
    # FSDP: the same number of passes on every rank, a weight-0 placeholder where a share is empty
    assert distributed.local_micro_batches(micro, 1, 2, even=True)[1] == ([3], 0.0)
    assert distributed.unshard([distributed.shard(list("abcde"), r, 2) for r in range(2)], 5) == list("abcde")
    assert distributed.unshard([distributed.shard(list("abcdefg"), r, 3) for r in range(3)], 7) == list("abcdefg")


# --------------------------------------------------------------------------- stages under torchrun


@pytest.fixture
def varied_chat(tmp_path) -> Path:
    # varied lengths, so the ranks' shares pad differently
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}." + " Done" * (i % 5)}]}
            for i in range(40)]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def test_sft_two_processes_match_one(tiny_model_dir, varied_chat, tmp_path):
    """DDP and FSDP; the FSDP run is also killed inside a checkpoint write and resumed."""
    from posttrain.faults import run_with_kills

    # batch 5 over 2 ranks (3 + 2 rows), accumulation 2, an eval split: uneven shares everywhere
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={varied_chat}", "batch_size=5", "grad_accum=2",
            "lr=1e-3", "max_steps=4", "schedule=constant", "tensorboard=false", "data.eval_fraction=0.1",
            "save_every=1"]
    one, two = one_vs_two("sft", args, tmp_path, tmp_path / "home")
    fsdp = tmp_path / "fsdp"
    env = {"POSTTRAIN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    outcomes = run_with_kills(command("sft", [*args, "parallel=fsdp", "resume=true", f"output_dir={fsdp}"], 2),
                              ["checkpoint:3"], env)
    assert outcomes == ["killed at checkpoint:3"]
    m1 = train_metrics(one)
    for run in (two, fsdp):
        assert_same_weights(one / "model", run / "model")
        assert [m["loss/train"] for m in m1] == pytest.approx([m["loss/train"] for m in train_metrics(run)], rel=1e-5)
    assert yaml.safe_load((fsdp / "config.yaml").read_text())["parallel"] == "fsdp"
    assert m1[-1]["loss/train"] < m1[0]["loss/train"]


@pytest.mark.parametrize("mode", ["lora-ddp", "full-fsdp"])
def test_dpo_two_processes_match_one(tiny_model_dir, tmp_path, mode):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}, I think" + " so" * (i % 3)}
        for i in range(30)])
    extra = (["model.lora=true", "model.lora_r=4", "model.lora_dropout=0.0", "lr=1e-2"] if mode == "lora-ddp"
             else ["parallel=fsdp", "lr=1e-3"])
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", "batch_size=3", "grad_accum=2",
            "max_steps=4", "schedule=constant", "tensorboard=false", "data.eval_fraction=0.2", "ref_cache=false",
            *extra]
    one, two = one_vs_two("dpo", args, tmp_path, tmp_path / "home")
    assert_same_weights(one / "model", two / "model",
                        "adapter_model.safetensors" if mode == "lora-ddp" else "model.safetensors")
    m1, m2 = train_metrics(one), train_metrics(two)
    for key in ("loss/train", "reward/margin"):
        assert [m[key] for m in m1] == pytest.approx([m[key] for m in m2], rel=1e-4, abs=1e-6), key
    # accuracy counts margins > 0; at step 1 the policy equals the reference and every margin is
    # float32 rounding noise (|margin| < 1e-6, whose sign depends on the batch split), so from step 2
    assert [m["reward/accuracy"] for m in m1[1:]] == pytest.approx([m["reward/accuracy"] for m in m2[1:]])
    e1, e2 = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two))
    assert e1["eval/reward_accuracy"] == pytest.approx(e2["eval/reward_accuracy"])


GRPO_WORKER = '''
import json, sys
import torch
from posttrain import distributed
from posttrain.config import load_config
from posttrain.stages import online_rl

model_dir, prompts, out, record = sys.argv[1:5]
real = online_rl.token_advantages


def recording(cfg, roll, rewards, lengths, old, *a, **k):
    adv = real(cfg, roll, rewards, lengths, old, *a, **k)
    with open(f"{record}.{distributed.rank()}", "a") as fh:
        fh.write(json.dumps({"prompt_ids": roll.prompt_ids, "rewards": rewards.tolist(), "lengths": lengths,
                             "adv": adv["adv"].tolist()}) + "\\n")
    return adv


def e_count(prompts, completions, **kw):
    return [float(c.count("e")) for c in completions]


online_rl.token_advantages = recording
cfg = load_config(online_rl.GRPOConfig, None, [
    f"model.name_or_path={model_dir}", f"data.train={prompts}", f"output_dir={out}", "sampling.max_new_tokens=10",
    "sampling.top_k=50", "tensorboard=false", "group_size=4", "batch_size=3", "lr=3e-3", "max_steps=3", "beta=0.05",
    "micro_batch_size=5", "parallel=fsdp"])
online_rl.train(cfg, reward_functions=[e_count])
'''


def test_grpo_two_processes_gather_whole_groups(tiny_model_dir, tmp_path):
    """Each rank samples whole groups for its share of the prompts; after the gather every rank
    holds the whole step in single-process order, and the advantages are the single-process
    group statistics of those rewards. (Run under FSDP: sampling inside the gathered model,
    uneven micro-batch shares padded.)"""
    from posttrain.advantages import group_advantages
    from posttrain.data.dataset import DataSource
    from posttrain.data.loading import BadRows
    from posttrain.engine import EpochBatches
    from posttrain.models import load_tokenizer
    from posttrain.stages.online_rl import load_prompts

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w} please"} for w in
                                                       ("tree", "eel", "bee", "sky", "sea", "yes", "zoo", "geese")])
    worker = tmp_path / "worker.py"
    worker.write_text(GRPO_WORKER)
    env = {**os.environ, "POSTTRAIN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(worker), str(tiny_model_dir), str(prompts), str(tmp_path / "run"),
           str(tmp_path / "rec")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-5000:]
    r0, r1 = ([json.loads(x) for x in (tmp_path / f"rec.{r}").read_text().splitlines()] for r in range(2))
    assert len(r0) == 3 and r0 == r1  # both ranks hold the same whole-step rollout and advantages
    tok = load_tokenizer(tiny_model_dir)
    ps = load_prompts(tok, [DataSource(str(prompts))], 1024, "error", BadRows())
    batches = EpochBatches([len(p.ids) for p in ps], 3, 0)
    for step, rec in enumerate(r0, start=1):
        assert rec["prompt_ids"] == [ps[i].ids for i in batches[step - 1] for _ in range(4)]  # prompt order, G each
        rewards = torch.tensor(rec["rewards"])
        want = torch.repeat_interleave(group_advantages(rewards, 4, "group"), torch.tensor(rec["lengths"]))
        torch.testing.assert_close(torch.tensor(rec["adv"]), want)
    assert any(len(set(rec["rewards"])) > 1 for rec in r0)  # the rewards vary: a real check


# (LoRA under DDP is covered by the DPO test: the same engine path)
@pytest.mark.parametrize("stage,extra", [("rm", ["frozen_backbone=true", "head_hidden=8"]),
                                         ("rm", ["parallel=fsdp"]), ("prm", ["parallel=fsdp"])],
                         ids=["rm-frozen-mlp", "rm-full-fsdp", "prm-full-fsdp"])
def test_reward_models_two_processes_match_one(tiny_model_dir, tmp_path, stage, extra):
    if stage == "rm":
        data = write_jsonl(tmp_path / "pairs.jsonl", [
            {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}" + " hm" * (i % 3)}
            for i in range(30)])
    else:
        data = write_jsonl(tmp_path / "steps.jsonl", [
            {"prompt": f"What is {i} * 2 + 1?", "steps": [f"{i} * 2 = {2 * i}", f"{2 * i} + 1 = {2 * i + 1 + i % 2}"],
             "labels": [1, 1 - i % 2]} for i in range(30)])
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "batch_size=5", "grad_accum=2", "lr=1e-3",
            "max_steps=3", "schedule=constant", "tensorboard=false", "data.eval_fraction=0.2", *extra]
    one, two = one_vs_two(stage, args, tmp_path, tmp_path / "home")
    m1, m2 = train_metrics(one), train_metrics(two)
    assert [m["loss/train"] for m in m1] == pytest.approx([m["loss/train"] for m in m2], rel=1e-4, abs=1e-6)
    e1, e2 = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two))
    assert e1 == pytest.approx({**e2, "time": e1["time"]}, rel=2e-3, abs=1e-5)  # Adam amplifies rounding
    if "head_hidden=8" in extra:
        assert_same_weights(one / "model", two / "model", "reward_head.safetensors")
    else:  # Adam turns rounding in tiny gradients into differences up to ~1e-4 (a tenth of one step)
        assert_same_weights(one / "model", two / "model", atol=2e-4)


def test_ppo_runs_under_two_processes(tiny_model_dir, tmp_path):
    """PPO (policy + value head, reference KL) completes under torchrun; rank 0 alone writes."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                       for i in range(6)])
    run = tmp_path / "ppo"
    launch("ppo", [f"model.name_or_path={tiny_model_dir}", f"data.train={prompts}", f"output_dir={run}",
                   "sampling.max_new_tokens=6", "group_size=2", "batch_size=3", "max_steps=2", "beta=0.1",
                   "tensorboard=false", "save_every=1", "sample_every=1"], 2, tmp_path / "home")
    rows = train_metrics(run) or [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/value" in r] == [1, 2]
    assert (run / "value_head.safetensors").is_file() and (run / "model" / "model.safetensors").is_file()
    assert len((run / "samples.jsonl").read_text().splitlines()) == 2 * 3  # one per prompt, each step once


def test_ppo_under_fsdp_takes_the_one_process_gradients(tiny_model_dir, tmp_path):
    """PPO with FSDP on 2 processes, greedy rollouts scored by a (random) reward model, so both
    runs see the same samples and rewards: the same gradient norm each step (the head's gradient
    was one rank's slice after a rollout resharded the root, the value head's twice its size),
    and a checkpoint written and resumed (the optimizer state of the value head beside the
    sharded model failed to gather)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                       for i in range(8)])
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={prompts}", f"rewards=[rm:{rm}]",
            "sampling.temperature=0", "sampling.max_new_tokens=6", "group_size=1", "batch_size=4", "minibatch_size=4",
            "max_steps=2", "beta=0.1", "tensorboard=false", "save_every=1", "data.eval_fraction=0",
            "parallel=fsdp"]
    one, two = one_vs_two("ppo", args, tmp_path, tmp_path / "home")
    norms = [[r["train/grad_norm"] for r in engine.read_metrics(d) if "train/grad_norm" in r] for d in (one, two)]
    assert norms[0][0] > 0 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    launch("ppo", [*args, f"output_dir={two}", "max_steps=3", "resume=true"], 2, tmp_path / "home")
    assert [r["step"] for r in engine.read_metrics(two) if "loss/value" in r] == [1, 2, 3]


def test_resumed_two_process_run_draws_each_ranks_own_dropout(tiny_model_dir, varied_chat, tmp_path):
    """LoRA dropout on 2 processes, killed after step 2 and resumed: the same adapter as the run
    that was not stopped (every rank restored rank 0's RNG, so rank 1 drew rank 0's masks)."""
    from safetensors.torch import load_file

    from posttrain.faults import run_with_kills

    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={varied_chat}", "batch_size=5", "grad_accum=2",
            "lr=1e-3", "max_steps=4", "tensorboard=false", "save_every=1", "model.lora=true", "model.lora_r=4",
            "model.lora_dropout=0.3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch("sft", [*args, f"output_dir={whole}"], 2, tmp_path / "home")
    env = {"POSTTRAIN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    assert run_with_kills(command("sft", [*args, "resume=true", f"output_dir={resumed}"], 2), ["step:3"],
                          env) == ["killed at step:3"]
    a, b = (load_file(str(d / "model" / "adapter_model.safetensors")) for d in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
