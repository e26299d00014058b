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
