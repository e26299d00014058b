"""Shared helpers of the benchmark scripts (data, timing windows, load, matmul peak).

Nothing here imports torch, transformers or posttrain at module level: the scripts run
each training run in a fresh ``spawn`` subprocess (so ``ru_maxrss`` is that run's own),
and the parent process should stay light.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- data


def sft_rows(n: int) -> list[dict]:
    """``n`` worked arithmetic solutions as ``messages`` rows (the demo's data)."""
    from posttrain.synth.tasks import arithmetic_problems

    return [p.as_sft_row() for p in arithmetic_problems(n, "train", seed=0)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def posttrain_overrides(model_dir: str, train_file: str, out_dir: str, steps: int, batch_size: int,
                        max_length: int, lr: float, *extra: str) -> list[str]:
    """The posttrain SFT config of every benchmark run (no eval split, no TensorBoard)."""
    return [
        f"model.name_or_path={model_dir}", f"data.train={train_file}", "data.eval_fraction=0",
        f"data.max_length={max_length}", f"output_dir={out_dir}", f"max_steps={steps}",
        f"batch_size={batch_size}", f"lr={lr}", "seed=0", "tensorboard=false", *extra,
    ]


def posttrain_batches(model_dir: str, train_file: str, steps: int, batch_size: int, max_length: int,
                      lr: float) -> tuple[list[list[int]], list[int], list[int]]:
    """(example indices of each of the ``steps`` batches posttrain will train on, token lengths,
    trained positions of each example: the tokens the loss is taken at).

    Computed with posttrain's own loader and ``EpochBatches``, from the same config as
    the run, so another trainer can be fed exactly the same batches.
    """
    from posttrain.config import load_config
    from posttrain.data.dataset import load_sft_data
    from posttrain.data.tokenize import IGNORE
    from posttrain.models import load_tokenizer
    from posttrain.stages.sft import SFTConfig

    cfg = load_config(SFTConfig, None, posttrain_overrides(model_dir, train_file, "/nonexistent", steps,
                                                           batch_size, max_length, lr))
    tok = load_tokenizer(model_dir)
    data = load_sft_data(tok, cfg.data, cfg.seed)
    try:  # EpochBatches moved from the SFT stage to the engine (taking lengths instead of examples)
        from posttrain.engine import EpochBatches

        batches = EpochBatches([len(e.input_ids) for e in data.train], cfg.batch_size, cfg.seed)
    except ImportError:
        from posttrain.stages.sft import EpochBatches

        batches = EpochBatches(data.train, cfg.batch_size, cfg.seed)
    targets = [sum(1 for t in e.labels[1:] if t != IGNORE) for e in data.train]
    return [list(batches[m]) for m in range(steps)], [len(e.input_ids) for e in data.train], targets


def head_parameters(model_dir: str) -> dict[str, int]:
    """Parameters of the LM head and of the input embedding (the same matrix when tied)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg = getattr(cfg, "text_config", cfg)
    head = cfg.vocab_size * cfg.hidden_size
    return {"head": head, "embedding": head, "tied": bool(getattr(cfg, "tie_word_embeddings", False))}


def executed_flops(batch: list[int], lengths: list[int], targets: list[int], params: int, head: dict,
                   padded_body: bool, head_at_targets: bool) -> float:
    """Matmul FLOPs one training step executes (forward + backward, 6 per parameter per token).

    The decoder body runs over every token it is given (padding included when ``padded_body``),
    the LM head over every body position or only the trained ones (``head_at_targets``), and
    the input embedding is a lookup (its gradient a scatter, no matmul). Attention's own
    score/value products (quadratic in the length) are left out, as in the 6PT rule.
    """
    real = sum(lengths[i] for i in batch)
    body_tokens = len(batch) * max(lengths[i] for i in batch) if padded_body else real
    head_tokens = sum(targets[i] for i in batch) if head_at_targets else body_tokens
    body_params = params - head["head"] - (0 if head["tied"] else head["embedding"])
    return 6.0 * (body_params * body_tokens + head["head"] * head_tokens)


def padding_share(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of padding in right-padded batches (pad to the longest row of each batch)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / padded


# --------------------------------------------------------------------------- load and timing


def cpu_times() -> dict[str, float]:
    """Machine-wide CPU time counters (seconds) from /proc/stat, and this process's CPU time."""
    out: dict[str, float] = {}
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
        tick = os.sysconf("SC_CLK_TCK")
        names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
        out.update({n: int(v) / tick for n, v in zip(names, fields)})
    except OSError:
        pass
    t = os.times()
    out["self"] = t.user + t.system
    out["wall"] = time.perf_counter()
    return out


def window_load(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """CPU use between two :func:`cpu_times` samples: this process's cores busy, machine idle/steal."""
    wall = max(b["wall"] - a["wall"], 1e-9)
    res = {"self_cores_busy": round((b["self"] - a["self"]) / wall, 2)}
    if "idle" in a:
        total = sum(b[k] - a[k] for k in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"))
        if total > 0:
            res["machine_idle_share"] = round((b["idle"] + b["iowait"] - a["idle"] - a["iowait"]) / total, 3)
            res["machine_steal_share"] = round((b["steal"] - a["steal"]) / total, 3)
            busy = total - (b["idle"] + b["iowait"] - a["idle"] - a["iowait"])
            # cores kept busy by everything else on this machine (other processes)
            res["other_cores_busy"] = round(max(0.0, busy / wall - res["self_cores_busy"]), 2)
    return res


def other_cores_busy(seconds: float = 3.0) -> float:
    """Cores kept busy by other processes over the next ``seconds`` (this process is idle meanwhile)."""
    a = cpu_times()
    time.sleep(seconds)
    return window_load(a, cpu_times()).get("other_cores_busy", 0.0)


def wait_quiet(max_wait_s: float, threshold: float = 0.15, sample_s: float = 3.0, quiet_samples: int = 2) -> dict:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` cores for ``quiet_samples`` samples.

    Returns what happened: seconds waited and the last reading. Other processes on a
    2-core machine do not just take their share: torch's OpenMP threads then wait on
    each other at every barrier and a step can take 3x as long.
    """
    t0, quiet, busy = time.perf_counter(), 0, 0.0
    while True:
        busy = other_cores_busy(sample_s)
        quiet = quiet + 1 if busy < threshold else 0
        waited = time.perf_counter() - t0
        if quiet >= quiet_samples or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "other_cores_busy": busy, "quiet": quiet >= quiet_samples}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def status_rss_mb() -> tuple[float, float]:
    """(resident, peak resident) MB of this process now: ``VmRSS`` and ``VmHWM`` of
    ``/proc/self/status`` (Linux), the counters the heap-release figures were read from."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def window_throughput(step_ends: list[float], step_tokens: list[int], step_cpu: list[dict] | None = None,
                      quiet_below: float = 0.1) -> dict:
    """Tokens/s over the steady-state window: end of step 1 to end of step N, tokens of steps 2..N.

    Step 1 (first-touch allocations, lazy initialisation) is left out. The window holds
    everything the loop does between steps (data collation, logging, progress bar).

    With ``step_cpu`` (a :func:`cpu_times` sample at each step end) each step ``k >= 2``
    also gets the cores other processes kept busy during it, and ``quiet_tokens_per_s``
    counts only the steps where that stayed below ``quiet_below``: on a 2-core machine a
    step that shares the CPU with another process can take 3-5x as long, so the quiet
    steps are the fair figure when the machine is shared.
    """
    res: dict = {"tokens_per_s": float("nan"), "window_s": float("nan"), "window_tokens": 0}
    if len(step_ends) < 2:
        return res
    res["window_s"] = step_ends[-1] - step_ends[0]
    res["window_tokens"] = sum(step_tokens[1:])
    res["tokens_per_s"] = res["window_tokens"] / res["window_s"]
    if step_cpu:
        per_step = []
        for k in range(1, len(step_ends)):
            load = window_load(step_cpu[k - 1], step_cpu[k])
            per_step.append({"step": k + 1, "s": round(step_ends[k] - step_ends[k - 1], 3), "tokens": step_tokens[k],
                             "other_cores_busy": load.get("other_cores_busy"),
                             "self_cores_busy": load.get("self_cores_busy")})
        quiet = [p for p in per_step if p["step"] in quiet_steps(per_step, quiet_below)]
        res["per_step"] = per_step
        res["quiet_steps"] = len(quiet)
        res["quiet_tokens_per_s"] = (sum(p["tokens"] for p in quiet) / sum(p["s"] for p in quiet)
                                     if quiet else float("nan"))
    return res


# --------------------------------------------------------------------------- machine


# TRL's fastest CPU settings found (every benchmark's "fast" TRL run). "bf16": "auto" is resolved by
# resolve_trl_settings to the precision posttrain's dtype=auto picks on this machine: bf16=True
# (TRL's autocast over fp32 weights, as posttrain's mixed precision) where bf16 is fast, else fp32.
TRL_FAST = {
    "bf16": "auto",
    "gradient_checkpointing": False,
    "dataloader_pin_memory": False,
}


def resolve_trl_settings(settings: dict) -> dict:
    """``settings`` with ``bf16: "auto"`` replaced by posttrain's precision choice on this CPU."""
    out = dict(settings)
    if out.get("bf16") == "auto":
        from posttrain.models import pick_precision

        out["bf16"] = pick_precision("auto", "cpu").autocast is not None
    return out


def matmul_gflops(n: int = 2048, reps: int = 8, quiet_trials: int = 4, max_s: float = 120.0,
                  quiet_below: float = 0.1, dtype=None) -> dict:
    """Best ``n x n`` matmul rate (GFLOP/s; fp32 unless ``dtype``) over trials run while other
    processes left the CPU idle.

    Trials of ``reps`` products are repeated until ``quiet_trials`` of them ran with other
    processes below ``quiet_below`` cores, or ``max_s`` have passed; the best quiet trial
    is the figure (the best of all trials, flagged, when none was quiet).
    """
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t_start, quiet, loaded = time.perf_counter(), [], []
    while len(quiet) < quiet_trials and (time.perf_counter() - t_start < max_s or not (quiet or loaded)):
        c0 = cpu_times()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
        other = window_load(c0, cpu_times()).get("other_cores_busy", 0.0)
        (quiet if other < quiet_below else loaded).append(rate)
    if quiet:
        return {"gflops": max(quiet), "quiet": True, "trials": len(quiet) + len(loaded)}
    return {"gflops": max(loaded), "quiet": False, "trials": len(loaded)}


def paired_quiet_rates(a: dict, b: dict, quiet_below: float = 0.1) -> dict | None:
    """Tokens/s of two runs over the steps (same index = same batch) that were quiet in both."""
    pa = {p["step"]: p for p in a.get("per_step") or []}
    pb = {p["step"]: p for p in b.get("per_step") or []}
    steps = [k for k in pa if k in pb and (pa[k]["other_cores_busy"] or 0) < quiet_below
             and (pb[k]["other_cores_busy"] or 0) < quiet_below and pa[k]["tokens"] == pb[k]["tokens"]]
    if not steps:
        return None
    tokens = sum(pa[k]["tokens"] for k in steps)
    ra = tokens / sum(pa[k]["s"] for k in steps)
    rb = tokens / sum(pb[k]["s"] for k in steps)
    return {"steps": steps, "tokens": tokens, "a": ra, "b": rb, "ratio": ra / rb}


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = "missing"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": versions}


def _child(fn, spec: dict, conn) -> None:
    """Body of a benchmark subprocess: send ``fn(spec)``, or the error and traceback, to the parent."""
    try:
        # posttrain's process-level malloc settings and kernel-cache caps (set by ``import posttrain``
        # in the parent and inherited), for a peer's run too; without them the peer runs as shipped
        from posttrain.allocator import KERNEL_CACHE_CAPACITY, keep_freed_memory

        if spec.get("keep_freed_memory"):
            spec = {**spec, "keep_freed_memory": keep_freed_memory()}
        elif "keep_freed_memory" in spec:  # a peer's run, asked to go without them
            for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
                if os.environ.get(var) == KERNEL_CACHE_CAPACITY:
                    del os.environ[var]
        conn.send(fn(spec))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    conn.close()


def run_in_subprocess(fn, spec: dict) -> dict:
    """Run ``fn(spec)`` in a fresh spawn process; returns its result (or ``{"error": ...}``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(fn, spec, child))
    p.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": f"child exited without a result (exit code {p.join() or p.exitcode})"}
    p.join()
    return result


def run_one(name: str, fn, spec: dict, work: Path, wait_quiet_s: float) -> dict:
    """One benchmark run: wait for a quiet CPU, run ``fn`` in a fresh subprocess, record wall time and load.

    Prints the run's header, and its error when it failed (the result then has ``"error"``).
    """
    spec = {**spec, "name": name, "out_dir": str(work / name)}
    quiet = wait_quiet(wait_quiet_s) if wait_quiet_s > 0 else {}
    print(f"\n-- {name}: {spec['steps']} steps (load average {loadavg()}; waited {quiet.get('waited_s', 0)} s "
          f"for a quiet CPU: {'yes' if quiet.get('quiet') else 'no'})", flush=True)
    t0 = time.perf_counter()
    r = run_in_subprocess(fn, spec)
    r["wall_s"] = time.perf_counter() - t0
    r["loadavg_after"] = loadavg()
    r["waited_for_quiet"] = quiet
    if "error" in r:
        print(f"{name} FAILED: {r['error']}\n{r.get('traceback', '')}", flush=True)
    return r


def quiet_steps(per_step: list[dict], quiet_below: float = 0.1) -> list[int]:
    """The window steps (numbers) during which other processes kept under ``quiet_below`` cores busy."""
    return [p["step"] for p in per_step if (p["other_cores_busy"] or 0.0) < quiet_below]


def pick_quiet(r: dict, key: str) -> tuple[float, str]:
    """A run's ``key`` figure (``tokens_per_s``, ``s_per_step``) over its quiet window steps when at
    least 2 (or all) were quiet, else over all steps, flagged LOADED; with a note of the basis."""
    window_steps = len(r.get("per_step", []))
    q = r.get("quiet_steps", 0)
    if q >= min(2, window_steps) and q > 0:
        return r[f"quiet_{key}"], f"quiet steps ({q}/{window_steps})"
    return r[key], f"all steps, LOADED ({q}/{window_steps} quiet)"


def fmt(x, spec: str = ",.0f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


# --------------------------------------------------------------------------- seconds per step (DPO, GRPO)


def window_step_times(step_ends: list[float], step_cpu: list[dict] | None = None, quiet_below: float = 0.1) -> dict:
    """Seconds per optimizer step over the steady-state window (end of step 1 to end of step N).

    Like :func:`window_throughput` but per step rather than per token (for stages whose
    steps do not process a fixed token count, such as RL with sampled completions). With
    ``step_cpu`` each step ``k >= 2`` also gets the cores other processes kept busy during
    it, and ``quiet_s_per_step`` averages only the steps where that stayed below
    ``quiet_below``.
    """
    res: dict = {"s_per_step": float("nan"), "window_s": float("nan"), "window_steps": 0}
    if len(step_ends) < 2:
        return res
    res["window_s"] = step_ends[-1] - step_ends[0]
    res["window_steps"] = len(step_ends) - 1
    res["s_per_step"] = res["window_s"] / res["window_steps"]
    if step_cpu:
        per_step = []
        for k in range(1, len(step_ends)):
            load = window_load(step_cpu[k - 1], step_cpu[k])
            per_step.append({"step": k + 1, "s": round(step_ends[k] - step_ends[k - 1], 3),
                             "other_cores_busy": load.get("other_cores_busy"),
                             "self_cores_busy": load.get("self_cores_busy")})
        quiet = [p for p in per_step if p["step"] in quiet_steps(per_step, quiet_below)]
        res["per_step"] = per_step
        res["quiet_steps"] = len(quiet)
        res["quiet_s_per_step"] = sum(p["s"] for p in quiet) / len(quiet) if quiet else float("nan")
    return res


def paired_quiet_step_times(a: dict, b: dict, quiet_below: float = 0.1) -> dict | None:
    """Mean seconds per step of two runs over the step numbers that were quiet in both."""
    pa = {p["step"]: p for p in a.get("per_step") or []}
    pb = {p["step"]: p for p in b.get("per_step") or []}
    steps = [k for k in pa if k in pb and (pa[k]["other_cores_busy"] or 0) < quiet_below
             and (pb[k]["other_cores_busy"] or 0) < quiet_below]
    if not steps:
        return None
    sa = sum(pa[k]["s"] for k in steps) / len(steps)
    sb = sum(pb[k]["s"] for k in steps) / len(steps)
    return {"steps": steps, "a": sa, "b": sb}


def git_state() -> dict:
    """Commit of the working tree and whether posttrain/ has uncommitted changes (what was measured)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import hashlib

    dirty = git("status", "--porcelain", "--", "posttrain")
    diff = git("diff", "HEAD", "--", "posttrain") if dirty else ""
    return {"commit": git("rev-parse", "--short", "HEAD"), "posttrain_dirty": bool(dirty),
            "posttrain_changes": dirty.splitlines(),
            "posttrain_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None}
