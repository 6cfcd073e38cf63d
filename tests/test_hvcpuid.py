"""Hyper-V CPUID decoding (host KVM_GET_SUPPORTED_HV_CPUID and L1's own CPUID) and its checks.

Data in tests/data/hvcpuid/: each file's _note says whether it was captured here or constructed
from documented bit positions (no host of this project has VMX).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.host import enlightenments as en
from harness.host import hvcpuid as hc
from harness.host.enlightenments import Profile
from harness.scenario import hv_checks as hvc
from harness.scenario.checks import Check

DATA = Path(__file__).parent / "data" / "hvcpuid"


def host_entries(name: str) -> list[tuple[int, int, int, int, int, int]]:
    data = json.loads((DATA / name).read_text())
    assert "_note" in data
    return [tuple(int(v, 16) for v in e) for e in data["entries"]]


def l1(name: str) -> hc.L1HvView:
    return hc.decode_l1_cpuid((DATA / name).read_text())


def log(name: str) -> str:
    """A recorded kernel log without its '# _note' header."""
    text = (DATA / name).read_text()
    return "\n".join(x for x in text.splitlines() if not x.startswith("#"))


KVM61_INTEL = {
    "hv-relaxed", "hv-vapic", "hv-time", "hv-crash", "hv-reset", "hv-vpindex", "hv-runtime",
    "hv-synic", "hv-stimer", "hv-frequencies", "hv-reenlightenment", "hv-tlbflush", "hv-evmcs",
    "hv-ipi", "hv-stimer-direct", "hv-avic", "hv-apicv", "hv-syndbg", "hv-emsr-bitmap",
    "hv-xmm-input",
}

# (flag, leaf, register, bit): TLFS positions as written in Linux hyperv-tlfs.h, stated here
# independently of harness/host/hvcpuid.py so a wrong constant there fails.
BIT_SPEC = [
    ("hv-runtime", 0x40000003, "eax", 0),
    ("hv-time", 0x40000003, "eax", 1),
    ("hv-time", 0x40000003, "eax", 9),
    ("hv-synic", 0x40000003, "eax", 2),
    ("hv-stimer", 0x40000003, "eax", 3),
    ("hv-vapic", 0x40000003, "eax", 4),
    ("hv-vpindex", 0x40000003, "eax", 6),
    ("hv-reset", 0x40000003, "eax", 7),
    ("hv-frequencies", 0x40000003, "eax", 11),
    ("hv-frequencies", 0x40000003, "edx", 8),
    ("hv-reenlightenment", 0x40000003, "eax", 13),
    ("hv-xmm-input", 0x40000003, "edx", 4),
    ("hv-crash", 0x40000003, "edx", 10),
    ("hv-syndbg", 0x40000003, "edx", 11),
    ("hv-tlbflush-ext", 0x40000003, "edx", 14),
    ("hv-stimer-direct", 0x40000003, "edx", 19),
    ("hv-tlbflush", 0x40000004, "eax", 2),
    ("hv-tlbflush", 0x40000004, "eax", 11),
    ("hv-relaxed", 0x40000004, "eax", 5),
    ("hv-avic", 0x40000004, "eax", 9),
    ("hv-ipi", 0x40000004, "eax", 10),
    ("hv-ipi", 0x40000004, "eax", 11),
    ("hv-evmcs", 0x40000004, "eax", 14),
    ("hv-tlbflush-direct", 0x4000000A, "eax", 17),
    ("hv-emsr-bitmap", 0x4000000A, "eax", 19),
]
REGS = ("eax", "ebx", "ecx", "edx")


# --- host side -----------------------------------------------------------------------------


def test_kvm61_intel():
    host = hc.decode_supported_hv_cpuid(host_entries("host_kvm61_intel.json"))
    assert host.signature == "Linux KVM Hv"
    assert host.max_leaf == 0x40000082
    assert host.flags == KVM61_INTEL
    assert host.evmcs_versions == (1, 1)


def test_kvm61_amd_has_no_evmcs():
    host = hc.decode_supported_hv_cpuid(host_entries("host_kvm61_amd.json"))
    assert host.flags == KVM61_INTEL - {"hv-evmcs"}
    assert host.evmcs_versions is None


def test_mainline_adds_tlbflush_ext_and_direct():
    flags = hc.supported_hv_flags(host_entries("host_kvm_mainline_intel.json"))
    assert flags == KVM61_INTEL | {"hv-tlbflush-ext", "hv-tlbflush-direct"}
    assert hc.supported_hv_flags(None) is None


@pytest.mark.parametrize(("flag", "leaf", "reg", "bit"), BIT_SPEC)
def test_bit_positions(flag, leaf, reg, bit):
    full = {lf: (0xFFFFFFFF,) * 4 for lf in (0x40000003, 0x40000004, 0x4000000A)}
    regs = list(full[leaf])
    regs[REGS.index(reg)] &= ~(1 << bit)
    assert flag not in hc.flags_from_leaves({**full, leaf: tuple(regs)})
    assert flag in hc.flags_from_leaves(full)


@pytest.mark.parametrize("flag", sorted({f for f, *_ in BIT_SPEC}))
def test_spec_bits_alone_are_enough(flag):
    leaves: dict[int, list[int]] = {}
    for f, leaf, reg, bit in BIT_SPEC:
        if f == flag:
            leaves.setdefault(leaf, [0, 0, 0, 0])[REGS.index(reg)] |= 1 << bit
    assert flag in hc.flags_from_leaves({k: tuple(v) for k, v in leaves.items()})


def test_bit_spec_covers_the_table():
    assert {f for f, *_ in BIT_SPEC} == set(hc.HV_FEATURE_BITS) - {"hv-apicv"}
    assert hc.HV_FEATURE_BITS["hv-apicv"] == hc.HV_FEATURE_BITS["hv-avic"]


def test_evmcs_version_range():
    assert hc.evmcs_versions(0x00080101) == (1, 1)
    assert hc.evmcs_versions(0x00000201) == (1, 2)
    assert hc.evmcs_versions(0x00080000) is None


# --- L1 side: parser -----------------------------------------------------------------------


def test_tcg_guest_recorded():
    view = l1("l1_tcg_qemu72.txt")
    assert view.vendor == "TCGTCGTCGTCG"
    assert view.max_leaf == 0x40000001
    assert view.hypervisor_bit is True
    assert not view.hyperv
    assert view.features == frozenset()  # leaves above 0x40000001 are echoes, not Hyper-V
    assert view.kvm_leaves_at is None
    assert view.complete


def test_tcg_recording_holds_exactly_the_dump_leaves():
    leaves, _ = hc.parse_cpuid_dump((DATA / "l1_tcg_qemu72.txt").read_text())
    assert [leaf for leaf, _ in leaves] == list(hc.DUMP_LEAVES)


def test_plain_kvm_guest():
    view = l1("l1_kvm_plain.txt")
    assert view.signature == "KVMKVMKVM\0\0\0"
    assert view.vendor == "KVMKVMKVM"
    assert view.max_leaf == 0x40000001
    assert not view.hyperv and view.features == frozenset()
    assert view.kvm_leaves_at == 0x40000000


def test_hyperv_enlightened_kvm_guest():
    view = l1("l1_kvm_windows_evmcs.txt")
    assert view.vendor == "Microsoft Hv"
    assert view.max_leaf == 0x4000000A
    assert view.hyperv
    assert view.features == {
        "hv-relaxed", "hv-vapic", "hv-time", "hv-reset", "hv-vpindex", "hv-runtime",
        "hv-synic", "hv-stimer", "hv-frequencies", "hv-reenlightenment", "hv-tlbflush",
        "hv-evmcs", "hv-ipi", "hv-stimer-direct",
    }
    assert view.evmcs_versions == (1, 1)
    assert view.spinlocks == 0x1FFF
    assert view.kvm_leaves_at == 0x40000100


def test_evmcs_linux_guest_hides_kvm():
    view = l1("l1_kvm_evmcs_linux.txt")
    assert view.features == {"hv-vapic", "hv-vpindex", "hv-evmcs"}
    assert view.kvm_leaves_at is None
    assert view.spinlocks == 0xFFFFFFFF


def test_format_round_trip():
    line = hc.format_cpuid_line(0x40000000, 0, (0x4000000A, 0x7263694D, 0x666F736F, 0x76482074))
    leaves, complete = hc.parse_cpuid_dump(line)
    assert leaves == {(0x40000000, 0): (0x4000000A, 0x7263694D, 0x666F736F, 0x76482074)}
    assert not complete


@pytest.mark.parametrize(("text", "message"), [
    ("0x40000000 0x0: eax=0x1 ebx=0x2 ecx=0x3\n", "line 1: not"),
    ("# hi\n\n0x40000000: eax=0x1 ebx=0x2 ecx=0x3 edx=0x4\n", "line 3: not"),
    ("0x1 0x0: eax=0x1 ebx=0x2 ecx=0x3 edx=0x4\n0x1 0x0: eax=0x1 ebx=0x2 ecx=0x3 edx=0x4\n",
     "line 2: leaf 0x00000001/0x0 printed twice"),
])
def test_parser_rejects_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        hc.parse_cpuid_dump(text)


def test_no_hypervisor_bit_means_no_hypervisor_range():
    text = "0x00000001 0x00000000: eax=0x0 ebx=0x0 ecx=0x00000000 edx=0x0\n" + \
           "0x40000000 0x00000000: eax=0x40000001 ebx=0x4b4d564b ecx=0x564b4d56 edx=0x4d\n"
    view = hc.decode_l1_cpuid(text)
    assert view.hypervisor_bit is False and view.signature is None and view.kvm_leaves_at is None


# --- checks --------------------------------------------------------------------------------


def windows_vmx() -> Profile:
    return en.resolve_profile("windows", None, l1_nested="vmx")


def test_l1_sees_enlightenments_passes():
    check = hvc.l1_sees_enlightenments(windows_vmx(), l1("l1_kvm_windows_evmcs.txt"))
    assert check.ok, check.detail
    assert check.name == "l1-sees-enlightenments"
    assert "eVMCS 1..1" in check.detail
    linux = en.resolve_profile("evmcs-linux", None, l1_nested="vmx")
    assert hvc.l1_sees_enlightenments(linux, l1("l1_kvm_evmcs_linux.txt")).ok
    assert hvc.l1_sees_enlightenments(en.get_profile("none"), l1("l1_kvm_plain.txt")).ok


def test_l1_sees_enlightenments_fails_under_tcg():
    check = hvc.l1_sees_enlightenments(windows_vmx(), l1("l1_tcg_qemu72.txt"))
    assert not check.ok
    assert "no Hyper-V interface" in check.detail and "TCGTCGTCGTCG" in check.detail


def test_l1_sees_enlightenments_fails_on_missing_flag_and_values():
    view = l1("l1_kvm_windows_evmcs.txt")
    asked = en.resolve_profile("windows", "hv-crash,hv-spinlocks=0xfff,hv-vendor-id=KVMKVM",
                               l1_nested="vmx")
    check = hvc.l1_sees_enlightenments(asked, view)
    assert not check.ok
    assert "missing hv-crash" in check.detail
    assert "hv-spinlocks=0xfff but L1 sees 0x1fff" in check.detail
    assert "hv-vendor-id=KVMKVM but L1 sees 'Microsoft Hv'" in check.detail


def test_l1_sees_enlightenments_fails_when_kvm_not_hidden():
    linux = en.resolve_profile("evmcs-linux", None, l1_nested="vmx")
    check = hvc.l1_sees_enlightenments(linux, l1("l1_kvm_windows_evmcs.txt"))
    assert not check.ok and "kvm=off asked for but KVM leaves are at 0x40000100" in check.detail


def test_l1_sees_enlightenments_fails_for_none_on_hyperv():
    check = hvc.l1_sees_enlightenments(en.get_profile("none"), l1("l1_kvm_windows_evmcs.txt"))
    assert not check.ok


def test_l1_sees_enlightenments_flags_truncated_dump():
    text = (DATA / "l1_kvm_windows_evmcs.txt").read_text().splitlines()
    cut = "\n".join(x for x in text if not x.startswith("0x4000000a") and x != "# end")
    check = hvc.l1_sees_enlightenments(windows_vmx(), hc.decode_l1_cpuid(cut))
    assert not check.ok and "truncated" in check.detail


def test_l1_uses_evmcs_passes():
    check = hvc.l1_uses_evmcs(log("dmesg_l1_evmcs_ok.txt"))
    assert check.ok and check.detail.endswith("KVM: vmx: using Hyper-V Enlightened VMCS")
    newer = "[    2.1] kvm_intel: Using Hyper-V Enlightened VMCS\n"
    assert hvc.l1_uses_evmcs(newer).ok


@pytest.mark.parametrize(("name", "why"), [
    ("dmesg_l1_kvm_chosen.txt", "kvm=off"),
    ("dmesg_l1_no_vpindex.txt", "add hv-vpindex"),
])
def test_l1_uses_evmcs_fails_with_reason(name, why):
    check = hvc.l1_uses_evmcs(log(name))
    assert not check.ok and why in check.detail


def test_l1_uses_evmcs_fails_on_empty_log():
    check = hvc.l1_uses_evmcs("")
    assert not check.ok and "whole log" in check.detail


def test_evmcs_log_clean_passes():
    assert hvc.evmcs_log_clean(log("dmesg_l1_evmcs_ok.txt")) == Check(
        "evmcs-log-clean", True, "no eVMCS warnings")


@pytest.mark.parametrize(("name", "needle"), [
    ("dmesg_l1_evmcs_warn.txt", "KVM: accessing unsupported EVMCS field 2032"),
    ("dmesg_l0_evmcs_warn.txt", "at arch/x86/kvm/vmx/evmcs.c:413"),
])
def test_evmcs_log_clean_catches_complaints(name, needle):
    check = hvc.evmcs_log_clean(log(name))
    assert not check.ok and needle in check.detail


def test_evmcs_log_clean_caps_shown_lines():
    text = "\n".join(f"KVM: accessing unsupported EVMCS field {i}" for i in range(5))
    check = hvc.evmcs_log_clean(text)
    assert not check.ok and check.detail.endswith("(+2 more)")


def test_enlightenment_checks_bundle_fails_on_garbage_and_missing_evmcs():
    from harness.host.enlightenments import get_profile
    from harness.scenario.hv_checks import enlightenment_checks

    prof = get_profile("evmcs")
    checks = enlightenment_checks(prof, "not a cpuid dump", "[ 1.0] kvm: no eVMCS here")
    names = [c.name for c in checks]
    assert names == ["l1-sees-enlightenments", "l1-uses-evmcs", "evmcs-log-clean"]
    assert not checks[0].ok and not checks[1].ok and checks[2].ok
