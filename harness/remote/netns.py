"""Two test hosts as network namespaces joined by a veth pair, and how a thread enters one.

setns(CLONE_NEWNET) changes the calling thread only: sockets it makes and processes it starts
live in that namespace, the rest of the process stays where it was. So a harness (or a test)
can act as "host A" for a while without running inside `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass

from harness.core import proc
from harness.core.errors import SetupError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def current() -> str:
    """This thread's network namespace, as the kernel names it ("net:[4026531840]")."""
    return os.readlink("/proc/thread-self/ns/net")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block in netns `name` (this thread only), then come back, also on error."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def available() -> str | None:
    """Why network namespaces cannot be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    try:
        proc.run(["ip", "-V"], 10)
    except SetupError as e:
        return f"iproute2 is missing: {e}"
    return None


@dataclass(frozen=True)
class HostPair:
    """Netns `a` (addr_a on dev_a) <-> netns `b` (addr_b on dev_b), one /24 between them."""

    a: str
    b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str

    @classmethod
    def create(cls, tag: str, subnet: str = "10.77.0") -> HostPair:
        """Make both namespaces and the link (0.1 s); destroy() removes all of it.

        `tag` keeps names apart between parallel test processes (at most 9 characters: an
        interface name stops at 15).
        """
        if len(tag) > 9 or not tag.isalnum():
            raise ValueError(f"netns tag {tag!r}: up to 9 letters or digits")
        p = cls(a=f"nv{tag}a", b=f"nv{tag}b", dev_a=f"nv{tag}a0", dev_b=f"nv{tag}b0",
                addr_a=f"{subnet}.1", addr_b=f"{subnet}.2")
        try:
            for ns in (p.a, p.b):
                proc.run(["ip", "netns", "add", ns], 10)
            proc.run(["ip", "link", "add", p.dev_a, "type", "veth", "peer", "name", p.dev_b], 10)
            for ns, dev, addr in ((p.a, p.dev_a, p.addr_a), (p.b, p.dev_b, p.addr_b)):
                proc.run(["ip", "link", "set", dev, "netns", ns], 10)
                proc.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], 10)
                proc.run(["ip", "-n", ns, "link", "set", "lo", "up"], 10)
                proc.run(["ip", "-n", ns, "link", "set", dev, "up"], 10)
        except BaseException:
            p.destroy()
            raise
        return p

    def destroy(self) -> None:
        """Delete both namespaces (their veth ends go with them); safe to call twice."""
        for ns in (self.a, self.b):
            proc.run(["ip", "netns", "del", ns], 10, check=False)
        # A veth created but not yet moved lives in the root namespace.
        proc.run(["ip", "link", "del", self.dev_a], 10, check=False)

    def exists(self) -> list[str]:
        """Which of this pair's namespaces still exist (for leftover checks)."""
        listed = proc.run(["ip", "netns", "list"], 10).stdout.split()
        return [ns for ns in (self.a, self.b) if ns in listed]
