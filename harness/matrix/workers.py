"""Many variants at once without oversubscribing the host.

- ``HostBudget``: a ledger of the CPUs and memory that running variants hold, kept in a file
  under the cache dir behind flock, so every runner process on the host (CLI workers,
  pytest-xdist workers, avocado tasks, a colleague's run) draws from one budget.
- ``Job`` / ``execute_job``: one attempt of one variant as plain data, and the one function
  every runner calls to run it (engine, known issues, repro bundle, record file).
- ``run_jobs``: the CLI's scheduler: one process per job (qemu.qmp's sync shim wants an event
  loop of its own per process), started in input order, at most N at once, within the budget.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.core import proc
from harness.core.cache import cache_root
from harness.core.errors import NestvirtError, StepTimeout
from harness.guest.image import L1Image
from harness.host.probe import HostFacts
from harness.matrix.engines import runner_for
from harness.matrix.files import Resources
from harness.remote.ssh import HostSpec
from harness.results import known
from harness.results.repro import BUNDLE_VERDICTS, write_bundle
from harness.scenario.engine import RunContext, run_variant
from harness.scenario.result import ScenarioResult
from harness.scenario.spec import Variant

RECORD = "record.json"
# Verdicts that count as a failure of the system under test in repeat statistics.
FAILURE_VERDICTS = ("fail", "error", "known-issue")
# Left free for the host itself and whatever else runs on it.
MEM_RESERVE_MIB = 512
# How long a variant may wait for room on a busy host before it is an error.
BUDGET_WAIT_S = 3600.0


# --------------------------------------------------------------------------------------------
# the host budget


def host_cpus() -> int:
    """CPUs this process may use (affinity, cgroup-less); NESTVIRT_HOST_CPUS overrides."""
    forced = os.environ.get("NESTVIRT_HOST_CPUS")
    if forced:
        return max(1, int(forced))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def meminfo_mib() -> dict[str, int]:
    """/proc/meminfo in MiB (MemTotal, MemAvailable, ...)."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) // 1024
    return out


@dataclass(frozen=True)
class Reservation:
    key: str
    pid: int
    cpus: int
    mem_mib: int
    what: str


class HostBudget:
    """CPUs and memory held by running variants on this host, shared across processes.

    A reservation fits when the CPUs held stay within ``cpus`` and the memory held plus the
    new need stays within MemAvailable minus a reserve. Memory already touched by a running
    variant is counted twice that way (it is held and no longer available): conservative on
    purpose, since an oversubscribed TCG host turns into timeouts that look like guest bugs.
    Reservations of processes that died are dropped on the next look.
    """

    def __init__(self, path: Path | None = None, cpus: int | None = None,
                 mem_reserve_mib: int = MEM_RESERVE_MIB) -> None:
        self.path = path or cache_root() / "host-budget.json"
        self.cpus = cpus or host_cpus()
        self.mem_reserve_mib = mem_reserve_mib

    def never_fits(self, need: Resources) -> str | None:
        """Why this host can never give ``need`` (a skip reason), or None."""
        if need.cpus > self.cpus:
            return (f"needs {need.cpus} host CPUs (one per TCG vCPU), this host gives "
                    f"{self.cpus}")
        total = meminfo_mib().get("MemTotal", 0) - self.mem_reserve_mib
        if need.mem_mib > total:
            return (f"needs {need.mem_mib} MiB (src and dst guest RAM plus QEMU), this host "
                    f"has {total} MiB to give")
        return None

    @contextmanager
    def _ledger(self) -> Iterator[list[Reservation]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    raw = json.loads(self.path.read_text())
                    held = [Reservation(**r) for r in raw]
                except (OSError, ValueError, TypeError):
                    held = []  # a missing or torn ledger holds nothing
                held = [r for r in held if _alive(r.pid)]
                yield held
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps([asdict(r) for r in held]))
                tmp.replace(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def held(self) -> list[Reservation]:
        with self._ledger() as held:
            return list(held)

    def try_acquire(self, need: Resources, what: str, pid: int | None = None) -> Reservation | None:
        """Reserve ``need`` now if it fits, else None (never waits)."""
        with self._ledger() as held:
            cpus = sum(r.cpus for r in held)
            mem = sum(r.mem_mib for r in held)
            available = meminfo_mib().get("MemAvailable", 0) - self.mem_reserve_mib
            if cpus + need.cpus > self.cpus or mem + need.mem_mib > available:
                return None
            r = Reservation(uuid.uuid4().hex[:12], pid or os.getpid(), need.cpus, need.mem_mib,
                            what)
            held.append(r)
            return r

    def release(self, r: Reservation) -> None:
        with self._ledger() as held:
            held[:] = [x for x in held if x.key != r.key]

    @contextmanager
    def hold(self, need: Resources, what: str, timeout: float = BUDGET_WAIT_S,
             poll: float = 0.5) -> Iterator[Reservation]:
        """Wait until ``need`` fits, hold it for the block, release it after (also on error)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.try_acquire(need, what)
            if r is not None:
                break
            if time.monotonic() > deadline:
                raise StepTimeout(f"host budget: no room for {need.cpus} CPU(s) and "
                                  f"{need.mem_mib} MiB within {timeout:g}s")
            time.sleep(poll)
        try:
            yield r
        finally:
            self.release(r)


def _alive(pid: int) -> bool:
    # By process state: a zombie answers kill -0 (PID 1 does not reap here).
    return proc.pid_alive(pid)


# --------------------------------------------------------------------------------------------
# one job


@dataclass(frozen=True)
class Job:
    """One attempt of one planned variant: everything a worker needs, as plain JSON data.

    ``out`` is the engine's out dir for this job (RunContext.out); ``host``/``image`` are the
    probe and the built L1 image of the run (HostFacts.to_json, L1Image.to_json).
    """

    index: int
    attempt: int
    id: str
    variant: dict[str, Any]
    out: str
    host: dict[str, Any]
    image: dict[str, Any]
    needs: Resources
    signatures: tuple[dict[str, Any], ...] = ()
    of: int = 1  # attempts planned for this variant
    # Options every job of the run shares: "dst_host" (HostSpec.to_json), "stall_timeout",
    # "start" (snapshot | cold).
    run: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["signatures"] = list(self.signatures)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Job:
        d = dict(d)
        d["needs"] = Resources(**d["needs"])
        d["signatures"] = tuple(d.get("signatures", ()))
        return cls(**d)


def job_out(root: Path, job_id: str, variant_id: str) -> Path:
    """The engine's out dir for a job: the run's root when the job id is the variant id (the
    layout of a plain `nestvirt run`), else a subdir named by the job id (knobs, repeats)."""
    return root if job_id == variant_id else root / slug(job_id)


def slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text)


def signatures_json(sigs: list[known.Signature]) -> tuple[dict[str, Any], ...]:
    return tuple(asdict(s) for s in sigs)


def context(job: Job) -> RunContext:
    dst = job.run.get("dst_host")
    return RunContext(host=HostFacts.from_json(job.host), image=L1Image.from_json(job.image),
                      out=Path(job.out), dst_host=HostSpec.from_json(dst) if dst else None,
                      stall_timeout=job.run.get("stall_timeout", 15.0),
                      start=job.run.get("start", "snapshot"))


def skip_reason(job: Job, budget: HostBudget | None) -> str | None:
    """Why this job will be a skip without starting anything (host can't), or None."""
    variant = Variant.from_json(job.variant)
    reason = (context(job).unsupported_reason(variant) if runner_for(variant) is run_variant
              else None)
    if reason is None and budget is not None:
        reason = budget.never_fits(job.needs)
    return reason


def execute_job(job: Job, budget: HostBudget | None = None) -> dict[str, Any]:
    """Run one job through the engine and return its record (also written as record.json).

    Applies known-issue signatures, writes a repro bundle for fail/error/known-issue, and when
    ``budget`` is given holds the job's resources while QEMU runs. Never raises for a
    scenario's own failure; raises NestvirtError when the job itself is unusable.
    """
    ctx = context(job)
    variant = Variant.from_json(job.variant)
    runner = runner_for(variant)
    ctx.out.mkdir(parents=True, exist_ok=True)
    # run_variant's own skip check, done before holding any budget; other engines (vmexit)
    # decide per profile themselves.
    host_reason = (ctx.unsupported_reason(variant) if runner is run_variant else None) or (
        budget.never_fits(job.needs) if budget else None)
    if host_reason:
        res = ScenarioResult(id=job.id, scenario=variant.spec.name, verdict="skip",
                             reason=host_reason, params=variant.params())
        workdir = ctx.out / slug(variant.id)
        workdir.mkdir(parents=True, exist_ok=True)
        res.artifacts = {"dir": str(workdir), "files": []}
    elif budget is not None:
        with budget.hold(job.needs, job.id):
            res = runner(variant, ctx)
    else:
        res = runner(variant, ctx)
    res.id = job.id
    if job.of > 1:
        res.metrics["attempt"] = {"n": job.attempt, "of": job.of}
    sigs = [known.Signature(**s) for s in job.signatures]
    known.classify([res], sigs, ctx.accel, ctx.host.qemu.version)  # the result's own versions first
    if res.verdict in BUNDLE_VERDICTS:
        write_bundle(res, job.variant, job.image, job.host)
    return write_record(job, res)


def write_record(job: Job, res: ScenarioResult) -> dict[str, Any]:
    record = {"index": job.index, "attempt": job.attempt, "of": job.of, "id": job.id,
              "result": res.to_json(), "host": job.host, "image": job.image}
    workdir = Path(res.artifacts.get("dir") or job.out)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RECORD).write_text(json.dumps(record, indent=1, default=str))
    return record


def failure_text(record: dict[str, Any]) -> str:
    """What a runner shows for a failed variant: verdict, failed checks, where to look."""
    r = record["result"]
    lines = [f"{r['id']}: {r['verdict'].upper()}"]
    failed = [c for c in r.get("checks", []) if not c["ok"]]
    lines += [f"  {c['name']}: {c['detail']}" for c in failed] or [f"  {r['reason']}"]
    art = r.get("artifacts", {})
    if art.get("dir"):
        lines.append(f"  artefacts: {art['dir']}")
    if art.get("repro"):
        lines.append(f"  reproduce: {art['repro']}")
    return "\n".join(lines)


def error_record(job: Job, reason: str) -> dict[str, Any]:
    """The record of a job whose worker could not report (crashed, killed, unusable job)."""
    variant = job.variant.get("spec", {}).get("name", job.id.split("/")[0])
    res = ScenarioResult(id=job.id, scenario=variant, verdict="error", reason=reason[:1000])
    # Its own dir: job.out may be the run's root, shared with other jobs.
    res.artifacts = {"dir": str(Path(job.out) / slug(job.id)), "files": []}
    return write_record(job, res)


def collect_records(root: Path, since: float | None = None) -> list[dict[str, Any]]:
    """Every record.json under ``root`` (pytest workers, avocado tasks), in input order;
    with ``since`` (epoch seconds) only those written from then on (this session's)."""
    records = []
    for path in root.rglob(RECORD):
        try:
            if since is not None and path.stat().st_mtime < since:
                continue
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a worker killed mid-write left nothing usable
    records.sort(key=lambda r: (r.get("index", 0), r.get("attempt", 1)))
    return records


# --------------------------------------------------------------------------------------------
# the CLI's scheduler


@dataclass
class _Running:
    job: Job
    process: Any
    conn: Any
    reservation: Reservation | None
    started: float = field(default_factory=time.monotonic)


def run_jobs(jobs: list[Job], *, parallel: int, budget: HostBudget,
             on_done: Callable[[Job, dict[str, Any]], bool],
             execute: Callable[[Job], dict[str, Any]] | None = None) -> None:
    """Run ``jobs`` in input order, each in its own process, at most ``parallel`` at once.

    A job starts only when the budget has room; the head of the queue waits rather than being
    overtaken, so output order follows input order. Jobs that will skip run inline (no QEMU).
    ``on_done(job, record)`` returning False stops new starts (--until-fail); running jobs
    finish. Ctrl-C/SIGTERM: every worker is told to stop, reaps its QEMUs and is waited for;
    the KeyboardInterrupt is then re-raised for the caller to keep what finished.
    ``execute`` replaces execute_job in the workers (tests; must be importable by name).
    """
    mp = multiprocessing.get_context("spawn")
    pending = list(jobs)
    running: list[_Running] = []
    stopping = False
    waited_since = 0.0
    try:
        while pending or running:
            while pending and not stopping:
                job = pending[0]
                if execute is None and skip_reason(job, budget):
                    # Nothing to start: judged inline at once, without taking a slot.
                    pending.pop(0)
                    if not on_done(job, execute_job(job, budget)):
                        stopping = True
                    continue
                if len(running) >= max(1, parallel):
                    break
                r = budget.try_acquire(job.needs, job.id)
                if r is None:
                    # Wait for room (a running job ending, or someone else's), but not forever.
                    waited_since = waited_since or time.monotonic()
                    if time.monotonic() - waited_since < BUDGET_WAIT_S:
                        break
                    pending.pop(0)
                    waited_since = 0.0
                    on_done(job, error_record(job, f"host budget: no room for {job.needs.cpus} "
                                                   f"CPU(s) and {job.needs.mem_mib} MiB within "
                                                   f"{BUDGET_WAIT_S:g}s"))
                    continue
                waited_since = 0.0
                pending.pop(0)
                recv, send = mp.Pipe(duplex=False)
                p = mp.Process(target=_worker, args=(job.to_json(), send, execute, os.getpid()),
                               name=f"nestvirt-{job.id}")
                _start_deaf_to_ctrl_c(p)
                send.close()
                running.append(_Running(job, p, recv, r))
            if not running:
                if pending and not stopping:
                    time.sleep(0.5)
                    continue
                break
            ready = multiprocessing.connection.wait(
                [x.conn for x in running] + [x.process.sentinel for x in running], timeout=1.0)
            for x in list(running):
                if x.conn not in ready and x.process.sentinel not in ready:
                    continue
                record = _receive(x)
                if record is None:
                    continue
                running.remove(x)
                if x.reservation:
                    budget.release(x.reservation)
                if not on_done(x.job, record) and not stopping:
                    stopping = True
            if stopping:
                pending.clear()
    except KeyboardInterrupt:
        _stop_all(running, budget)
        raise


def _start_deaf_to_ctrl_c(p: Any) -> None:
    """Start a worker with SIGINT ignored until _worker sets its own handler: a Ctrl-C while
    it still imports would print a traceback. The terminal's Ctrl-C reaches this process too,
    which stops the workers itself (SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        p.start()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        p.start()
    finally:
        signal.signal(signal.SIGINT, old)


def _receive(x: _Running) -> dict[str, Any] | None:
    """The worker's record once it is there; an error record if the worker died without one."""
    try:
        if x.conn.poll():
            record = x.conn.recv()
            x.process.join(timeout=30)
            return record
    except (EOFError, OSError):
        pass
    if x.process.is_alive():
        return None
    x.process.join()
    return error_record(x.job, f"worker process died (exit status {x.process.exitcode}) "
                                "before reporting")


def _stop_all(running: list[_Running], budget: HostBudget) -> None:
    for x in running:
        if x.process.is_alive():
            x.process.terminate()  # SIGTERM: the worker turns it into KeyboardInterrupt
    deadline = time.monotonic() + 30
    for x in running:
        x.process.join(timeout=max(0.1, deadline - time.monotonic()))
        if x.process.is_alive():
            x.process.kill()
            x.process.join(timeout=5)
            # Its QEMUs (own sessions, so the kill did not reach them) are found by out dir.
            kill_qemus_under(Path(x.job.out))
        if x.reservation:
            budget.release(x.reservation)


def kill_qemus_under(out: Path) -> int:
    """SIGKILL QEMU processes whose command line names ``out``; the last resort after a
    worker was killed before it could reap them. Returns how many were found."""
    needle = str(out.resolve()).encode()
    found = 0
    for pid, argv in proc.qemu_processes():
        if any(needle in a for a in argv):
            try:
                os.kill(pid, signal.SIGKILL)
                found += 1
            except ProcessLookupError:
                pass
    return found


def _interrupt_once(signum: int, frame: object) -> None:
    # The terminal's SIGINT and the parent's SIGTERM may both arrive: the second must not
    # interrupt the teardown the first started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    proc.note_interrupt()
    raise KeyboardInterrupt


def _worker(job_json: dict[str, Any], conn: Any,
            execute: Callable[[Job], dict[str, Any]] | None, parent: int | None = None) -> None:
    if parent is not None:
        # A SIGKILLed CLI takes its workers with it (and they their QEMUs: proc.spawn).
        proc.die_with_parent(parent)
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    job = Job.from_json(job_json)
    try:
        record = (execute or execute_job)(job)
        conn.send(record)
    except KeyboardInterrupt:
        pass  # the parent asked; it keeps what finished
    except Exception as e:  # noqa: BLE001 - a worker bug must still come back as a result
        if proc.interrupted():
            # The interrupt landed inside a library that turned it into its own error
            # (qemu.qmp's connect: ConnectError): still the parent's stop, not a result.
            pass
        elif isinstance(e, NestvirtError):
            conn.send(error_record(job, str(e)))
        else:
            conn.send(error_record(job, f"internal error in worker: {type(e).__name__}: {e}\n"
                                        f"{traceback.format_exc(limit=5)}"))
    finally:
        proc.reap_all()
        conn.close()
