"""Test matrices as data: YAML axes -> Variants, with invalid combinations pruned and said why.

A matrix file (ci/smoke.yaml, ci/nightly.yaml) holds blocks of axes; each block is a cartesian
product. Expansion needs three facts of the probe, never more: the CPU vendor and L1's nesting
kind (a profile the vendor cannot have) and the QEMU inventory (which binaries the axes
``qemu`` / ``dst_qemu`` name, their migration schemas and machine types: a mode a named binary
does not have, a pair with no common machine type, a name no binary has here). Those make a
combination *invalid* here: it is pruned, listed with its reason, and never run. Without those
axes a variant runs on the newest binary, or on the newest one that has its mode
(harness/scenario/binaries.py). What the host merely cannot do today (TCG instead of KVM, a missing KVM
cap) stays a variant and becomes a skip with the probe's reason when it runs.

Also here: a variant's resource needs and its exact JSON form (for workers and repro.sh).
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from harness.core import yamltext
from harness.core.errors import UsageError
from harness.host.enlightenments import load_profiles, parse_hv_list, resolve_profile, vendor_problems
from harness.host.probe import QemuFacts
from harness.scenario.binaries import lacks, plan_qemu
from harness.scenario.faults import INJECTIONS, get_fault
from harness.scenario.spec import ScenarioSpec, Variant
from harness.scenario.suite import SCENARIOS
from harness.vm.migration import COMPRESSION_MODES, MigrationMode
from harness.vm.tls import TLS_MODES

FORMAT_KEY = "nestvirt_matrix"
FORMAT_VERSION = 1

# MigrationMode knobs a matrix may set, and the modes that use each. A knob given for a mode
# that ignores it is an invalid combination (pruned), not a silently ignored setting.
MODE_KNOBS: Mapping[str, tuple[str, ...]] = {
    "channels": ("multifd-zlib", "multifd-zstd"),
    "level": ("multifd-zlib", "multifd-zstd", "compress"),
    "threads": ("compress",),
    "decompress_threads": ("compress",),
    "wait_thread": ("compress",),
    "xbzrle_cache_mib": ("xbzrle",),
    "transport": COMPRESSION_MODES,
    "max_bandwidth_mib": COMPRESSION_MODES,
    "downtime_limit_ms": COMPRESSION_MODES,
    "tls": COMPRESSION_MODES,
    "auto_converge": COMPRESSION_MODES,
}
# ScenarioSpec fields that size the guest and its workload.
GUEST_FIELDS = ("mem_mib", "smp", "l1_mib", "l1_threads", "l1_rate_mib_s", "l2_pages")
# Axis order = nesting order of the product (outermost first), so output reads by scenario.
# qemu / dst_qemu: binary selectors (a name from `nestvirt qemu`, newest, oldest, a version
# such as "7.2", or a path); dst_qemu alone keeps the source on the newest binary.
QEMU_AXES = ("qemu", "dst_qemu")
# in_hostvm: true sends a combination into the KVM host VM (one boot for all of them, run with
# --accel kvm there); false or absent runs it here. [false, true] runs it in both places.
HOSTVM_AXIS = "in_hostvm"
HOSTVM_ID = "+hostvm"
AXES = ("scenario", HOSTVM_AXIS, *QEMU_AXES, "profile", "hv", "guest", *GUEST_FIELDS,
        "compression", *MODE_KNOBS, "inject")
# Which combinations one expansion keeps: "all" every one, "here" those without in_hostvm,
# "hostvm" only those with it (what the host VM's inner run is given).
PARTS = ("all", "here", "hostvm")
_INT_AXES = frozenset({"channels", "threads", "decompress_threads", "level", "xbzrle_cache_mib",
                       "max_bandwidth_mib", "downtime_limit_ms", *GUEST_FIELDS})
_STR_AXES = frozenset({"scenario", "profile", "hv", "compression", "transport", "inject", "tls",
                       *QEMU_AXES})
_REQUIRED = ("scenario",)

# QEMU's own memory beyond guest RAM under TCG (translation cache, device state, migration
# buffers). An -m 512 L1 showed 230-330 MiB RSS in all here, with part of its RAM untouched;
# guest RAM is counted in full and this is added, so estimates err on the safe side.
QEMU_OVERHEAD_MIB = 320


class HostLike(Protocol):
    """The probe facts expansion reads (probe.HostFacts has them)."""

    vendor: str
    l1_nested: str
    qemu_pin: str

    @property
    def qemu(self) -> QemuFacts: ...

    @property
    def qemus(self) -> tuple[QemuFacts, ...]: ...

    def binary(self, path: str) -> QemuFacts | None: ...


@dataclass(frozen=True)
class Resources:
    """What one variant holds on the host while it runs."""

    cpus: int
    mem_mib: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def needs(spec: ScenarioSpec) -> Resources:
    """Host CPUs and memory one variant of ``spec`` needs while it runs.

    Memory: src and dst are both alive during and after migration, each with all of its guest
    RAM plus QEMU's own. CPUs: under TCG each running vCPU keeps one host core busy, but the
    two sides' vCPUs never run at once (dst waits in -incoming until src stops at switchover),
    so a pair costs ``smp`` cores, not twice that.
    """
    return Resources(cpus=spec.smp, mem_mib=2 * (spec.mem_mib + QEMU_OVERHEAD_MIB))


@dataclass(frozen=True)
class PlannedVariant:
    """One variant to run, in input order, with its stable id and what it needs."""

    index: int
    id: str
    variant: Variant
    needs: Resources
    origin: str = ""  # where it came from: "ci/smoke.yaml include[0]"
    in_hostvm: bool = False


@dataclass(frozen=True)
class Pruned:
    """A combination the matrix spelled out that cannot exist here, and why."""

    id: str
    reason: str
    origin: str = ""

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """An expanded matrix: variants to run (in input order) and pruned combinations."""

    name: str
    source: str
    variants: tuple[PlannedVariant, ...]
    pruned: tuple[Pruned, ...] = ()
    # Combinations of the other part (expand_matrix's ``part``), unexpanded: "hostvm" ones
    # are judged against the host VM's inner probe, not this host's.
    elsewhere: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source,
                "variants": [{"index": p.index, "id": p.id, "needs": p.needs.to_json(),
                              **({HOSTVM_AXIS: True} if p.in_hostvm else {})}
                             for p in self.variants],
                "pruned": [p.to_json() for p in self.pruned], "elsewhere": self.elsewhere}


@dataclass(frozen=True)
class MatrixSpec:
    """A matrix file, parsed and checked for typos, not yet expanded."""

    name: str
    source: str
    description: str
    blocks: tuple[dict[str, list[Any]], ...]
    excludes: tuple[dict[str, Any], ...] = ()


# --------------------------------------------------------------------------------------------
# loading


def is_matrix_file(path: Path) -> bool:
    """True for a YAML file carrying the ``nestvirt_matrix`` marker (cheap, never raises)."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return re.search(rf"^{FORMAT_KEY}\s*:", head, re.MULTILINE) is not None


def load_matrix(path: Path) -> MatrixSpec:
    """Parse and check a matrix file; UsageError (one line, naming the spot) on bad input."""
    doc, lines = yamltext.load(path, "matrix")
    return parse_matrix(doc, str(path), lines)


def parse_matrix(doc: Any, source: str, lines: dict[tuple, int] | None = None) -> MatrixSpec:
    """Check a loaded matrix document; see ci/smoke.yaml for the format. ``lines`` (from
    key_lines) lets an error name the line of the key it is about."""
    where = f"matrix {source}"

    def at(*path: Any) -> int | None:
        return (lines or {}).get(tuple(path))

    def spot(*path: Any) -> str:
        n = at(*path)
        return f"{where} (line {n})" if n else where

    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a mapping at the top")
    if doc.get(FORMAT_KEY) != FORMAT_VERSION:
        raise UsageError(f"{where}: needs '{FORMAT_KEY}: {FORMAT_VERSION}' at the top")
    unknown = set(doc) - {FORMAT_KEY, "name", "description", "defaults", "include", "exclude"}
    if unknown:
        key = sorted(unknown)[0]
        raise UsageError(f"{spot(key)}: unknown top-level key '{key}'")
    defaults = _axes(doc.get("defaults") or {}, f"{where}: defaults",
                     lambda key: at("defaults", key))
    include = doc.get("include")
    if not isinstance(include, list) or not include:
        raise UsageError(f"{where}: 'include' must be a non-empty list of axis blocks")
    blocks = []
    for i, block in enumerate(include):
        merged = {**defaults, **_axes(block, f"{where}: include[{i}]",
                                      lambda key, i=i: at("include", i, key))}
        for req in _REQUIRED:
            if req not in merged:
                raise UsageError(f"{where}: include[{i}]: needs '{req}'")
        blocks.append(merged)
    excludes = []
    for i, ex in enumerate(doc.get("exclude") or []):
        if not isinstance(ex, dict):
            raise UsageError(f"{where}: exclude[{i}]: expected a mapping")
        reason = ex.get("reason", "")
        body = {k: v for k, v in ex.items() if k != "reason"}
        _axes(body, f"{where}: exclude[{i}]", lambda key, i=i: at("exclude", i, key))
        excludes.append({"reason": str(reason), "match": body})
    return MatrixSpec(name=str(doc.get("name") or Path(source).stem), source=source,
                      description=str(doc.get("description") or ""), blocks=tuple(blocks),
                      excludes=tuple(excludes))


def _axes(block: Any, where: str,
          at: Callable[[str], int | None] | None = None) -> dict[str, list[Any]]:
    """Normalise one block: every axis becomes a list of checked values. ``at(key)`` is the
    line of a key in the file (errors about that key name it)."""
    if not isinstance(block, dict):
        raise UsageError(f"{where}: expected a mapping of axes")
    out: dict[str, list[Any]] = {}
    known_profiles = set(load_profiles())
    for key, raw in block.items():
        n = at(key) if at is not None else None
        where_key = f"{where} (line {n})" if n else where
        if key not in AXES:
            close = difflib.get_close_matches(str(key), AXES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{where_key}: unknown axis '{key}'{hint}")
        values = list(COMPRESSION_MODES) if key == "compression" and raw == "all" else (
            raw if isinstance(raw, list) else [raw])
        if not values:
            raise UsageError(f"{where_key}: axis '{key}' is empty")
        for v in values:
            _check_value(key, v, where_key, known_profiles)
        out[key] = values
    return out


def _check_value(key: str, v: Any, where: str, profiles: set[str]) -> None:
    if v is None:
        if key in ("scenario", "compression"):
            raise UsageError(f"{where}: '{key}' cannot be null")
        return
    if key == "guest":
        if not isinstance(v, dict) or set(v) - set(GUEST_FIELDS):
            bad = sorted(set(v) - set(GUEST_FIELDS)) if isinstance(v, dict) else [v]
            raise UsageError(f"{where}: guest entries take {', '.join(GUEST_FIELDS)}; got {bad[0]!r}")
        for k, x in v.items():
            _check_value(k, x, where, profiles)
        return
    if key in _INT_AXES:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and key != "level"):
            raise UsageError(f"{where}: {key}={v!r}: expected a positive integer")
        return
    if key in ("wait_thread", "auto_converge", HOSTVM_AXIS):
        if not isinstance(v, bool):
            raise UsageError(f"{where}: {key}={v!r}: expected true or false")
        return
    if not isinstance(v, str):
        hint = f" (quote it: '{v}')" if key in QEMU_AXES and isinstance(v, (int, float)) else ""
        raise UsageError(f"{where}: {key}={v!r}: expected a string{hint}")
    choices: Iterable[str] | None = {"scenario": SCENARIOS, "compression": COMPRESSION_MODES,
                                     "inject": INJECTIONS, "profile": profiles,
                                     "transport": ("tcp", "unix"), "tls": TLS_MODES}.get(key)
    if choices is not None and v not in choices:
        close = difflib.get_close_matches(v, list(choices), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"{where}: unknown {key} '{v}'{hint}")
    if key == "hv":
        try:
            parse_hv_list(v)  # a typo in a flag name is bad input, not a combination to prune
        except UsageError as e:
            raise UsageError(f"{where}: hv '{v}': {e}") from e


# --------------------------------------------------------------------------------------------
# expansion


def combinations(matrix: MatrixSpec, part: str = "all") -> int:
    """How many combinations the file's blocks make before pruning, of ``part`` (an upper
    bound on its variants: a bound on a whole run is sized from it)."""
    return len(combination_scenarios(matrix, part))


def combination_scenarios(matrix: MatrixSpec, part: str = "all") -> list[str]:
    """The scenario of each combination of ``part``, before pruning (a bound per scenario)."""
    return [combo["scenario"] for block in matrix.blocks for combo in _combos(block)
            if _in_part(combo, part)]


def has_hostvm_part(matrix: MatrixSpec) -> bool:
    """True when some combination of the file runs in the KVM host VM."""
    return any(True in block.get(HOSTVM_AXIS, []) for block in matrix.blocks)


def _combos(block: Mapping[str, list[Any]]) -> Iterable[dict[str, Any]]:
    keys = [k for k in AXES if k in block]
    for values in itertools.product(*(block[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _in_part(combo: Mapping[str, Any], part: str) -> bool:
    if part not in PARTS:
        raise UsageError(f"unknown matrix part '{part}' (choose from {', '.join(PARTS)})")
    return part == "all" or bool(combo.get(HOSTVM_AXIS)) == (part == "hostvm")


def expand_matrix(matrix: MatrixSpec, host: HostLike, inject: str | None = None,
                  part: str = "all") -> Plan:
    """Every block's product -> variants in input order; invalid ones pruned with the reason.

    ``inject`` (the CLI's --inject) is laid over every combination. A combination that appears
    twice (two blocks overlapping) runs once, at its first place. ``part`` (PARTS) keeps the
    combinations run here or those run in the host VM; the others are only counted.
    """
    variants: list[PlannedVariant] = []
    pruned: list[Pruned] = []
    seen: set[str] = set()
    elsewhere = 0
    for bi, block in enumerate(matrix.blocks):
        origin = f"{matrix.source} include[{bi}]"
        for combo in _combos(block):
            if not _in_part(combo, part):
                elsewhere += 1
                continue
            if inject is not None:
                combo["inject"] = inject
            vid, variant, reason = _build(combo, matrix, host)
            if vid in seen:
                continue
            seen.add(vid)
            if reason is not None or variant is None:
                pruned.append(Pruned(vid, reason or "invalid", origin))
            else:
                variants.append(PlannedVariant(len(variants), vid, variant,
                                               needs(variant.spec), origin,
                                               in_hostvm=bool(combo.get(HOSTVM_AXIS))))
    return Plan(matrix.name, matrix.source, tuple(variants), tuple(pruned), elsewhere)


def plan_from_variants(variants: Iterable[Variant], name: str, source: str) -> Plan:
    """A plan for variants built elsewhere (suite.expand, --variant-json): ids stay Variant.id."""
    planned = tuple(PlannedVariant(i, v.id, v, needs(v.spec), source)
                    for i, v in enumerate(variants))
    return Plan(name, source, planned)


def _build(combo: dict[str, Any], matrix: MatrixSpec,
           host: HostLike) -> tuple[str, Variant | None, str | None]:
    """(id, variant or None, prune reason or None) for one combination."""
    name = combo["scenario"]
    base = SCENARIOS[name]
    guest: dict[str, Any] = dict(combo.get("guest") or {})
    for f in GUEST_FIELDS:
        if combo.get(f) is not None:
            guest[f] = combo[f]
    spec = replace(base, **guest, inject=combo.get("inject"))
    knobs = {k: combo[k] for k in MODE_KNOBS if combo.get(k) is not None}
    compression = combo["compression"] if "compression" in combo else "none"
    profile_name = combo.get("profile")
    hv = combo.get("hv")
    # The id of a combination that may not even build: spelled as Variant.id would spell it
    # (no "/none" profile; an hv list laid over its profile as resolve_profile labels it).
    label = f"{profile_name or 'none'}+{hv}" if hv else (profile_name or "none")
    qemu_sel = {k: combo[k] for k in QEMU_AXES if combo.get(k) is not None}
    tls = f"+tls={knobs['tls']}" if knobs.get("tls", "none") != "none" else ""
    where = HOSTVM_ID if combo.get(HOSTVM_AXIS) else ""
    provisional = _id_text(f"{name}/{compression}" + ("" if label == "none" else f"/{label}")
                           + tls, spec, base, knobs, qemu_sel) + where

    for ex in matrix.excludes:
        if all(_matches(combo.get(k), v) for k, v in ex["match"].items()):
            return provisional, None, f"excluded by the matrix: {ex['reason'] or ex['match']}"
    if base.profile and profile_name and profile_name != base.profile:
        return provisional, None, (f"{name} is defined with profile {base.profile}; "
                                   f"profile {profile_name} contradicts it")
    reason = knob_reason(compression, knobs)
    if reason:
        return provisional, None, reason
    try:
        mode = MigrationMode(compression=compression, **knobs)
    except UsageError as e:
        return provisional, None, str(e)
    try:
        plan = plan_qemu(mode, host, qemu_sel.get("qemu"), qemu_sel.get("dst_qemu"))
    except UsageError as e:
        return provisional, None, f"QEMU binaries: {e}"
    src, dst = host.binary(plan.src), host.binary(plan.dst)
    assert src is not None and dst is not None  # the plan was made from this inventory
    schema = lacks(mode, plan, src, dst)
    if schema:
        return provisional, None, f"not in this QEMU binary: {schema}"
    try:
        profile = resolve_profile(profile_name or base.profile or "none", hv,
                                  l1_nested=host.l1_nested, vendor=host.vendor)
    except UsageError as e:
        return provisional, None, f"invalid enlightenment set: {e}"
    vendor = vendor_problems(profile, host.vendor, host.l1_nested)
    if vendor:
        return provisional, None, f"profile {profile.name}: {'; '.join(vendor)}"
    variant = Variant(spec, mode, profile, qemu=plan)
    # A path names its binary badly in an id (most end in qemu-system-x86_64): its name does.
    named = {k: (plan.src_name if k == "qemu" else plan.dst_name) if "/" in sel else sel
             for k, sel in qemu_sel.items()}
    vid = matrix_id(variant, named) + where
    fault_tls = get_fault(spec.inject).unfit(mode.tls, remote=True) if spec.inject else None
    reason = inject_reason(spec) or fault_tls or guest_reason(spec)
    return vid, variant, reason


def _matches(value: Any, wanted: Any) -> bool:
    return value in wanted if isinstance(wanted, list) else value == wanted


def knob_reason(compression: str, knobs: Mapping[str, Any]) -> str | None:
    """Why a knob makes no sense with this mode (multifd and compress exclude each other)."""
    for knob in knobs:
        if compression in MODE_KNOBS[knob]:
            continue
        if knob == "channels" and compression == "compress":
            return ("multifd channels with legacy compress: QEMU's multifd and compress "
                    "capabilities are mutually exclusive")
        if knob in ("threads", "decompress_threads", "wait_thread") and compression.startswith(
                "multifd-"):
            return (f"legacy compress {knob} with {compression}: QEMU's multifd and compress "
                    "capabilities are mutually exclusive")
        users = ", ".join(MODE_KNOBS[knob])
        return f"{knob} applies to {users} only, not {compression}"
    return None


def inject_reason(spec: ScenarioSpec) -> str | None:
    """Why a deliberate fault cannot be observed by this scenario's checks."""
    if spec.inject is None:
        return None
    if spec.name == "vmexit":
        return "vmexit measures exit costs and runs none of the checks an inject breaks"
    return get_fault(spec.inject).unobservable(spec)


def guest_reason(spec: ScenarioSpec) -> str | None:
    """Why a guest size cannot hold its own workload."""
    if spec.l1_workload and spec.l1_mib >= spec.mem_mib:
        return (f"L1 workload of {spec.l1_mib} MiB cannot fit in a {spec.mem_mib} MiB L1 "
                "(kernel and initramfs need room too)")
    if spec.l1_threads > spec.l1_mib:
        return f"{spec.l1_threads} workload threads for {spec.l1_mib} MiB: under 1 MiB each"
    return None


def matrix_id(v: Variant, qemu_sel: Mapping[str, str] | None = None) -> str:
    """Variant.id plus "+knob=value" for every knob and guest size that differs from the
    scenario's defaults ("migrate-nested/multifd-zstd+channels=8"), and the QEMU axes as
    written ("+qemu=7.2+dst_qemu=10.0").

    So two variants that differ only in channels, memory or binaries get different ids, and an
    id stays the same whether a default was written out in the matrix or not. Never holds a
    comma.
    """
    base = SCENARIOS.get(v.spec.name, v.spec)
    default_mode = MigrationMode(compression=v.mode.compression)
    knobs = {f.name: getattr(v.mode, f.name) for f in fields(MigrationMode)
             if f.name != "compression" and getattr(v.mode, f.name) != getattr(default_mode, f.name)}
    return _id_text(v.id, v.spec, base, knobs, qemu_sel or {})


def _id_text(head: str, spec: ScenarioSpec, base: ScenarioSpec, knobs: Mapping[str, Any],
             qemu_sel: Mapping[str, str] | None = None) -> str:
    # A path would make a poor id: its file name stands for it.
    parts = [f"{k}={Path(sel).name if '/' in sel else sel}"
             for k, sel in (qemu_sel or {}).items()]
    # tls is in Variant.id already ("+tls=x509"), never twice.
    parts += [f"{k}={_short(knobs[k])}" for k in MODE_KNOBS if k in knobs and k != "tls"]
    parts += [f"{f}={getattr(spec, f)}" for f in GUEST_FIELDS
              if getattr(spec, f) != getattr(base, f)]
    inj = f"+inject-{spec.inject}" if spec.inject and "+inject-" not in head else ""
    # No commas: QEMU's option parser splits on them, and avocado names test dirs by the id.
    return (head + inj + "".join("+" + p for p in parts)).replace(",", "+")


def _short(v: Any) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)
