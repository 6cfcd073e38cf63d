"""The in-L1 Hyper-V checks: L1 sees the profile's flags, its KVM uses eVMCS, its log is clean."""

from __future__ import annotations

import re
from typing import Protocol

from harness.host.hvcpuid import HV_FEATURE_BITS, L1HvView, decode_l1_cpuid
from harness.scenario.checks import Check


class HvExpectation(Protocol):
    """What l1_sees_enlightenments needs of a profile (enlightenments.Profile fits)."""

    @property
    def flags(self) -> tuple[str, ...]: ...

    @property
    def values(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def kvm_signature(self) -> bool: ...


def l1_sees_enlightenments(expected: HvExpectation, view: L1HvView) -> Check:
    """Every hv-* flag the profile asked for is visible in L1's CPUID (and nothing when none)."""
    name = "l1-sees-enlightenments"
    trunc = "" if view.complete else " (dump has no '# end' line: output truncated?)"
    if not expected.flags and not expected.values:
        if view.hyperv:
            return Check(name, False, f"no hv-* flags asked for, but L1 sees the Hyper-V "
                                      f"interface (vendor {view.vendor!r})")
        return Check(name, True, f"no Hyper-V interface, as expected (vendor {view.vendor!r})")
    if not view.hyperv:
        return Check(name, False, f"L1 sees no Hyper-V interface (0x40000001 is not 'Hv#1'; "
                                  f"vendor {view.vendor!r}): hv-* flags were not applied" + trunc)

    problems: list[str] = []
    missing = [f for f in expected.flags if f in HV_FEATURE_BITS and f not in view.features]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if "hv-evmcs" in expected.flags and "hv-evmcs" not in missing:
        if not view.evmcs_versions or view.evmcs_versions[0] < 1:
            problems.append("hv-evmcs recommended but 0x4000000A offers no eVMCS version")
    values = dict(expected.values)
    if "hv-spinlocks" in values and view.spinlocks != int(values["hv-spinlocks"], 0):
        seen = "none" if view.spinlocks is None else f"{view.spinlocks:#x}"
        problems.append(f"hv-spinlocks={values['hv-spinlocks']} but L1 sees {seen}")
    if "hv-vendor-id" in values and view.vendor != values["hv-vendor-id"]:
        problems.append(f"hv-vendor-id={values['hv-vendor-id']} but L1 sees {view.vendor!r}")
    if not expected.kvm_signature and view.kvm_leaves_at is not None:
        problems.append(f"kvm=off asked for but KVM leaves are at {view.kvm_leaves_at:#x}")
    if problems:
        return Check(name, False, "; ".join(problems) + trunc)
    shown = sorted(set(expected.flags) & set(HV_FEATURE_BITS))
    evmcs = f", eVMCS {view.evmcs_versions[0]}..{view.evmcs_versions[1]}" if (
        "hv-evmcs" in expected.flags and view.evmcs_versions) else ""
    return Check(name, True, f"L1 sees {len(shown)} expected flag(s) under vendor "
                             f"{view.vendor!r}{evmcs}")


# Linux kvm_intel's line when it runs on Hyper-V and adopts eVMCS:
#   6.1 arch/x86/kvm/vmx/vmx.c vmx_init(): pr_info("KVM: vmx: using Hyper-V Enlightened VMCS\n")
#   later kernels (hv_init_evmcs(), pr_fmt "kvm_intel: "): "Using Hyper-V Enlightened VMCS"
EVMCS_IN_USE = re.compile(r"(?:KVM: vmx: using|Using) Hyper-V Enlightened VMCS")

# Why a Linux L1 did not adopt eVMCS, most specific first (arch/x86/kernel/cpu/mshyperv.c and
# hypervisor.c, 6.1): Linux takes Hyper-V only when it wins hypervisor detection.
_EVMCS_MISSING_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"x86/hyperv: VP_INDEX MSR not available"),
     "L1 rejected Hyper-V: VP_INDEX MSR not available (add hv-vpindex)"),
    (re.compile(r"x86/hyperv: HYPERCALL MSR not available"),
     "L1 rejected Hyper-V: HYPERCALL MSR not available"),
    (re.compile(r"Hypervisor detected: KVM"),
     "L1 chose KVM as its hypervisor, so it never looks at Hyper-V hints (start QEMU with "
     "kvm=off so only the Hyper-V leaves are offered)"),
    (re.compile(r"Hypervisor detected: Microsoft Hyper-V"),
     "L1 runs on Hyper-V but kvm_intel did not take eVMCS (hint bit 14 or eVMCS version "
     "missing, a VP assist page absent, or kvm_intel.enlightened_vmcs=0)"),
)


def l1_uses_evmcs(dmesg_text: str) -> Check:
    """L1's kvm_intel reported that it uses Enlightened VMCS."""
    name = "l1-uses-evmcs"
    for line in dmesg_text.splitlines():
        if EVMCS_IN_USE.search(line):
            return Check(name, True, line.strip())
    for pattern, why in _EVMCS_MISSING_HINTS:
        if pattern.search(dmesg_text):
            return Check(name, False, f"no 'Hyper-V Enlightened VMCS' line: {why}")
    return Check(name, False, "no 'Hyper-V Enlightened VMCS' line and no 'Hypervisor detected' "
                              "line: was kvm_intel loaded, and was the whole log captured?")


# eVMCS complaints a kernel log may carry (6.1 sources):
#   arch/x86/kvm/vmx/evmcs.h get_evmcs_offset(): WARN_ONCE "KVM: accessing unsupported EVMCS
#     field %lx" (L1 using eVMCS touched a field eVMCS v1 has no slot for)
#   arch/x86/kvm/vmx/evmcs.c WARN_ON_ONCE sites: the WARN header names the file
#     ("WARNING: CPU: 0 PID: 1 at arch/x86/kvm/vmx/evmcs.c:413 ...") - L0's side
#   arch/x86/kvm/vmx/nested.c: pr_debug "%s: enlightened vmptrld failed" (dynamic debug only)
EVMCS_COMPLAINTS: tuple[re.Pattern[str], ...] = (
    re.compile(r"unsupported EVMCS field"),
    re.compile(r"WARNING: .* at arch/x86/kvm/vmx/(?:evmcs|hyperv_evmcs|hyperv|vmx_onhyperv)"
               r"\.[ch]:\d+"),
    re.compile(r"enlightened vmptrld failed"),
)


def evmcs_log_clean(dmesg_text: str, *, max_shown: int = 3) -> Check:
    """No eVMCS warning in a kernel log (L1's, or L0's when it is at hand)."""
    name = "evmcs-log-clean"
    bad = [line.strip() for line in dmesg_text.splitlines()
           if any(p.search(line) for p in EVMCS_COMPLAINTS)]
    if bad:
        more = f" (+{len(bad) - max_shown} more)" if len(bad) > max_shown else ""
        return Check(name, False, " | ".join(bad[:max_shown]) + more)
    return Check(name, True, "no eVMCS warnings")


def enlightenment_checks(expected: HvExpectation, cpuid_dump: str, dmesg_text: str) -> list[Check]:
    """The in-L1 checks for a profile with hv-* flags: CPUID seen, eVMCS in use, log clean."""
    try:
        found = [l1_sees_enlightenments(expected, decode_l1_cpuid(cpuid_dump))]
    except ValueError as e:  # a garbled dump is a failed check, not a crash of the run
        found = [Check("l1-sees-enlightenments", False, f"cpuid dump unreadable: {e}")]
    if "hv-evmcs" in expected.flags:
        found.append(l1_uses_evmcs(dmesg_text))
    found.append(evmcs_log_clean(dmesg_text))
    return found
