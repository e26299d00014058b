"""Fault injection for the crash-safety tests (inactive unless ``POSTTRAIN_KILL_AT`` is set).

``POSTTRAIN_KILL_AT=point:N`` makes this process SIGKILL itself the ``N``-th time it reaches
``point`` (1-based). The points are the places a real crash hurts most:

* ``step``: inside an optimizer step, after the gradients are computed and before the update;
* ``checkpoint``: inside a checkpoint write, after the model is written and before the
  optimizer state (a half-written temporary directory is left behind);
* ``synth``: inside synthesis, after a chunk's rows are appended and before its progress
  marker is updated (the file holds rows the marker does not vouch for).

SIGKILL cannot be caught, so nothing (no ``finally``, no atexit) runs: exactly what an OOM
kill or a preempted machine does.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter = Counter()


def point(name: str) -> None:
    spec = os.environ.get("POSTTRAIN_KILL_AT")
    if not spec:
        return
    where, _, n = spec.partition(":")
    if where != name:
        return
    _seen[name] += 1
    if _seen[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def run_with_kills(cmd: list[str], kills: list[str | float], env: dict[str, str] | None = None,
                   timeout: float = 900) -> list[str]:
    """Run ``cmd`` (a resumable command) once per entry of ``kills``, each run killed with
    SIGKILL at that point, then once more to the end; returns what happened to each run.

    An entry ``"point:N"`` sets ``POSTTRAIN_KILL_AT`` (the run kills itself there); a number
    kills the run from outside after that many seconds. A run that finishes before its kill
    point is reported as ``finished``. The last run must exit 0.
    """
    import subprocess
    import time

    base = {**os.environ, **(env or {})}
    base.pop("POSTTRAIN_KILL_AT", None)
    outcomes = []
    for spec in kills:
        run_env = dict(base)
        if isinstance(spec, str):
            run_env["POSTTRAIN_KILL_AT"] = spec
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if isinstance(spec, str):
            _, err = proc.communicate(timeout=timeout)
        else:
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < spec:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=timeout)
        # a launcher (torchrun) reports its killed worker and exits 1
        if proc.returncode == -signal.SIGKILL or (proc.returncode != 0 and "(SIGKILL)" in err):
            outcomes.append(f"killed at {spec}")
        elif proc.returncode == 0:
            outcomes.append(f"finished before {spec}")
        else:
            raise RuntimeError(f"{' '.join(cmd)} (kill at {spec}) failed with exit code {proc.returncode}:\n{err[-3000:]}")
    res = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (final resume) failed with exit code {res.returncode}:\n{res.stderr[-3000:]}")
    return outcomes
