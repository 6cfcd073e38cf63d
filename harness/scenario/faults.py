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

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from harness.core.errors import StepTimeout, UsageError
from harness.guest.l1 import L1Shell
from harness.remote.link import Link
from harness.vm.machine import Machine, MachineConfig
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
    # How the first destination is started instead (a retry's destination is a healthy one).
    dst_config: Callable[[MachineConfig], MachineConfig] | None = None
    # A fault of the harness's own ground (its results disk) breaks no check of the guest:
    # must_fail is "" and the run's error reason says it (this pattern).
    reason_re: str | None = None

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


def _nmi_dst_now(at: At) -> None:
    # As _nmi_dst, but without waiting: L1 dies while the harness goes on to SSH into it.
    at.destination().qmp("inject-nmi")


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


def _wait_sent(src: Machine, what: str, nbytes: int = CUT_AFTER_BYTES) -> int:
    """Wait (bounded) until the source has sent nbytes of RAM; returns the count then."""
    deadline = time.monotonic() + 30
    while True:
        info = src.qmp("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            raise StepTimeout(f"{what}: migration ended ({info.get('status')}) before the fault")
        sent = info.get("ram", {}).get("transferred", 0)
        if sent >= nbytes:
            return sent
        if time.monotonic() > deadline:
            raise StepTimeout(f"{what}: fewer than {nbytes >> 20} MiB sent in 30 s: "
                              "no stream to act on")
        time.sleep(0.02)


def _cut_mid_stream(at: At) -> None:
    _wait_sent(at.source(), "cut-link")
    at.network().down()


# Mid-stream faults on one host: the source is slowed to this for the first migration (the
# mode's own limit is set again for the retry), so the fault lands while RAM is in flight
# (512 MiB of L1 on loopback is otherwise sent in well under a second).
MID_STREAM_BANDWIDTH = 64 << 20


def _mid_stream(what: str, act: Callable[[Machine, Machine], None]) -> Action:
    def run(at: At) -> None:
        src = at.source()
        src.qmp("migrate-set-parameters", **{"max-bandwidth": MID_STREAM_BANDWIDTH})
        _wait_sent(src, what)
        act(src, at.destination())
    return run


def _sigkill(m: Machine) -> None:
    if m.pid is not None:
        os.kill(m.pid, signal.SIGKILL)
        m.wait_exit(5.0)


def _arm_crash(m: Machine, command: str) -> None:
    """The machine crashes (SIGSEGV) the moment `command` is sent to it: it never answers."""
    def hook(name: str) -> None:
        if name == command and m.pid is not None:
            m.command_hook = None
            os.kill(m.pid, signal.SIGSEGV)
    m.command_hook = hook


def _crash_on(command: str) -> Callable[[Machine, Machine], None]:
    def arm(src: Machine, dst: Machine) -> None:
        _arm_crash(src, command)
    return arm


def _crash_dst_on(command: str) -> Action:
    def run(at: At) -> None:
        _arm_crash(at.destination(), command)
    return run


# Filling --out is done only on a filesystem this small (a tmpfs or loop mount made for it),
# never on a real disk.
FILL_MAX_FREE = 256 << 20
FILLER = ".nestvirt-fill"


def _out_dir(at: At) -> Path:
    return at.source().workdir.parent  # workdir is OUT/<variant>


def _fill_out(at: At) -> None:
    out = _out_dir(at)
    st = os.statvfs(out)
    free = st.f_bavail * st.f_frsize
    if free > FILL_MAX_FREE:
        raise UsageError(f"inject fill-out fills --out's filesystem: give it one with at most "
                         f"{FILL_MAX_FREE >> 20} MiB free (a small tmpfs); {out} has "
                         f"{free >> 20} MiB")
    with open(out / FILLER, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                continue  # full at this grain: go finer, then stop


def _unfill_out(at: At) -> None:
    if at.src is not None:
        (_out_dir(at) / FILLER).unlink(missing_ok=True)


def _more_ram(cfg: MachineConfig) -> MachineConfig:
    # 64 MiB more than the source: the destination's RAM block has another length, so it
    # refuses the stream at the RAM section and says so on its stderr.
    return replace(cfg, mem_mib=cfg.mem_mib + 64)


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
          must_fail="l1-ssh-on-dst", scenario="migrate-plain", needs_paused=False,
          # Judged by L1 refusing on every try, not by the 20 s SSH wait running out.
          detail_re=r"refused on every try for [\d.]+s: L1 answers, nothing listens"),
    Fault("run-dst-before-compare", "the paused destination runs for 0.5 s before the compare",
          {"before-compare": _run_dst_briefly},
          must_fail="ram-identical", scenario="migrate-paused-identity", needs_paused=True,
          also_fails=("vcpu-registers-identical",)),
    Fault("cancel-migration", "migrate_cancel right after the migration starts (still in setup: "
          "no RAM sent yet; cancel-mid-stream cancels with RAM in flight)",
          {"during-migrate": _cancel},
          must_fail="migration-completed", scenario="migrate-plain",
          also_fails=("dst-qemu-alive", "l1-ssh-on-dst")),
    Fault("freeze-dst", "the destination VM is stopped while the guest checks run",
          {"in-guest": _freeze_dst},
          must_fail="l1-responsive-on-dst", scenario="migrate-plain", needs_paused=False,
          # Judged by QEMU's own word that the vCPUs stopped, not by a wait running out.
          detail_re=r"vCPUs are not running \(QEMU run state paused\)"),
    Fault("unload-kvm", "L1's KVM modules are unloaded on the destination",
          {"in-guest": _sh("kill $(cat /run/l2.pid); sleep 0.3; "
                           "rmmod kvm_amd kvm_intel kvm 2>/dev/null; true")},
          must_fail="l2-starts-on-dst", scenario="migrate-bare", needs_paused=False),
    Fault("panic-dst", "an NMI panics L1 on the destination (armed on the source, so it migrates)",
          {"before-migrate": _sh("echo 1 > /proc/sys/kernel/unknown_nmi_panic"),
           "after-migrate": _nmi_dst},
          must_fail="dst-qemu-alive", scenario="migrate-plain", needs_paused=False,
          also_fails=("l1-ssh-on-dst", "kernel-log-clean")),
    # L1 dies while the harness waits on it: recognised from its console and its QEMU's
    # exit at once (guest/l1.py's death watch), not at the SSH or command timeout.
    Fault("panic-in-guest", "L1 on the destination crashes itself (sysrq c) during a guest step",
          {"in-guest": _sh("echo c > /proc/sysrq-trigger")},
          must_fail="l1-responsive-on-dst", scenario="migrate-plain", needs_paused=False,
          also_fails=("kernel-log-clean",), detail_re=r"L1 died while running .*(panic|sysrq)"),
    Fault("panic-halt-in-guest", "L1 on the destination panics and halts (panic=0, sysrq c) "
          "during a guest step: its QEMU lives on, only its console says", {"in-guest": _sh(
              "echo 0 > /proc/sys/kernel/panic; echo c > /proc/sysrq-trigger")},
          must_fail="l1-responsive-on-dst", scenario="migrate-plain", needs_paused=False,
          also_fails=("kernel-log-clean",), detail_re=r"L1 died while running .*its console: "
                                                       r".*Kernel panic"),
    Fault("panic-dst-early", "an NMI panics L1 on the destination just as the harness starts "
          "to SSH into it", {"before-migrate": _sh("echo 1 > /proc/sys/kernel/unknown_nmi_panic"),
                             "after-migrate": _nmi_dst_now},
          must_fail="l1-ssh-on-dst", scenario="migrate-plain", needs_paused=False,
          also_fails=("dst-qemu-alive", "kernel-log-clean", "l1-responsive-on-dst"),
          detail_re=r"(L1 died while SSH was connecting|destination QEMU is gone)"),
    # The results disk fills up mid-run: the run ends as an error naming the write that was
    # refused; once the space is back (teardown) everything else is written. -stays keeps the
    # disk full: the CLI then prints the results and names the file it could not write.
    Fault("fill-out", "--out's filesystem (a small tmpfs) fills up after the migration; freed "
          "at teardown", {"after-migrate": _fill_out, "teardown": _unfill_out},
          must_fail="", scenario="migrate-plain", needs_paused=False,
          reason_re=r"out of disk: writing \S+ failed: No space left on device"),
    Fault("fill-out-stays", "--out's filesystem (a small tmpfs) fills up after the migration "
          "and stays full", {"after-migrate": _fill_out},
          must_fail="", scenario="migrate-plain", needs_paused=False,
          reason_re=r"out of disk: writing \S+ failed: No space left on device"),
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
    # One host, mid-stream (the source slowed so that RAM is in flight): each must end in a
    # verdict within its timeout; where the source survives it must verify and a retry to a
    # fresh destination complete.
    Fault("kill-dst-mid", "the destination QEMU is SIGKILLed mid-stream; retry to a new one",
          {"during-migrate": _mid_stream("kill-dst-mid", lambda src, dst: _sigkill(dst))},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          retry=True, detail_re=r"source status failed"),
    Fault("kill-src-mid", "the source QEMU is SIGKILLed mid-stream: a clear fail, no hang",
          {"during-migrate": _mid_stream("kill-src-mid", lambda src, dst: _sigkill(src))},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          also_fails=("source-intact", "dst-qemu-alive", "l1-ssh-on-dst"),
          detail_re=r"source status source-exited: the source QEMU exited mid-migration: "
                    r"killed by signal 9"),
    Fault("cancel-mid-stream", "migrate_cancel once 4 MiB are in flight; retry to a new "
          "destination", {"during-migrate": _mid_stream(
              "cancel-mid-stream", lambda src, dst: src.qmp("migrate_cancel"))},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          retry=True, detail_re=r"source status cancelled"),
    Fault("dst-refuses", "the destination is started with 64 MiB more RAM, so it refuses the "
          "stream; retry to a destination like the source", {},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          retry=True, dst_config=_more_ram,
          detail_re=r"source status failed.*; destination: .*(mismatch|ength)"),
    Fault("stop-src", "the source VM is stopped before the migration and never resumed (L1 "
          "hung): the destination takes it paused", {"before-migrate": lambda at:
                                                     at.source().qmp("stop")},
          must_fail="dst-qemu-alive", scenario="migrate-plain", needs_paused=False,
          also_fails=("l1-ssh-on-dst",), detail_re=r"run state paused, expected running"),
    Fault("hang-src", "the source QEMU is SIGSTOPped mid-stream (L1 and its QEMU hang): no "
          "progress, said at once, never waited on", {"during-migrate": _mid_stream(
              "hang-src", lambda src, dst: os.kill(src.pid or 0, signal.SIGSTOP))},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          also_fails=("source-intact", "dst-qemu-alive", "l1-ssh-on-dst"),
          detail_re=r"source status source-hung: no progress: the source QEMU does not answer "
                    r".*stopped"),
    Fault("crash-src-on-qmp", "the source QEMU crashes (SIGSEGV) while it answers a "
          "query-migrate mid-stream", {"during-migrate": _mid_stream(
              "crash-src-on-qmp", _crash_on("query-migrate"))},
          must_fail="migration-completed", scenario="migrate-plain", needs_paused=False,
          also_fails=("source-intact", "dst-qemu-alive", "l1-ssh-on-dst"),
          detail_re=r"source-exited: .*killed by signal 11 \(SIGSEGV\)"),
    Fault("crash-dst-on-qmp", "the destination QEMU crashes (SIGSEGV) while it answers the "
          "query-status after the migration", {"during-migrate": _crash_dst_on("query-status")},
          must_fail="dst-qemu-alive", scenario="migrate-plain", needs_paused=False,
          also_fails=("l1-ssh-on-dst",), detail_re=r"killed by signal 11 \(SIGSEGV\)"),
)}

INJECTIONS = tuple(FAULTS)


def get_fault(name: str) -> Fault:
    """The fault of that name; UsageError naming the known ones otherwise."""
    try:
        return FAULTS[name]
    except KeyError:
        raise UsageError(f"unknown fault '{name}' (choose from {', '.join(INJECTIONS)})") from None


def shape_destination(fault: str | None, cfg: MachineConfig) -> MachineConfig:
    """The first destination's config as the run's fault (if any) wants it started."""
    shape = FAULTS[fault].dst_config if fault is not None else None
    return shape(cfg) if shape is not None else cfg


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
