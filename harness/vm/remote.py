"""One L1 QEMU on another host, started over SSH: the same template as a local one, QMP on the
QEMU's stdin/stdout through its own SSH session (no port, nothing listening but the migration),
L1's SSH through a tunnel to QEMU's hostfwd on that host's loopback, logs in a private
directory there that are copied into the local workdir when it ends.

The QEMU is tied to its SSH connection (setpriv --pdeathsig): closing the connection, or the
server giving up on a dead link, ends it. So a harness that dies leaves nothing behind there.
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.core.errors import StepTimeout
from harness.remote.ssh import RemoteError, RemoteHost, RemoteProcess
from harness.vm.machine import Machine, parse_events

READ_TIMEOUT = 5.0  # one log read on the other host; a live link answers in ~15 ms
_HOSTFWD = re.compile(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s")


@dataclass
class RemoteMachine(Machine):
    """A Machine whose QEMU runs on `control`'s host; logs live in `remote_dir` there."""

    control: RemoteHost | None = None
    remote_dir: str = ""
    _rproc: RemoteProcess | None = None
    _cache: dict[str, str] | None = None
    _unreachable_until: float = 0.0

    @property
    def host(self) -> RemoteHost:
        assert self.control is not None
        return self.control

    # Paths the template puts on the command line: on the remote host.
    @property
    def console_log(self) -> Path:
        return Path(self.remote_dir) / f"{self.config.name}-console.log"

    @property
    def events_log(self) -> Path:
        return Path(self.remote_dir) / f"{self.config.name}-events.log"

    @property
    def stderr_log(self) -> Path:
        return Path(self.remote_dir) / f"{self.config.name}-qemu.stderr"

    def qmp_spec(self) -> str:
        return "stdio"

    def l1_ssh_opener(self) -> Callable[[], Any] | None:
        return lambda: self.host.tunnel("127.0.0.1", self.ssh_port)

    def launch(self, timeout: float = 20.0) -> None:
        """Start QEMU over SSH, connect QMP, learn L1's forwarded SSH port; bounded."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.argv = self.render_argv()
        # A binary with its own module dir gets it in its environment only (as locally).
        env = ["env", f"QEMU_MODULE_DIR={self.config.module_dir}"] if self.config.module_dir else []
        (self.workdir / f"{self.config.name}-cmdline.txt").write_text(
            f"# on {self.host.spec.label}\n" + shlex.join(env + self.argv) + "\n")
        self._transcript = open(self.transcript_path, "a")
        self._t0 = time.monotonic()
        self._rproc = self.host.start(env + self.argv, str(self.stderr_log), timeout)
        qmp = QEMUMonitorProtocol(self._rproc.stdio_socket())
        # connect() has no timeout of its own: closing the session makes it fail instead.
        watchdog = threading.Timer(timeout, self._rproc.close)
        watchdog.start()
        try:
            qmp.connect(negotiate=True)
        except (QMPError, OSError, EOFError) as e:
            self._rproc.wait(2.0)
            raise StepTimeout(f"{self.config.name} QEMU on {self.host.spec.label} did not answer "
                              f"QMP: {self.error_line() or e!r}") from e
        finally:
            watchdog.cancel()
        self._qmp = qmp
        self._log("connected", {"argv": self.argv, "host": self.host.spec.label})
        m = _HOSTFWD.search(self.hmp("info usernet"))
        if not m:
            raise StepTimeout(f"{self.config.name}: no forwarded SSH port in 'info usernet'")
        self.ssh_port = int(m.group(1))

    # -- state ---------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self._rproc is not None and self._rproc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._rproc.pid if self._rproc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._rproc.poll() if self._rproc is not None else None

    def death_watch(self, stopped_is_dead: bool = False) -> Callable[[], str | None]:
        # Its console is on the other host: polling it over SSH every 50 ms would be load.
        # Its QEMU ends with its SSH session, which is seen here at once; a stop, by QEMU's
        # STOP event on the QMP stream (no round trip: its run state is not polled here).
        mark = len(self.events_seen)

        def dead() -> str | None:
            if not self.alive():
                return f"its QEMU exited: {self.exit_story()}"
            return self._stopped_since(mark) if stopped_is_dead else None
        return dead

    def thread_names(self) -> list[str]:
        # Its /proc is on the other host; sampling it over SSH every 20 ms would be load, not
        # a measurement. Migration threads are recorded for the local side only.
        return []

    def _text(self, path: Path) -> str:
        """A remote log's text; the last copy seen when the host does not answer (a cut
        link): then it is not asked again for a few seconds, so polls stay bounded."""
        if self._cache is None:
            self._cache = {}
        if time.monotonic() < self._unreachable_until:
            return self._cache.get(str(path), "")
        try:
            data = self.host.read(str(path), timeout=READ_TIMEOUT)
        except RemoteError:
            self._unreachable_until = time.monotonic() + 5.0
            return self._cache.get(str(path), "")
        text = (data or b"").decode(errors="replace")
        self._cache[str(path)] = text
        return text

    def error_lines(self) -> list[str]:
        return [x for x in self._text(self.stderr_log).splitlines() if x.strip()]

    def console_lines(self) -> list[str]:
        return self._text(self.console_log).splitlines()

    def console_tail(self, n: int = 20) -> str:
        return "\n".join(self.console_lines()[-n:])

    def guest_events(self) -> list[tuple[str, dict[str, str]]]:
        return parse_events(self._text(self.events_log))

    # -- ending ----------------------------------------------------------------------------------
    def kill(self) -> None:
        if self._rproc is not None:
            self._rproc.kill(self.host if self.host.active else None, timeout=5.0)

    def shutdown(self, timeout: float = 5.0) -> int | None:
        """Quit through QMP if possible, else kill; copy the logs here. Safe to call twice."""
        if self._qmp is not None:
            if self.alive():
                try:
                    self._log("->", {"execute": "quit"})
                    self._qmp.settimeout(timeout)
                    self._qmp.cmd_raw("quit")
                except (QMPError, OSError, TimeoutError, EOFError):
                    pass
            try:
                self._qmp.close()
            except Exception:  # noqa: BLE001 - EOF from a QEMU that already quit is expected
                pass
            self._qmp = None
        rc = None
        if self._rproc is not None:
            rc = self._rproc.wait(timeout)
            if rc is None:
                self.kill()
                rc = self._rproc.poll()
            self._rproc.close()
            self._fetch_logs()
        if self._transcript is not None:
            self._log("exit", {"returncode": rc})
            self._transcript.close()
            self._transcript = None
        return rc

    def _fetch_logs(self) -> None:
        # Named as a local machine's are, so every artefact reader finds them.
        for remote in (self.console_log, self.events_log, self.stderr_log):
            text = self._text(remote)
            (self.workdir / remote.name).write_text(text)

