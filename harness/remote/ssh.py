"""SSH to another host with paramiko: key only (never a password), host key checked against a
known_hosts file, every call bounded. Runs a command, starts a long-lived one tied to its own
connection, moves files, and tunnels a TCP port of the remote loopback.

Every remote command line is built here from an argv with shlex quoting, or is a fixed script
whose inputs arrive as quoted positional arguments: no user string is ever pasted into a shell.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paramiko

from harness.core.cache import file_digest
from harness.core.errors import NestvirtError, UsageError

logging.getLogger("paramiko").setLevel(logging.CRITICAL)

# Print "sha256  path" for the first of $1 (the same path as here: a shared filesystem) or the
# staging cache that exists; $2 is the file's name in that cache.
_FIND_STAGED = ('c="$HOME/.cache/nestvirt/staged"; '
                'for f in "$1" "$c/$2"; do [ -f "$f" ] && sha256sum -- "$f"; done; true')
_STAGE_DIR = 'c="$HOME/.cache/nestvirt/staged"; mkdir -p -m 700 "$c" && echo "$c"'

_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
# A DNS name or an IPv4 address; nothing a shell or QEMU's option parser would split.
_ADDR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class RemoteError(NestvirtError):
    """The other host could not be reached, or a command there failed; says which and why."""


@dataclass(frozen=True)
class HostSpec:
    """How to reach a host: user@addr:port with a key file (or the agent and ~/.ssh keys when
    none is given) and the known_hosts file that must hold its host key. No password, ever.

    What is recorded in results is ``label`` and the paths, never a key's content.
    """

    user: str
    addr: str
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None

    def __post_init__(self) -> None:
        if not _USER.fullmatch(self.user):
            raise UsageError(f"--dst-host: user {self.user!r} is not a plain user name")
        if not _ADDR.fullmatch(self.addr):
            raise UsageError(f"--dst-host: {self.addr!r} is not a host name or IPv4 address")
        if not 1 <= self.port <= 65535:
            raise UsageError(f"--dst-host: port {self.port} is not in 1..65535")

    @classmethod
    def parse(cls, text: str, **kw: Any) -> HostSpec:
        """"user@addr" or "user@addr:port" (the user is required: no guessing who logs in)."""
        user, at, rest = text.partition("@")
        if not at or not user or not rest:
            raise UsageError(f"--dst-host {text!r}: expected USER@ADDR[:PORT]")
        addr, colon, port = rest.partition(":")
        if colon and not port.isdigit():
            raise UsageError(f"--dst-host {text!r}: port {port!r} is not a number")
        return cls(user=user, addr=addr, port=int(port) if colon else 22,
                   **{k: v for k, v in kw.items() if v is not None})

    @property
    def label(self) -> str:
        return f"{self.user}@{self.addr}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HostSpec:
        """Inverse of to_json; TypeError on an unknown field, UsageError on a bad value."""
        return cls(**d)


@dataclass(frozen=True)
class RemoteResult:
    rc: int
    out: str
    err: str


class RemoteHost:
    """One SSH connection to a host. Not thread-safe; one caller at a time."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self._client: paramiko.SSHClient | None = None

    # -- connection ----------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> RemoteHost:
        """Connect and authenticate with the key; RemoteError naming the cause otherwise."""
        s = self.spec
        client = paramiko.SSHClient()
        try:
            if s.known_hosts:
                client.load_host_keys(s.known_hosts)
            else:
                client.load_system_host_keys()
        except OSError as e:
            raise RemoteError(f"known_hosts {s.known_hosts}: {e.strerror}") from e
        # An unknown host key is refused, never learnt: a first connection must not be trusted.
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pkey = _load_key(s.key_file) if s.key_file else None
        try:
            client.connect(s.addr, port=s.port, username=s.user, pkey=pkey, password=None,
                           allow_agent=pkey is None, look_for_keys=pkey is None,
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
        except paramiko.BadHostKeyException as e:
            client.close()
            raise RemoteError(f"{s.label}: host key does not match {s.known_hosts or 'known_hosts'}"
                              ) from e
        except paramiko.SSHException as e:
            client.close()
            if "not found in known_hosts" in str(e):
                raise RemoteError(f"{s.label}: host key not in {s.known_hosts or '~/.ssh/known_hosts'}"
                                  " (refused; add it, e.g. with ssh-keyscan)") from e
            raise RemoteError(f"{s.label}: SSH failed: {e}") from e
        except (OSError, EOFError) as e:
            client.close()
            raise RemoteError(f"{s.label}: cannot connect: {e}") from e
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(2)
        self._client = client
        return self

    @property
    def active(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def reconnect(self, timeout: float = 10.0) -> None:
        """A fresh connection if this one died (a cut link takes the control connection too)."""
        if not self.active:
            self.close()
            self.connect(timeout)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _transport(self) -> paramiko.Transport:
        t = self._client.get_transport() if self._client else None
        if t is None or not t.is_active():
            raise RemoteError(f"{self.spec.label}: SSH connection is not active")
        return t

    def _session(self, timeout: float) -> paramiko.Channel:
        try:
            return self._transport().open_session(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(f"{self.spec.label}: cannot open an SSH session: {e}") from e

    # -- commands ------------------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float, *, input: bytes | None = None,
            check: bool = True) -> RemoteResult:
        """Run argv (quoted, never through a shell built from it) to completion, bounded."""
        return self._exec(shlex.join(argv), timeout, input, check)

    def script(self, script: str, args: Sequence[str], timeout: float, *,
               input: bytes | None = None, check: bool = True) -> RemoteResult:
        """Run a fixed sh script (a constant of the caller) with args as $1, $2, ... (quoted)."""
        return self._exec(shlex.join(["sh", "-c", script, "nestvirt", *args]), timeout, input,
                          check)

    def _exec(self, command: str, timeout: float, input: bytes | None,
              check: bool) -> RemoteResult:
        deadline = time.monotonic() + timeout
        chan = self._session(min(timeout, 10.0))
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(0.2)
            chan.exec_command(command)
            if input is not None:
                view = memoryview(input)
                while view:
                    _check_deadline(deadline, timeout, command)
                    try:
                        n = chan.send(view[:1 << 16])
                    except TimeoutError:
                        continue
                    view = view[n:]
            chan.shutdown_write()
            while not (chan.exit_status_ready() and not chan.recv_ready()
                       and not chan.recv_stderr_ready()):
                _check_deadline(deadline, timeout, command)
                got = False
                if chan.recv_ready():
                    out += chan.recv(1 << 16)
                    got = True
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    got = True
                if not got:
                    if chan.closed and not chan.exit_status_ready():
                        raise RemoteError(f"{self.spec.label}: connection lost during "
                                          f"{_short(command)}")
                    chan.status_event.wait(0.05)
            rc = chan.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(f"{self.spec.label}: {_short(command)}: {e}") from e
        finally:
            # Close only after the exit status: dropbear 2022.83 breaks the whole connection when
            # a session opens while a closed one's SIGCHLD is pending (mkj/dropbear#321).
            chan.close()
        res = RemoteResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and rc != 0:
            tail = (res.err or res.out).strip().splitlines()[-2:]
            raise RemoteError(f"{self.spec.label}: {_short(command)} failed ({rc}): "
                              f"{' | '.join(tail)}")
        return res

    def start(self, argv: Sequence[str], stderr_path: str, timeout: float = 10.0) -> RemoteProcess:
        """Start argv on its own new connection, stdin/stdout on that session, stderr to a file.

        The process gets SIGKILL when its connection's server process ends (setpriv
        --pdeathsig): closing the connection, or the server giving up on a dead link, ends it.
        """
        conn = RemoteHost(self.spec).connect(timeout)
        chan = conn._session(timeout)
        # The pid is echoed only after setpriv has armed the signal: were it echoed before, a
        # caller could close the connection while the server still lived but before the
        # prctl, and the process would outlive it (seen on a loaded CI host).
        armed = 'echo $$; f=$1; shift; exec "$@" 2>"$f"'
        line = "exec setpriv --pdeathsig KILL -- " + shlex.join(
            ["sh", "-c", armed, "sh", stderr_path, *argv])
        try:
            chan.exec_command(line)
            pid, rest = _read_line(chan, time.monotonic() + timeout)
        except (paramiko.SSHException, OSError, EOFError, ValueError) as e:
            chan.close()
            conn.close()
            raise RemoteError(f"{self.spec.label}: could not start {argv[0]}: {e}") from e
        return RemoteProcess(conn, chan, pid, rest, argv[0])

    # -- files and ports -----------------------------------------------------------------
    def mkdtemp(self, prefix: str = "nestvirt-") -> str:
        """A private (0700) directory under the remote /tmp, for one run."""
        out = self.run(["mktemp", "-d", f"/tmp/{prefix}XXXXXXXX"], 15).out.strip()
        if not out.startswith("/tmp/"):
            raise RemoteError(f"{self.spec.label}: mktemp said {out!r}")
        return out

    def put(self, data: bytes, path: str, timeout: float = 120.0) -> None:
        """Write a file (mode 0600), atomically: beside it first, then renamed."""
        self.script('umask 077; cat > "$1.part" && mv -f "$1.part" "$1"', [path], timeout,
                    input=data)

    def read(self, path: str, timeout: float = 15.0) -> bytes | None:
        """A remote file's bytes, or None when it does not exist."""
        res = self.script('[ -e "$1" ] || exit 3; cat -- "$1"', [path], timeout, check=False)
        if res.rc == 3:
            return None
        if res.rc != 0:
            raise RemoteError(f"{self.spec.label}: cannot read {path}: {res.err.strip()}")
        return res.out.encode()

    def tunnel(self, host: str, port: int, timeout: float = 5.0) -> paramiko.Channel:
        """A channel to host:port as seen from the remote side (its loopback, typically)."""
        try:
            return self._transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                  timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(f"{self.spec.label}: tunnel to {host}:{port}: {e}") from e


class RemoteProcess:
    """A process started by RemoteHost.start: its pid there, its exit status once known, and
    its stdin/stdout as a local socket (for QMP on stdio)."""

    def __init__(self, conn: RemoteHost, chan: paramiko.Channel, pid: int, early: bytes,
                 name: str) -> None:
        self.conn, self.chan, self.pid, self.name = conn, chan, pid, name
        self._early = early
        self._sock: socket.socket | None = None
        self.lost = False  # the connection died before an exit status came

    def poll(self) -> int | None:
        """The exit status once it exited (-1 for a signal), else None. A lost connection
        counts as ended: its server process is gone, and the pdeathsig went with it."""
        if self.chan.exit_status_ready():
            return self.chan.recv_exit_status()
        if self.chan.closed or not self.conn.active:
            self.lost = True
            return -1
        return None

    def wait(self, timeout: float) -> int | None:
        self.chan.status_event.wait(timeout)
        return self.poll()

    def stdio_socket(self) -> socket.socket:
        """A local socket whose other end is the process's stdin/stdout (two pump threads;
        qemu.qmp needs a real socket, a paramiko Channel is not one)."""
        if self._sock is None:
            self._sock = _bridge(self.chan, self._early)
        return self._sock

    def kill(self, control: RemoteHost | None, timeout: float = 5.0) -> int | None:
        """SIGKILL it over the control connection, else by closing its own connection;
        waits (bounded) for the exit status. Safe on a process that already ended."""
        if self.poll() is None and control is not None and control.active:
            with contextlib.suppress(RemoteError):
                control.run(["kill", "-9", str(self.pid)], timeout)
        rc = self.wait(timeout)
        self.close()
        return rc

    def close(self) -> None:
        """Close its connection (the process dies with it, if it still ran)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        with contextlib.suppress(Exception):
            self.chan.close()
        self.conn.close()


def _load_key(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException as e:
        raise UsageError(f"--dst-key {path}: the key is encrypted; load it into ssh-agent and "
                         "leave --dst-key out") from e
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise UsageError(f"--dst-key {path}: not a usable private key ({e})") from e


def _read_line(chan: paramiko.Channel, deadline: float) -> tuple[int, bytes]:
    """The pid line `echo $$` printed, and whatever arrived after it."""
    buf = b""
    chan.settimeout(0.2)
    while b"\n" not in buf:
        if time.monotonic() > deadline:
            raise ValueError("no pid line in time")
        try:
            data = chan.recv(4096)
        except TimeoutError:
            continue
        if not data:
            raise ValueError(f"exited at once (status {chan.recv_exit_status()})")
        buf += data
    line, _, rest = buf.partition(b"\n")
    chan.settimeout(None)
    return int(line.strip()), rest


def _bridge(chan: paramiko.Channel, early: bytes) -> socket.socket:
    mine, theirs = socket.socketpair()
    if early:
        theirs.sendall(early)

    def down() -> None:  # channel -> local socket
        try:
            while True:
                data = chan.recv(1 << 16)
                if not data:
                    break
                theirs.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                theirs.shutdown(socket.SHUT_WR)

    def up() -> None:  # local socket -> channel
        try:
            while True:
                data = theirs.recv(1 << 16)
                if not data:
                    break
                chan.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(Exception):
                chan.shutdown_write()

    threading.Thread(target=down, name="ssh-stdio-down", daemon=True).start()
    threading.Thread(target=up, name="ssh-stdio-up", daemon=True).start()
    return mine


def _check_deadline(deadline: float, timeout: float, command: str) -> None:
    if time.monotonic() > deadline:
        raise RemoteError(f"{_short(command)} did not finish in {timeout:g}s")


def _short(command: str) -> str:
    return repr(command[:80])


def write_known_hosts(path: Path, addr: str, port: int, host_key_line: str) -> None:
    """One known_hosts line for addr:port from an "ssh-ed25519 AAAA..." public key line."""
    host = addr if port == 22 else f"[{addr}]:{port}"
    kind, b64 = host_key_line.split()[:2]
    path.write_text(f"{host} {kind} {b64}\n")


def stage(host: RemoteHost, local: Path, timeout: float = 300.0) -> str:
    """The path on `host` of a file with local's content: the same path when it holds the same
    bytes (a shared filesystem), else a copy in the host's staging cache (uploaded once)."""
    digest = file_digest(local)
    name = f"{digest[:16]}-{local.name}"
    found = host.script(_FIND_STAGED, [str(local), name], 60).out
    for line in found.splitlines():
        got, _, path = line.partition("  ")
        if got == digest:
            return path
    cache = host.script(_STAGE_DIR, [], 30).out.strip()
    target = f"{cache}/{name}"
    host.put(local.read_bytes(), target, timeout)
    return target
