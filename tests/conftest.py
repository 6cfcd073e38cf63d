"""Shared fixtures: the host probe and the built L1 image, once per test process."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.core import proc
from harness.guest.image import L1Image, build_l1, build_tools
from harness.guest.kernel import find_kernel
from harness.host.probe import HostFacts
from harness.qemu.inventory import probe_host
from harness.remote import netns
from harness.remote.sshd import DROPBEAR
from harness.remote.testhosts import TestHosts
from harness.results import known
from harness.scenario.engine import RunContext
from harness.scenario.result import ScenarioResult

DATA = Path(__file__).parent / "data"
SIGNATURES = known.load()


@pytest.fixture(scope="session")
def facts() -> HostFacts:
    # The inventory's default: the newest binary (QEMU 10.0 once `nestvirt qemu fetch` ran).
    return probe_host("auto")


@pytest.fixture(scope="session")
def l1_image() -> L1Image:
    return build_l1(find_kernel(), build_tools())


@pytest.fixture
def ctx(facts: HostFacts, l1_image: L1Image, tmp_path: Path) -> RunContext:
    return RunContext(host=facts, image=l1_image, out=tmp_path)


@pytest.fixture
def two_hosts() -> Iterator[TestHosts]:
    """Hosts A and B as network namespaces, dropbear on B (harness/remote/testhosts.py);
    fails the test if anything it started was still running inside them at the end."""
    why = netns.available() or (None if Path(DROPBEAR).exists() else
                                "dropbear-bin is not installed (/usr/sbin/dropbear)")
    if why:
        pytest.skip(why)
    with TestHosts() as hosts:
        yield hosts
    assert not hosts.leftovers, f"left running inside the test hosts: {hosts.leftovers}"


def qemu_children() -> list[str]:
    """QEMU processes whose parent is this test process (left behind = a reaping bug)."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=,comm=", "-e"], capture_output=True, text=True,
                         timeout=10).stdout
    me = str(os.getpid())
    return [ln for ln in out.splitlines()
            if ln.split()[1:2] == [me] and "qemu" in ln and "<defunct>" not in ln]


@pytest.fixture(autouse=True)
def no_qemu_left_behind():
    yield
    live = [p.pid for p in proc._LIVE]
    left = qemu_children()
    proc.reap_all()
    assert not live and not left, f"QEMU left running after the test: {live} {left}"


def interrupt_when_booted(p: subprocess.Popen, out: Path, l1s: int, timeout: float) -> str:
    """SIGINT a running `nestvirt run` once `l1s` L1s have booted under out; return its stderr.

    Then assert what Ctrl-C promises: exit 130, no traceback, results.json kept, and no QEMU
    of that run still alive.
    """
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("**/src-events.log"))) < l1s and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)  # the parent only: it must stop its workers itself
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert (out / "results.json").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10).stdout
    assert str(out) not in ps, "a QEMU of the interrupted run is still running"
    return err


def qemu_flaked(r: ScenarioResult, host: HostFacts) -> bool:
    """QEMU, not the harness, broke the run, and the harness said so with QEMU's evidence.

    Judged by the shipped known-issue signatures (ci/known-issues.json), each of which needs
    the evidence in the result: the destination's own refusal line, or L1's oops after a
    migration that needed 4+ dirty syncs (QEMU 7.2 TCG loses writes there).
    """
    # Judged as the same run without its injected fault: QEMU's damage is what is asked about.
    probe_copy = dataclasses.replace(r, id=r.id.split("+inject-")[0], checks=list(r.checks))
    known.classify([probe_copy], SIGNATURES, host.accel, host.qemu.version)  # result's versions first
    return probe_copy.verdict == "known-issue"
