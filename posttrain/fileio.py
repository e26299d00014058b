"""Crash-safe writes: a file or directory is written beside its final name, flushed to disk,
and renamed over it, so a kill or a power loss leaves either the old one or the new one.

A rename alone survives a killed process (the page cache is the kernel's), but not a power
loss or a crashed machine: without ``fsync`` the rename can reach the disk before the data,
and the final name then holds an empty or partial file. So the data is flushed before the
rename, and the directory after it (the rename itself is an entry of the directory).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk (best effort: a filesystem that cannot is passed over)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # (Windows flushes writable handles only)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def sync_tree(root: str | Path) -> None:
    """Flush every file under ``root``, then its directories (deepest first)."""
    dirs = []
    for d, _subdirs, files in os.walk(root):
        dirs.append(d)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                fsync_file(p)
    for d in reversed(dirs):
        fsync_dir(d)


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all: text, bytes, or ``content(tmp_path)`` (e.g. a
    ``torch.save``) into ``PATH.tmp-PID``, flushed, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def replace_tree(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``, flushed to disk first. An existing
    ``final`` is renamed aside and deleted after, so ``final`` is never a mix of the two nor a
    half-deleted one (``.old-NAME-PID``: a kill between the two renames leaves it for the
    caller to put back or delete)."""
    import shutil

    sync_tree(tmp)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
