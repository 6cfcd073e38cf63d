"""The network link that carries a migration to another host: found by the route to the peer,
cut and restored with `ip link`, throttled with a token-bucket qdisc (tc tbf; this kernel has
no netem). Acts in the calling thread's network namespace, as root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.core import proc
from harness.core.errors import SetupError

_DEV = re.compile(r"\bdev (\S+)")


@dataclass(frozen=True)
class Link:
    """The local device on the route to `peer`."""

    dev: str
    peer: str

    @classmethod
    def towards(cls, peer: str) -> Link:
        """The device `ip route get PEER` names; SetupError for loopback (no link to cut)."""
        out = proc.run(["ip", "-o", "route", "get", peer], 10).stdout
        m = _DEV.search(out)
        if not m:
            raise SetupError(f"no route to {peer}: {out.strip()}")
        if m.group(1) == "lo":
            raise SetupError(f"{peer} is this host (route via lo): no link to cut")
        return cls(dev=m.group(1), peer=peer)

    def down(self) -> None:
        proc.run(["ip", "link", "set", "dev", self.dev, "down"], 10)

    def up(self) -> None:
        proc.run(["ip", "link", "set", "dev", self.dev, "up"], 10)

    def is_up(self) -> bool:
        """Administratively up (the UP flag in "<BROADCAST,MULTICAST,UP,LOWER_UP>")."""
        out = proc.run(["ip", "-o", "link", "show", "dev", self.dev], 10).stdout
        flags = out.partition("<")[2].partition(">")[0].split(",")
        return "UP" in flags

    def throttle(self, rate: str) -> None:
        """Egress through a token bucket of `rate` ("50mbit"), replacing any root qdisc."""
        if not re.fullmatch(r"\d+[kmg]?bit", rate):
            raise ValueError(f"tbf rate {rate!r}: e.g. 50mbit")
        proc.run(["tc", "qdisc", "replace", "dev", self.dev, "root", "tbf", "rate", rate,
                  "burst", "32kbit", "latency", "400ms"], 10)

    def unthrottle(self) -> None:
        # Deleting the root qdisc brings the default back; "nothing to delete" is fine.
        proc.run(["tc", "qdisc", "del", "dev", self.dev, "root"], 10, check=False)
