"""Deliberate faults as data: each one names where in a run it acts, what it does, and the check
it must make fail. The engine calls act() at its points and knows no fault by name, so adding a
fault is one entry here (and its test), never an edit of the engine.

Points, in the order a run reaches them:

* ``before-migrate``: workloads run on the source; ``At.sh`` is the source's shell.
* ``during-migrate``: the source has just been told to migrate; no shell.
* ``after-migrate``: the migration has ended (either way); no shell.
* ``in-guest``: the destination answered SSH; ``At.sh`` is the destination's shell.
* ``after-l2-progress``: L2's progress was sampled on the destination (shell as in-guest).
* ``before-compare``: a paused run, just before RAM and registers are compared; no shell.
* ``before-dst``: the run's TLS credentials (``At.tls``) are made, no destination started yet.
* ``teardown``: the run is over, also after an error: undo what the fault changed outside the
  machines (a link it cut). Runs after the machines are gone.

``At.link`` is the network link to a destination on another host (None on one host).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from harness.core.errors import StepTimeout, UsageError
from harness.guest.l1 import L1Shell
from harness.remote.link import Link
from harness.vm.machine import Machine
from harness.vm.tls import TlsCredentials

POINTS = ("before-migrate", "before-dst", "during-migrate", "after-migrate", "in-guest",
          "after-l2-progress", "before-compare", "teardown")


@dataclass(frozen=True)
class At:
    """What a fault may touch where it acts: the run's machines and the shell of that point."""

    src: Machine | None
    dst: Machine | None
    sh: L1Shell | None = None
    tls: TlsCredentials | None = None
    link: Link | None = None

    def shell(self) -> L1Shell:
        if self.sh is None:
            raise AssertionError("a fault that needs a shell was placed at a point without one")
        return self.sh

    def source(self) -> Machine:
        if self.src is None:
            raise AssertionError("no source machine at this point")
        return self.src

    def destination(self) -> Machine:
        if self.dst is None:
            raise AssertionError("no destination machine at this point")
        return self.dst

    def credentials(self) -> TlsCredentials:
        if self.tls is None:
            raise AssertionError("a TLS fault ran without TLS credentials (needs_tls unchecked)")
        return self.tls

    def network(self) -> Link:
        if self.link is None:
            raise AssertionError("a network fault ran without a link (needs_remote unchecked)")
        return self.link


Action = Callable[[At], None]


class SpecLike(Protocol):
    """What a fault asks of a scenario to know whether its checks can see it."""

    name: str
    state: str
    paused: bool
    l1_workload: bool


@dataclass(frozen=True)
class Fault:
    """One deliberate fault. ``actions`` maps a point to what happens there; ``must_fail`` is the
    check that catches it and ``scenario`` one scenario where it is shown to (the tests run it)."""

    name: str
    description: str
    actions: Mapping[str, Action]
    must_fail: str
    scenario: str
    needs_paused: bool | None = None  # True: only a paused run; False: only a live one
    needs_state: str | None = None  # "nested": needs a running L2
    needs_workload: bool = False
    also_fails: tuple[str, ...] = field(default=())  # checks that fail with it by necessity
    needs_tls: str | None = None  # "x509" / "psk": the run must migrate with that TLS
    needs_remote: bool = False  # the destination must be on another host (a link to act on)
    retry: bool = False  # after the failure, verify the source and migrate it again
    detail_re: str | None = None  # what must_fail's detail says (the destination's own line)

    def __post_init__(self) -> None:
        for point in self.actions:
            assert point in POINTS, (self.name, point)

    def unobservable(self, spec: SpecLike) -> str | None:
        """Why this scenario's checks cannot see the fault (a prune reason), or None."""
        if self.needs_paused is True and not spec.paused:
            return f"inject {self.name} needs a paused migration (migrate-paused-identity)"
        if self.needs_paused is False and spec.paused:
            return f"inject {self.name} is judged by guest checks, which {spec.name} does not run"
        if self.needs_state and spec.state != self.needs_state:
            return f"inject {self.name} needs a running L2 (state {self.needs_state}), not {spec.state}"
        if self.needs_workload and not spec.l1_workload:
            return f"inject {self.name} needs the L1 workload, which {spec.name} does not run"
        return None

    def unfit(self, tls: str, remote: bool) -> str | None:
        """Why a run with this TLS mode and destination cannot show the fault, or None."""
        if self.needs_tls and tls != self.needs_tls:
            return f"inject {self.name} needs --tls {self.needs_tls} (this run: --tls {tls})"
        if self.needs_remote and not remote:
            return (f"inject {self.name} needs a destination on another host (--dst-host): "
                    "on one host the migration crosses no link")
        return None


def _sh(cmd: str) -> Action:
    """An action that runs one fixed command in L1 (never built from user input)."""
    def run(at: At) -> None:
        at.shell().run(cmd, 10)
    return run


def _kill_dst(at: At) -> None:
    at.destination().kill()


def _nmi_dst(at: At) -> None:
    # L1 panics as a stale page would make it: QEMU ends with 0 and no stderr, and only the
    # console says why.
    dst = at.destination()
    if dst.alive():
        dst.qmp("inject-nmi")
        dst.wait_exit(30.0)


def _cancel(at: At) -> None:
    at.source().qmp("migrate_cancel")


def _freeze_dst(at: At) -> None:
    at.destination().qmp("stop")  # L1 stops answering mid-check, as a hung L1 would


def _run_dst_briefly(at: At) -> None:
    dst = at.destination()
    dst.qmp("cont")
    time.sleep(0.5)
    dst.qmp("stop")


def _tls(change: str) -> Action:
    """An action that breaks the run's credentials one way (a method of TlsCredentials)."""
    def run(at: At) -> None:
        getattr(at.credentials(), change)()
    return run


# The cut happens once this much has crossed the link: mid-stream, well before the end (the
# throttle below makes a 512 MiB L1 with its workload take ~8 s).
CUT_AFTER_BYTES = 4 << 20
CUT_THROTTLE = "100mbit"


def _throttle(at: At) -> None:
    at.network().throttle(CUT_THROTTLE)


def _cut_mid_stream(at: At) -> None:
    src, deadline = at.source(), time.monotonic() + 30
    while True:
        info = src.qmp("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            raise StepTimeout(f"cut-link: migration ended ({info.get('status')}) before the cut")
        if info.get("ram", {}).get("transferred", 0) >= CUT_AFTER_BYTES:
            break
        if time.monotonic() > deadline:
            raise StepTimeout("cut-link: fewer than 4 MiB sent in 30 s: nothing to cut")
        time.sleep(0.05)
    at.network().down()


def _restore_link(at: At) -> None:
    link = at.network()
    link.up()
    link.unthrottle()


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("corrupt-l1", "l1work flips a page of its region behind its own back",
          {"in-guest": _sh("l1work corrupt --pidfile /run/l1work.pid")},
          must_fail="l1-workload-pattern", scenario="migrate-plain",
          needs_paused=False, needs_workload=True),
    Fault("corrupt-l2", "nvmm flips a word of L2's memory",
          {"in-guest": _sh("nvmm corrupt --pidfile /run/l2.pid")},
          must_fail="l2-memory-pattern", scenario="migrate-nested",
          needs_paused=False, needs_state="nested"),
    Fault("stop-l2", "the L2 VMM is stopped while its progress is sampled, then resumed",
          {"in-guest": _sh("kill -STOP $(cat /run/l2.pid)"),
           # The stall was the point, not L2's memory: let the memory check see a live VMM.
           "after-l2-progress": _sh("kill -CONT $(cat /run/l2.pid)")},
          must_fail="l2-progress", scenario="migrate-nested",
          needs_paused=False, needs_state="nested"),
    Fault("kill-dst", "the destination QEMU is killed after the migration",
          {"after-migrate": _kill_dst},
          must_fail="dst-qemu-alive", scenario="migrate-plain", also_fails=("l1-ssh-on-dst",)),
    Fault("kernel-warning", "a WARNING line is written to L1's kernel log on the destination",
          {"in-guest": _sh("echo 'WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:1 injected by "
                           "nestvirt' > /dev/kmsg")},
          must_fail="kernel-log-clean", scenario="migrate-plain", needs_paused=False),
    Fault("ssh-down", "dropbear is killed on the source, so the destination has no SSH",
          {"before-migrate": _sh("kill $(cat /run/dropbear.pid)")},
          must_fail="l1-ssh-on-dst", scenario="migrate-plain", needs_paused=False),
    Fault("run-dst-before-compare", "the paused destination runs for 0.5 s before the compare",
          {"before-compare": _run_dst_briefly},
          must_fail="ram-identical", scenario="migrate-paused-identity", needs_paused=True,
          also_fails=("vcpu-registers-identical",)),
    Fault("cancel-migration", "migrate_cancel right after the migration starts",
          {"during-migrate": _cancel},
          must_fail="migration-completed", scenario="migrate-plain",
          also_fails=("dst-qemu-alive", "l1-ssh-on-dst")),
    Fault("freeze-dst", "the destination VM is stopped while the guest checks run",
          {"in-guest": _freeze_dst},
          must_fail="l1-responsive-on-dst", scenario="migrate-plain", needs_paused=False),
    Fault("unload-kvm", "L1's KVM modules are unloaded on the destination",
          {"in-guest": _sh("kill $(cat /run/l2.pid); sleep 0.3; "
                           "rmmod kvm_amd kvm_intel kvm 2>/dev/null; true")},
          must_fail="l2-starts-on-dst", scenario="migrate-bare", needs_paused=False),
    Fault("panic-dst", "an NMI panics L1 on the destination (armed on the source, so it migrates)",
          {"before-migrate": _sh("echo 1 > /proc/sys/kernel/unknown_nmi_panic"),
           "after-migrate": _nmi_dst},
          must_fail="dst-qemu-alive", scenario="migrate-plain", needs_paused=False,
          also_fails=("l1-ssh-on-dst", "kernel-log-clean")),
    # TLS: each breaks one thing the handshake checks; the migration must fail, the check must
    # name it with the destination's own line, and the source must keep running.
    Fault("tls-wrong-ca", "the destination's certificate comes from a CA the source does not trust",
          {"before-dst": _tls("use_other_ca")},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          needs_tls="x509", also_fails=("dst-qemu-alive", "l1-ssh-on-dst"),
          detail_re=r"known issuer.*destination: Verify failed"),
    Fault("tls-wrong-hostname", "the source expects another host name than the destination's "
          "certificate holds", {"before-dst": _tls("expect_other_hostname")},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          needs_tls="x509", also_fails=("dst-qemu-alive", "l1-ssh-on-dst"),
          # The destination's line differs by version (7.2: "Cannot read from TLS channel",
          # 10.0: "load of migration failed"): that it speaks is what is judged.
          detail_re=r"does not match the hostname wrong\.nestvirt\.test; destination: \S"),
    Fault("tls-authz-reject", "the source presents a valid client certificate the "
          "destination's authz does not allow", {"before-dst": _tls("use_rogue_client")},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          needs_tls="x509", also_fails=("dst-qemu-alive", "l1-ssh-on-dst"),
          detail_re=r"destination: TLS x509 authz check for O=nestvirt,CN=rogue\.nestvirt\.test "
                    r"is denied"),
    Fault("tls-psk-mismatch", "the source holds another pre-shared key than the destination",
          {"before-dst": _tls("use_other_psk")},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          needs_tls="psk", also_fails=("dst-qemu-alive", "l1-ssh-on-dst"),
          detail_re=r"TLS handshake failed.*destination: TLS handshake failed"),
    # The network between the hosts: TCP alone would retry for ~15 min; the harness's stall
    # timeout cancels, the source must be intact, and a retry once the link is back completes.
    Fault("cut-link", "the link to the destination host goes down mid-stream (ip link set "
          "down); stall timeout, migrate_cancel, link up, retry to a new destination",
          {"before-migrate": _throttle, "during-migrate": _cut_mid_stream,
           "after-migrate": _restore_link, "teardown": _restore_link},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          needs_remote=True, retry=True, detail_re=r"source status stalled: no progress"),
)}

INJECTIONS = tuple(FAULTS)


def get_fault(name: str) -> Fault:
    """The fault of that name; UsageError naming the known ones otherwise."""
    try:
        return FAULTS[name]
    except KeyError:
        raise UsageError(f"unknown fault '{name}' (choose from {', '.join(INJECTIONS)})") from None


def retries(fault: str | None) -> bool:
    """Whether the run's fault asks for a retry after its failed migration."""
    return fault is not None and FAULTS[fault].retry


def act(fault: str | None, point: str, at: At) -> None:
    """Do what the run's fault (if any) does at this point; a no-op everywhere else."""
    assert point in POINTS, point
    if fault is None:
        return
    action = FAULTS[fault].actions.get(point)
    if action is not None:
        action(at)
