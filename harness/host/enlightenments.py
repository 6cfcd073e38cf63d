"""Hyper-V enlightenment profiles: parse, validate, check against the host, render for -cpu.

Rules are data (DEPENDENCIES, VMX_DEPENDENCIES, VMX_ONLY, BOOL_FLAGS, VALUE_FLAGS) so tests
and reports can walk them. Everything here is pure: host facts come in as parameters
(accel, l1_nested, caps, hv_supported, qemu_hv_props), never from probing.

We validate ourselves because QEMU only does so under KVM: QEMU 7.2 under TCG accepts any
hv-* set silently and exposes no Hyper-V leaves at all (checked on this project's hosts).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.core.errors import UsageError
from harness.core.paths import TEMPLATES
from harness.host.hvcpuid import HV_FEATURE_BITS

PROFILES_PATH = TEMPLATES / "profiles.json"

# Dependencies QEMU enforces under KVM (target/i386/kvm/kvm.c: kvm_hyperv_properties[]
# .dependencies, plus the separate hv-synic -> hv-vpindex check). Direct needs only: a missing
# transitive need shows up as its own line once the direct one is added.
DEPENDENCIES: Mapping[str, tuple[str, ...]] = {
    "hv-evmcs": ("hv-vapic",),
    "hv-synic": ("hv-vpindex",),
    "hv-stimer": ("hv-synic", "hv-time"),
    "hv-tlbflush": ("hv-vpindex",),
    "hv-ipi": ("hv-vpindex",),
    "hv-stimer-direct": ("hv-stimer",),
    "hv-tlbflush-ext": ("hv-tlbflush",),
    "hv-tlbflush-direct": ("hv-vapic",),
    "hv-syndbg": ("hv-synic", "hv-relaxed"),
}

# Needs that hold only where L1 nests with VMX. QEMU does not enforce this one, but its docs
# (docs/system/i386/hyperv.rst) say the VMX implementation of direct TLB flush requires eVMCS,
# so without it the flag would do nothing and the test would measure nothing.
VMX_DEPENDENCIES: Mapping[str, tuple[str, ...]] = {
    "hv-tlbflush-direct": ("hv-evmcs",),
}

# Flags that exist only for VMX: KVM_CAP_HYPERV_ENLIGHTENED_VMCS cannot be enabled on SVM.
VMX_ONLY: frozenset[str] = frozenset({"hv-evmcs"})

# Boolean hv-* properties of QEMU 7.2's x86 CPU (`-device max-x86_64-cpu,help`); with VALUE_FLAGS
# this is exactly its hv-* list.
BOOL_FLAGS: frozenset[str] = frozenset({
    "hv-relaxed", "hv-vapic", "hv-time", "hv-crash", "hv-reset", "hv-vpindex", "hv-runtime",
    "hv-synic", "hv-stimer", "hv-frequencies", "hv-reenlightenment", "hv-tlbflush",
    "hv-evmcs", "hv-ipi", "hv-stimer-direct", "hv-avic", "hv-apicv", "hv-syndbg",
    "hv-emsr-bitmap", "hv-xmm-input", "hv-tlbflush-ext", "hv-tlbflush-direct",
    "hv-passthrough", "hv-enforce-cpuid",
})

# Valued hv-* properties and the kind of value QEMU 7.2 takes (its x-hv-* ones are internal).
VALUE_FLAGS: Mapping[str, str] = {
    "hv-spinlocks": "u32",
    "hv-vendor-id": "vendor",
    "hv-no-nonarch-coresharing": "onoffauto",
    "hv-version-id-build": "u32",
    "hv-version-id-major": "u16",
    "hv-version-id-minor": "u16",
    "hv-version-id-spack": "u32",
    "hv-version-id-sbranch": "u8",
    "hv-version-id-snumber": "u32",
}

KNOWN_FLAGS: frozenset[str] = BOOL_FLAGS | frozenset(VALUE_FLAGS)

# Properties that make QEMU add a migration blocker (target/i386/kvm/kvm.c hyperv_init_vcpu).
MIGRATION_BLOCKERS: Mapping[str, str] = {
    "hv-passthrough": "hv-passthrough adds a migration blocker in QEMU: use an explicit hv-* list",
    "hv-no-nonarch-coresharing=auto": "hv-no-nonarch-coresharing=auto adds a migration blocker "
                                      "in QEMU: use =on (with SMT off or pinned vCPUs)",
}

TCG_SKIP_REASON = (
    "Hyper-V enlightenments need -accel kvm: under TCG QEMU exposes no Hyper-V CPUID leaves and "
    "checks no hv-* dependencies (and hv-vpindex aborts start), and KVM_GET_SUPPORTED_HV_CPUID "
    "is unavailable"
)

_INT_RANGES = {"u8": (0, 0xFF), "u16": (0, 0xFFFF), "u32": (0, 0xFFFFFFFF)}
_VENDOR_ID = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")


@dataclass(frozen=True)
class Profile:
    """A set of hv-* flags for L1's -cpu, as data.

    ``flags`` are the enabled boolean flags in order; ``values`` the valued ones as
    (name, canonical text); ``vmx_only`` flags are still to be added where L1 nests with VMX
    (empty once resolve_profile has run); ``kvm_signature`` False means kvm=off.
    """

    name: str
    flags: tuple[str, ...] = ()
    values: tuple[tuple[str, str], ...] = ()
    vmx_only: tuple[str, ...] = ()
    kvm_signature: bool = True
    description: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def names(self) -> frozenset[str]:
        """Every hv-* property the profile sets (boolean and valued)."""
        return frozenset(self.flags) | frozenset(n for n, _ in self.values)

    def value(self, name: str) -> str | None:
        return dict(self.values).get(name)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "flags": list(self.flags), "values": [list(x) for x in self.values],
                "vmx_only": list(self.vmx_only), "kvm_signature": self.kvm_signature,
                "description": self.description, "notes": list(self.notes)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Profile:
        """Inverse of to_json; UsageError when the profile breaks a dependency rule."""
        p = cls(name=str(d["name"]), flags=tuple(d.get("flags", ())),
                values=tuple((str(n), str(v)) for n, v in d.get("values", ())),
                vmx_only=tuple(d.get("vmx_only", ())),
                kvm_signature=bool(d.get("kvm_signature", True)),
                description=str(d.get("description", "")), notes=tuple(d.get("notes", ())))
        # Every name reaches QEMU's -cpu option: only known hv-* flags and values, so a
        # variant file cannot smuggle in other -cpu properties ("hv-relaxed,pmu=off").
        for item in (*p.flags, *p.vmx_only, *(f"{n}={v}" for n, v in p.values)):
            try:
                if "," in item or ("=" not in item and item not in KNOWN_FLAGS):
                    raise UsageError(f"{item!r} is not one hv-* flag")
                _parse_items(item)
            except UsageError as e:
                raise UsageError(f"profile {p.name} in variant file: {e}") from None
        problems = dependency_problems(p)
        if problems:
            raise UsageError(f"profile {p.name} in variant file: {'; '.join(problems)}")
        return p


@dataclass
class _Items:
    on: list[str] = field(default_factory=list)
    off: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)


def _did_you_mean(word: str, choices: frozenset[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _canonical_value(name: str, text: str) -> str:
    kind = VALUE_FLAGS[name]
    if kind == "vendor":
        # QEMU truncates longer ids with a warning; a comma would end the -cpu option.
        if len(text) > 12 or not _VENDOR_ID.match(text) or "," in text:
            raise UsageError(f"{name}={text!r}: 1 to 12 printable ASCII characters, no comma "
                             f"or surrounding spaces")
        return text
    if kind == "onoffauto":
        if text not in ("on", "off", "auto"):
            raise UsageError(f"{name}={text}: expected on, off or auto")
        return text
    try:
        number = int(text, 0)
    except ValueError:
        raise UsageError(f"{name}={text}: not a number (write 0x1fff or 8191)") from None
    low, high = _INT_RANGES[kind]
    if not low <= number <= high:
        raise UsageError(f"{name}={text}: out of range for {kind} ({low:#x}..{high:#x})")
    return f"{number:#x}" if name == "hv-spinlocks" else str(number)


def _parse_items(text: str) -> _Items:
    items = _Items()
    seen: set[str] = set()
    for n, raw in enumerate(text.split(","), 1):
        item = raw.strip()
        if not item:
            raise UsageError(f"empty item #{n} in hv list {text!r}")
        name, eq, value = item.partition("=")
        if not name.startswith("hv-"):
            guess = "hv-" + name.removeprefix("hv_").removeprefix("hv").lstrip("-_")
            guess = guess.replace("_", "-")
            hint = f" (did you mean {guess}?)" if guess in KNOWN_FLAGS else ""
            raise UsageError(f"{name!r} is not an hv-* flag: write hv-NAME{hint}")
        if name not in KNOWN_FLAGS:
            raise UsageError(f"unknown Hyper-V flag {name}{_did_you_mean(name, KNOWN_FLAGS)}")
        if name in seen:
            raise UsageError(f"{name} given twice in {text!r}")
        seen.add(name)
        if name in BOOL_FLAGS:
            if not eq or value == "on":
                items.on.append(name)
            elif value == "off":
                items.off.append(name)
            else:
                raise UsageError(f"{item}: {name} is on or off, not {value!r}")
        else:
            if not eq or not value:
                raise UsageError(f"{name} needs a value ({name}=...)")
            items.values[name] = _canonical_value(name, value)
    return items


def parse_hv_list(text: str, *, name: str = "custom", description: str = "") -> Profile:
    """Parse "hv-a,hv-b=on,hv-spinlocks=0x1fff" into a Profile; raise UsageError on bad input.

    Strict: every item is hv-NAME or hv-NAME=VALUE with a name QEMU 7.2 knows; a flag may appear
    once; "hv-x=off" is accepted and leaves hv-x out.
    """
    items = _parse_items(text)
    return Profile(name=name, flags=tuple(items.on), values=tuple(items.values.items()),
                   description=description)


def load_profiles(path: Path | None = None) -> dict[str, Profile]:
    """Read every profile from templates/profiles.json (or ``path``)."""
    path = path or PROFILES_PATH
    data = json.loads(path.read_text())
    profiles: dict[str, Profile] = {}
    for pname, spec in data["profiles"].items():
        try:
            base = parse_hv_list(",".join(spec.get("flags", [])), name=pname) if spec.get(
                "flags") else Profile(name=pname)
            extra = _parse_items(",".join(spec.get("vmx_only", []))) if spec.get(
                "vmx_only") else _Items()
        except UsageError as e:
            raise ValueError(f"{path}: profile {pname}: {e}") from None
        if extra.off or extra.values:
            raise ValueError(f"{path}: profile {pname}: vmx_only takes plain boolean flags")
        profiles[pname] = replace(
            base,
            vmx_only=tuple(extra.on),
            kvm_signature=bool(spec.get("kvm_signature", True)),
            description=spec.get("description", ""),
        )
    return profiles


def get_profile(name: str, path: Path | None = None) -> Profile:
    """One named profile; UsageError (with a did-you-mean) for an unknown name."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise UsageError(f"unknown enlightenment profile {name!r}"
                         f"{_did_you_mean(name, set(profiles))}; known: "
                         f"{', '.join(sorted(profiles))}")
    return profiles[name]


def dependency_problems(profile: Profile, l1_nested: str = "") -> list[str]:
    """One line per missing need: "hv-stimer needs hv-synic (add hv-synic)"."""
    have = set(profile.flags)
    problems = []
    for flag in profile.flags:
        for need in DEPENDENCIES.get(flag, ()):
            if need not in have:
                problems.append(f"{flag} needs {need} (add {need})")
        if l1_nested == "vmx":
            for need in VMX_DEPENDENCIES.get(flag, ()):
                if need not in have:
                    problems.append(f"{flag} on VMX needs {need} to take effect (add {need})")
    return problems


def vendor_problems(profile: Profile, vendor: str, l1_nested: str) -> list[str]:
    """One line per flag this host's kind of nesting cannot have (hv-evmcs off VMX)."""
    if l1_nested == "vmx":
        return []
    return [f"{flag} needs Intel VMX, but L1 nesting here is {l1_nested or 'none'} "
            f"(vendor {vendor or 'unknown'}): drop {flag}"
            for flag in profile.flags if flag in VMX_ONLY]


def validate(profile: Profile, vendor: str, l1_nested: str) -> list[str]:
    """Every problem with ``profile`` on a host of this vendor/nesting, one line each."""
    return dependency_problems(profile, l1_nested) + vendor_problems(profile, vendor, l1_nested)


def resolve_profile(
    name: str | None,
    hv_list: str | None,
    *,
    l1_nested: str,
    vendor: str = "",
    path: Path | None = None,
) -> Profile:
    """The profile to run: named profile (default ``none``) with ``hv_list`` laid over it.

    vmx_only flags are added where L1 nests with VMX and left out elsewhere, with a note.
    ``hv_list`` items add flags, "=off" removes them, values override. Dependency problems raise
    UsageError (the set is wrong on every host); an explicitly asked-for VMX-only flag off VMX
    is kept, and host_support turns it into a skip (the set is right, the host is not).
    """
    base = get_profile(name or "none", path)
    flags = list(base.flags)
    notes = list(base.notes)
    if l1_nested == "vmx":
        flags += [f for f in base.vmx_only if f not in flags]
    else:
        notes += [f"{f} left out of profile {base.name}: VMX only, and L1 nesting here is "
                  f"{l1_nested or 'none'}" for f in base.vmx_only]
    values = dict(base.values)
    label = base.name
    if hv_list:
        items = _parse_items(hv_list)
        flags = [f for f in flags if f not in items.off]
        flags += [f for f in items.on if f not in flags]
        values.update(items.values)
        label = f"{base.name}+{hv_list}" if name else "custom"
    profile = Profile(name=label, flags=tuple(flags), values=tuple(values.items()),
                      kvm_signature=base.kvm_signature, description=base.description,
                      notes=tuple(notes))
    problems = dependency_problems(profile, l1_nested)
    if problems:
        raise UsageError(f"enlightenments {label}: " + "; ".join(problems))
    return profile


def host_support(
    profile: Profile,
    *,
    accel: str,
    l1_nested: str,
    caps: Mapping[str, bool],
    hv_supported: frozenset[str] | None,
    qemu_hv_props: frozenset[str],
) -> str | None:
    """None when this host can run ``profile``; otherwise the one-line reason to skip.

    ``caps`` uses the probe's KvmFacts.caps keys; ``hv_supported`` is the set of flags decoded
    from KVM_GET_SUPPORTED_HV_CPUID (hvcpuid.supported_hv_flags), None when it was not run.
    """
    if not profile.names:
        return None
    vmx_only = [f for f in profile.flags if f in VMX_ONLY]
    if accel != "kvm":
        if vmx_only and l1_nested != "vmx":
            return (f"{vmx_only[0]} needs KVM with VMX: this host runs {accel.upper()} "
                    f"(l1 nesting is {l1_nested or 'none'}); Intel hardware only (TCG offers no "
                    "VMX, so the KVM host VM cannot run it either)")
        return TCG_SKIP_REASON
    if vmx_only and l1_nested != "vmx":
        return (f"{vmx_only[0]} needs KVM with VMX: L1 nesting on this host is "
                f"{l1_nested or 'none'}; Intel hardware only")
    unknown = sorted(profile.names - qemu_hv_props)
    if unknown:
        rest = f" (nor {', '.join(unknown[1:])})" if unknown[1:] else ""
        return f"QEMU does not know {unknown[0]}{rest}"
    if "hv-evmcs" in profile.flags and not caps.get("hyperv_enlightened_vmcs"):
        return ("hv-evmcs needs KVM_CAP_HYPERV_ENLIGHTENED_VMCS (163), absent on this host "
                "kernel")
    if not caps.get("hyperv_cpuid"):
        return ("hv-* flags need KVM_CAP_HYPERV_CPUID (167), absent on this host kernel: "
                "Hyper-V emulation too old or compiled out, so support cannot be checked")
    if hv_supported is None:
        if not caps.get("sys_hyperv_cpuid"):
            # Without cap 191 the ioctl needs a vCPU, which a probe does not create.
            return ("hv-* support cannot be checked: this kernel lacks KVM_CAP_SYS_HYPERV_CPUID "
                    "(191), so KVM_GET_SUPPORTED_HV_CPUID was not run")
        return "KVM_GET_SUPPORTED_HV_CPUID was not recorded by the probe: cannot check hv-* flags"
    offered = set(hv_supported)
    if caps.get("hyperv_enlightened_vmcs") and not caps.get("sys_hyperv_cpuid"):
        # The per-vCPU ioctl hides the eVMCS bit until the cap is enabled; QEMU trusts the cap.
        offered.add("hv-evmcs")
    missing = [f for f in profile.flags if f in HV_FEATURE_BITS and f not in offered]
    if missing:
        return f"{', '.join(missing)} not offered by KVM_GET_SUPPORTED_HV_CPUID on this host"
    return None


def qemu_cpu_suffix(profile: Profile) -> str:
    """What to append to -cpu: ",hv-relaxed=on,hv-vapic=on,hv-spinlocks=0x1fff" ("" for none)."""
    if profile.vmx_only:
        raise ValueError(f"profile {profile.name} still has vmx_only flags: resolve_profile first")
    parts = [f"{f}=on" for f in profile.flags]
    parts += [f"{n}={v}" for n, v in profile.values]
    if not profile.kvm_signature:
        parts.append("kvm=off")
    return "".join("," + p for p in parts)


def migration_blockers(profile: Profile) -> list[str]:
    """Lines for settings that make QEMU refuse to migrate this L1 at all."""
    out = []
    if "hv-passthrough" in profile.flags:
        out.append(MIGRATION_BLOCKERS["hv-passthrough"])
    if profile.value("hv-no-nonarch-coresharing") == "auto":
        out.append(MIGRATION_BLOCKERS["hv-no-nonarch-coresharing=auto"])
    return out


def same_enlightenments(src: Profile, dst: Profile) -> str | None:
    """None when src and dst can migrate L1 between them; otherwise one problem line.

    hv-evmcs is reported first and by name: KVM on dst refuses nested state that carries the
    eVMCS flag when dst was started without hv-evmcs, and the reverse changes L1's CPUID under it.
    """
    if ("hv-evmcs" in src.flags) != ("hv-evmcs" in dst.flags):
        has, lacks = ("src", "dst") if "hv-evmcs" in src.flags else ("dst", "src")
        return (f"hv-evmcs differs: {has} has it, {lacks} lacks it; start both with the same "
                f"hv-evmcs (KVM rejects nested state carrying the eVMCS flag otherwise)")
    blockers = migration_blockers(src) + migration_blockers(dst)
    if blockers:
        return blockers[0]
    if qemu_cpu_suffix(src) == qemu_cpu_suffix(dst):
        return None
    only_src = [f for f in src.flags if f not in dst.flags]
    only_dst = [f for f in dst.flags if f not in src.flags]
    diffs = [f"src-only {', '.join(only_src)}"] if only_src else []
    diffs += [f"dst-only {', '.join(only_dst)}"] if only_dst else []
    sv, dv = dict(src.values), dict(dst.values)
    diffs += [f"{n} {sv.get(n, 'unset')} vs {dv.get(n, 'unset')}"
              for n in sorted(set(sv) | set(dv)) if sv.get(n) != dv.get(n)]
    if src.kvm_signature != dst.kvm_signature:
        diffs.append("kvm=off on one side only")
    return "enlightenments differ between src and dst: " + "; ".join(diffs)
