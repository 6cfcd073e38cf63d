"""Nothing outlives the harness: children die with it (PR_SET_PDEATHSIG from one long-lived
spawner thread), private temp roots of dead runs are swept, and a SIGKILLed CLI leaves no QEMU.
Real processes throughout; liveness judged by /proc state (PID 1 here does not reap)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.core import proc, scratch
from harness.remote import netns

REPO = Path(__file__).resolve().parent.parent


def wait_dead(pid: int, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while proc.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.pid_state(pid)


def test_a_child_outlives_the_short_lived_thread_that_asked_for_it():
    # The parent-death signal fires when the forking *thread* ends: a -j worker thread or a
    # probe thread that returns must not take its QEMU with it.
    got: dict[str, subprocess.Popen] = {}
    t = threading.Thread(target=lambda: got.update(p=proc.spawn(["sleep", "30"])))
    t.start()
    t.join()
    time.sleep(0.3)
    p = got["p"]
    try:
        assert proc.pid_state(p.pid) == "S"
    finally:
        proc.reap(p)


def test_a_sigkilled_parent_takes_its_children_with_it(tmp_path: Path):
    code = ("import threading, time\nfrom harness.core import proc\n"
            "t = threading.Thread(target=lambda: print(proc.spawn(['sleep', '300']).pid, "
            "flush=True))\n"
            "t.start(); t.join(); time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline().split()[0])
        assert proc.pid_alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert wait_dead(child) in ("Z", "gone"), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_child_dies_when_its_parent_is_gone_before_it_asked(tmp_path: Path):
    # The race the check after prctl closes: the parent died between fork and prctl.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cp = subprocess.run([sys.executable, "-c", f"from harness.core import proc; "
                         f"proc.die_with_parent({dead.pid}); print('still here')"],
                        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 137 and "still here" not in cp.stdout


def test_a_child_starts_in_its_callers_network_namespace():
    why = netns.available()
    if why:
        pytest.skip(why)
    name = f"nvt{os.getpid() % 100000}"
    proc.run(["ip", "netns", "add", name], 10)
    try:
        with netns.entered(name):
            mine = netns.current()
            theirs = proc.run(["readlink", "/proc/self/ns/net"], 10).stdout.strip()
        assert theirs == mine != netns.current()
        # And the spawner came back: the next child is in this thread's namespace again.
        assert proc.run(["readlink", "/proc/self/ns/net"], 10).stdout.strip() == netns.current()
    finally:
        proc.run(["ip", "netns", "del", name], 10, check=False)


def test_pid_state_sees_a_zombie_that_kill_0_calls_alive():
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while proc.pid_state(p.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        os.kill(p.pid, 0)  # succeeds on a zombie: why liveness is read from /proc
        assert proc.pid_state(p.pid) == "Z" and not proc.pid_alive(p.pid)
    finally:
        p.wait()
    assert proc.pid_state(p.pid) == "gone"


def test_the_janitor_sweeps_only_roots_of_dead_owners(tmp_path: Path):
    mine = scratch.private_dir(parent=tmp_path)
    assert (mine.stat().st_mode & 0o777) == 0o700
    zombie = subprocess.Popen(["true"])
    dead = scratch.private_dir(parent=tmp_path)
    (dead / scratch.OWNER).write_text(f"{zombie.pid} 1\n")
    reused = scratch.private_dir(parent=tmp_path)
    (reused / scratch.OWNER).write_text(f"{os.getpid()} 1\n")  # a pid that now is someone else
    foreign = tmp_path / "nestvirt-someone-elses"
    foreign.mkdir()
    time.sleep(0.2)
    try:
        removed = scratch.sweep(tmp_path)
    finally:
        zombie.wait()
    assert sorted(removed) == sorted([dead, reused])
    assert mine.exists() and foreign.exists() and not dead.exists() and not reused.exists()


def qemus_naming(path: Path) -> list[tuple[int, str]]:
    """(pid, state) of live QEMU processes whose command line names ``path``."""
    found = []
    for pid, argv in proc.qemu_processes():
        state = proc.pid_state(pid)
        if any(str(path).encode() in a for a in argv) and state not in ("Z", "X", "gone"):
            found.append((pid, state))
    return found


@pytest.mark.qemu
def test_sigkill_of_the_cli_mid_run_leaves_no_live_qemu(tmp_path: Path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "harness", "run", "migrate-plain",
                          "--compression", "none", "--out", str(out)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not qemus_naming(out) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert qemus_naming(out), "the run started no QEMU to kill"
        time.sleep(1.0)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 5
        while qemus_naming(out) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not qemus_naming(out), f"left running: {qemus_naming(out)}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid, _ in qemus_naming(out):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def small_out(tmp_path: Path):
    """A 48 MiB tmpfs to be --out's filesystem (the fill-out faults fill only one this small)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "nestvirt-test", str(mnt)], 10)
    try:
        yield mnt
    finally:
        proc.run(["umount", "-l", str(mnt)], 10, check=False)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.qemu
def test_a_results_disk_that_fills_up_mid_run_is_named_and_nothing_else_is_lost(small_out):
    out = small_out / "out"
    cp = run_cli("run", "migrate-plain", "--compression", "none", "--inject", "fill-out",
                 "--out", str(out))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stderr
    sc = json.loads((out / "results.json").read_text())["scenarios"][0]
    assert sc["verdict"] == "error"
    assert re.search(r"out of disk: writing \S+/migrate-plain_none\+inject-fill-out/\S+ failed: "
                     r"No space left on device", sc["reason"]), sc["reason"]
    # What ran before the disk filled is kept: the migration and its checks.
    assert {c["name"] for c in sc["checks"]} >= {"migration-completed", "dst-qemu-alive"}
    assert all(c["ok"] for c in sc["checks"])
    wd = out / "migrate-plain_none+inject-fill-out"
    assert (wd / "scenario.json").exists() and not (out / ".nestvirt-fill").exists()
    assert not qemus_naming(out)


@pytest.mark.qemu
def test_a_results_disk_that_stays_full_gets_one_line_and_the_results_on_the_console(small_out):
    out = small_out / "out"
    cp = run_cli("run", "migrate-plain", "--compression", "none", "--inject", "fill-out-stays",
                 "--out", str(out))
    assert cp.returncode == 2 and "Traceback" not in cp.stderr, cp.stderr
    last = cp.stderr.strip().splitlines()[-1]
    assert re.match(rf"nestvirt: error: --out {re.escape(str(out))} is full: writing \S+ failed: "
                    r"No space left on device", last), last
    assert "migrate-plain/none+inject-fill-out-stays" in cp.stdout and "ERROR" in cp.stdout
    assert not (out / "results.json.tmp").exists()  # no torn file left
    assert not qemus_naming(out)


def test_signals_held_back_act_after_the_block_and_children_get_a_clean_mask():
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with proc.signals_deferred():
            p = proc.spawn(["sleep", "30"])
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert got == []  # held back inside the block
        time.sleep(0.1)
        assert got == [signal.SIGTERM]  # and acted on right after it
        blocked = next(ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                       if ln.startswith("SigBlk:"))
        assert int(blocked.split()[1], 16) == 0, blocked
        assert proc.reap(p) == -signal.SIGTERM  # SIGTERM reaches it: not inherited blocked
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("turned_into", [RuntimeError, TimeoutError])
def test_an_interrupt_a_library_turned_into_its_own_error_is_still_a_stop(monkeypatch, tmp_path,
                                                                         turned_into):
    # qemu.qmp's connect turns a KeyboardInterrupt into ConnectError: once the stop was
    # asked for, that is the stop (teardown done), never an "internal error" result.
    from harness.scenario.result import ScenarioResult, execute_guarded

    class Steps:
        torn = False

        def execute(self) -> None:
            raise turned_into("Failed to establish session: [Errno 104] Connection reset")

        def teardown(self) -> None:
            Steps.torn = True

    monkeypatch.setattr(proc, "_INTERRUPTED", threading.Event())
    res = ScenarioResult(id="x", scenario="x")
    execute_guarded(Steps(), res, tmp_path)  # no stop asked: an engine bug, kept as a result
    assert res.verdict == "error" and turned_into.__name__ in res.reason
    proc.note_interrupt()
    res = ScenarioResult(id="x", scenario="x")
    Steps.torn = False
    with pytest.raises(KeyboardInterrupt):
        execute_guarded(Steps(), res, tmp_path)
    assert Steps.torn
