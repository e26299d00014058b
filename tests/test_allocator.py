"""posttrain.allocator: freed large blocks stay mapped, so re-allocating them costs no page faults."""

import os
import platform
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import resource, torch
from posttrain.allocator import keep_freed_memory
on = keep_freed_memory()
assert keep_freed_memory() == on  # applied once, same answer after


def steps():  # a training step's pattern: large blocks, far above glibc's mmap threshold, made and freed
    b = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        a, c = torch.ones(16 * 2**20), torch.ones(4 * 2**20)  # 64 MiB and 16 MiB
        del a, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - b


steps(), steps()  # warm-up: the heap grows until the freed blocks fit the next ones
print(on, steps())
"""


def _probe(**env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    on, faults = _probe()
    assert on
    # 3 x 80 MiB touched again: 61,440 faults of 4 KiB pages if the blocks were mapped anew each time
    assert faults < 2_000
    off, faults_default = _probe(POSTTRAIN_KEEP_FREED_MEMORY="0")
    assert not off
    assert faults_default > 30_000  # glibc's default: every large block is a fresh mmap


def test_import_caps_the_cpu_kernel_caches_unless_set():
    """``import posttrain`` caps oneDNN's primitive cache and ideep's LRU cache (one entry per
    matmul shape each), leaving a value the user set alone."""
    from posttrain.allocator import KERNEL_CACHE_CAPACITY

    code = "import os, posttrain; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    run = lambda **extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                                         text=True, check=True).stdout.split()
    assert run() == [KERNEL_CACHE_CAPACITY, KERNEL_CACHE_CAPACITY]
    assert run(LRU_CACHE_CAPACITY="7") == [KERNEL_CACHE_CAPACITY, "7"]


RELEASE_PROBE = r"""
import re, torch
from pathlib import Path
from posttrain.allocator import keep_freed_memory, release_freed_memory
assert keep_freed_memory()
rss = lambda: int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
keep = [torch.ones(2**20)]
blocks = []
for i in range(64):  # 64 x 4 MiB, every other one kept: the freed ones sit between live blocks
    blocks.append(torch.ones(2**20))
    keep.append(torch.ones(1024))
del blocks
before = rss()
release_freed_memory()
print(before, rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_freed_memory_returns_free_heap_pages():
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before - after > 200  # MB: the 256 MiB freed between live blocks, kept mapped until released


def test_release_between_layers_trims_in_training_passes_only(tiny_model_dir, monkeypatch):
    """prepare_model hooks a checkpointed model's decoder layers: the heap's growth is checked
    (and trimmed past the budget) before each layer's forward and backward when grad is on,
    never in a no-grad pass."""
    from posttrain import allocator
    from posttrain.models import ModelConfig, prepare_model

    calls = []
    monkeypatch.setattr(allocator, "_release_if_over", lambda: calls.append(1))  # trims past the budget
    model, _, _ = prepare_model(ModelConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=True))
    assert allocator.release_between_layers(model) == 0  # hooked once only
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == []
    loss = model(input_ids=ids, labels=ids).loss
    assert len(calls) == 2  # the 2 layers' forwards
    loss.backward()
    assert len(calls) == 4  # and their backwards


def test_release_between_layers_is_off_when_asked(tiny_model_dir, monkeypatch):
    from posttrain import allocator
    from posttrain.models import load_model

    monkeypatch.setenv("POSTTRAIN_RELEASE_PER_LAYER", "0")
    model = load_model(str(tiny_model_dir))
    assert allocator.release_between_layers(model) == 0


FRAGMENT_PROBE = r"""
import re, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from posttrain import allocator
from posttrain.models import enable_checkpointing
assert allocator.keep_freed_memory()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
model = LlamaForCausalLM(cfg)
enable_checkpointing(model, lora=False)
allocator.release_between_layers(model)
ids = torch.randint(0, 512, (8, 512))
peak = lambda: int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
before = peak()
model(input_ids=ids, labels=ids).loss.backward()
print(peak() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_between_layers_lowers_the_peak_of_a_checkpointed_pass():
    """A checkpointed training pass whose layers make 32 MiB transients (8 x 512 x 2048 fp32):
    with the per-layer release the peak stays a fraction of glibc's fragmented heap without it."""
    run = lambda flag: int(subprocess.run(
        [sys.executable, "-c", FRAGMENT_PROBE], capture_output=True, text=True, check=True,
        env={**os.environ, "POSTTRAIN_RELEASE_PER_LAYER": flag, "POSTTRAIN_RELEASE_ABOVE_MIB": "128"}).stdout.split()[-1])
    off, on = run("0") + run("0"), run("1") + run("1")  # two of each: the fragmented peak varies by ~20%
    # MB over the start (one run): 311 against 693 on machine D when written (0.37-0.46x over runs), but
    # 375 against 571 (0.66x) on the CI machine, whose heap fragments less without the release.
    assert on < 0.8 * off, (on, off)


def test_release_counts_growth_from_the_last_trim_or_the_lowest_since(monkeypatch):
    from posttrain import allocator

    readings = iter([50, 150, 60, 120, 40, 130, 150, 45])
    trims = []
    monkeypatch.setattr(allocator, "resident_bytes", lambda: next(readings))
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: trims.append(len(trims)))
    monkeypatch.setattr(allocator, "RELEASE_ABOVE_BYTES", 100)
    monkeypatch.setattr(allocator, "_baseline", 0)
    seen = []
    for _ in range(6):
        allocator._release_if_over()
        seen.append((len(trims), allocator._baseline))
    # 50: +50; 150: +150, trimmed to 60; 120: +60; 40: the new low; 130: +90; 150: +110, trimmed to 45
    assert seen == [(0, 0), (1, 60), (1, 60), (1, 40), (1, 40), (2, 45)]
