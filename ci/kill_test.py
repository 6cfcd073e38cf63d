#!/usr/bin/env python3
"""Kill the harness at random points and count what it left behind.

Runs `nestvirt run` N times (default 20), alternating a plain run (-j 1 path) and a matrix run
with two workers (-j 2), and sends SIGINT, SIGTERM or SIGKILL at a random moment, either to the
CLI or (in -j 2 runs) to one of its workers. After each run it counts, by process state (a
zombie is dead: PID 1 here does not reap) and by the kernel's socket tables:

* QEMUs of that run still alive (their command line names the run's out dir),
* TCP ports that run's QEMUs used still in LISTEN,
* unix sockets of the run still bound or on disk,
* the run's private temp roots left at exit and after the next CLI start (the janitor),
* whether every scenario that finished is in results.json (partial results for what finished).

Prints one table and exits 1 if anything was left (0 otherwise).

    nice -n 5 .venv/bin/python ci/kill_test.py            # 20 runs
    nice -n 5 .venv/bin/python ci/kill_test.py --runs 4 --seed 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.core import proc, scratch  # noqa: E402

SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
EXIT_WAIT_S = 120.0  # a CLI told to stop that is still there after this is a hang


def children(pid: int) -> list[int]:
    """Every descendant of pid now (from /proc's PPid lines)."""
    by_parent: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int(next(x for x in (d / "status").read_text().splitlines()
                            if x.startswith("PPid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        by_parent.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in by_parent.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def live_qemus(out: Path) -> list[int]:
    needle = str(out).encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            argv = cmdline(int(d.name))
            if argv and b"qemu-system" in argv[0] and any(needle in a for a in argv) and \
                    proc.pid_alive(int(d.name)):
                pids.append(int(d.name))
    return pids


def ports_used(out: Path) -> set[int]:
    """TCP ports the run's QEMUs were given or reported (hostfwd, migration listeners)."""
    ports: set[int] = set()
    for f in list(out.rglob("*-cmdline.txt")) + list(out.rglob("*-qmp.jsonl")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        ports.update(int(p) for p in re.findall(r"tcp:(?:127\.0\.0\.1|0\.0\.0\.0|\[::1?\]):(\d+)",
                                                text) if int(p))
        ports.update(int(p) for p in re.findall(r'"port": "(\d+)"', text) if int(p))
    return ports


def listening() -> set[int]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if len(f) > 3 and f[3] == "0A":
                found.add(int(f[1].rsplit(":", 1)[1], 16))
    return found


def roots_of(pids: set[int]) -> list[Path]:
    """Private temp roots (harness/core/scratch.py) owned by any of pids."""
    roots = []
    for d in Path(tempfile.gettempdir()).glob(scratch.PREFIX + "*"):
        try:
            owner = int((d / scratch.OWNER).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if owner in pids:
            roots.append(d)
    return roots


def unix_left(roots_exit: list[Path], roots_after: list[Path]) -> int:
    """Unix sockets of the run: still bound in the kernel (a process holds them), or files
    still on disk after the janitor."""
    names = [str(r) for r in roots_exit]
    try:
        table = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        table = []
    bound = sum(1 for ln in table if any(n in ln for n in names))
    on_disk = sum(1 for r in roots_after for p in r.rglob("*") if p.is_socket())
    return bound + on_disk


def results_check(out: Path) -> tuple[int, int, str]:
    """(finished scenarios, of them in results.json, note)."""
    finished = set()
    for f in out.rglob("scenario.json"):
        try:
            finished.add(json.loads(f.read_text())["id"])
        except (OSError, ValueError, KeyError):
            continue
    try:
        listed = {s["id"] for s in json.loads((out / "results.json").read_text())["scenarios"]}
        note = "results.json"
    except (OSError, ValueError, KeyError):
        listed, note = set(), "no results.json" if out.exists() else "no out dir"
    return len(finished), len(finished & listed), note


def one_run(n: int, rng: random.Random, base: Path, python: str) -> dict:
    parallel = n % 2 == 1
    target = rng.choice(("cli", "worker")) if parallel else "cli"
    sig = ("INT", "TERM", "KILL")[n % 3]
    at = round(rng.uniform(0.5, 5.5), 1)  # a two-variant run takes ~5 s here (fast start)
    out = base / f"run-{n:02d}"
    argv = [python, "-m", "harness", "run", "--out", str(out), "--compression", "none"]
    argv += (["migrate-plain", "migrate-bare", "-j", "2"] if parallel else
             ["migrate-plain", "migrate-bare"])
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    tree: set[int] = {p.pid}
    victim = None
    hung = False
    while p.poll() is None and time.monotonic() - t0 < at:
        tree.update(children(p.pid))
        time.sleep(0.1)
    if p.poll() is None:
        if target == "worker":
            # Job workers run spawn_main; the resource tracker beside them is not one.
            workers = [c for c in children(p.pid)
                       if any(b"spawn_main" in a for a in cmdline(c))]
            victim = workers[0] if workers else None
        tree.update(children(p.pid))
        try:
            os.kill(victim or p.pid, SIGNALS[sig])
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + EXIT_WAIT_S + (600 if victim else 0)
        while p.poll() is None and time.monotonic() < deadline:
            tree.update(children(p.pid))
            time.sleep(0.2)
        if p.poll() is None:
            hung = True
            os.killpg(p.pid, signal.SIGKILL)
    err = p.communicate()[1]
    took = round(time.monotonic() - t0, 1)
    time.sleep(2.0)  # the kernel's parent-death signals and the reaping of sessions
    qemus = live_qemus(out)
    ports = ports_used(out) & listening()
    roots_exit = roots_of(tree)
    # The next start of the CLI sweeps roots whose owners died.
    subprocess.run([python, "-m", "harness", "list"], cwd=REPO, capture_output=True, timeout=60)
    roots_after = roots_of(tree)
    sockets = unix_left(roots_exit, roots_after)
    finished, listed, note = results_check(out)
    # Every scenario that finished is in results.json (nothing finished: nothing to keep).
    partial_ok = finished == listed
    row = {"run": n, "jobs": 2 if parallel else 1, "target": "worker" if victim else "cli",
           "signal": sig, "at_s": at, "exit": p.returncode, "took_s": took,
           "killed_before_end": p.returncode not in (0, 1), "hung": hung,
           "live_qemus": len(qemus), "listening_ports": len(ports), "sockets": sockets,
           "tmp_at_exit": len(roots_exit), "tmp_after_janitor": len(roots_after),
           "finished": finished, "in_results": listed, "results": note,
           "traceback": "Traceback" in err,
           "stderr_tail": err.strip().splitlines()[-6:] if "Traceback" in err else []}
    row["leftover"] = bool(qemus or ports or sockets or roots_after or hung or not partial_ok
                           or row["traceback"])
    for pid in qemus:  # leave the machine clean for the next run, and say it was needed
        os.kill(pid, signal.SIGKILL)
    return row


def table(rows: list[dict]) -> str:
    cols = ["run", "jobs", "target", "signal", "at_s", "exit", "took_s", "live_qemus",
            "listening_ports", "sockets", "tmp_at_exit", "tmp_after_janitor", "finished",
            "in_results", "results", "leftover"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--keep", action="store_true", help="keep the runs' out dirs")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="kill-test-", dir="/var/tmp"))
    rows = []
    try:
        for n in range(1, args.runs + 1):
            row = one_run(n, rng, base, sys.executable)
            rows.append(row)
            print(f"run {n}: {row['signal']} to {row['target']} (-j {row['jobs']}) at "
                  f"{row['at_s']}s: exit {row['exit']}, leftover {row['leftover']}",
                  file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(table(rows))
    totals = {k: sum(r[k] for r in rows) for k in ("live_qemus", "listening_ports", "sockets",
                                                     "tmp_after_janitor")}
    bad = [r["run"] for r in rows if r["leftover"]]
    print(f"{len(rows)} runs; left behind: {totals['live_qemus']} QEMU(s), "
          f"{totals['listening_ports']} listening port(s), {totals['sockets']} socket(s), "
          f"{totals['tmp_after_janitor']} temp root(s) after the janitor; "
          f"runs with a leftover: {bad or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
