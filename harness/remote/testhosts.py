"""Two hosts made of network namespaces, for tests and for trying cross-host runs here:
host A runs the harness (and the source QEMU), host B runs dropbear, and destinations are
started there over SSH; the migration crosses the veth between them.

    sudo python -m harness.remote.testhosts      # up until Ctrl-C; prints the commands to use

Everything made (namespaces, veth, dropbear, its keys and home) is removed on exit, and any
process still inside a namespace then (a leak of the harness) is killed by its pid and named.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

from harness.core import proc
from harness.remote import netns
from harness.remote.netns import HostPair
from harness.remote.ssh import HostSpec
from harness.remote.sshd import NetnsSshd


class TestHosts(AbstractContextManager["TestHosts"]):
    """A and B (see the module doc); `dst` is how to log in to B, `leftovers` what the exit
    found still running inside them (pid and command; empty when nothing leaked)."""

    __test__ = False  # not a pytest class

    def __init__(self, tag: str | None = None, keepalive_s: int = 5) -> None:
        # Unique among parallel test processes and runs: pid plus chance.
        self.tag = tag or f"{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.keepalive_s = keepalive_s
        self.pair: HostPair | None = None
        self.sshd: NetnsSshd | None = None
        self.rundir: Path | None = None
        self.leftovers: list[str] = []
        # B has a /tmp of its own (an empty tmpfs): what a run leaves there goes with B, and
        # nothing can rely on the two hosts sharing /tmp. So this host's files live elsewhere.
        self.private = Path("/tmp")

    def __enter__(self) -> TestHosts:
        self.rundir = Path(tempfile.mkdtemp(prefix="nestvirt-hosts-", dir="/var/tmp"))
        try:
            self.pair = HostPair.create(self.tag)
            self.sshd = NetnsSshd(self.pair.b, self.pair.addr_b, self.rundir, self.keepalive_s,
                                  private_dir=self.private)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def dst(self) -> HostSpec:
        assert self.sshd is not None
        return self.sshd.spec

    @property
    def source_ns(self) -> str:
        assert self.pair is not None
        return self.pair.a

    def on_source(self) -> AbstractContextManager[None]:
        """This thread acts as host A for the block (sockets and children live there)."""
        return netns.entered(self.source_ns)

    def dst_args(self) -> list[str]:
        """The `nestvirt run` options that send destinations to B."""
        d = self.dst
        return ["--dst-host", f"{d.user}@{d.addr}", "--dst-key", str(d.key_file),
                "--dst-known-hosts", str(d.known_hosts)]

    def close(self) -> None:
        """Stop dropbear, kill (by pid) and name whatever is still in the namespaces, delete
        them and the run dir. Safe to call twice."""
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None
        if self.pair is not None:
            for ns in self.pair.exists():
                self.leftovers += _kill_inside(ns)
            self.pair.destroy()
            self.pair = None
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None


def _live_inside(ns: str) -> list[int]:
    pids = [int(p) for p in proc.run(["ip", "netns", "pids", ns], 10, check=False).stdout.split()]
    return [p for p in pids if _state(p) not in ("Z", "gone")]


def _kill_inside(ns: str, grace: float = 3.0) -> list[str]:
    """SIGKILL every process still in netns `ns` after `grace` seconds (all started by this
    run: the namespace is its own), wait for them, and say which they were. A closed SSH
    connection's server process takes a moment to end: that is not a leak."""
    deadline = time.monotonic() + grace
    while _live_inside(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = _live_inside(ns)
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            state = _state(pid)
            if state in ("Z", "gone"):
                continue
            found.append(f"{pid} {cmd.strip()}")
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
    deadline = time.monotonic() + 5
    while any(_state(int(f.split()[0])) not in ("Z", "gone") for f in found):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return found


def _state(pid: int) -> str:
    """R, S, Z, ... from /proc (kill -0 calls a zombie alive), or "gone"."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return "gone"
    return "?"


def main() -> int:
    why = netns.available()
    if why:
        print(f"testhosts: {why}", file=sys.stderr)
        return 2
    with TestHosts(tag="try") as hosts:
        nv = shlex.join(["ip", "netns", "exec", hosts.source_ns, sys.executable, "-m", "harness"])
        assert hosts.pair is not None
        print(f"host A: netns {hosts.pair.a} ({hosts.pair.addr_a}), "
              f"host B: netns {hosts.pair.b} ({hosts.pair.addr_b}) with dropbear\n"
              f"  {nv} run migrate-plain {shlex.join(hosts.dst_args())}\n"
              "Ctrl-C removes both.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    if hosts.leftovers:
        print(f"testhosts: killed what was left inside: {hosts.leftovers}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
