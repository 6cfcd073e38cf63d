"""The inventory: every QEMU binary nestvirt knows here, each probed once and cached, the newest
the default.

Sources, in this order (one binary found twice keeps its first origin): ``--qemu PATH`` (and
``--src-qemu``/``--dst-qemu``/matrix paths), ``$NESTVIRT_QEMU``, the entries of the config
file (``$NESTVIRT_QEMU_CONFIG``, else ``$XDG_CONFIG_HOME/nestvirt/qemu.yaml``, else
``~/.config/nestvirt/qemu.yaml``), ``qemu-system-x86_64`` on PATH, and the trees
``nestvirt qemu fetch`` unpacked into the cache.

Each binary is described by a ``QemuFacts`` (harness/host/probe.py): version, migration schema,
machine types, how it is started (module dir, firmware dirs) and whether it passed its
verification (harness/qemu/verify.py). Probe and verification are cached per binary, keyed by
its path, size and mtime and those of its module dirs, so a run starts no QEMU for a binary it
has seen before (the KVM start of the run's own binary is the exception: that is a fact of the
host, not of the binary).

Choice: ``--qemu SEL`` > ``$NESTVIRT_QEMU`` > the newest verified binary. A selector is a name
(``nestvirt qemu`` lists them), ``newest``, ``oldest``, a version or version prefix (``7.2``,
``10.0.2``) or a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.core import yamltext
from harness.core.cache import cache_root
from harness.core.errors import SetupError, StepTimeout, UsageError
from harness.host.probe import (
    QEMU_DEFAULT,
    QEMU_ENV,
    HostFacts,
    QemuFacts,
    machine_version,
    probe,
    probe_schema,
)
from harness.qemu.fetch import fetched
from harness.qemu.verify import verify

CONFIG_ENV = "NESTVIRT_QEMU_CONFIG"
# Bumped when what is cached per binary changes shape: old entries are then ignored.
PROBE_FORMAT = 1
# Debian's compiled-in module dir: a binary whose own dir lacks a module falls back to it, so
# a change here (the system QEMU upgraded) must invalidate what was cached about any binary.
SYSTEM_MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"


@dataclass(frozen=True)
class QemuInstall:
    """Where one binary was found and how it is started."""

    binary: str  # absolute, symlinks resolved
    origin: str  # "--qemu", "NESTVIRT_QEMU", "config:<file>", "PATH", "fetched"
    name: str = ""  # a config entry's name ("": the binary's version names it)
    module_dir: str = ""
    firmware_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Broken:
    """A binary the inventory found but cannot use, and why (one line)."""

    install: QemuInstall
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"binary": self.install.binary, "origin": self.install.origin,
                "name": self.install.name, "reason": self.reason}


@dataclass(frozen=True)
class Inventory:
    """Every usable binary (newest first) and the ones found broken."""

    qemus: tuple[QemuFacts, ...]
    broken: tuple[Broken, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"qemus": [q.to_json() for q in self.qemus],
                "broken": [b.to_json() for b in self.broken]}


# --------------------------------------------------------------------------------------------
# discovery


def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nestvirt" / "qemu.yaml"


def read_config(path: Path) -> list[QemuInstall]:
    """Entries of the config file (absent file: none); UsageError naming the spot otherwise.

        qemu:
          - name: mytree                                   # how --qemu names it
            binary: /src/qemu/build/qemu-system-x86_64
            module_dir: /src/qemu/build                    # optional: QEMU_MODULE_DIR
            firmware_dirs: [/src/qemu/pc-bios]             # optional: -L, in this order
    """
    if not path.is_file():
        return []
    where = f"QEMU config {path}"
    doc, lines = yamltext.load(path, "QEMU config")
    entries = (doc or {}).get("qemu") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise UsageError(f"{where}: expected 'qemu:' with a list of entries")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("binary"), str):
            raise UsageError(f"{where} (line {lines.get(('qemu', i), '?')}): qemu[{i}]: "
                             "needs 'binary: PATH'")
        unknown = set(e) - {"name", "binary", "module_dir", "firmware_dirs"}
        if unknown:
            key = sorted(unknown)[0]
            raise UsageError(f"{where} (line {lines.get(('qemu', i, key), '?')}): qemu[{i}]: "
                             f"unknown key '{key}'")
        fw = e.get("firmware_dirs") or []
        if not isinstance(fw, list) or not all(isinstance(x, str) for x in fw):
            raise UsageError(f"{where}: qemu[{i}]: firmware_dirs must be a list of paths")
        name = str(e.get("name") or "")
        if name in ("newest", "oldest") or "/" in name:
            raise UsageError(f"{where}: qemu[{i}]: '{name}' cannot name a binary")
        out.append(QemuInstall(str(Path(e["binary"]).expanduser()), f"config:{path}", name,
                               str(e.get("module_dir") or ""), tuple(fw)))
    return out


def discover(given: Sequence[str] = ()) -> list[QemuInstall]:
    """Every install nestvirt can see, in source order, one per binary (nothing started).

    ``given``: paths the user named (--qemu and friends); each must exist (UsageError).
    $NESTVIRT_QEMU names a path or a command on PATH and must resolve (SetupError).
    """
    found: list[QemuInstall] = []
    for g in given:
        if not Path(g).exists():
            raise UsageError(f"--qemu {g}: no such file")
        found.append(QemuInstall(g, "--qemu"))
    env = os.environ.get(QEMU_ENV)
    if env:
        path = shutil.which(env)
        if path is None:
            raise SetupError(f"QEMU not found: {env} (${QEMU_ENV}); install qemu-system-x86 "
                             f"or set {QEMU_ENV}=/path/to/qemu-system-x86_64")
        found.append(QemuInstall(path, QEMU_ENV))
    found += read_config(config_path())
    on_path = shutil.which(QEMU_DEFAULT)
    if on_path:
        found.append(QemuInstall(on_path, "PATH"))
    for f in fetched():
        found.append(QemuInstall(f.binary, "fetched", "", f.module_dir, f.firmware_dirs))
    unique: dict[str, QemuInstall] = {}
    for inst in found:
        real = os.path.realpath(inst.binary)
        first = unique.setdefault(real, replace(inst, binary=real))
        if not (first.module_dir or first.firmware_dirs) and (inst.module_dir or inst.firmware_dirs):
            # Named first by a path (NESTVIRT_QEMU=, --qemu) but known to need its own module
            # and firmware dirs (a fetched tree, a config entry): started as those say.
            unique[real] = replace(first, module_dir=inst.module_dir,
                                   firmware_dirs=inst.firmware_dirs, name=first.name or inst.name)
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# probing, cached per binary


def describe(install: QemuInstall, *, refresh: bool = False) -> QemuFacts:
    """The facts of one install: schema probe and verification, from the cache when neither the
    binary nor its module dirs changed. SetupError when it is not a usable QEMU at all."""
    key = _cache_key(install)
    path = cache_root() / "qemu-probe" / f"{key}.json"
    facts = None
    if not refresh:
        try:
            facts = QemuFacts.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            facts = None  # absent, torn or from an older format: probe again
    if facts is None:
        try:
            facts = probe_schema(install.binary, module_dir=install.module_dir,
                                 firmware_dirs=install.firmware_dirs)
        except StepTimeout as e:
            raise SetupError(str(e)) from e
        check = verify(install.binary, module_dir=install.module_dir,
                       firmware_dirs=install.firmware_dirs)
        facts = replace(facts, verified=check.summary, warnings=check.warnings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(facts.to_json(), indent=1))
        tmp.replace(path)
    return replace(facts, binary=install.binary, origin=install.origin, name=install.name,
                   module_dir=install.module_dir, firmware_dirs=install.firmware_dirs)


def _cache_key(install: QemuInstall) -> str:
    h = hashlib.sha256(f"{PROBE_FORMAT}\0{install.binary}\0{install.module_dir}\0"
                       f"{':'.join(install.firmware_dirs)}".encode())
    for p in (install.binary, install.module_dir, SYSTEM_MODULE_DIR, *install.firmware_dirs):
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        # A directory's size is its filesystem's business (the host VM's image holds the same
        # entries in another size of directory): its mtime says when its entries changed.
        size = 0 if st is None or stat.S_ISDIR(st.st_mode) else st.st_size
        h.update(f"\0{size}:{st.st_mtime_ns}".encode() if st else b"\0-")
    return h.hexdigest()[:16]


def load_inventory(given: Sequence[str] = (), *, refresh: bool = False) -> Inventory:
    """Discover and describe every install; usable ones newest first, each with a unique name."""
    good: list[QemuFacts] = []
    broken: list[Broken] = []
    for inst in discover(given):
        try:
            good.append(describe(inst, refresh=refresh))
        except SetupError as e:
            if inst.origin == "--qemu":
                raise UsageError(f"--qemu {inst.binary}: not a QEMU: {e}") from e
            broken.append(Broken(inst, str(e)))
    good.sort(key=lambda q: q.version_tuple, reverse=True)  # stable: source order breaks ties
    named: list[QemuFacts] = []
    taken: set[str] = set()
    for q in good:
        name = q.name or q.version
        n = 2
        while name in taken:
            name, n = f"{q.name or q.version}-{n}", n + 1
        taken.add(name)
        named.append(replace(q, name=name))
    return Inventory(tuple(named), tuple(broken))


# --------------------------------------------------------------------------------------------
# choosing (pure: facts in, facts out)


def usable(q: QemuFacts) -> bool:
    """Passed its verification (or was never verified, e.g. a record from before it)."""
    return q.verified in ("", "ok")


def newest(qemus: Iterable[QemuFacts]) -> QemuFacts | None:
    """The newest usable binary (the first of equals, in inventory order)."""
    best = None
    for q in qemus:
        if usable(q) and (best is None or q.version_tuple > best.version_tuple):
            best = q
    return best


def select(qemus: Sequence[QemuFacts], selector: str, what: str = "--qemu") -> QemuFacts:
    """The binary a selector names: name, newest/oldest, version (prefix) or path.

    UsageError (one line, naming what is known) when nothing matches, or when the binary it
    names failed its verification.
    """
    sel = selector.strip()
    hit: QemuFacts | None = None
    if sel in ("newest", "oldest"):
        ok = [q for q in qemus if usable(q)]
        hit = (max if sel == "newest" else min)(ok, key=lambda q: q.version_tuple) if ok else None
    if hit is None:
        hit = next((q for q in qemus if q.name == sel), None)
    if hit is None and "/" in sel:
        real = os.path.realpath(sel)
        hit = next((q for q in qemus if q.binary == real), None)
    if hit is None:
        matches = [q for q in qemus if q.version == sel or q.version.startswith(sel + ".")]
        hit = max(matches, key=lambda q: q.version_tuple) if matches else None
    if hit is None:
        known = ", ".join(f"{q.name} ({q.origin})" for q in qemus) or "none"
        raise UsageError(f"{what} {sel}: no such QEMU here (known: {known}; "
                         "a version, newest, oldest or a path also work)")
    if not usable(hit):
        raise UsageError(f"{what} {sel}: {hit.binary} fails its verification: {hit.verified}")
    return hit


def common_machine(a: QemuFacts, b: QemuFacts) -> str | None:
    """The newest versioned q35 machine type both binaries have (pc-q35-7.2 for 7.2 and 10.0)."""
    shared = set(a.machine_types) & set(b.machine_types)
    return max(shared, key=machine_version) if shared else None


def machine_for(q: QemuFacts) -> str:
    """The machine type one binary runs alone: its newest versioned q35 (what "q35" means)."""
    return q.machine_types[-1] if q.machine_types else (q.default_machine or "q35")


# --------------------------------------------------------------------------------------------
# the host probe with the inventory


def probe_host(accel: str = "auto", pin: str | None = None,
               extra: Iterable[str | None] = ()) -> HostFacts:
    """HostFacts for a run: the inventory in ``qemus``, the chosen binary in ``qemu``.

    ``pin`` (--qemu) > $NESTVIRT_QEMU > the newest usable binary. ``extra``: more selectors
    the run will use (--src-qemu, --dst-qemu, matrix axes); those that are paths join the
    inventory. UsageError for a selector that names nothing or a path that is not a QEMU;
    SetupError when there is no usable QEMU at all.
    """
    paths = [s for s in (pin, *extra) if s and "/" in s]
    inv = load_inventory(paths)
    if pin:
        chosen, pin_text = select(inv.qemus, pin), f"--qemu {pin}"
    elif os.environ.get(QEMU_ENV):
        env_bin = os.path.realpath(shutil.which(os.environ[QEMU_ENV]) or os.environ[QEMU_ENV])
        chosen = next((q for q in inv.qemus if q.binary == env_bin), None)
        if chosen is None:
            why = next((b.reason for b in inv.broken if b.install.binary == env_bin), "not found")
            raise SetupError(f"${QEMU_ENV}={os.environ[QEMU_ENV]}: {why}")
        if not usable(chosen):
            raise SetupError(f"${QEMU_ENV}={os.environ[QEMU_ENV]}: fails its verification: "
                             f"{chosen.verified}")
        pin_text = f"{QEMU_ENV}={os.environ[QEMU_ENV]}"
    else:
        chosen, pin_text = newest(inv.qemus), ""
        if chosen is None:
            why = "; ".join(f"{b.install.binary}: {b.reason}" for b in inv.broken[:2])
            raise SetupError("no usable QEMU: install qemu-system-x86, run `nestvirt qemu fetch`, "
                             "or give --qemu PATH" + (f" ({why})" if why else ""))
    return probe(accel, qemu=chosen, qemus=inv.qemus, qemu_pin=pin_text)


# --------------------------------------------------------------------------------------------
# nestvirt qemu


def render_inventory(inv: Inventory, default: QemuFacts | None) -> str:
    """The table of `nestvirt qemu`: one row per binary, then what each one offers."""
    rows = [("NAME", "VERSION", "ORIGIN", "VERIFIED", "MACHINES (q35)", "LEGACY COMPRESS",
             "BINARY")]
    for q in inv.qemus:
        mark = " *" if default is not None and q.binary == default.binary else ""
        machines = (f"{q.machine_types[0].removeprefix('pc-q35-')}.."
                    f"{q.machine_types[-1].removeprefix('pc-q35-')}" if q.machine_types else "-")
        rows.append((q.name + mark, q.version, q.origin.split(":")[0], q.verified or "-",
                     machines, "present" if q.legacy_compress else "absent", q.binary))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
             for r in rows]
    if default is not None:
        lines.append(f"* the default: {default_reason(inv.qemus, default)}")
    for q in inv.qemus:
        lines.append(f"{q.name}:")
        lines += [f"  {k}: {v}" for k, v in details(q).items()]
    for b in inv.broken:
        lines.append(f"not usable: {b.install.binary} ({b.install.origin}): {b.reason}")
    return "\n".join(lines)


def inventory_rows(facts: HostFacts) -> list[str]:
    """`nestvirt doctor`'s summary of the inventory: one line per binary, the default marked."""
    qemus = facts.qemus or (facts.qemu,)
    width = max(len(q.label) for q in qemus)
    rows = [f"qemu inventory    {len(qemus)} binar{'y' if len(qemus) == 1 else 'ies'} "
            "(`nestvirt qemu` for details)"]
    for q in qemus:
        mark = "default, " if q.binary == facts.qemu.binary else ""
        why = (f"pinned by {facts.qemu_pin}" if facts.qemu_pin else "newest") if mark else ""
        legacy = "legacy compress" if q.legacy_compress else "no legacy compress"
        rows.append(f"  {q.label:<{width}}  {mark}{why + ', ' if why else ''}{q.origin}, "
                    f"{legacy}, machines up to {machine_for(q)}, verified {q.verified or '-'}")
    return rows


def default_reason(qemus: Sequence[QemuFacts], default: QemuFacts) -> str:
    n = newest(qemus)
    if n is not None and n.binary == default.binary and default.origin not in ("--qemu", QEMU_ENV):
        return "the newest usable binary"
    return f"chosen by {default.origin}" if default.origin in ("--qemu", QEMU_ENV) else "pinned"


def details(q: QemuFacts) -> Mapping[str, str]:
    """What a person asks of one binary, as short lines."""
    extras = [c for c in ("dirty-limit", "mapped-ram", "switchover-ack")
              if c in q.migration_capabilities]
    if "zero-page-detection" in q.migration_parameters:
        extras.append("zero-page-detection")
    return {
        "package": q.package or "-",
        "module dir": q.module_dir or "(compiled in)",
        "firmware dirs": ", ".join(q.firmware_dirs) or "(compiled in)",
        "machine types": f"{len(q.machine_types)} versioned q35, q35 = {q.default_machine or '?'}",
        "capabilities": f"{len(q.migration_capabilities)}: "
                        + ", ".join(sorted(q.migration_capabilities)),
        "parameters": str(len(q.migration_parameters)),
        "multifd compression": ", ".join(sorted(q.multifd_compression)) or "none listed",
        "legacy compress": "present" if q.legacy_compress else "absent (removed in 9.1)",
        "newer extras": ", ".join(extras) or "none",
        "query-migrationthreads": "yes" if "query-migrationthreads" in q.commands else "no",
        "warnings": "; ".join(q.warnings) or "none",
    }
