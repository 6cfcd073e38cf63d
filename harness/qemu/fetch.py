"""Fetch Debian bookworm-backports' QEMU into the cache, beside the system's, without installing it.

``apt-get download`` runs under a private apt configuration (its own sources list, state,
lists and cache under the cache dir; APT_CONFIG and Dir::Etc::Parts keep the host's apt.conf,
apt.conf.d, sources and preferences out), so the system's apt is neither read nor changed.
The .debs are unpacked with ``dpkg-deb -x`` and the tree is verified by starting it
(harness/qemu/verify.py) before it is marked complete. Debian's 10.0 binary is not
relocatable: its modules and firmware are passed explicitly (QEMU_MODULE_DIR, -L), and the
opengl and spice module packages are unpacked too, because QEMU searches QEMU_MODULE_DIR
*before* its compiled-in module dir (the system 7.2's), so a module name missing from ours
would be loaded from 7.2 and abort QEMU.

Layout: CACHE/qemu/apt/ (the private apt), CACHE/qemu/debian-<version>/{root,debs,install.json,
.complete}. Nothing is committed to the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.core import proc
from harness.core.cache import cache_root, locked
from harness.core.errors import SetupError, StepTimeout
from harness.qemu.verify import Verification, verify

MIRROR_ENV = "NESTVIRT_QEMU_MIRROR"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm-backports"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data",
            "qemu-system-modules-opengl", "qemu-system-modules-spice")
MODULE_SUBDIR = "usr/lib/x86_64-linux-gnu/qemu"
FIRMWARE_SUBDIR = "usr/share/qemu"
BINARY_SUBDIR = "usr/bin/qemu-system-x86_64"
UPDATE_TIMEOUT_S = 180.0
DOWNLOAD_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Fetched:
    """One unpacked, verified QEMU tree in the cache."""

    dir: Path
    package_version: str  # Debian's, "1:10.0.2+ds-2+deb13u1~bpo12+1"
    binary: str
    module_dir: str
    firmware_dirs: tuple[str, ...]
    verification: Verification | None = None  # None: found complete in the cache
    fresh: bool = False

    @property
    def name(self) -> str:
        return self.dir.name


def qemu_cache() -> Path:
    return cache_root() / "qemu"


def fetched() -> list[Fetched]:
    """Every complete fetched tree in the cache, in directory order (no network)."""
    found = []
    root = qemu_cache()
    if not root.is_dir():
        return []
    for done in sorted(root.glob("*/.complete")):
        try:
            found.append(_read_install(done.parent))
        except (OSError, ValueError, KeyError):
            continue  # a tree from another layout or a torn write: not ours to use
    return found


def fetch(refresh: bool = False, mirror: str | None = None) -> Fetched:
    """Get the newest QEMU of bookworm-backports into the cache and verify it.

    Idempotent and offline once done: a complete tree in the cache is reused without asking the
    network (``refresh`` asks for the newest candidate and downloads it if it is new, or again).
    SetupError (one line, exit 2 at the CLI) when apt is missing, the mirror cannot be reached,
    the packages are not there, or the unpacked tree fails its verification.
    """
    mirror = mirror or os.environ.get(MIRROR_ENV) or MIRROR
    with locked("qemu-fetch"):
        have = fetched()
        if have and not refresh:
            return have[-1]
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise SetupError(f"qemu fetch: {tool} not found: this host cannot fetch Debian's "
                                 "QEMU; give a QEMU with --qemu PATH (or list it in the "
                                 "inventory's config file)")
        apt = _private_apt(qemu_cache() / "apt", mirror)
        versions = _candidates(apt, mirror)
        version = versions[PACKAGES[0]]
        dest = qemu_cache() / f"debian-{_dir_name(version)}"
        if (dest / ".complete").exists() and not refresh:
            return _read_install(dest)
        return _download_and_unpack(apt, versions, dest)


def _private_apt(base: Path, mirror: str) -> dict[str, str]:
    """Write the private apt configuration; return the environment that selects it."""
    etc = base / "etc"
    for d in (base / "lists" / "partial", base / "cache" / "archives" / "partial",
              etc / "sources.list.d", etc / "apt.conf.d", etc / "preferences.d", base / "state"):
        d.mkdir(parents=True, exist_ok=True)
    # Only backports: with nothing else listed, its NotAutomatic flag does not matter and the
    # candidate is simply the backports version.
    (etc / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    conf = {
        "Dir::Etc": etc, "Dir::Etc::SourceList": etc / "sources.list",
        "Dir::Etc::SourceParts": etc / "sources.list.d", "Dir::Etc::Parts": etc / "apt.conf.d",
        "Dir::Etc::Preferences": etc / "preferences",
        "Dir::Etc::PreferencesParts": etc / "preferences.d",
        "Dir::Etc::Trusted": "/etc/apt/trusted.gpg",
        "Dir::Etc::TrustedParts": "/etc/apt/trusted.gpg.d",
        "Dir::State": base / "state", "Dir::State::Lists": base / "lists",
        # Empty, not dpkg's: with the host's status, an installed qemu-system-x86 (7.2) would
        # count as a candidate, and an unreachable mirror would "find" the system's version.
        "Dir::State::status": base / "state" / "status",
        "Dir::Cache": base / "cache", "Dir::Cache::Archives": base / "cache" / "archives",
        "Dir::Cache::pkgcache": "", "Dir::Cache::srcpkgcache": "",
        "Debug::NoLocking": "true",
        # As root, apt's _apt sandbox user could not write our dirs (a warning per file).
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        "APT::Architecture": "amd64", "Acquire::Languages": "none",
        "Acquire::Retries": "1", "Acquire::http::Timeout": "20",
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled": "false",
        "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled": "false",
        "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled": "false",
    }
    (base / "state" / "status").touch()
    lines = [f'{k} "{v}";' for k, v in conf.items() if not (k == "APT::Sandbox::User" and not v)]
    (base / "apt.conf").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APT_")}
    env.update(APT_CONFIG=str(base / "apt.conf"), DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    return env


def _candidates(apt: dict[str, str], mirror: str) -> dict[str, str]:
    """apt-get update, then the candidate version of each package (all must agree)."""
    try:
        up = proc.run(["apt-get", "-q", "update"], UPDATE_TIMEOUT_S, env=apt, check=False)
    except StepTimeout as e:
        raise SetupError(f"qemu fetch: apt-get update from {mirror} did not finish in "
                         f"{UPDATE_TIMEOUT_S:g}s (no network?)") from e
    # apt-get update exits 0 on some fetch failures: its W:/E: lines tell, and so does the
    # absence of any package index afterwards.
    complaint = next((ln.strip() for ln in (up.stderr + up.stdout).splitlines()
                      if ln.startswith(("E:", "W:", "Err:"))), "")
    versions: dict[str, str] = {}
    for pkg in PACKAGES:
        pol = proc.run(["apt-cache", "policy", pkg], 60, env=apt, check=False).stdout
        m = re.search(r"Candidate:\s*(\S+)", pol)
        if m and m.group(1) != "(none)":
            versions[pkg] = m.group(1)
    if not versions:
        why = complaint or f"apt-get update exit status {up.returncode}"
        raise SetupError(f"qemu fetch: cannot read {SUITE} from {mirror} (no network?): {why}")
    missing = [p for p in PACKAGES if p not in versions]
    if missing:
        raise SetupError(f"qemu fetch: {SUITE} at {mirror} has no {', '.join(missing)}")
    if len(set(versions.values())) > 1:
        raise SetupError("qemu fetch: the QEMU packages disagree on their version: "
                         + ", ".join(f"{p}={v}" for p, v in versions.items()))
    return versions


def _download_and_unpack(apt: dict[str, str], versions: dict[str, str], dest: Path) -> Fetched:
    work = dest.with_name(dest.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "debs").mkdir(parents=True)
    # apt-get download writes into its working directory.
    try:
        got = proc.run(["apt-get", "-q", "download", *(f"{p}={v}" for p, v in versions.items())],
                       DOWNLOAD_TIMEOUT_S, env=apt, cwd=work / "debs", check=False)
    except StepTimeout as e:
        shutil.rmtree(work, ignore_errors=True)
        raise SetupError(f"qemu fetch: apt-get download did not finish in "
                         f"{DOWNLOAD_TIMEOUT_S:g}s") from e
    debs = sorted((work / "debs").glob("*.deb"))
    if got.returncode != 0 or len(debs) != len(versions):
        why = next((ln.strip() for ln in (got.stderr + got.stdout).splitlines()
                    if ln.startswith(("E:", "W:", "Err:"))), f"exit status {got.returncode}")
        shutil.rmtree(work, ignore_errors=True)
        raise SetupError(f"qemu fetch: apt-get download got {len(debs)} of {len(versions)} "
                         f"packages: {why}")
    for deb in debs:
        proc.run(["dpkg-deb", "-x", str(deb), str(work / "root")], 300)
    version = versions[PACKAGES[0]]
    upstream = re.sub(r"^\d+:", "", version).split("+")[0].split("-")[0]
    install = {
        "package_version": version, "packages": versions, "mirror_suite": SUITE,
        "binary": str(dest / "root" / BINARY_SUBDIR),
        "module_dir": str(dest / "root" / MODULE_SUBDIR),
        "firmware_dirs": [str(dest / "root" / FIRMWARE_SUBDIR)],
    }
    # Verified where it will live: the paths are absolute, so move first, check, then mark.
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    check = verify(install["binary"], module_dir=install["module_dir"],
                   firmware_dirs=tuple(install["firmware_dirs"]), expect_version=upstream)
    install["verification"] = {"ok": check.ok, "problems": list(check.problems),
                               "warnings": list(check.warnings), "version": check.version,
                               "device_types": check.device_types}
    (dest / "install.json").write_text(json.dumps(install, indent=1))
    if not check.ok:
        raise SetupError(f"qemu fetch: the unpacked QEMU {version} in {dest} fails its "
                         f"verification: {check.summary}")
    (dest / ".complete").write_text(version + "\n")
    return Fetched(dest, version, install["binary"], install["module_dir"],
                   tuple(install["firmware_dirs"]), check, fresh=True)


def _read_install(d: Path) -> Fetched:
    doc = json.loads((d / "install.json").read_text())
    return Fetched(d, str(doc["package_version"]), str(doc["binary"]), str(doc["module_dir"]),
                   tuple(str(x) for x in doc["firmware_dirs"]))


def _dir_name(version: str) -> str:
    """A Debian version as a directory name: the epoch's colon dropped, nothing odd left."""
    return re.sub(r"[^\w.+~-]", "_", re.sub(r"^\d+:", "", version))
