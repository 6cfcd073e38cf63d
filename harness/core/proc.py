"""The one place where subprocesses are started: always bounded, always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from harness.core.errors import SetupError, StepTimeout

_LIVE: set[subprocess.Popen] = set()


def run(
    argv: Sequence[str],
    timeout: float,
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    input: str | None = None,
    stdout_path: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with a timeout; raise StepTimeout or SetupError.

    With stdout_path, standard output goes to that file (binary-safe) instead of memory.
    """
    try:
        if stdout_path is not None:
            with open(stdout_path, "wb") as fh:
                cpb = subprocess.run(list(argv), cwd=cwd, env=env,
                                     input=input.encode() if input is not None else None,
                                     stdout=fh, stderr=subprocess.PIPE, timeout=timeout)
            cp = subprocess.CompletedProcess(cpb.args, cpb.returncode, "",
                                             cpb.stderr.decode(errors="replace"))
        else:
            cp = subprocess.run(list(argv), cwd=cwd, env=env, input=input,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise StepTimeout(f"{argv[0]} did not finish in {timeout:g}s") from e
    except FileNotFoundError as e:
        raise SetupError(f"program not found: {argv[0]}") from e
    if check and cp.returncode != 0:
        tail = (cp.stderr or cp.stdout).strip().splitlines()[-3:]
        raise SetupError(f"{' '.join(map(str, argv[:3]))} failed ({cp.returncode}): {' | '.join(tail)}")
    return cp


def spawn(argv: Sequence[str], *, stdout=None, stderr=None, cwd: str | Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a long-running process in its own process group; reap() or reap_all() ends it.

    ``env`` replaces the environment (None: inherit ours)."""
    try:
        p = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
            start_new_session=True, env=env,
        )
    except FileNotFoundError as e:
        raise SetupError(f"program not found: {argv[0]}") from e
    _LIVE.add(p)
    return p


def reap(p: subprocess.Popen, grace: float = 3.0) -> int | None:
    """Terminate (then kill) a spawned process and wait for it; returns its exit status."""
    try:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=grace)
    finally:
        _LIVE.discard(p)
    return p.returncode


def reap_all() -> None:
    """Reap every process still live; called on exit paths, including Ctrl-C."""
    for p in list(_LIVE):
        reap(p, grace=1.0)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
