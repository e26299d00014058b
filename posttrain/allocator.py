"""Keep freed CPU memory inside the process instead of handing it back to the OS (glibc).

glibc's ``malloc`` serves every block above its mmap threshold (128 KB, rising to at most
32 MB) with a fresh ``mmap`` and ``munmap``s it on ``free``; smaller frees at the top of the
heap are trimmed back with ``sbrk``. A training step allocates and frees the same large
tensors every time (logits chunks, activation gradients, the 113 MB gradient of a 49k x 576
embedding), so each step the kernel maps those pages anew and zero-fills every 4 KB page at
its first touch. Profiled on the embedded SmolLM2 (2-core CPU, batch 8 x 150 tokens), zeroing
the embedding gradient took 290 ms per call instead of ~10 ms and a ``128 x 49152`` logits
matmul 154 ms instead of ~70 ms; with the settings below a full step was ~10% faster.

``keep_freed_memory()`` turns off mmap for large blocks (``M_MMAP_MAX = 0``: everything comes
from the heap, whose freed pages stay mapped) and raises the trim threshold, as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would before start-up. Peak RSS is
about the same (memory is reused, not added: 5.79 GB in the SFT benchmark, 5.5-5.7 GB
before), though the heap keeps some fragmented free blocks and the process no longer shrinks
after a peak. Off with ``POSTTRAIN_KEEP_FREED_MEMORY=0``; a no-op off glibc.

Activation-checkpointed passes fragment that heap badly (freed blocks not reused, their pages
resident: 7.0 GB peak for 0.55 GB in use), so there :func:`release_between_layers` hands the
free pages back between layers; :func:`release_freed_memory` does it once per online-RL step.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top

_state: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the malloc settings once per process; True when they are in effect."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("POSTTRAIN_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return _state
    libc = _libc()
    if libc is None:
        return _state
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _state = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _state


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``); a no-op off glibc.

    For loops whose phases allocate differently (online RL: the decoding copy and KV cache,
    then the training passes' activations), where the blocks one phase freed between live ones
    fragment the heap and pile up as resident memory that the next phase does not reuse.
    :func:`posttrain.stages.online_rl.train` calls it once a step, after the rollout (the
    decoding copy just freed): in ``benchmarks/grpo_vs_trl.py`` peak RSS 1,808 -> 1,754 MB
    at the same speed; a second call after each update took it to 1,686 MB but cost ~10% of a
    step (the training blocks faulted in again by the next rollout). A few milliseconds a call.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_between_layers(model) -> int:
    """Before each decoder layer's forward and backward in training passes (grad enabled), hand
    the heap's free pages back to the OS (:func:`release_freed_memory`) once resident memory has
    grown by :data:`RELEASE_ABOVE_BYTES`; no-op off glibc or with
    ``POSTTRAIN_RELEASE_PER_LAYER=0``. Returns the number of layers hooked (0 when already done).

    For activation-checkpointed models (:func:`posttrain.models.prepare_model` hooks them): a
    checkpointed pass frees blocks in the heap that glibc does not reuse. Each layer's
    transients (the MLP's ``(B, T, 1536)`` products, the LoRA outputs) come partly from fresh
    heap while the block kept between them (the layer's input, saved for the recompute) keeps
    the freed ones from merging, and their pages stay resident (:func:`keep_freed_memory`).
    Our reading of the cause: PyTorch takes CPU tensors with ``posix_memalign(64, n)``, which
    glibc serves from a free block only if it holds ``n`` plus the alignment slack, so a block
    freed by one layer is just too small for the same tensor of the next unless it merged with
    a neighbour. The budget keeps trims rare: pages handed back are faulted in again when reused.

    Measured on machine D (2 cores, float32), the embedded SmolLM2 with LoRA and checkpointing,
    forward + backward over 8 x 672 tokens (the GRPO stage's shape), three passes
    (``benchmarks/heap_release.py``): without it 0.55 GB in use at most but **7.0 GB** peak RSS,
    50.7 s a pass; with it (1 GiB budget) **2.6 GB**, 53.9 s. In the reasoning demo's GRPO stage
    the whole process peaked at 4.2 GB instead of 11.6. Without checkpointing (full SFT,
    8 x 256 tokens, ``benchmarks/sft_vs_trl.py --only posttrain``) the trims cost 11% (140.9 ->
    125.3 tokens/s) for 15% less RSS (6.0 -> 5.1 GB): not hooked there.
    Decoding and other passes without grad are not hooked either (a trim per layer per
    generated token would cost more than the step).
    """
    if os.environ.get("POSTTRAIN_RELEASE_PER_LAYER", "1") == "0" or _libc() is None:
        return 0
    import torch

    layers = _decoder_layers(model)
    if not layers or getattr(model, "_posttrain_releases", False):
        return 0

    def before(_module, _args):
        if torch.is_grad_enabled():
            _release_if_over()

    def after(_module, _args, out):  # the layer's backward starts when its output's gradient is ready
        o = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled() and isinstance(o, torch.Tensor) and o.requires_grad:
            o.register_hook(_release_hook)

    for layer in layers:
        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
    model._posttrain_releases = True
    return len(layers)


def _release_hook(_grad):
    _release_if_over()


#: :func:`release_between_layers` trims once resident memory has grown by this much since the
#: last trim, or since the lowest it fell to after it (env ``POSTTRAIN_RELEASE_ABOVE_MIB``;
#: 0 = at nearly every layer).
RELEASE_ABOVE_BYTES = int(os.environ.get("POSTTRAIN_RELEASE_ABOVE_MIB", "1024")) * 2**20

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_baseline = 0  # resident bytes after the last trim, or the fewest seen since


def resident_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _release_if_over() -> None:
    global _baseline
    now = resident_bytes()
    if now - _baseline > RELEASE_ABOVE_BYTES:
        release_freed_memory()
        _baseline = resident_bytes()
    elif now < _baseline:  # memory went back (a phase ended): growth counts from here
        _baseline = now


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_info() -> _MallInfo2 | None:
    """glibc's ``mallinfo2()`` of the main heap (bytes in use ``uordblks``, free ``fordblks``,
    mmapped ``hblkhd``); None off glibc or before glibc 2.33."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return fn()


def _decoder_layers(model):
    """The decoder's layer list of a transformers model, peft-wrapped or not: its longest
    ``ModuleList`` (``model.layers`` of Llama, Qwen, Mistral; ``transformer.h`` of GPT-2)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len, default=None)


@functools.cache
def _libc():
    """glibc through ctypes, loaded once (release_freed_memory runs every online-RL step); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = libc.gnu_get_libc_version  # glibc only (musl has no mallopt / malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


#: Shapes kept by the CPU matmul caches (defaults 1,024 each), see :func:`limit_kernel_caches`.
KERNEL_CACHE_CAPACITY = "32"


def limit_kernel_caches() -> None:
    """Cap oneDNN's primitive cache and ideep's LRU cache (PyTorch's CPU matmul kernels) at
    :data:`KERNEL_CACHE_CAPACITY` shapes, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` /
    ``LRU_CACHE_CAPACITY`` are already set. Read once, at the first CPU matmul of the process,
    so ``import posttrain`` does it.

    Both keep one entry per matmul shape, and online RL sees new shapes every step (sequence
    lengths vary): in GRPO on the embedded model the heap in use grew ~80 MB a step, 2.2 GB peak
    RSS after 6 steps; with both caches off it stayed flat (1.6 GB) but steps took 3x as long
    (every kernel rebuilt). 32 entries each, with online RL's rows padded to a multiple of 32
    tokens so that shapes repeat, kept the speed and the peak at 1.8 GB
    (``benchmarks/grpo_vs_trl.py``, README). Training and decoding reuse a few shapes at a time.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)
    os.environ.setdefault("LRU_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)
