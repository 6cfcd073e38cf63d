"""Talk to L1 over SSH (paramiko -> dropbear through QEMU's hostfwd), with a key made per run."""

from __future__ import annotations

import base64
import logging
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from harness.core.errors import NestvirtError, StepTimeout

logging.getLogger("paramiko").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class RunKey:
    """A fresh key pair for one run; the public half goes on L1's kernel command line."""

    private: paramiko.PKey

    @classmethod
    def generate(cls) -> RunKey:
        return cls(paramiko.ECDSAKey.generate(bits=256))

    @property
    def cmdline_arg(self) -> str:
        return f"nestvirt.sshkey={self.private.get_name()}:{self.private.get_base64()}"

    def save(self, path: Path) -> None:
        """Keep the private key with the run's artefacts so a person can log in by hand."""
        self.private.write_private_key_file(str(path))

    def rekey_line(self, nonce: str, host: HostKey, epoch_ns: int | None = None) -> str:
        """The control-port line that gives a restored L1 this run's secrets (see
        guests/l1/nvrekey.c): 64 fresh bytes of seed, the host's clock, this public key and
        the host key L1 is to serve."""
        when = time.time_ns() if epoch_ns is None else epoch_ns
        return (f"rekey {nonce} {secrets.token_hex(64)} {when} {self.private.get_name()} "
                f"{self.private.get_base64()} {host.dropbear_b64()}")


@dataclass(frozen=True)
class HostKey:
    """An SSH host key made by the harness for one restored L1: L1 serves it, the harness
    pins it (so a connection reaches exactly the L1 it re-keyed, on the destination too)."""

    private: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> HostKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    def _raw(self) -> tuple[bytes, bytes]:
        priv = self.private.private_bytes(serialization.Encoding.Raw,
                                          serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        pub = self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw)
        return priv, pub

    def dropbear_b64(self) -> str:
        """The private key in dropbear's own file format (string type, string priv||pub)."""
        priv, pub = self._raw()
        return base64.b64encode(_ssh_string(b"ssh-ed25519") + _ssh_string(priv + pub)).decode()

    @property
    def public(self) -> paramiko.PKey:
        _, pub = self._raw()
        return paramiko.Ed25519Key(data=_ssh_string(b"ssh-ed25519") + _ssh_string(pub))


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def new_nonce() -> str:
    """Names one rekey, so that its answer cannot be an older one's."""
    return secrets.token_hex(8)


class L1Dead(StepTimeout):
    """L1 was seen dead (its QEMU exited, or its console said panic/oops) during a wait."""


# How often a wait on L1 looks at its QEMU and console.
POLL_S = 0.05
SEND_CHUNK = 1 << 15  # paramiko's largest packet: one channel write each


@dataclass(frozen=True)
class CommandResult:
    rc: int
    out: str
    err: str


_MARK = "@@NESTVIRT-PART"


def _split_many(text: str) -> dict[int, CommandResult]:
    """The parts of run_many's output, by command index (a part that never ended is absent)."""
    parts: dict[int, CommandResult] = {}
    chunks = text.split(f"\n{_MARK} ")
    for chunk in chunks[1:]:
        head, _, rest = chunk.partition("\n")
        idx, _, rc = head.partition(" ")
        out, _, err = rest.partition(f"\n{_MARK}ERR {idx}\n")
        try:
            parts[int(idx)] = CommandResult(int(rc or -1), out.removesuffix("\n"),
                                            err.removesuffix("\n"))
        except ValueError:
            continue
    return parts


def was_refused(e: BaseException) -> bool:
    """Whether a failed SSH connect was refused: the connection reset or closed before
    dropbear's banner (paramiko wraps either in its banner error). Through QEMU's user
    network that is L1's own answer that nothing listens (slirp passes L1's reset on as a
    reset or a close), where an L1 that does not answer leaves the try to time out."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, (ConnectionResetError, EOFError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class L1Shell:
    """An SSH session to one L1; every call is bounded by a timeout.

    `opener` makes the transport for each attempt (a tunnel through another host's SSH, for
    an L1 whose QEMU runs there); without it, host:port is dialled directly.
    """

    def __init__(self, port: int, key: RunKey, host: str = "127.0.0.1",
                 opener: Callable[[], Any] | None = None,
                 host_key: paramiko.PKey | None = None,
                 death: Callable[[], str | None] | None = None) -> None:
        self.port = port
        self.key = key
        self.host = host
        self.opener = opener
        # Pinned: the harness gave L1 its host key (a re-keyed L1); None: accepted as offered
        # (a cold L1 makes its own on first connection, unannounced).
        self.host_key = host_key
        # Says why L1 is dead (its QEMU exited, its console panicked), or None: every wait
        # here asks it, so a dead L1 ends the wait at once instead of at its timeout.
        self.death = death
        self._client: paramiko.SSHClient | None = None

    def _check_alive(self, doing: str) -> None:
        why = self.death() if self.death is not None else None
        if why:
            raise L1Dead(f"L1 died while {doing}: {why}")

    def connect(self, timeout: float = 30.0, refused_is_final_s: float | None = None) -> float:
        """Retry until dropbear answers; return seconds taken. L1Dead once L1 is seen dead.

        ``refused_is_final_s``: for an L1 whose dropbear was already serving (a destination
        after its migration): when every try for that long is refused (L1's TCP stack
        answers, nothing listens on the port), that is the verdict, not a wait to the end.
        A booting L1 refuses too before dropbear listens, so it is never the default."""
        t0 = time.monotonic()
        last = "no attempt"
        refused_since: float | None = None
        while time.monotonic() - t0 < timeout:
            self._check_alive(f"SSH was connecting to port {self.port}")
            client = paramiko.SSHClient()
            if self.host_key is not None:
                name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
                client.get_host_keys().add(name, self.host_key.get_name(), self.host_key)
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            else:
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                sock = self.opener() if self.opener is not None else None
                client.connect(self.host, port=self.port, username="root", pkey=self.key.private,
                               timeout=5, banner_timeout=5, auth_timeout=5, sock=sock,
                               allow_agent=False, look_for_keys=False)
                self._client = client
                return time.monotonic() - t0
            except paramiko.BadHostKeyException as e:
                client.close()
                raise NestvirtError(f"L1 on port {self.port} offered a host key other than the "
                                    f"one it was given: {e}") from e
            except (paramiko.SSHException, OSError, EOFError, NestvirtError) as e:
                last = f"{type(e).__name__}: {e}"
                client.close()
                if not was_refused(e):
                    refused_since = None
                elif refused_since is None:
                    refused_since = time.monotonic()
                elif refused_is_final_s is not None and \
                        time.monotonic() - refused_since >= refused_is_final_s:
                    raise StepTimeout(
                        f"SSH to L1 on port {self.port} was refused on every try for "
                        f"{time.monotonic() - refused_since:.1f}s: L1 answers, nothing listens "
                        f"on its SSH port ({last})") from e
                time.sleep(0.1)
        raise StepTimeout(f"SSH to L1 on port {self.port} failed for {timeout:g}s ({last})")

    def run(self, command: str, timeout: float = 30.0, stdin: bytes | None = None
            ) -> CommandResult:
        """Run one shell command in L1 (``stdin``: bytes it reads, then end of file); raise
        StepTimeout if it does not finish in time, and L1Dead (a StepTimeout) as soon as L1
        is seen dead while it runs."""
        if self._client is None:
            raise StepTimeout("SSH not connected")
        self._check_alive(f"running {command[:60]!r}")
        deadline = time.monotonic() + timeout
        try:
            chan = self._client.get_transport().open_session(timeout=timeout)
            chan.settimeout(POLL_S)
            chan.exec_command(command)
            if stdin is not None:
                self._send(chan, stdin, deadline, command)
            out, err = bytearray(), bytearray()
            while True:
                got = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    got = True
                if chan.exit_status_ready() and not chan.recv_ready() and \
                        not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError
                if not got:
                    self._check_alive(f"running {command[:60]!r}")
                    chan.status_event.wait(POLL_S)  # wakes at once when the command ends
            rc = chan.recv_exit_status()
            chan.close()  # dropbear caps open channels per connection
        except L1Dead:
            raise
        except (TimeoutError, paramiko.SSHException, EOFError, OSError, AttributeError) as e:
            self._check_alive(f"running {command[:60]!r}")
            raise StepTimeout(f"L1 command timed out or dropped after {timeout:g}s: "
                              f"{command[:60]!r} ({type(e).__name__})") from e
        return CommandResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def _send(self, chan: paramiko.Channel, data: bytes, deadline: float, command: str) -> None:
        """Write ``data`` to the command's stdin and close it, within ``deadline``: a send
        that waits on a full window returns to ask whether L1 is still alive."""
        view, sent = memoryview(data), 0
        while sent < len(view):
            try:
                sent += chan.send(view[sent:sent + SEND_CHUNK])
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self._check_alive(f"sending to {command[:60]!r}")
        chan.shutdown_write()

    def run_many(self, commands: Mapping[str, str], timeout: float = 30.0
                 ) -> dict[str, CommandResult]:
        """Run several commands at once inside L1, in one SSH exec (each in the background;
        a round trip to an emulated L1 costs more than most of what is asked): each one's
        output and exit status once all have ended."""
        names = list(commands)
        if not names:
            return {}
        lines = ['d=$(mktemp -d /tmp/nvmany.XXXXXX)']
        for i, name in enumerate(names):
            lines.append(f"( {commands[name]}\n) >$d/{i}.out 2>$d/{i}.err </dev/null & p{i}=$!")
        for i in range(len(names)):
            lines.append(f"wait $p{i}; echo $? >$d/{i}.rc")
        for i in range(len(names)):
            lines.append(f'printf "\\n{_MARK} {i} %s\\n" "$(cat $d/{i}.rc)"; cat $d/{i}.out; '
                         f'printf "\\n{_MARK}ERR {i}\\n"; cat $d/{i}.err')
        lines.append('rm -rf "$d"')
        r = self.run("\n".join(lines), timeout)
        return {names[i]: res for i, res in _split_many(r.out).items() if i < len(names)}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
