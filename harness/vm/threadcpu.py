"""CPU time of every thread of some processes (QEMU's, named by -name ...,debug-threads=on),
sampled from /proc while something runs, and cut to a time window afterwards.

Per thread: /proc/PID/task/TID/schedstat (nanoseconds on CPU; /proc/.../stat's clock ticks
are 10 ms, too coarse for a one-second migration) and comm. A thread born during sampling
starts from 0 (the kernel's counter starts at its birth); one that exits loses at most its last
interval, which the process total (/proc/PID/stat, dead threads included) shows as
``unattributed_s``. The sampler's own CPU time is measured, so its cost can be quoted.
"""

from __future__ import annotations

import os
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field

_TICK = os.sysconf("SC_CLK_TCK")

# Thread kinds, for both QEMU generations: 7.2 live_migration / multifdsend_N / multifdrecv_N /
# compress / decompress; 10.0 mig/src/main / mig/src/send_N / mig/dst/recv_N (FINDINGS 4).
_KINDS = (
    ("vcpu", re.compile(r"^CPU \d+/")),
    ("mig-main", re.compile(r"^(live_migration|mig/src/main|mig/dst/main)$")),
    ("mig-send", re.compile(r"^(multifdsend_\d+|mig/src/send_\d+)$")),
    ("mig-recv", re.compile(r"^(multifdrecv_\d+|mig/dst/recv_\d+)$")),
    ("compress", re.compile(r"^compress$")),
    ("decompress", re.compile(r"^decompress$")),
    ("rcu", re.compile(r"^call_rcu$")),
    ("dirtyrate", re.compile(r"^get_dirtyrate$")),
    ("io", re.compile(r"^IO ")),
    ("worker", re.compile(r"^worker")),
)


def thread_kind(name: str, is_main: bool) -> str:
    """What a QEMU thread is, from its comm: main (the process's first thread), vcpu, mig-main,
    mig-send, mig-recv, compress, decompress, rcu, dirtyrate, io, worker, other. A second thread named like
    the binary is the RCU thread (it is created before -name is parsed, FINDINGS 4)."""
    if is_main:
        return "main"
    for kind, rx in _KINDS:
        if rx.match(name):
            return kind
    return "rcu" if name.startswith("qemu-system") else "other"


@dataclass
class ThreadSeries:
    tid: int
    name: str
    born_during: bool  # first seen after the first round: counted from 0
    t: list[float] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)

    def at(self, when: float) -> float:
        """CPU ns at time ``when`` (linear between samples; 0 before birth, last after exit)."""
        if not self.t:
            return 0.0
        if when <= self.t[0]:
            if not self.born_during:
                return float(self.ns[0])
            return 0.0
        i = bisect_right(self.t, when)
        if i >= len(self.t):
            return float(self.ns[-1])
        t0, t1, v0, v1 = self.t[i - 1], self.t[i], self.ns[i - 1], self.ns[i]
        return v0 + (v1 - v0) * (when - t0) / (t1 - t0) if t1 > t0 else float(v1)


@dataclass
class ProcessSeries:
    pid: int
    threads: dict[int, ThreadSeries] = field(default_factory=dict)
    t: list[float] = field(default_factory=list)
    ticks: list[int] = field(default_factory=list)  # utime+stime of the whole process

    def total_s(self, t0: float, t1: float) -> float:
        """Whole-process CPU seconds in [t0, t1] from the sampled totals (tick resolution)."""
        if not self.t:
            return 0.0

        def at(when: float) -> float:
            i = bisect_right(self.t, when)
            return float(self.ticks[max(0, min(i, len(self.t)) - 1)])

        return (at(t1) - at(t0)) / _TICK


@dataclass(frozen=True)
class ThreadCpu:
    """One thread's CPU in a window."""

    tid: int
    name: str
    kind: str
    cpu_s: float

    def to_json(self) -> dict:
        return {"tid": self.tid, "name": self.name, "kind": self.kind, "cpu_s": round(self.cpu_s, 4)}


_NAME_READS = 4


def _read_text(path: str) -> str | None:
    # os.open/os.read: a sampler round is a few dozen of these, Path.read_text costs twice as much
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_first_int(path: str) -> int | None:
    text = _read_text(path)
    try:
        return int(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def read_process_ticks(pid: int) -> int | None:
    """utime + stime of a process, dead threads included (fields 14 and 15 of /proc/PID/stat)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    rest = text[text.rfind(")") + 2:].split()  # comm may hold spaces and parentheses
    return int(rest[11]) + int(rest[12])


class ThreadCpuSampler:
    """Samples the threads of ``pids`` (side -> pid) every ``interval`` s in a thread of its
    own until stop(); window() then gives each thread's CPU seconds in any time span."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.05) -> None:
        self.interval = interval
        self.series = {side: ProcessSeries(pid) for side, pid in pids.items()}
        self.rounds = 0
        self.own_cpu_s = 0.0
        self.started = time.monotonic()
        self.stopped: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nestvirt-threadcpu", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for ps in self.series.values():
            now = time.monotonic()
            ticks = read_process_ticks(ps.pid)
            if ticks is None:
                continue  # the process is gone: its series ends here
            ps.t.append(now)
            ps.ticks.append(ticks)
            task = f"/proc/{ps.pid}/task"
            try:
                tids = os.listdir(task)
            except OSError:
                continue
            for name_ in tids:
                tid = int(name_)
                ns = _read_first_int(f"{task}/{name_}/schedstat")
                if ns is None:
                    continue  # exited while we looked
                th = ps.threads.get(tid)
                if th is None:
                    th = ps.threads[tid] = ThreadSeries(tid, "", born_during=self.rounds > 0)
                if len(th.t) < _NAME_READS:
                    # A new thread names itself just after it starts: read comm a few times,
                    # then no more (half of a round's reads otherwise).
                    comm = _read_text(f"{task}/{name_}/comm")
                    if comm is None:
                        continue
                    th.name = comm.strip()
                th.t.append(now)
                th.ns.append(ns)
        self.rounds += 1

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            while True:
                self._sample()
                if self._stop.wait(self.interval):
                    break
            self._sample()  # the last word, at stop()
        finally:
            self.own_cpu_s = time.thread_time() - t0

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.stopped = time.monotonic()

    @property
    def own_share(self) -> float:
        """The sampler's CPU time as a share of one core over its wall time."""
        wall = (self.stopped or time.monotonic()) - self.started
        return self.own_cpu_s / wall if wall > 0 else 0.0

    def window(self, side: str, t0: float, t1: float) -> list[ThreadCpu]:
        """Every thread of ``side`` with its CPU seconds in [t0, t1] (monotonic time)."""
        ps = self.series[side]
        out = []
        for tid, th in sorted(ps.threads.items()):
            cpu = (th.at(t1) - th.at(t0)) / 1e9
            if th.t and (th.t[-1] < t0 or (th.born_during and th.t[0] > t1)):
                continue  # gone before the window, or born after it
            out.append(ThreadCpu(tid, th.name, thread_kind(th.name, tid == ps.pid), max(0.0, cpu)))
        return out

    def unattributed_s(self, side: str, t0: float, t1: float) -> float:
        """Process CPU in the window that no sampled thread accounts for (threads that exited
        between samples, tick rounding); small when sampling is fine enough."""
        threads = sum(x.cpu_s for x in self.window(side, t0, t1))
        return self.series[side].total_s(t0, t1) - threads


def by_kind(threads: list[ThreadCpu]) -> dict[str, dict[str, float]]:
    """kind -> {n, total_s, min_s, max_s} over the threads of one side."""
    out: dict[str, dict[str, float]] = {}
    for th in threads:
        d = out.setdefault(th.kind, {"n": 0, "total_s": 0.0, "min_s": float("inf"), "max_s": 0.0})
        d["n"] += 1
        d["total_s"] += th.cpu_s
        d["min_s"] = min(d["min_s"], th.cpu_s)
        d["max_s"] = max(d["max_s"], th.cpu_s)
    return {k: {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in d.items()}
            for k, d in sorted(out.items())}
