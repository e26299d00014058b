"""Crash safety: stages SIGKILLed at chosen points (inside a step, inside a checkpoint write,
inside synthesis) and from outside at a random moment, then resumed, end exactly where an
uninterrupted run ends: the same weights bit for bit (CPU, fixed seed, same thread count),
the same metrics, and synthesis files with no duplicated or missing rows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from posttrain import engine
from posttrain.faults import run_with_kills


def env_for(tmp_path: Path) -> dict[str, str]:
    # the same thread count in every process, so that float sums are bit-identical
    return {"POSTTRAIN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def posttrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "posttrain", *map(str, args)]


def reference_run(monkeypatch, tmp_path: Path, *args) -> None:
    """The uninterrupted run, in this process with the subprocesses' settings (saves a launch)."""
    from posttrain.cli import main

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)


def assert_bitwise_equal(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


def train_losses(run: Path) -> list[float]:
    return [m["loss/train"] for m in engine.read_metrics(run) if "loss/train" in m]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_stage_killed_anywhere_resumes_exactly(stage, tiny_model_dir, tmp_path, monkeypatch):
    if stage == "sft":
        rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                              {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(40)]
        extra = ["batch_size=4", "lr=1e-3", "max_steps=8"]
    else:
        rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
        extra = ["batch_size=2", "group_size=3", "lr=3e-3", "max_steps=5", "beta=0.1", "sampling.max_new_tokens=8",
                 "sampling.top_k=20"]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "save_every=1", "keep_last=2",
            "tensorboard=false", "seed=5", *extra]
    env = env_for(tmp_path)
    reference_run(monkeypatch, tmp_path, stage, *args, f"output_dir={tmp_path / 'ref'}")
    # inside step 3, then inside the 2nd checkpoint write of the resumed run (kills from
    # outside at random moments: benchmarks/kill_resume.py)
    kills = ["step:3", "checkpoint:2"]
    cut = tmp_path / "cut"
    outcomes = run_with_kills(posttrain_cmd(stage, *args, f"output_dir={cut}", "resume=true"), kills, env)
    assert sum(o.startswith("killed") for o in outcomes) >= 2, outcomes
    assert_bitwise_equal(tmp_path / "ref" / "model" / "model.safetensors", cut / "model" / "model.safetensors")
    assert train_losses(tmp_path / "ref") == train_losses(cut)  # each step logged once, same values
    assert not list((cut / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint was cleared


def test_synthesis_killed_mid_chunk_has_no_duplicate_or_missing_rows(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(40)])
    args = ["cai", "generate", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "6",
            "--keep-unfinished"]  # (a random model never finishes within 6 tokens)
    env = env_for(tmp_path)
    reference_run(monkeypatch, tmp_path, *args, "--out-dir", tmp_path / "ref")
    # 40 prompts = 3 chunks of 16: killed after chunk 2's rows are appended but before its
    # progress marker is written, then after chunk 1 of the restarted run
    outcomes = run_with_kills(posttrain_cmd(*args, "--out-dir", tmp_path / "cut"), ["synth:2", "synth:1"], env)
    assert outcomes == ["killed at synth:2", "killed at synth:1"]
    for name in ("sft.jsonl", "pairs.jsonl"):
        ref = (tmp_path / "ref" / name).read_text().splitlines()
        cut = (tmp_path / "cut" / name).read_text().splitlines()
        assert cut == ref, name
    sft = [json.loads(x) for x in (tmp_path / "cut" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 40 and len({r["messages"][0]["content"] for r in sft}) == 40
    marker = json.loads((tmp_path / "cut" / "sft.jsonl.progress.json").read_text())
    assert marker["chunks_done"] == marker["n_chunks"] == 3


def test_checkpoint_write_error_keeps_last_good(tiny_model_dir, tmp_path, monkeypatch):
    """A failed write (disk full) stops with a clear message naming the last good checkpoint."""
    from posttrain.config import load_config
    from posttrain.stages.sft import SFTConfig, train

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"line {i}"} for i in range(16)])
    cfg = load_config(SFTConfig, None, [f"model.name_or_path={tiny_model_dir}", f"data.train={data}",
                                        f"output_dir={tmp_path / 'run'}", "batch_size=4", "max_steps=4",
                                        "save_every=1", "tensorboard=false"])
    real = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*step-3.*No space left.*last complete "
                                      r"checkpoint is .*step-2"):
        train(cfg)
    assert engine.latest_checkpoint(tmp_path / "run").name == "step-2"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert os.environ.get("POSTTRAIN_KILL_AT") is None


def test_runs_lists_finished_running_and_stopped(tmp_path):
    """``posttrain runs``: a run whose process is gone while its status says running was killed."""
    import subprocess

    from posttrain.engine import write_status
    from posttrain.runs import find_runs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    for name, state in (("done", "finished"), ("live", "running"), ("killed", "running"), ("reused", "running")):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"stage": "sft"}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss/train": 1.5}) + "\n")
        write_status(d, state)
    status = json.loads((tmp_path / "killed" / "status.json").read_text())
    (tmp_path / "killed" / "status.json").write_text(json.dumps({**status, "pid": int(gone.stdout)}))
    # a live process that reuses a killed run's pid (here: this one, started at another time)
    status = json.loads((tmp_path / "reused" / "status.json").read_text())
    assert status["pid_started"] is not None
    (tmp_path / "reused" / "status.json").write_text(json.dumps({**status, "pid_started": status["pid_started"] - 60}))
    got = {Path(r["run"]).name: (r["state"], r["progress"], r["headline"]) for r in find_runs([tmp_path])}
    assert got == {"done": ("finished", "step 3", "loss/train 1.5"), "live": ("running", "step 3", "loss/train 1.5"),
                   "killed": ("stopped", "step 3", "loss/train 1.5"), "reused": ("stopped", "step 3", "loss/train 1.5")}
    # a recipe's directory as the root: one run, its stages inside it
    (tmp_path / "recipe.yaml").write_text("name: r\nstages: []\n")
    assert [Path(r["run"]) for r in find_runs([tmp_path])] == [tmp_path]


def test_atomic_writes_flush_before_rename_and_leave_the_old_file_on_failure(tmp_path, monkeypatch):
    from posttrain import fileio

    synced, order = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (order.append(("replace", str(a), str(b))),
                                                            real_replace(a, b)))
    target = tmp_path / "a.json"
    fileio.atomic_write(target, "old")
    tmp_name = str(tmp_path / f"a.json.tmp-{os.getpid()}")
    assert synced[0] == tmp_name and order[0] == ("replace", tmp_name, str(target))  # data flushed, then renamed
    assert synced[1] == str(tmp_path)  # then the directory entry

    def broken(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    # a directory: every file flushed before it takes the final name; the old one is gone after
    new, final = tmp_path / "new", tmp_path / "model"
    (final).mkdir()
    (final / "adapter.bin").write_text("stale")
    (new / "sub").mkdir(parents=True)
    (new / "w.safetensors").write_text("w")
    (new / "sub" / "x").write_text("x")
    synced.clear()
    fileio.replace_tree(new, final)
    assert {str(new / "w.safetensors"), str(new / "sub" / "x")} <= set(synced)
    assert sorted(p.name for p in final.rglob("*")) == ["sub", "w.safetensors", "x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]
