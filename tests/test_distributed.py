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
from safetensors.torch import load_file

from posttrain import distributed
from conftest import write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, args: list[str], nproc: int, home: Path) -> subprocess.CompletedProcess:
    """``posttrain STAGE args`` in ``nproc`` processes (torchrun) or one (python -m)."""
    env = {**os.environ, "POSTTRAIN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "posttrain", stage, *args]
    else:
        cmd = [sys.executable, "-m", "posttrain", stage, *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def train_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss/train" in x]


def assert_same_weights(a_dir: Path, b_dir: Path, name: str = "model.safetensors", atol: float = 1e-5) -> None:
    a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def one_vs_two(stage: str, args: list[str], tmp_path: Path, home: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    launch(stage, [*args, f"output_dir={one}"], 1, home)
    launch(stage, [*args, f"output_dir={two}"], 2, home)
    assert json.loads((two / "manifest.json").read_text())["host"]["world_size"] == 2
    return one, two


# --------------------------------------------------------------------------- pure sharding rules


def test_shards_cover_each_micro_batch_once():
    micro = [[5, 1, 7, 2, 9], [3], [4, 8]]
    shares = [distributed.local_micro_batches(micro, r, 2) for r in range(2)]
    assert shares == [[[5, 7, 9], [3], [4]], [[1, 2], [8]]]  # rank 1 has no share of [3]
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
    # batch 5 over 2 ranks (3 + 2 rows), accumulation 2, an eval split: uneven shares everywhere
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={varied_chat}", "batch_size=5", "grad_accum=2",
            "lr=1e-3", "max_steps=4", "schedule=constant", "tensorboard=false", "data.eval_fraction=0.1"]
    one, two = one_vs_two("sft", args, tmp_path, tmp_path / "home")
    assert_same_weights(one / "model", two / "model")
    m1, m2 = train_metrics(one), train_metrics(two)
    assert [m["loss/train"] for m in m1] == pytest.approx([m["loss/train"] for m in m2], rel=1e-5)
    assert m1[-1]["loss/train"] < m1[0]["loss/train"]


def test_dpo_lora_two_processes_match_one(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}, I think" + " so" * (i % 3)}
        for i in range(30)])
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", "batch_size=3", "grad_accum=2",
            "lr=1e-2", "max_steps=4", "schedule=constant", "tensorboard=false", "data.eval_fraction=0.2",
            "model.lora=true", "model.lora_r=4", "model.lora_dropout=0.0", "ref_cache=false"]
    one, two = one_vs_two("dpo", args, tmp_path, tmp_path / "home")
    assert_same_weights(one / "model", two / "model", "adapter_model.safetensors")
    m1, m2 = train_metrics(one), train_metrics(two)
    for key in ("loss/train", "reward/accuracy", "reward/margin"):
        assert [m[key] for m in m1] == pytest.approx([m[key] for m in m2], rel=1e-4, abs=1e-6), key
    e1, e2 = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two))
    assert e1["eval/reward_accuracy"] == pytest.approx(e2["eval/reward_accuracy"])
