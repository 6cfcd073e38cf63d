"""Enlightenment profiles: rules, parsing, host support, -cpu rendering, migration pairing.

Pure logic on recorded facts (tests/data/hvcpuid/): no host here has VMX, so these are the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.host import enlightenments as en
from harness.host.enlightenments import Profile
from harness.host.hvcpuid import HV_FEATURE_BITS, supported_hv_flags

DATA = Path(__file__).parent / "data" / "hvcpuid"

# The rules as FACTS.md states them (QEMU target/i386/kvm/kvm.c): the table must hold exactly these.
FACTS_RULES = {
    ("hv-evmcs", "hv-vapic"),
    ("hv-synic", "hv-vpindex"),
    ("hv-stimer", "hv-synic"),
    ("hv-stimer", "hv-time"),
    ("hv-tlbflush", "hv-vpindex"),
    ("hv-ipi", "hv-vpindex"),
    ("hv-stimer-direct", "hv-stimer"),
    ("hv-tlbflush-ext", "hv-tlbflush"),
    ("hv-tlbflush-direct", "hv-vapic"),
    ("hv-syndbg", "hv-synic"),
    ("hv-syndbg", "hv-relaxed"),
}
RULE_PAIRS = sorted((flag, need) for flag, needs in en.DEPENDENCIES.items() for need in needs)

WINDOWS_FLAGS = [
    "hv-relaxed", "hv-vapic", "hv-vpindex", "hv-runtime", "hv-synic", "hv-stimer",
    "hv-stimer-direct", "hv-reset", "hv-frequencies", "hv-reenlightenment", "hv-tlbflush",
    "hv-ipi", "hv-time",
]


def closure(flag: str) -> set[str]:
    """flag plus everything it needs, transitively (VMX-independent rules)."""
    out, todo = set(), [flag]
    while todo:
        f = todo.pop()
        if f not in out:
            out.add(f)
            todo.extend(en.DEPENDENCIES.get(f, ()))
    return out


def host_entries(name: str) -> list[tuple[int, int, int, int, int, int]]:
    data = json.loads((DATA / name).read_text())
    return [tuple(int(v, 16) for v in e) for e in data["entries"]]


def qemu72_props() -> frozenset[str]:
    lines = (DATA / "qemu72_hv_props.txt").read_text().splitlines()
    return frozenset(x for x in lines if x and not x.startswith("#"))


CAPS_ALL = {"nested_state": True, "hyperv_enlightened_vmcs": True, "exception_payload": True,
            "hyperv_cpuid": True, "dirty_log_ring": True, "sys_hyperv_cpuid": True}


def support(profile: Profile, *, accel="kvm", l1_nested="vmx", caps=None,
            hv="host_kvm61_intel.json", props=None) -> str | None:
    return en.host_support(
        profile, accel=accel, l1_nested=l1_nested, caps=CAPS_ALL if caps is None else caps,
        hv_supported=supported_hv_flags(host_entries(hv)) if isinstance(hv, str) else hv,
        qemu_hv_props=qemu72_props() if props is None else props,
    )


def custom(text: str) -> Profile:
    return en.parse_hv_list(text)


# --- the rule table ------------------------------------------------------------------------


def test_rule_table_is_exactly_the_facts_rules():
    assert set(RULE_PAIRS) == FACTS_RULES


@pytest.mark.parametrize(("flag", "need"), RULE_PAIRS)
def test_each_rule_catches_its_missing_flag(flag, need):
    profile = Profile("t", flags=tuple(sorted(closure(flag) - {need})))
    line = f"{flag} needs {need} (add {need})"
    assert en.dependency_problems(profile, "svm") == [line]
    with pytest.raises(UsageError) as e:
        en.resolve_profile(None, ",".join(profile.flags), l1_nested="svm")
    assert line in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flag", sorted(en.DEPENDENCIES))
def test_flag_with_all_its_needs_is_valid(flag):
    assert en.dependency_problems(Profile("t", flags=tuple(sorted(closure(flag)))), "svm") == []


def test_rule_table_names_only_known_flags():
    for flag, need in RULE_PAIRS:
        assert {flag, need} <= en.BOOL_FLAGS
    assert set(HV_FEATURE_BITS) <= en.BOOL_FLAGS


def test_known_flags_are_exactly_qemu72_hv_props():
    assert en.KNOWN_FLAGS == qemu72_props()


def test_tlbflush_direct_on_vmx_needs_evmcs():
    p = custom("hv-vapic,hv-tlbflush-direct")
    assert en.validate(p, "intel", "vmx") == [
        "hv-tlbflush-direct on VMX needs hv-evmcs to take effect (add hv-evmcs)"]
    assert en.validate(p, "amd", "svm") == []
    assert en.validate(custom("hv-vapic,hv-evmcs,hv-tlbflush-direct"), "intel", "vmx") == []


# --- vendor rule ---------------------------------------------------------------------------


def test_evmcs_on_svm_is_a_vendor_problem():
    problems = en.validate(custom("hv-vapic,hv-evmcs"), "amd", "svm")
    assert len(problems) == 1
    assert problems[0].startswith("hv-evmcs needs Intel VMX")
    assert "svm" in problems[0] and "amd" in problems[0]
    assert en.validate(custom("hv-vapic,hv-evmcs"), "intel", "vmx") == []


def test_windows_drops_vmx_only_evmcs_on_svm_with_note():
    p = en.resolve_profile("windows", None, l1_nested="svm", vendor="amd")
    assert "hv-evmcs" not in p.flags
    assert p.vmx_only == ()
    assert any("hv-evmcs left out" in n and "svm" in n for n in p.notes)


def test_windows_gets_evmcs_on_vmx():
    p = en.resolve_profile("windows", None, l1_nested="vmx", vendor="intel")
    assert "hv-evmcs" in p.flags
    assert p.notes == ()


def test_explicit_evmcs_on_svm_is_kept_and_skipped_not_raised():
    p = en.resolve_profile("evmcs", None, l1_nested="svm", vendor="amd")
    assert "hv-evmcs" in p.flags
    reason = support(p, l1_nested="svm", hv="host_kvm61_amd.json")
    assert reason == "hv-evmcs needs KVM with VMX: L1 nesting on this host is svm; Intel hardware only"


# --- parsing -------------------------------------------------------------------------------


def test_parse_hv_list():
    p = en.parse_hv_list("hv-relaxed,hv-vapic=on,hv-spinlocks=0x1fff,hv-ipi=off")
    assert p.flags == ("hv-relaxed", "hv-vapic")
    assert p.values == (("hv-spinlocks", "0x1fff"),)
    assert p.names == {"hv-relaxed", "hv-vapic", "hv-spinlocks"}
    assert p.value("hv-spinlocks") == "0x1fff"


@pytest.mark.parametrize(("text", "message"), [
    ("hv-evcms", "unknown Hyper-V flag hv-evcms (did you mean hv-evmcs?)"),
    ("hv-relaxd", "(did you mean hv-relaxed?)"),
    ("relaxed", "'relaxed' is not an hv-* flag: write hv-NAME (did you mean hv-relaxed?)"),
    ("hv_stimer_direct", "(did you mean hv-stimer-direct?)"),
    ("hv-relaxed,hv-relaxed", "hv-relaxed given twice"),
    ("hv-relaxed=yes", "hv-relaxed is on or off"),
    ("hv-relaxed,,hv-vapic", "empty item #2"),
    ("hv-spinlocks", "hv-spinlocks needs a value"),
    ("hv-spinlocks=lots", "hv-spinlocks=lots: not a number"),
    ("hv-spinlocks=0x100000000", "out of range"),
    ("hv-vendor-id=ThirteenChars", "1 to 12 printable ASCII"),
    ("hv-no-nonarch-coresharing=maybe", "expected on, off or auto"),
    ("hv-version-id-sbranch=256", "out of range"),
])
def test_parse_rejects_with_one_line(text, message):
    with pytest.raises(UsageError) as e:
        en.parse_hv_list(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_spinlocks_canonical_hex():
    assert en.parse_hv_list("hv-spinlocks=8191").values == (("hv-spinlocks", "0x1fff"),)
    assert en.parse_hv_list("hv-vendor-id=KVM Hv").values == (("hv-vendor-id", "KVM Hv"),)


# --- profiles as data ----------------------------------------------------------------------


def test_shipped_profiles():
    profiles = en.load_profiles()
    assert {"none", "evmcs", "windows"} <= set(profiles)
    for p in profiles.values():
        assert p.description and "\n" not in p.description
    assert profiles["none"].names == frozenset()
    assert set(profiles["evmcs"].flags) == {"hv-evmcs", "hv-vapic"}
    windows = profiles["windows"]
    assert sorted(windows.flags) == sorted(WINDOWS_FLAGS)
    assert windows.values == (("hv-spinlocks", "0x1fff"),)
    assert windows.vmx_only == ("hv-evmcs",)


@pytest.mark.parametrize("nested", ["vmx", "svm"])
@pytest.mark.parametrize("name", sorted(en.load_profiles()))
def test_every_shipped_profile_resolves_cleanly(name, nested):
    p = en.resolve_profile(name, None, l1_nested=nested)
    assert en.dependency_problems(p, nested) == []


def test_get_profile_unknown_suggests():
    with pytest.raises(UsageError, match="did you mean 'windows'|did you mean windows"):
        en.get_profile("window")


def test_broken_profile_file_names_the_profile(tmp_path):
    bad = tmp_path / "profiles.json"
    bad.write_text(json.dumps({"profiles": {"oops": {"flags": ["hv-nope"]}}}))
    with pytest.raises(ValueError, match="profile oops: unknown Hyper-V flag hv-nope"):
        en.load_profiles(bad)


def test_resolve_overlay():
    p = en.resolve_profile("windows", "hv-evmcs=off,hv-crash,hv-spinlocks=0xfff", l1_nested="vmx")
    assert "hv-evmcs" not in p.flags and "hv-crash" in p.flags
    assert p.value("hv-spinlocks") == "0xfff"
    assert p.name == "windows+hv-evmcs=off,hv-crash,hv-spinlocks=0xfff"
    assert en.resolve_profile(None, None, l1_nested="svm").names == frozenset()
    assert en.resolve_profile(None, "hv-relaxed", l1_nested="svm").name == "custom"


# --- host support on recorded facts ----------------------------------------------------------


def test_tcg_host_none_supported_hv_skipped():
    none = en.get_profile("none")
    windows = en.resolve_profile("windows", None, l1_nested="svm")
    assert support(none, accel="tcg", l1_nested="svm", caps={}, hv=None) is None
    assert support(windows, accel="tcg", l1_nested="svm", caps={}, hv=None) == en.TCG_SKIP_REASON
    assert en.TCG_SKIP_REASON.startswith("Hyper-V enlightenments need -accel kvm")


def test_tcg_host_evmcs_names_vmx():
    evmcs = en.get_profile("evmcs")
    assert support(evmcs, accel="tcg", l1_nested="svm", caps={}, hv=None) == (
        "hv-evmcs needs KVM with VMX: this host runs TCG (l1 nesting is svm); Intel hardware "
        "only (TCG offers no VMX, so the KVM host VM cannot run it either)")


def test_intel_kvm_with_cap_163_and_evmcs_offered_is_supported():
    assert "hv-evmcs" in supported_hv_flags(host_entries("host_kvm61_intel.json"))
    assert support(en.get_profile("evmcs")) is None
    assert support(en.resolve_profile("windows", None, l1_nested="vmx")) is None
    assert support(en.resolve_profile("evmcs-linux", None, l1_nested="vmx")) is None


def test_intel_kvm_without_cap_163_names_the_cap():
    caps = dict(CAPS_ALL, hyperv_enlightened_vmcs=False)
    assert support(en.get_profile("evmcs"), caps=caps) == (
        "hv-evmcs needs KVM_CAP_HYPERV_ENLIGHTENED_VMCS (163), absent on this host kernel")
    assert support(en.resolve_profile("windows", None, l1_nested="svm"), caps=caps) is None


def test_qemu_lacking_a_prop_is_a_skip():
    props = qemu72_props() - {"hv-stimer-direct"}
    windows = en.resolve_profile("windows", None, l1_nested="vmx")
    assert support(windows, props=props) == "QEMU does not know hv-stimer-direct"
    props -= {"hv-ipi"}
    assert support(windows, props=props) == "QEMU does not know hv-ipi (nor hv-stimer-direct)"


def test_flag_not_offered_by_kernel_is_a_skip():
    p = custom("hv-vpindex,hv-tlbflush,hv-tlbflush-ext")
    assert support(p) == "hv-tlbflush-ext not offered by KVM_GET_SUPPORTED_HV_CPUID on this host"
    assert support(p, hv="host_kvm_mainline_intel.json") is None


def test_missing_hv_cpuid_cap_or_record_is_a_skip():
    p = custom("hv-relaxed")
    assert "KVM_CAP_HYPERV_CPUID (167)" in support(p, caps=dict(CAPS_ALL, hyperv_cpuid=False))
    assert "not recorded" in support(p, hv=None)
    assert "KVM_CAP_SYS_HYPERV_CPUID (191)" in support(
        p, hv=None, caps=dict(CAPS_ALL, sys_hyperv_cpuid=False))


def test_vcpu_ioctl_evmcs_quirk_trusts_cap_163():
    hv = supported_hv_flags(host_entries("host_kvm61_intel.json")) - {"hv-evmcs"}
    evmcs = en.get_profile("evmcs")
    assert support(evmcs, hv=hv, caps=dict(CAPS_ALL, sys_hyperv_cpuid=False)) is None
    assert support(evmcs, hv=hv) == (
        "hv-evmcs not offered by KVM_GET_SUPPORTED_HV_CPUID on this host")


# --- rendering and migration pairing ---------------------------------------------------------


def test_qemu_cpu_suffix():
    assert en.qemu_cpu_suffix(custom("hv-relaxed,hv-vapic,hv-spinlocks=0x1fff")) == (
        ",hv-relaxed=on,hv-vapic=on,hv-spinlocks=0x1fff")
    assert en.qemu_cpu_suffix(en.get_profile("none")) == ""
    linux = en.resolve_profile("evmcs-linux", None, l1_nested="vmx")
    assert en.qemu_cpu_suffix(linux) == ",hv-vapic=on,hv-vpindex=on,hv-evmcs=on,kvm=off"
    with pytest.raises(ValueError, match="resolve_profile first"):
        en.qemu_cpu_suffix(en.get_profile("windows"))


def test_same_enlightenments():
    win_vmx = en.resolve_profile("windows", None, l1_nested="vmx")
    win_svm = en.resolve_profile("windows", None, l1_nested="svm")
    assert en.same_enlightenments(win_vmx, win_vmx) is None
    line = en.same_enlightenments(win_vmx, win_svm)
    assert line.startswith("hv-evmcs differs: src has it, dst lacks it")
    assert en.same_enlightenments(win_svm, win_vmx).startswith(
        "hv-evmcs differs: dst has it, src lacks it")
    other = en.resolve_profile("windows", "hv-spinlocks=0xfff,hv-crash", l1_nested="vmx")
    assert en.same_enlightenments(win_vmx, other) == (
        "enlightenments differ between src and dst: dst-only hv-crash; "
        "hv-spinlocks 0x1fff vs 0xfff")


@pytest.mark.parametrize("extra", ["hv-passthrough", "hv-no-nonarch-coresharing=auto"])
def test_migration_blockers(extra):
    p = custom(f"hv-relaxed,{extra}")
    assert "migration blocker" in en.same_enlightenments(p, p)
    assert en.same_enlightenments(custom("hv-relaxed"), custom("hv-relaxed")) is None
