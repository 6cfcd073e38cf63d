"""Hyper-V CPUID decoding: what the host's KVM offers and what L1 actually sees.

Two inputs, one feature table:

* host side: the entries of KVM_GET_SUPPORTED_HV_CPUID, as (function, index, eax, ebx,
  ecx, edx) tuples (the shape of the probe's ``KvmFacts.hv_cpuid``);
* L1 side: the text printed by the in-L1 CPUID dumper (format below).

Both are decoded into QEMU hv-* flag names with HV_FEATURE_BITS, which follows QEMU's
``kvm_hyperv_properties[]`` (target/i386/kvm/kvm.c): QEMU calls a flag supported when all of
its bits are set in the host's Hyper-V CPUID, and it sets exactly those bits in L1's CPUID,
so one table serves both directions. Bit positions are the TLFS ones as spelled in Linux
include/asm-generic/hyperv-tlfs.h and arch/x86/include/asm/hyperv-tlfs.h (6.1).

L1 dump format (one line per leaf; the C dumper must print exactly this)::

    # comment lines start with '#', blank lines are ignored
    0x40000000 0x00000000: eax=0x4000000a ebx=0x7263694d ecx=0x666f736f edx=0x76482074
    ...
    # end

``<leaf> <subleaf>: eax=<r> ebx=<r> ecx=<r> edx=<r>``, every number ``0x`` + 1 to 8 hex
digits (the dumper prints 8, lower case). The dumper prints DUMP_LEAVES with subleaf 0, then
``# end`` so a truncated capture can be told from a complete one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

# Leaves (TLFS names as in Linux arch/x86/include/asm/hyperv-tlfs.h).
HV_VENDOR_AND_MAX = 0x40000000
HV_INTERFACE = 0x40000001
HV_FEATURES = 0x40000003
HV_ENLIGHTENMENT_INFO = 0x40000004
HV_NESTED_FEATURES = 0x4000000A
KVM_SIGNATURE_NEXT = 0x40000100  # QEMU moves KVM's leaves here when Hyper-V leaves are on

# 0x40000001.eax when the hypervisor implements the Hyper-V interface: "Hv#1".
HV_INTERFACE_SIGNATURE = 0x31237648
HV_MIN_MAX_LEAF = 0x40000005  # Linux (ms_hyperv_platform) ignores Hyper-V below this
KVM_SIGNATURE = "KVMKVMKVM\0\0\0"
TCG_SIGNATURE = "TCGTCGTCGTCG"
HYPERV_SIGNATURE = "Microsoft Hv"

# What the in-L1 dumper prints (all with subleaf 0). Leaf 1 carries the hypervisor-present bit
# (ECX[31]) and VMX (ECX[5]); 0x80000001 carries SVM (ECX[2]).
DUMP_LEAVES: tuple[int, ...] = (
    0x00000001,
    *range(0x40000000, 0x4000000B),
    0x40000100,
    0x40000101,
    0x80000001,
)

Regs = tuple[int, int, int, int]  # eax, ebx, ecx, edx
_REG_INDEX = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}


def _bit(n: int) -> int:
    return 1 << n


class CpuidBits(NamedTuple):
    """All of ``mask`` must be set in register ``reg`` of ``leaf``."""

    leaf: int
    reg: str
    mask: int


# 0x40000003.EAX: partition privileges (MSR availability).
HV_MSR_VP_RUNTIME_AVAILABLE = _bit(0)
HV_MSR_TIME_REF_COUNT_AVAILABLE = _bit(1)
HV_MSR_SYNIC_AVAILABLE = _bit(2)
HV_MSR_SYNTIMER_AVAILABLE = _bit(3)
HV_MSR_APIC_ACCESS_AVAILABLE = _bit(4)
HV_MSR_HYPERCALL_AVAILABLE = _bit(5)
HV_MSR_VP_INDEX_AVAILABLE = _bit(6)
HV_MSR_RESET_AVAILABLE = _bit(7)
HV_MSR_REFERENCE_TSC_AVAILABLE = _bit(9)
HV_ACCESS_FREQUENCY_MSRS = _bit(11)
HV_ACCESS_REENLIGHTENMENT = _bit(13)
# 0x40000003.EDX: misc features.
HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE = _bit(4)
HV_FEATURE_FREQUENCY_MSRS_AVAILABLE = _bit(8)
HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE = _bit(10)
HV_FEATURE_DEBUG_MSRS_AVAILABLE = _bit(11)
HV_FEATURE_EXT_GVA_RANGES_FLUSH = _bit(14)
HV_STIMER_DIRECT_MODE_AVAILABLE = _bit(19)
# 0x40000004.EAX: implementation recommendations.
HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED = _bit(2)
HV_X64_APIC_ACCESS_RECOMMENDED = _bit(3)
HV_X64_RELAXED_TIMING_RECOMMENDED = _bit(5)
HV_DEPRECATING_AEOI_RECOMMENDED = _bit(9)
HV_X64_CLUSTER_IPI_RECOMMENDED = _bit(10)
HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED = _bit(11)
HV_X64_ENLIGHTENED_VMCS_RECOMMENDED = _bit(14)
# 0x4000000A.EAX: nested features; bits 7:0 / 15:8 are the eVMCS version range (min / max).
HV_X64_NESTED_DIRECT_FLUSH = _bit(17)
HV_X64_NESTED_MSR_BITMAP = _bit(19)
HV_EVMCS_VERSION_MASK = 0xFFFF

_F, _R, _N = HV_FEATURES, HV_ENLIGHTENMENT_INFO, HV_NESTED_FEATURES

# QEMU flag -> CPUID bits that mean "supported" (host) / "exposed" (L1); from QEMU's
# kvm_hyperv_properties[] (identical in 7.2 and current master for these flags).
HV_FEATURE_BITS: Mapping[str, tuple[CpuidBits, ...]] = {
    "hv-relaxed": (CpuidBits(_R, "eax", HV_X64_RELAXED_TIMING_RECOMMENDED),),
    "hv-vapic": (CpuidBits(_F, "eax", HV_MSR_APIC_ACCESS_AVAILABLE),),
    "hv-time": (
        CpuidBits(_F, "eax", HV_MSR_TIME_REF_COUNT_AVAILABLE | HV_MSR_REFERENCE_TSC_AVAILABLE),
    ),
    "hv-crash": (CpuidBits(_F, "edx", HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE),),
    "hv-reset": (CpuidBits(_F, "eax", HV_MSR_RESET_AVAILABLE),),
    "hv-vpindex": (CpuidBits(_F, "eax", HV_MSR_VP_INDEX_AVAILABLE),),
    "hv-runtime": (CpuidBits(_F, "eax", HV_MSR_VP_RUNTIME_AVAILABLE),),
    "hv-synic": (CpuidBits(_F, "eax", HV_MSR_SYNIC_AVAILABLE),),
    "hv-stimer": (CpuidBits(_F, "eax", HV_MSR_SYNTIMER_AVAILABLE),),
    "hv-frequencies": (
        CpuidBits(_F, "eax", HV_ACCESS_FREQUENCY_MSRS),
        CpuidBits(_F, "edx", HV_FEATURE_FREQUENCY_MSRS_AVAILABLE),
    ),
    "hv-reenlightenment": (CpuidBits(_F, "eax", HV_ACCESS_REENLIGHTENMENT),),
    "hv-tlbflush": (
        CpuidBits(
            _R, "eax", HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED | HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED
        ),
    ),
    "hv-evmcs": (CpuidBits(_R, "eax", HV_X64_ENLIGHTENED_VMCS_RECOMMENDED),),
    "hv-ipi": (
        CpuidBits(
            _R, "eax", HV_X64_CLUSTER_IPI_RECOMMENDED | HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED
        ),
    ),
    "hv-stimer-direct": (CpuidBits(_F, "edx", HV_STIMER_DIRECT_MODE_AVAILABLE),),
    "hv-avic": (CpuidBits(_R, "eax", HV_DEPRECATING_AEOI_RECOMMENDED),),
    "hv-apicv": (CpuidBits(_R, "eax", HV_DEPRECATING_AEOI_RECOMMENDED),),  # alias of hv-avic
    "hv-syndbg": (CpuidBits(_F, "edx", HV_FEATURE_DEBUG_MSRS_AVAILABLE),),
    "hv-emsr-bitmap": (CpuidBits(_N, "eax", HV_X64_NESTED_MSR_BITMAP),),
    "hv-xmm-input": (CpuidBits(_F, "edx", HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE),),
    "hv-tlbflush-ext": (CpuidBits(_F, "edx", HV_FEATURE_EXT_GVA_RANGES_FLUSH),),
    "hv-tlbflush-direct": (CpuidBits(_N, "eax", HV_X64_NESTED_DIRECT_FLUSH),),
}


def flags_from_leaves(leaves: Mapping[int, Regs]) -> frozenset[str]:
    """QEMU hv-* flags whose bits are all set in ``leaves`` (leaf -> regs); absent leaves are 0."""
    found = set()
    for flag, needs in HV_FEATURE_BITS.items():
        if all(_reg(leaves, b.leaf, b.reg) & b.mask == b.mask for b in needs):
            found.add(flag)
    return frozenset(found)


def _reg(leaves: Mapping[int, Regs], leaf: int, reg: str) -> int:
    regs = leaves.get(leaf)
    return regs[_REG_INDEX[reg]] if regs else 0


def signature_of(regs: Regs) -> str:
    """The 12-byte vendor signature in ebx, ecx, edx (little-endian), NULs kept."""
    raw = b"".join(r.to_bytes(4, "little") for r in regs[1:])
    return raw.decode("latin-1")


def evmcs_versions(nested_eax: int) -> tuple[int, int] | None:
    """(min, max) eVMCS version from 0x4000000A.EAX, or None when no version is offered."""
    low = nested_eax & HV_EVMCS_VERSION_MASK
    if not low:
        return None
    return low & 0xFF, low >> 8


# --- host side: KVM_GET_SUPPORTED_HV_CPUID ---------------------------------------------------


@dataclass(frozen=True)
class HostHvCpuid:
    """What KVM_GET_SUPPORTED_HV_CPUID says this host's KVM can give a guest."""

    signature: str | None  # "Linux KVM Hv" from KVM
    max_leaf: int | None
    flags: frozenset[str]  # QEMU hv-* flags whose bits are all offered
    evmcs_versions: tuple[int, int] | None  # (min, max); None: no eVMCS (SVM, or not enabled)


def decode_supported_hv_cpuid(
    entries: Iterable[tuple[int, int, int, int, int, int]],
) -> HostHvCpuid:
    """Decode KVM_GET_SUPPORTED_HV_CPUID entries (function, index, eax, ebx, ecx, edx).

    Note: the per-vCPU form of the ioctl leaves the eVMCS bit clear until
    KVM_CAP_HYPERV_ENLIGHTENED_VMCS is enabled on that vCPU (QEMU patches it in from the cap);
    the system form (KVM_CAP_SYS_HYPERV_CPUID) reports it whenever VMX can do eVMCS.
    """
    leaves: dict[int, Regs] = {}
    for function, index, eax, ebx, ecx, edx in entries:
        if index == 0:
            leaves[function] = (eax, ebx, ecx, edx)
    top = leaves.get(HV_VENDOR_AND_MAX)
    nested = leaves.get(HV_NESTED_FEATURES)
    return HostHvCpuid(
        signature=signature_of(top) if top else None,
        max_leaf=top[0] if top else None,
        flags=flags_from_leaves(leaves),
        evmcs_versions=evmcs_versions(nested[0]) if nested else None,
    )


def supported_hv_flags(
    entries: Iterable[tuple[int, int, int, int, int, int]] | None,
) -> frozenset[str] | None:
    """The ``hv_supported`` input of enlightenments.host_support; None when there are no entries."""
    if entries is None:
        return None
    return decode_supported_hv_cpuid(entries).flags


# --- L1 side: the in-L1 dumper's output ------------------------------------------------------

_HEX = r"0x([0-9a-fA-F]{1,8})"
_LINE = re.compile(rf"^{_HEX} {_HEX}: eax={_HEX} ebx={_HEX} ecx={_HEX} edx={_HEX}$")


def parse_cpuid_dump(text: str) -> tuple[dict[tuple[int, int], Regs], bool]:
    """Parse dumper output into {(leaf, subleaf): regs} and whether the ``# end`` line was seen.

    Raises ValueError naming the line for anything that is neither a comment nor a CPUID line,
    and for a leaf printed twice (a dumper bug, not something to guess around).
    """
    out: dict[tuple[int, int], Regs] = {}
    complete = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            complete = complete or line == "# end"
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"cpuid dump line {n}: not '<leaf> <subleaf>: eax=.. ebx=.. ecx=.. "
                             f"edx=..': {line!r}")
        leaf, sub, eax, ebx, ecx, edx = (int(g, 16) for g in m.groups())
        if (leaf, sub) in out:
            raise ValueError(f"cpuid dump line {n}: leaf {leaf:#010x}/{sub:#x} printed twice")
        out[(leaf, sub)] = (eax, ebx, ecx, edx)
    return out, complete


def format_cpuid_line(leaf: int, subleaf: int, regs: Regs) -> str:
    """One dump line, exactly as the dumper prints it (used to build expectations and tests)."""
    eax, ebx, ecx, edx = regs
    return (f"0x{leaf:08x} 0x{subleaf:08x}: eax=0x{eax:08x} ebx=0x{ebx:08x} "
            f"ecx=0x{ecx:08x} edx=0x{edx:08x}")


@dataclass(frozen=True)
class L1HvView:
    """The hypervisor L1 sees, decoded from its own CPUID."""

    hypervisor_bit: bool | None  # CPUID.1:ECX[31]; None when leaf 1 was not dumped
    signature: str | None  # raw 12 chars at 0x40000000 (NULs kept); None: no hypervisor range
    max_leaf: int | None  # 0x40000000.EAX when it is a valid hypervisor-range leaf
    hyperv: bool  # 0x40000001.EAX is "Hv#1": the Hyper-V interface is offered
    features: frozenset[str]  # QEMU hv-* flags whose bits L1 sees (only when hyperv)
    evmcs_versions: tuple[int, int] | None  # from 0x4000000A when within max_leaf
    spinlocks: int | None  # 0x40000004.EBX when hyperv
    kvm_leaves_at: int | None  # 0x40000000 or 0x40000100 where "KVMKVMKVM" was found
    complete: bool  # the dump ended with "# end"

    @property
    def vendor(self) -> str | None:
        """Signature without its NUL padding ("Microsoft Hv", "KVMKVMKVM", "TCGTCGTCGTCG")."""
        return self.signature.rstrip("\0") if self.signature is not None else None


def decode_l1_cpuid(text: str) -> L1HvView:
    """Decode the in-L1 dumper's output (see the module docstring for its format).

    Leaves above 0x40000000.EAX are ignored: on Intel (and under QEMU TCG, seen here) an
    out-of-range leaf answers with the highest basic leaf's data, which would otherwise decode
    as random features.
    """
    raw, complete = parse_cpuid_dump(text)
    leaves = {leaf: regs for (leaf, sub), regs in raw.items() if sub == 0}

    leaf1 = leaves.get(1)
    hypervisor_bit = bool(leaf1[2] & _bit(31)) if leaf1 else None

    top = leaves.get(HV_VENDOR_AND_MAX)
    signature = max_leaf = None
    if top and HV_VENDOR_AND_MAX <= top[0] <= 0x400000FF and hypervisor_bit is not False:
        signature, max_leaf = signature_of(top), top[0]

    in_range = {
        leaf: regs for leaf, regs in leaves.items()
        if max_leaf is not None and HV_VENDOR_AND_MAX <= leaf <= max_leaf
    }
    iface = in_range.get(HV_INTERFACE)
    hyperv = bool(iface and iface[0] == HV_INTERFACE_SIGNATURE)

    # With Hyper-V leaves on, QEMU moves KVM's own leaves up to 0x40000100.
    kvm_at = None
    nxt = leaves.get(KVM_SIGNATURE_NEXT)
    if signature == KVM_SIGNATURE:
        kvm_at = HV_VENDOR_AND_MAX
    elif nxt and signature_of(nxt) == KVM_SIGNATURE:
        kvm_at = KVM_SIGNATURE_NEXT

    nested = in_range.get(HV_NESTED_FEATURES) if hyperv else None
    enlight = in_range.get(HV_ENLIGHTENMENT_INFO) if hyperv else None
    return L1HvView(
        hypervisor_bit=hypervisor_bit,
        signature=signature,
        max_leaf=max_leaf,
        hyperv=hyperv,
        features=flags_from_leaves(in_range) if hyperv else frozenset(),
        evmcs_versions=evmcs_versions(nested[0]) if nested else None,
        spinlocks=enlight[1] if enlight else None,
        kvm_leaves_at=kvm_at,
        complete=complete,
    )
