"""TLS for migration: credentials made per run (certtool: a CA, a server and a client
certificate; or a pre-shared key) and how QEMU is wired to them.

The destination is the TLS server: `tls-creds-x509` with verify-peer (it checks the source's
client certificate) and a `tls-authz` allowing exactly the source's identity; the source is the
client and checks the destination's certificate against the CA and `tls-hostname`. With PSK
both sides hold the same key. The deliberate breakages the fault table uses (another CA, another
hostname, a client the authz refuses, another key) live here too, beside what they break.

QEMU 7.2 refuses the dotted `authz-list,rules.0.match=...` form, so every object is given in
QEMU's JSON `-object` form. The identity QEMU matches is gnutls' DN order, "O=...,CN=...".
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import proc
from harness.core.errors import SetupError

TLS_MODES = ("none", "x509", "psk")
ORG = "nestvirt"
SERVER_NAME = "dst.nestvirt.test"
CLIENT_NAME = "src.nestvirt.test"
ROGUE_NAME = "rogue.nestvirt.test"
WRONG_HOSTNAME = "wrong.nestvirt.test"
PSK_USER = "qemu"
DST_CREDS_ID = "nvtls-dst"
DST_AUTHZ_ID = "nvtls-authz"
_NAME = re.compile(r"[a-z0-9.-]+")
_CERT_DAYS = 2  # a run's certificates are thrown away with the run


def missing_tool(kind: str) -> str | None:
    """Why credentials of this kind cannot be made here (a skip reason), or None."""
    if kind == "x509" and shutil.which("certtool") is None:
        return "certtool (Debian package gnutls-bin) is not installed: no x509 credentials"
    return None


def identity(cn: str) -> str:
    """The string QEMU's tls-authz matches for a client certificate of this CN."""
    return f"O={ORG},CN={cn}"


@dataclass
class TlsCredentials:
    """One run's credentials, in a private directory. `server_dir` goes to the destination,
    `client_dir` to the source; `changed` lists what a fault broke on purpose."""

    kind: str
    root: Path
    hostname: str  # what the source expects the destination's certificate to name
    authz_identity: str  # the only client the destination lets in (x509)
    server_dir: Path
    client_dir: Path
    server_addr: str = ""
    seconds: float = 0.0
    changed: list[str] = field(default_factory=list)
    _src_objects: int = 0

    # -- QEMU wiring -------------------------------------------------------------------------
    def dst_args(self, server_dir: str | None = None) -> list[str]:
        """-object arguments for the destination (server_dir: where the files are over there)."""
        d = server_dir or str(self.server_dir)
        if self.kind == "psk":
            objs: list[dict[str, Any]] = [
                {"qom-type": "tls-creds-psk", "id": DST_CREDS_ID, "endpoint": "server", "dir": d}]
        else:
            objs = [{"qom-type": "tls-creds-x509", "id": DST_CREDS_ID, "endpoint": "server",
                     "dir": d, "verify-peer": True},
                    {"qom-type": "authz-list", "id": DST_AUTHZ_ID, "policy": "deny",
                     "rules": [{"match": self.authz_identity, "policy": "allow",
                                "format": "exact"}]}]
        return [a for o in objs for a in ("-object", json.dumps(o, separators=(",", ":")))]

    def dst_params(self) -> dict[str, Any]:
        if self.kind == "psk":
            return {"tls-creds": DST_CREDS_ID}
        return {"tls-creds": DST_CREDS_ID, "tls-authz": DST_AUTHZ_ID}

    def src_object(self) -> dict[str, Any]:
        """object-add arguments for the source's client credentials (a new id each call, so a
        retry on the same source adds its own)."""
        self._src_objects += 1
        oid = f"nvtls-src{self._src_objects}"
        if self.kind == "psk":
            return {"qom-type": "tls-creds-psk", "id": oid, "endpoint": "client",
                    "dir": str(self.client_dir), "username": PSK_USER}
        return {"qom-type": "tls-creds-x509", "id": oid, "endpoint": "client",
                "dir": str(self.client_dir), "verify-peer": True}

    def src_params(self, creds_id: str) -> dict[str, Any]:
        params: dict[str, Any] = {"tls-creds": creds_id}
        if self.kind == "x509":
            params["tls-hostname"] = self.hostname
        return params

    def server_files(self) -> list[Path]:
        return sorted(p for p in self.server_dir.iterdir() if p.is_file())

    def describe(self) -> dict[str, Any]:
        """What results.json records: the kind and names, never a key."""
        d: dict[str, Any] = {"kind": self.kind, "seconds_to_make": round(self.seconds, 3),
                             "changed_on_purpose": list(self.changed)}
        if self.kind == "x509":
            d.update({"verify_peer": True, "hostname": self.hostname,
                      "authz_allows": self.authz_identity, "key_type": "rsa-2048",
                      "server_cert": f"CN={SERVER_NAME}", "client_cert": identity(CLIENT_NAME)})
        else:
            d.update({"username": PSK_USER})
        return d

    # -- deliberate breakage (the fault table's TLS faults) -------------------------------------
    def use_other_ca(self) -> None:
        """The destination presents a certificate from a CA the source does not trust."""
        ca2 = _make_ca(self.root / "ca-other", "nestvirt other CA")
        _issue(self.server_dir, ca2, "server", SERVER_NAME, server=True, addr=self.server_addr)
        self.changed.append("destination certificate from another CA")

    def expect_other_hostname(self) -> None:
        """The source expects another name than the destination's certificate holds."""
        self.hostname = WRONG_HOSTNAME
        self.changed.append(f"source expects hostname {WRONG_HOSTNAME}")

    def use_rogue_client(self) -> None:
        """The source presents a valid client certificate (same CA) the authz does not allow."""
        _issue(self.client_dir, self.root / "ca", "client", ROGUE_NAME, server=False)
        self.changed.append(f"source presents {identity(ROGUE_NAME)}")

    def use_other_psk(self) -> None:
        """The source holds another pre-shared key than the destination."""
        _write_psk(self.client_dir / "keys.psk")
        self.changed.append("source holds another pre-shared key")


def make(kind: str, root: Path, server_addr: str) -> TlsCredentials:
    """Fresh credentials of `kind` ("x509" or "psk") under root (made 0700).

    The server certificate names SERVER_NAME and, as an IP SAN, server_addr (the address the
    migration goes to); the client certificate is CLIENT_NAME. RSA 2048 keys, 0.5-0.7 s for
    all: QEMU 10 refuses a certificate whose (critical) key usage lacks key encipherment, and
    certtool leaves that out for ECDSA keys (which QEMU 7.2 accepted).
    """
    if kind not in ("x509", "psk"):
        raise ValueError(f"TLS kind {kind!r}")
    why = missing_tool(kind)
    if why:
        raise SetupError(why)
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    server_dir, client_dir = root / "server", root / "client"
    for d in (server_dir, client_dir):
        d.mkdir(mode=0o700, exist_ok=True)
    if kind == "psk":
        _write_psk(server_dir / "keys.psk")
        shutil.copy(server_dir / "keys.psk", client_dir / "keys.psk")
    else:
        ca = _make_ca(root / "ca", "nestvirt run CA")
        _issue(server_dir, ca, "server", SERVER_NAME, server=True, addr=server_addr)
        _issue(client_dir, ca, "client", CLIENT_NAME, server=False)
    return TlsCredentials(kind=kind, root=root, hostname=SERVER_NAME,
                          authz_identity=identity(CLIENT_NAME), server_dir=server_dir,
                          client_dir=client_dir, server_addr=server_addr,
                          seconds=time.monotonic() - t0)


def _write_psk(path: Path) -> None:
    # QEMU's keys.psk format (what psktool writes): "username:hexkey", one line.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{PSK_USER}:{secrets.token_hex(32)}\n")


def _certtool(args: list[str]) -> None:
    proc.run(["certtool", *args], 30)


def _template(path: Path, lines: list[str]) -> Path:
    for line in lines:
        # Names are the module's own constants or an address; nothing else reaches a template.
        assert "\n" not in line, line
    path.write_text("\n".join(lines) + "\n")
    return path


def _key(path: Path) -> None:
    # RSA: an ECDSA key cannot carry key encipherment, which QEMU 10 requires (see make()).
    _certtool(["--generate-privkey", "--key-type", "rsa", "--bits", "2048", "--outfile", str(path)])
    os.chmod(path, 0o600)


def _make_ca(d: Path, cn: str) -> Path:
    d.mkdir(mode=0o700, exist_ok=True)
    _key(d / "ca-key.pem")
    t = _template(d / "ca.info", [f'cn = "{cn}"', f'organization = "{ORG}"', "ca",
                                  "cert_signing_key", f"expiration_days = {_CERT_DAYS}"])
    _certtool(["--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"),
               "--template", str(t), "--outfile", str(d / "ca-cert.pem")])
    return d


def _issue(d: Path, ca: Path, role: str, cn: str, *, server: bool, addr: str | None = None) -> None:
    """role-cert.pem + role-key.pem (+ the CA's cert) in d: what QEMU's dir= expects."""
    if not _NAME.fullmatch(cn) or (addr is not None and not _NAME.fullmatch(addr)):
        raise ValueError(f"certificate name {cn!r} / {addr!r}")
    _key(d / f"{role}-key.pem")
    lines = [f'cn = "{cn}"', f'organization = "{ORG}"', f"expiration_days = {_CERT_DAYS}",
             "encryption_key", "signing_key"]
    if server:
        lines += [f'dns_name = "{cn}"', "tls_www_server"]
        if addr and re.fullmatch(r"[0-9.]+", addr):
            lines.append(f"ip_address = {addr}")
        elif addr:
            lines.append(f'dns_name = "{addr}"')
    else:
        lines.append("tls_www_client")
    t = _template(d / f"{role}.info", lines)
    _certtool(["--generate-certificate", "--load-privkey", str(d / f"{role}-key.pem"),
               "--load-ca-certificate", str(ca / "ca-cert.pem"),
               "--load-ca-privkey", str(ca / "ca-key.pem"),
               "--template", str(t), "--outfile", str(d / f"{role}-cert.pem")])
    t.unlink()
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")

