"""How an L1 comes to life for a run: booted cold, or restored from the saved, booted image of
its configuration (built once, cached by content) and made this run's own (re-keyed).

One entry point, start_l1(): the scenario engine, the exit-cost and selftest rooms call it and
get a running L1 they can log into, whichever way it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paramiko

from harness.core.cache import content_key
from harness.core.errors import NestvirtError, StepTimeout
from harness.guest.image import GUEST_TOOLS
from harness.guest.l1 import HostKey, L1Shell, RunKey, new_nonce
from harness.vm import snapshot
from harness.vm.machine import Machine, MachineConfig

STARTS = ("snapshot", "cold")
# How an image is prepared is this file's code: a change to it makes older images stale.
RECIPE = content_key([Path(__file__)])
# Both tmpfs mounts (each may take half of RAM) filled up to free memory less a margin (an
# eighth of RAM, at least 64 MiB: the kernel's own reserves grow with RAM, and a fill into
# them wakes the OOM killer), then freed.
ZERO_FREE_PAGES = (
    "set -e; total=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo); "
    "margin=$((total / 8)); [ $margin -ge 64 ] || margin=64; "
    "free=$(awk '/MemFree/ {print int($2/1024)}' /proc/meminfo); half=$(((free - margin) / 2)); "
    "if [ $half -gt 0 ]; then "
    "dd if=/dev/zero of=/tmp/.zero bs=1M count=$half 2>/dev/null; "
    "dd if=/dev/zero of=/run/.zero bs=1M count=$half 2>/dev/null; fi; "
    "rm -f /tmp/.zero /run/.zero")


@dataclass
class StartedL1:
    """A running L1 and how it started. ``host_key``: the SSH host key the harness gave a
    re-keyed L1 (pin it for every later connection, the destination's too), else None."""

    machine: Machine
    ready: dict[str, str]
    host_key: paramiko.PKey | None = None
    record: dict[str, Any] = field(default_factory=dict)  # results: params.start

    def shell(self, key: RunKey, timeout: float = 30.0) -> L1Shell:
        sh = L1Shell(self.machine.ssh_port, key, opener=self.machine.l1_ssh_opener(),
                     host_key=self.host_key)
        sh.connect(timeout)
        return sh


def start_l1(cfg: MachineConfig, key: RunKey, launch: Callable[[MachineConfig], Machine], *,
             start: str = "snapshot", qemu_version: str = "", boot_timeout: float = 60.0,
             build_key: RunKey | None = None, file_uri: bool = False) -> StartedL1:
    """Start one L1 from ``cfg`` (its append without any key: the key is this run's and
    arrives on the command line of a cold boot, or through the control port of a restore).

    start "cold": boot, wait for L1's ready event. "snapshot": restore the saved image of
    this configuration (building it first when there is none, or it is stale or corrupt: a
    refused image is discarded and built again, once), reseed, set the clock, install this
    run's key and a new host key. ``build_key``: the key the boot that is saved logs in with
    (default: one made and forgotten here). ``file_uri``: the QEMU loads the image from a
    file: URI (snapshot.reads_files). On failure nothing is left running."""
    if start not in STARTS:
        raise NestvirtError(f"unknown start {start!r} ({', '.join(STARTS)})")
    if start == "cold":
        m = launch(replace(cfg, append=f"{cfg.append} {key.cmdline_arg}"))
        try:
            ready = m.wait_guest_event("ready", boot_timeout)
        except BaseException:
            m.shutdown()
            raise
        return StartedL1(m, ready, None, {"start": "cold"})
    return _from_snapshot(cfg, key, launch, qemu_version, boot_timeout,
                          build_key or RunKey.generate(), file_uri)


def _from_snapshot(cfg: MachineConfig, key: RunKey, launch: Callable[[MachineConfig], Machine],
                   qemu_version: str, boot_timeout: float, build_key: RunKey,
                   file_uri: bool) -> StartedL1:
    snap_cfg = replace(cfg, control=True, incoming=False)
    # The boot that is saved gets a key of its own, never kept: it logs in once to see the
    # guest programs are there; a restore replaces it (and the host key) with the run's.

    def boot(c: MachineConfig) -> Machine:
        return launch(replace(c, name=f"{c.name}-image",
                              append=f"{c.append} {build_key.cmdline_arg}"))

    why_rebuilt = None
    for attempt in (1, 2):
        t0 = time.monotonic()
        image, built = snapshot.ensure(snap_cfg, qemu_version, boot,
                                       lambda m: _prepare(m, build_key, boot_timeout),
                                       recipe=RECIPE, timeout=boot_timeout)
        t_built = time.monotonic() - t0
        try:
            m = snapshot.restore(snap_cfg, image, launch, timeout=boot_timeout,
                                 file_uri=file_uri)
        except snapshot.SnapshotUnusable as e:
            if attempt == 2:
                raise
            why_rebuilt = str(e)
            snapshot.discard(image)
            continue
        try:
            t1 = time.monotonic()
            announced = _rekey(m, key, boot_timeout)
        except BaseException:
            m.shutdown()
            raise
        rec = {"start": "snapshot", "image": image.key, "built": built,
               "build_s": round(t_built, 3) if built else 0.0,
               "rekey_s": round(time.monotonic() - t1, 3), "load": "file" if file_uri else "exec"}
        if why_rebuilt:
            rec["rebuilt_because"] = why_rebuilt[:300]
        return StartedL1(m, dict(image.ready), announced, rec)
    raise AssertionError("unreachable")


def _prepare(m: Machine, build_key: RunKey, boot_timeout: float) -> dict[str, str]:
    """Bring a cold L1 to the state worth saving: booted, ready, its programs answering; then
    idle (no SSH session, nothing of a run in it)."""
    ready = m.wait_guest_event("ready", boot_timeout)
    sh = L1Shell(m.ssh_port, build_key)
    try:
        sh.connect(boot_timeout)
        r = sh.run(f"test -x {GUEST_TOOLS}/nvmm && test -x {GUEST_TOOLS}/l1work && "
                   "test -x /bin/nvrekey", 15)
        if r.rc != 0:
            raise NestvirtError(f"L1 image lacks its programs: {r.err.strip()[:200]}")
        # Pages the boot freed still hold what was there (the initrd, init code): the saved
        # stream would carry them. Filling free memory with zeros once and freeing it again
        # leaves them zero, which the stream carries as markers (a third of its size).
        r = sh.run(ZERO_FREE_PAGES, 120)
        if r.rc != 0:
            raise NestvirtError(f"L1 image: zeroing free memory failed (exit {r.rc}): "
                                f"{r.err.strip()[:200]}")
        # Still whole after it: every program it had still there, dropbear answering.
        r = sh.run("kill -0 $(cat /run/dropbear.pid) && ! dmesg | grep -q 'Out of memory'", 15)
        if r.rc != 0:
            raise NestvirtError("L1 image: L1 was short of memory while it was prepared")
    finally:
        sh.close()
    return ready


def _rekey(m: Machine, key: RunKey, timeout: float) -> paramiko.PKey:
    """Resume the restored L1 and give it this run's secrets; return the host key to pin."""
    nonce, host = new_nonce(), HostKey.generate()
    # The line first: it waits in the control socket and L1 reads it as soon as it runs (one
    # round trip less than continuing first).
    m.send_control(key.rekey_line(nonce, host))
    m.qmp("cont")
    deadline = time.monotonic() + timeout
    while True:
        for ev, kv in m.guest_events():
            if kv.get("nonce") != nonce:
                continue
            if ev == "rekey-failed":
                raise StepTimeout(f"restored L1 could not take the run's keys ({kv.get('what')})")
            if ev == "rekeyed":
                return host.public
        if not m.alive():
            raise StepTimeout(f"{m.config.name} QEMU exited after restore: {m.error_line()}")
        if time.monotonic() > deadline:
            raise StepTimeout(f"restored L1 did not answer the rekey in {timeout:g}s")
        time.sleep(0.003)
