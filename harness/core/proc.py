"""The one place where subprocesses are started: always bounded, always reaped, and tied to
this process so that none outlives it, not even after a SIGKILL.

Every child is forked by one long-lived thread of this process (the spawner) and asks the
kernel for SIGKILL when its parent goes (PR_SET_PDEATHSIG). The kernel sends that signal when
the *thread* that forked the child ends, not the process: forking from the caller's thread
would kill a QEMU as soon as a short-lived worker thread that started it returned. The spawner
lives as long as the process. A caller's network namespace is per thread (netns.entered):
the spawner enters the caller's namespace for the fork and comes back, so a child starts where
its caller is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.core.errors import SetupError, StepTimeout

_LIVE: set[subprocess.Popen] = set()

PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


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
    The command dies with this process, as spawn()'s do.
    """
    fh = open(stdout_path, "wb") if stdout_path is not None else None
    try:
        p = _start(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                   stdout=fh if fh is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                   cwd=cwd, env=env, new_session=False)
        try:
            out, err = p.communicate(input.encode() if input is not None else None,
                                     timeout=timeout)
        except subprocess.TimeoutExpired as e:
            p.kill()
            p.communicate()
            raise StepTimeout(f"{argv[0]} did not finish in {timeout:g}s") from e
        except BaseException:  # Ctrl-C while waiting: the command goes with us
            p.kill()
            p.wait()
            raise
    finally:
        if fh is not None:
            fh.close()
    cp = subprocess.CompletedProcess(list(argv), p.returncode,
                                     (out or b"").decode(errors="replace"),
                                     (err or b"").decode(errors="replace"))
    if check and cp.returncode != 0:
        tail = (cp.stderr or cp.stdout).strip().splitlines()[-3:]
        raise SetupError(f"{' '.join(map(str, argv[:3]))} failed ({cp.returncode}): {' | '.join(tail)}")
    return cp


def spawn(argv: Sequence[str], *, stdout=None, stderr=None, cwd: str | Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a long-running process in its own process group; reap() or reap_all() ends it,
    and the kernel kills it if this process dies first.

    ``env`` replaces the environment (None: inherit ours)."""
    p = _start(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
               new_session=True)
    _LIVE.add(p)
    return p


def _start(argv: Sequence[str], *, new_session: bool, **kw: Any) -> subprocess.Popen:
    """Popen on the spawner thread, in the caller's network namespace, child tied to us."""
    ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        parent = os.getpid()
        return _SPAWNER.call(lambda: _popen_in(ns, list(argv), parent, new_session, kw))
    except FileNotFoundError as e:
        raise SetupError(f"program not found: {argv[0]}") from e
    finally:
        os.close(ns)


def _popen_in(ns: int, argv: list[str], parent: int, new_session: bool,
              kw: dict[str, Any]) -> subprocess.Popen:
    home = None
    if os.readlink(f"/proc/self/fd/{ns}") != os.readlink("/proc/thread-self/ns/net"):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        _setns(ns)
    try:
        return subprocess.Popen(argv, start_new_session=new_session,
                                preexec_fn=_die_with(parent), **kw)
    finally:
        if home is not None:
            _setns(home)
            os.close(home)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise SetupError(f"setns(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")


def _die_with(parent: int) -> Callable[[], None]:
    prctl = _libc.prctl

    def child() -> None:  # runs between fork and exec: nothing that takes a lock
        # The spawner holds SIGINT/SIGTERM back (they are the main thread's): the child gets
        # them as any program would.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: go too
            os._exit(137)
    return child


def die_with_parent(parent: int) -> None:
    """Ask for SIGKILL when the parent goes, in a process that was not started by spawn()
    (a multiprocessing worker); exits at once if that parent is already gone."""
    _die_with(parent)()


class _Spawner:
    """One daemon thread that makes every fork of this process (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def call(self, fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()  # a forked copy of us starts afresh
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._serve, args=(self._queue,),
                                                name="nestvirt-spawner", daemon=True)
                self._thread.start()
            q = self._queue
        fut: Future = Future()
        q.put((fn, fut))
        try:
            return fut.result()
        except KeyboardInterrupt:
            # Ctrl-C while the spawner forks: the child may still come, and nobody would
            # know of it. Wait for it (briefly) and end it before the interrupt goes on.
            try:
                p = fut.result(timeout=30)
            except Exception:  # noqa: BLE001 - it did not start: nothing to end
                raise KeyboardInterrupt from None
            p.kill()
            p.wait(10)
            raise

    @staticmethod
    def _serve(q: queue.SimpleQueue) -> None:
        # Process signals go to the main thread, whose Python handlers act on them (and which
        # may hold them back for a moment: signals_deferred).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while True:
            fn, fut = q.get()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(e)


_SPAWNER = _Spawner()


_INTERRUPTED = threading.Event()


def note_interrupt() -> None:
    """Called by the runners' SIGINT/SIGTERM handlers: the stop was asked for. A library may
    turn the KeyboardInterrupt into an error of its own (qemu.qmp's connect raises
    ConnectError); whoever catches errors asks interrupted() before calling it a result."""
    _INTERRUPTED.set()
    # The tasks the stop abandoned inside qemu.qmp's event loop are reported by asyncio when
    # collected ("Task exception was never retrieved", with a traceback): consequences of the
    # stop, not news, and they must not reach the terminal.
    for name in ("asyncio", "qemu.qmp"):
        logging.getLogger(name).disabled = True


def interrupted() -> bool:
    return _INTERRUPTED.is_set()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a short, bounded block that must not be cut in the
    middle (an asyncio session whose library cannot be interrupted at any point); they are
    delivered, and act, right after it. Outside the main thread: no-op.

    Deferred at the handler, not with the signal mask: a mask is per thread, and a process
    signal goes to any thread that leaves it unblocked (xdist's, a relay's), whose arrival
    still runs the main thread's Python handler at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def pid_state(pid: int) -> str:
    """The kernel's one-letter state of a process (R, S, D, T, Z, ...), or "gone".

    A zombie (Z) or dead (X) process is not alive: on these hosts PID 1 does not reap, so
    kill -0 succeeds on a process that ended long ago."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("State:"):
                    return line.split()[1]
    except OSError:
        pass
    return "gone"


def qemu_processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every QEMU process on the host, zombies included (ask pid_state)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in Path(argv[0].decode(errors="replace")).name.encode():
            yield int(d.name), argv


def pid_alive(pid: int) -> bool:
    return pid_state(pid) not in ("Z", "X", "gone")


def reap(p: subprocess.Popen, grace: float = 3.0) -> int | None:
    """Terminate (then kill) a spawned process and wait for it; returns its exit status.
    A stopped process (SIGSTOP) cannot act on SIGTERM: it is killed at once."""
    try:
        if p.poll() is None:
            stopped = pid_state(p.pid) == "T"
            _signal_group(p, signal.SIGKILL if stopped else signal.SIGTERM)
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
