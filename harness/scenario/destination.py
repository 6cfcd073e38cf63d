"""Where a run's destination QEMUs start: on this host, or on another one over SSH (the
migration then crosses the network between them), and the TLS credentials they are given.

One Destination per run of a variant: it connects to the other host once, keeps a private
directory there for logs and credentials, puts the L1 image there (or finds it on a shared
filesystem), and removes that directory again in close().
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.guest.image import L1Image
from harness.guest.l1 import RunKey
from harness.remote import netns
from harness.remote.link import Link
from harness.remote.ssh import HostSpec, RemoteError, RemoteHost, stage
from harness.vm import tls as tlsmod
from harness.vm.machine import Machine, MachineConfig
from harness.vm.remote import RemoteMachine

_RM_RUN_DIR = 'case "$1" in /tmp/nestvirt-dst-*) rm -rf -- "$1" ;; *) exit 2 ;; esac'


def where_am_i() -> dict[str, str]:
    """This process's host name and network namespace: where a variant ran (scale-out)."""
    return {"hostname": socket.gethostname(), "netns": netns.current()}


class Destination:
    """Destination QEMUs of one run: local (launch) or on `spec`'s host (over SSH)."""

    def __init__(self, spec: HostSpec | None, workdir: Path, key: RunKey, image: L1Image,
                 launch_local: Callable[[MachineConfig], Machine]) -> None:
        self.spec, self.workdir, self.key, self.image = spec, workdir, key, image
        self._launch_local = launch_local
        self.qemu = ""
        self.control: RemoteHost | None = None
        self.remote_dir = ""
        self._staged: tuple[str, str] | None = None
        self._remote_tls: str | None = None
        # The link the migration crosses: what the network faults act on. Known before any
        # destination starts (a fault throttles it while the source still runs alone).
        self.link: Link | None = Link.towards(spec.addr) if spec is not None else None

    @property
    def remote(self) -> bool:
        return self.spec is not None

    def uri(self, transport: str, unix_dir: Path | None) -> str:
        """Where the destination listens: the other host's address, else loopback; port 0
        (the kernel picks it, the destination reports it)."""
        if self.spec is not None:
            return f"tcp:{self.spec.addr}:0"
        if transport == "unix":
            assert unix_dir is not None
            return f"unix:{unix_dir / 'migration.sock'}"
        return "tcp:127.0.0.1:0"

    def make_tls(self, kind: str) -> tlsmod.TlsCredentials | None:
        if kind == "none":
            return None
        addr = self.spec.addr if self.spec is not None else "127.0.0.1"
        return tlsmod.make(kind, self.workdir / "tls", addr)

    def launch(self, cfg: MachineConfig, creds: tlsmod.TlsCredentials | None) -> Machine:
        """Start one destination (cfg: as it would start here, -incoming defer) with the
        credentials' server side. On the other host the same binary path is used (the
        inventory that chose it is this host's: hosts of one kind), the image as staged."""
        self.qemu = cfg.qemu
        if self.spec is None:
            extra = tuple(creds.dst_args()) if creds else ()
            return self._launch_local(replace(cfg, extra_args=cfg.extra_args + extra))
        control = self._connect()
        if self._staged is None:
            self._staged = (stage(control, self.image.kernel.image),
                            stage(control, self.image.initramfs))
        extra = ()
        if creds is not None:
            extra = tuple(creds.dst_args(self._upload_tls(control, creds)))
        cfg = replace(cfg, kernel=Path(self._staged[0]), initrd=Path(self._staged[1]),
                      extra_args=cfg.extra_args + extra, tcg_svm_log=None,
                      control=False)
        m = RemoteMachine(cfg, self.workdir, 0, control=control, remote_dir=self.remote_dir)
        try:
            m.launch(timeout=20)
        except BaseException:
            m.shutdown()
            raise
        return m

    def _connect(self) -> RemoteHost:
        assert self.spec is not None
        if self.control is None:
            self.control = RemoteHost(self.spec).connect()
            self.remote_dir = self.control.mkdtemp("nestvirt-dst-")
        return self.control

    def _upload_tls(self, control: RemoteHost, creds: tlsmod.TlsCredentials) -> str:
        if self._remote_tls is None:
            d = f"{self.remote_dir}/tls"
            control.run(["mkdir", "-m", "700", "--", d], 15)
            for f in creds.server_files():
                control.put(f.read_bytes(), f"{d}/{f.name}")
            self._remote_tls = d
        return self._remote_tls

    def ensure_connected(self) -> None:
        """Before a retry: a cut link may have taken the control connection with it."""
        if self.control is None:
            return
        try:
            self.control.run(["true"], 8)
        except RemoteError:
            self.control.close()
            self.control.connect()

    def record(self) -> dict[str, Any]:
        """What results.json says of where the destination ran (no key, no secret)."""
        if self.spec is None:
            return {"host": "local"}
        return {"host": self.spec.label, "qemu": self.qemu,
                "link_dev": self.link.dev if self.link else None, "remote_dir": self.remote_dir}

    def close(self) -> None:
        """Remove the remote run directory and disconnect (machines were shut down first)."""
        if self.control is None:
            return
        with contextlib.suppress(RemoteError):
            self.ensure_connected()
            if self.remote_dir:
                self.control.script(_RM_RUN_DIR, [self.remote_dir], 30)
        self.control.close()
        self.control = None


def unfit_reason(spec: HostSpec | None, transport: str) -> str | None:
    """Why a run with this destination cannot use this transport (a skip reason), or None."""
    if spec is not None and transport == "unix":
        return "a unix socket cannot cross hosts: --transport unix with --dst-host"
    return None

