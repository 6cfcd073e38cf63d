"""One L0 QEMU process: launch from a template, QMP through qemu.qmp, logs, shutdown and reap.

Knows nothing about nesting or migration; callers drive it through qmp() and the logs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.core import proc, scratch
from harness.core.errors import NestvirtError, StepTimeout
from harness.core.paths import TEMPLATES
from harness.guest.kernlog import death_line, qemu_exit_story
from harness.host.probe import launch_env
from harness.vm import resetwatch
from harness.vm.guestmode import TCG_SVM_LOG_ARGS

# qemu.qmp logs every negotiation failure while we poll for the socket; our transcript is enough.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

EVENT_RE = re.compile(r"^NESTVIRT-EVENT (\S+)(.*)$")
# How often a death watch that counts a stopped VM as dead asks QEMU its run state, besides
# reading QEMU's STOP event (which ends a wait at once): one QMP round trip per period.
RUNSTATE_POLL_S = 2.0


@dataclass(frozen=True)
class MachineConfig:
    """What one L1 machine is: the template's inputs, nothing else."""

    name: str  # "src" or "dst"
    qemu: str
    accel: str
    cpu: str
    kernel: Path
    initrd: Path
    append: str
    mem_mib: int = 512
    mem_extra_kib: int = 0  # RAM beyond mem_mib (a size off the dirty bitmap's 64-page word)
    smp: int = 1
    incoming: bool = False
    extra_args: tuple[str, ...] = ()
    machine: str = "q35"  # a versioned type (pc-q35-7.2) when two binaries must agree
    module_dir: str = ""  # QEMU_MODULE_DIR of this binary, for this process only
    firmware_dirs: tuple[str, ...] = ()  # -L, before the binary's compiled-in dirs
    tcg_svm_log: Path | None = None  # TCG's VMRUN/#VMEXIT log (harness/vm/guestmode.py)
    # L1's control port (ttyS2) on a unix socket the harness writes to (a restored L1 is
    # re-keyed through it); False: the same device on a null backend (the device set, which
    # migration needs equal on both sides, does not change).
    control: bool = False
    # Properties of the accelerator (KVM's dirty-ring-size=N): given, QEMU gets -accel ACCEL,OPTS
    # instead of -machine accel= (it refuses both at once).
    accel_opts: str = ""


class QmpCommandError(NestvirtError):
    """QEMU answered a command with an error; carries QEMU's own description."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc


@dataclass
class Machine:
    """A running (or finished) QEMU; create with launch(), always end with shutdown()."""

    config: MachineConfig
    workdir: Path
    ssh_port: int
    argv: list[str] = field(default_factory=list)
    _proc: Any = None
    _qmp: QEMUMonitorProtocol | None = None
    _transcript: Any = None
    _t0: float = 0.0
    events_seen: list[dict] = field(default_factory=list)
    _sockdir: Path | None = None
    _control: socket.socket | None = None
    # Called with each QMP command's name just before it is sent (a fault can act there).
    command_hook: Callable[[str], None] | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.config.name}-console.log"

    @property
    def events_log(self) -> Path:
        return self.workdir / f"{self.config.name}-events.log"

    @property
    def stderr_log(self) -> Path:
        return self.workdir / f"{self.config.name}-qemu.stderr"

    @property
    def qmp_socket(self) -> Path:
        # AF_UNIX paths stop at 108 bytes; result dirs are deeper than that, so sockets
        # live in a short private directory that shutdown() removes.
        if self._sockdir is None:
            self._sockdir = scratch.private_dir()
        return self._sockdir / f"{self.config.name}.qmp"

    def qmp_spec(self) -> str:
        """The -qmp argument: a unix socket in the private directory."""
        return f"unix:{self.qmp_socket},server=on,wait=off"

    @property
    def reset_socket(self) -> Path:
        return self.qmp_socket.with_name(f"{self.config.name}.reset")

    @property
    def reset_dump(self) -> Path:
        """The registers at a reset L1 asked for itself (resetwatch), when it happened."""
        return self.workdir / f"{self.config.name}-reset-registers.txt"

    @property
    def control_socket(self) -> Path:
        return self.qmp_socket.with_name(f"{self.config.name}.ctl")

    def control_chardev(self) -> str:
        """The -chardev of L1's control port: a socket when the config asks for one."""
        if self.config.control:
            return f"socket,id=ctl,path={self.control_socket},server=on,wait=off"
        return "null,id=ctl"

    def send_control(self, line: str, timeout: float = 5.0) -> None:
        """Write one line to L1's control port (ttyS2). The connection stays open until
        shutdown(): QEMU feeds the bytes to the UART as L1 reads them, and a peer that hangs
        up can take unread ones with it."""
        if not self.config.control:
            raise NestvirtError(f"{self.config.name}: started without a control port")
        if self._control is None:
            deadline = time.monotonic() + timeout
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            while True:
                try:
                    s.connect(str(self.control_socket))
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        s.close()
                        raise StepTimeout(f"{self.config.name}: control port: {e}") from e
                    time.sleep(0.02)
            self._control = s
        try:
            self._control.sendall(line.encode() + b"\n")
        except OSError as e:
            raise StepTimeout(f"{self.config.name}: control port: {e}") from e

    def l1_ssh_opener(self) -> Callable[[], Any] | None:
        """What L1Shell connects through (None: 127.0.0.1:ssh_port on this host)."""
        return None

    @property
    def transcript_path(self) -> Path:
        return self.workdir / f"{self.config.name}-qmp.jsonl"

    def render_argv(self) -> list[str]:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                 undefined=jinja2.StrictUndefined)
        c = self.config
        text = env.get_template("qemu-l1.j2").render(
            qemu=c.qemu, name=f"nestvirt-{c.name}", accel=c.accel, accel_opts=c.accel_opts,
            cpu=c.cpu, mem_mib=c.mem_mib,
            mem_extra_kib=c.mem_extra_kib,
            smp=c.smp, kernel=c.kernel, initrd=c.initrd, append=c.append,
            console_log=self.console_log, events_log=self.events_log, ssh_port=self.ssh_port,
            qmp=self.qmp_spec(), control_chardev=self.control_chardev(), incoming=c.incoming,
            extra_args=c.extra_args,
            machine=c.machine, firmware_dirs=c.firmware_dirs,
            tcg_log_args=TCG_SVM_LOG_ARGS if c.tcg_svm_log else (), tcg_svm_log=c.tcg_svm_log,
            reset_watch=(f"unix:{self.reset_socket},server=on,wait=off"
                         if resetwatch.enabled() else ""))
        return [line.strip() for line in text.splitlines() if line.strip()]

    def launch(self, timeout: float = 20.0) -> None:
        """Start QEMU and connect QMP; raise StepTimeout with QEMU's own error if it dies."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.argv = self.render_argv()
        # The module dir is part of how this binary starts: the saved line must carry it.
        env_text = (f"QEMU_MODULE_DIR={_shell_quote(self.config.module_dir)} "
                    if self.config.module_dir else "")
        (self.workdir / f"{self.config.name}-cmdline.txt").write_text(
            env_text + " ".join(_shell_quote(a) for a in self.argv) + "\n")
        self._transcript = open(self.transcript_path, "a")
        self._t0 = time.monotonic()
        stderr = open(self.stderr_log, "wb")
        try:
            self._proc = proc.spawn(self.argv, stdout=stderr, stderr=stderr,
                                    env=launch_env(self.config.module_dir))
        finally:
            stderr.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise StepTimeout(f"{self.config.name} QEMU exited at start: {self.error_line()}")
            if self.qmp_socket.exists():
                qmp = QEMUMonitorProtocol(str(self.qmp_socket))
                try:
                    qmp.connect(negotiate=True)
                    self._qmp = qmp
                    if resetwatch.enabled():
                        resetwatch.watch(self.reset_socket, self.reset_dump)
                    break
                except (QMPError, OSError):
                    qmp.close()
            if time.monotonic() > deadline:
                raise StepTimeout(f"{self.config.name} QMP did not answer in {timeout:g}s")
            time.sleep(0.005)  # a start is waited on at every restore: polled finely
        # The pid: the host VM tells its inner QEMUs' KVM tracepoints apart by it.
        self._log("connected", {"argv": self.argv, "module_dir": self.config.module_dir,
                                "pid": self._proc.pid})

    def qmp(self, command: str, timeout: float = 30.0, **args: Any) -> Any:
        """Execute one QMP command; return its result or raise QmpCommandError."""
        if self._qmp is None:
            raise QmpCommandError(command, "no QMP connection")
        if self._proc is not None and proc.pid_state(self._proc.pid) == "T":
            # A stopped process answers nothing: asking would only wait out the timeout.
            raise QmpCommandError(command, "not asked: the QEMU process is stopped (state T)")
        if self.command_hook is not None:
            self.command_hook(command)
        self._log("->", {"execute": command, "arguments": args})
        self._qmp.settimeout(timeout)
        try:
            resp = self._qmp.cmd_raw(command, args or None)
        except (QMPError, OSError, TimeoutError, EOFError) as e:
            self._log("!!", {"error": repr(e)})
            if self._proc is not None and self.wait_exit(1.0) is not None:
                # QEMU died under the command: its end says more than the broken socket.
                raise QmpCommandError(command, f"QEMU exited while answering it: "
                                               f"{self.exit_story()}") from e
            raise QmpCommandError(command, f"connection failed: {e!r}") from e
        finally:
            self._qmp.settimeout(None)
        self._log("<-", resp)
        self._drain_events()
        if "error" in resp:
            raise QmpCommandError(command, resp["error"].get("desc", str(resp["error"])))
        return resp.get("return")

    def hmp(self, command: str, timeout: float = 30.0) -> str:
        return self.qmp("human-monitor-command", timeout=timeout, **{"command-line": command})

    def wait_qmp_event(self, names: set[str], timeout: float,
                       match: Any = None) -> dict:
        """Wait for a QMP event among names (and match(event) if given), bounded by timeout."""
        deadline = time.monotonic() + timeout
        for ev in self.events_seen:
            if ev.get("event") in names and not ev.get("_consumed") and (not match or match(ev)):
                ev["_consumed"] = True
                return ev
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepTimeout(f"{self.config.name}: no {sorted(names)} event in {timeout:g}s")
            if self._qmp is None:
                raise StepTimeout(f"{self.config.name}: QMP closed")
            try:
                ev = self._qmp.pull_event(wait=min(left, 0.5))
            except (QMPError, OSError, TimeoutError, EOFError):
                ev = None
                if not self.alive():
                    raise StepTimeout(f"{self.config.name} QEMU exited: {self.error_line()}") from None
            if ev is None:
                continue
            self._log("event", ev)
            self.events_seen.append(ev)
            if ev.get("event") in names and (not match or match(ev)):
                ev["_consumed"] = True
                return ev

    def _drain_events(self) -> None:
        if self._qmp is None:
            return
        for ev in self._qmp.get_events(wait=False):
            self._log("event", ev)
            self.events_seen.append(ev)
        self._qmp.clear_events()

    def guest_events(self) -> list[tuple[str, dict[str, str]]]:
        """Events L1 printed on its event serial port so far, in order."""
        if not self.events_log.exists():
            return []
        return parse_events(self.events_log.read_text(errors="replace"))

    def wait_guest_event(self, name: str, timeout: float) -> dict[str, str]:
        """Wait until L1 prints event `name` on its event port; fail fast if QEMU dies."""
        deadline = time.monotonic() + timeout
        while True:
            for ev, kv in self.guest_events():
                if ev == name:
                    return kv
            if not self.alive():
                raise StepTimeout(f"{self.config.name} QEMU exited: {self.error_line()}")
            if time.monotonic() > deadline:
                raise StepTimeout(f"{self.config.name}: L1 did not report '{name}' in "
                                  f"{timeout:g}s (console: {self.console_tail(1)})")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def thread_names(self) -> list[str]:
        """Names of QEMU's threads now (-name ...,debug-threads=on names them; /proc shows them)."""
        if not self.alive() or self.pid is None:
            return []
        names = []
        for comm in Path(f"/proc/{self.pid}/task").glob("*/comm"):
            try:
                names.append(comm.read_text().strip())
            except OSError:
                continue  # a thread that ended while we looked
        return names

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def error_lines(self) -> list[str]:
        """QEMU's own stderr lines (the destination's rejection reason lives here)."""
        if not self.stderr_log.exists():
            return []
        return [x for x in self.stderr_log.read_text(errors="replace").splitlines() if x.strip()]

    def error_summary(self, n: int = 3) -> str:
        """QEMU's last few stderr lines joined: the first often names the cause, the last the step."""
        lines = self.error_lines()
        return " | ".join(lines[-n:]) if lines else self.exit_story()

    def exit_story(self) -> str:
        """How this QEMU ended: its stderr, else its status and the guest's last console words
        (L1 runs with panic=-1 under -no-reboot: a panic exits QEMU with 0 and no stderr)."""
        story = qemu_exit_story(self.error_lines(), self.returncode, self.console_lines())
        if self.reset_dump.exists():
            regs = self.reset_dump.read_text(errors="replace").split("\n== ")[0]
            story += f"; L1 reset itself at {resetwatch.summary(regs)} ({self.reset_dump.name})"
        return story

    def wait_exit(self, timeout: float) -> int | None:
        """Wait (bounded) for QEMU to exit on its own; returns its status or None if still alive."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode

    def failure_lines(self) -> list[str]:
        """QEMU's stderr lines that say something failed (not its warnings)."""
        return [x for x in self.error_lines() if "error" in x.lower() or "fail" in x.lower()]

    def error_line(self) -> str:
        errs = self.failure_lines()
        lines = errs or self.error_lines()
        return lines[-1] if lines else self.exit_story()

    def console_lines(self) -> list[str]:
        """Everything L1 printed on this QEMU's serial console so far."""
        if not self.console_log.exists():
            return []
        return self.console_log.read_text(errors="replace").splitlines()

    def death_watch(self, stopped_is_dead: bool = False) -> Callable[[], str | None]:
        """A cheap question to ask while waiting on L1: why it is dead (its QEMU exited, or
        its console printed a panic or oops since this watch began), or None.

        ``stopped_is_dead``: also when its vCPUs stopped since the watch began (QEMU's STOP
        event, read without a round trip; its run state asked every RUNSTATE_POLL_S besides).
        Only for a VM that must run all along the wait (a destination after its migration):
        a source stops at switchover."""
        offset = self.console_log.stat().st_size if self.console_log.exists() else 0
        seen: list[str] = []
        mark, next_ask = len(self.events_seen), time.monotonic() + RUNSTATE_POLL_S

        def dead() -> str | None:
            nonlocal offset, next_ask
            if not self.alive():
                return f"its QEMU exited: {self.exit_story()}"
            if stopped_is_dead:
                stopped = self._stopped_since(mark)
                if stopped is None and time.monotonic() >= next_ask:
                    next_ask = time.monotonic() + RUNSTATE_POLL_S
                    stopped = self._not_running()
                if stopped:
                    return stopped
            try:
                with open(self.console_log, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                return None
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            offset += cut
            seen.extend(data[:cut].decode(errors="replace").splitlines())
            line = death_line(seen)
            return f"its console: {line[:200]}" if line else None
        return dead

    def _stopped_since(self, mark: int) -> str | None:
        """Why the vCPUs are stopped, if QEMU said STOP after events_seen[mark] and has not
        said RESUME since (QMP events waiting on the socket are read first), else None."""
        try:
            self._drain_events()
        except (QMPError, OSError, EOFError):
            return None  # a broken monitor: the QEMU's exit, asked first, tells the story
        for ev in reversed(self.events_seen[mark:]):
            if ev.get("event") == "RESUME":
                return None
            if ev.get("event") == "STOP":
                return self._not_running() or "its vCPUs were stopped (QMP STOP event)"
        return None

    def _not_running(self) -> str | None:
        """Why this VM's vCPUs cannot run now (QEMU's run state), or None when they run or
        QEMU cannot say (its death is then told by the other questions)."""
        try:
            st = self.qmp("query-status", timeout=5)
        except QmpCommandError as e:
            return "its QEMU is stopped (state T)" if "state T" in str(e) else None
        if isinstance(st, dict) and st.get("running") is False:
            return f"its vCPUs are not running (QEMU run state {st.get('status')})"
        return None

    def console_tail(self, n: int = 20) -> str:
        if not self.console_log.exists():
            return ""
        return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """Kill QEMU abruptly (tests of the liveness check use this)."""
        if self._proc is not None:
            proc.reap(self._proc, grace=0.5)

    def shutdown(self, timeout: float = 5.0) -> int | None:
        """Quit through QMP if possible, then reap; safe to call twice and on a dead QEMU."""
        if self._qmp is not None:
            if self.alive():
                try:
                    self._log("->", {"execute": "quit"})
                    self._qmp.settimeout(timeout)
                    self._qmp.cmd_raw("quit")
                except (QMPError, OSError, TimeoutError, EOFError, ValueError):
                    # ValueError: a command a Ctrl-C interrupted is still pending in qemu.qmp
                    # ("ID 'None' is in-use", seen in CI): the reap below ends QEMU anyway.
                    pass
            try:
                self._qmp.close()
            except Exception:  # noqa: BLE001 - EOF from a QEMU that already quit is expected
                pass
            self._qmp = None
        if self._control is not None:
            self._control.close()
            self._control = None
        rc = proc.reap(self._proc, grace=timeout) if self._proc is not None else None
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
        if self._transcript is not None:
            try:
                self._log("exit", {"returncode": rc})
                self._transcript.close()
            except OSError:
                pass  # teardown goes on: the run's error already says the disk is full
            self._transcript = None
        return rc

    def _log(self, direction: str, msg: Any) -> None:
        if self._transcript is not None:
            rec = {"t": round(time.monotonic() - self._t0, 4), "dir": direction, "msg": msg}
            try:
                self._transcript.write(json.dumps(rec, default=str) + "\n")
                self._transcript.flush()
            except OSError as e:
                # Said with the file's name: a full results disk must say which write failed.
                raise OSError(e.errno, e.strerror, str(self.transcript_path)) from e


def parse_events(text: str) -> list[tuple[str, dict[str, str]]]:
    """The NESTVIRT-EVENT lines of an events log; a last line L1 is still writing (no newline
    yet) is not an event yet: its values could be cut short."""
    out = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        m = EVENT_RE.match(line.strip())
        if m:
            kv = dict(p.split("=", 1) for p in m.group(2).split() if "=" in p)
            out.append((m.group(1), kv))
    return out


def _shell_quote(arg: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"
