"""An sshd (dropbear) for a network-namespace test host, with a client key made for it.

dropbear 2022.83 reads `<home of the user>/.ssh/authorized_keys` with the home from getpwnam
and has no option to look elsewhere. So it runs in a private mount namespace where a copy of
/etc/passwd, with root's home moved into this server's own directory, is bind-mounted over
/etc/passwd: neither /root nor /etc is touched.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import paramiko

from harness.core import proc
from harness.core.errors import SetupError
from harness.remote import netns
from harness.remote.ssh import HostSpec, write_known_hosts

DROPBEAR = "/usr/sbin/dropbear"
# Bind-mount $1 over /etc/passwd, hide $2 (if given) under an empty tmpfs, then become the
# server ("$@" after the shifts).
_ENTER = ('mount --bind "$1" /etc/passwd || exit 97; '
          'if [ -n "$2" ]; then mount -t tmpfs nestvirt-private "$2" || exit 98; fi; '
          'shift 2; exec "$@"')


class NetnsSshd:
    """dropbear listening on addr:22 inside netns `ns`; `spec` is how to log in (as root).

    private_dir, if given, is an existing directory this host does not share with the others
    (an empty tmpfs over it): files there are not on the "remote" filesystem.
    """

    def __init__(self, ns: str, addr: str, rundir: Path, keepalive_s: int = 5,
                 private_dir: Path | None = None) -> None:
        self.ns, self.addr = ns, addr
        self.dir = rundir / f"sshd-{ns}"
        self.home = self.dir / "home"
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        os.chmod(self.home, 0o700)  # dropbear refuses a home others can write
        key = paramiko.ECDSAKey.generate(bits=256)
        self.key_file = self.dir / "id_ecdsa"
        key.write_private_key_file(str(self.key_file))
        auth = self.home / ".ssh" / "authorized_keys"
        auth.write_text(f"{key.get_name()} {key.get_base64()} nestvirt-test\n")
        auth.chmod(0o600)
        passwd = []
        for line in Path("/etc/passwd").read_text().splitlines():
            f = line.split(":")
            if f[0] == "root" and len(f) == 7:
                f[5] = str(self.home)
            passwd.append(":".join(f))
        (self.dir / "passwd").write_text("\n".join(passwd) + "\n")
        hostkey = self.dir / "host_ed25519"
        proc.run(["dropbearkey", "-t", "ed25519", "-f", str(hostkey)], 20)
        pub = proc.run(["dropbearkey", "-y", "-f", str(hostkey)], 20).stdout
        line = next((x for x in pub.splitlines() if x.startswith("ssh-ed25519 ")), None)
        if line is None:
            raise SetupError(f"dropbearkey -y printed no ssh-ed25519 line: {pub[:200]!r}")
        self.known_hosts = self.dir / "known_hosts"
        write_known_hosts(self.known_hosts, addr, 22, line)
        self.log_path = self.dir / "dropbear.log"
        log = open(self.log_path, "wb")
        try:
            # -s: no password logins; -k: no remote forwarding; -K: keepalive, so a session on
            # a dead link ends (and its QEMU with it) after 3 missed answers.
            self._proc = proc.spawn(
                ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private",
                 "sh", "-c", _ENTER, "nestvirt", str(self.dir / "passwd"),
                 str(private_dir) if private_dir else "",
                 DROPBEAR, "-F", "-E", "-s", "-k", "-K", str(keepalive_s), "-W", "1048576",
                 "-r", str(hostkey), "-P", str(self.dir / "dropbear.pid"), "-p", f"{addr}:22"],
                stdout=log, stderr=log)
        finally:
            log.close()
        self._wait_listening(10.0)
        self.spec = HostSpec(user="root", addr=addr, key_file=str(self.key_file),
                             known_hosts=str(self.known_hosts))

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise SetupError(f"dropbear in {self.ns} exited: {self.log_tail()}")
            try:
                with netns.entered(self.ns), socket.create_connection((self.addr, 22), 0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SetupError(f"dropbear in {self.ns} not listening after {timeout:g}s: "
                                 f"{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        proc.reap(self._proc, grace=2.0)
