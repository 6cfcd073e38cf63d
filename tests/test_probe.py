"""Tests for the host probe: the real probe on this host, and the logic on recorded hosts."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from harness.core.errors import SetupError, StepTimeout, UsageError
from harness.host import kvmcaps, probe
from harness.host.probe import HostFacts, decide_accel, render_table

HOSTS = Path(__file__).parent / "data" / "hosts"
FIXTURES = sorted(HOSTS.glob("*.json"))

_HAVE_QEMU = bool(os.environ.get(probe.QEMU_ENV) or shutil.which(probe.QEMU_DEFAULT))
needs_qemu = pytest.mark.skipif(not _HAVE_QEMU, reason="no qemu-system-x86_64 on this host")


# --------------------------------------------------------------------------------------
# helpers


def _leftovers() -> list[str]:
    """Children of this test process (alive or zombie) and any process still using a probe
    socket directory of this process (an orphan re-parented to init). Probes of other xdist
    workers and CLI subprocesses carry their own pid and are not ours to judge."""
    found = []
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited while we looked
        # comm may contain spaces and parens: the fields after the last ")" are fixed.
        state, ppid = text.rpartition(")")[2].split()[:2]
        if "multiprocessing.resource_tracker" in cmdline:
            continue  # Python's own per-interpreter helper (started by the parallel runner tests)
        if ppid == me or f"nestvirt-probe-{me}-" in cmdline:
            found.append(f"pid {stat.parent.name} state {state}: {cmdline.strip()}")
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    assert _leftovers() == []


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _fixture(name: str) -> HostFacts:
    return HostFacts.from_json(_load(HOSTS / name))


def _rows(table: str) -> dict[str, str]:
    # render_table separates name and value by at least two spaces
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in table.splitlines())


def _fake_binary(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def host_facts() -> tuple[HostFacts, float]:
    if not _HAVE_QEMU:
        pytest.skip("no qemu-system-x86_64 on this host")
    t0 = time.monotonic()
    facts = probe.probe()
    return facts, time.monotonic() - t0


# --------------------------------------------------------------------------------------
# the real probe on this host


@needs_qemu
@pytest.mark.qemu
def test_real_probe_accel_and_reason(host_facts):
    facts, elapsed = host_facts
    assert facts.accel in ("kvm", "tcg")
    assert facts.accel_reason.startswith(facts.accel + ": ")
    assert "\n" not in facts.accel_reason
    if facts.accel == "tcg":
        assert (facts.l1_cpu, facts.l1_nested) == ("max", "svm")
        if facts.kvm.device_ok and facts.kvm.create_vm_ok:
            # This project's machines come in two kinds (both seen): QEMU -accel kvm aborts
            # ("failed to set MSR 0x10a"), or it starts but the CPU offers no vmx/svm. Either
            # way the reason must say which, and TCG is the answer.
            assert facts.qemu.accel_kvm_tried
            if facts.qemu.accel_kvm_ok:
                assert "neither vmx nor svm" in facts.accel_reason
            else:
                assert facts.qemu.accel_kvm_error
                assert "QEMU -accel kvm fails: " + facts.qemu.accel_kvm_error in facts.accel_reason
                # A QEMU that aborts is noticed at once, not after the start timeout.
                assert elapsed < probe.KVM_START_TIMEOUT_S
    else:
        assert facts.l1_cpu in ("host,+vmx", "host,+svm")
        assert facts.qemu.accel_kvm_ok
    assert facts.vendor in ("intel", "amd", "other")
    assert facts.host_kernel == os.uname().release
    assert set(facts.kvm.caps) == set(kvmcaps.CAP_NAMES)


@needs_qemu
@pytest.mark.qemu
def test_real_probe_reads_the_qmp_schema(host_facts):
    q = host_facts[0].qemu
    assert os.path.isabs(q.binary)
    assert q.version == ".".join(map(str, q.version_tuple))
    assert q.multifd_compression >= {"none", "zlib", "zstd"}
    assert {"multifd", "xbzrle", "postcopy-ram"} <= q.migration_capabilities
    assert {"multifd-channels", "multifd-compression"} <= q.migration_parameters
    assert {"migrate", "migrate-set-capabilities", "query-kvm"} <= q.commands
    assert q.legacy_compress == ("compress" in q.migration_capabilities)
    if q.version_tuple < (9, 1):
        assert q.legacy_compress
    if q.version_tuple[:2] == (7, 2):
        # Documented "since 7.2" but only merged in 8.0: the schema is the truth.
        assert "query-migrationthreads" not in q.commands
        assert "dirty-limit" not in q.migration_capabilities
    assert {"hv-evmcs", "hv-vapic", "hv-vpindex", "hv-synic"} <= q.hv_props
    assert all(p.startswith("hv-") for p in q.hv_props)


@needs_qemu
@pytest.mark.qemu
def test_real_probe_round_trips_through_json(host_facts):
    facts = host_facts[0]
    data = json.loads(json.dumps(facts.to_json()))
    assert HostFacts.from_json(data) == facts


@needs_qemu
@pytest.mark.qemu
def test_accel_kvm_is_an_error_not_a_fallback(host_facts):
    facts = host_facts[0]
    if facts.accel == "kvm":
        pytest.skip(f"this host runs KVM ({facts.accel_reason})")
    with pytest.raises(UsageError, match=r"^--accel kvm: ") as e:
        probe.probe("kvm")
    assert str(e.value) == "--accel kvm: " + facts.accel_reason.removeprefix("tcg: ")


@needs_qemu
@pytest.mark.qemu
def test_accel_tcg_forces_tcg_without_starting_kvm():
    facts = probe.probe("tcg")
    assert (facts.accel, facts.accel_reason) == ("tcg", "tcg: requested")
    assert (facts.l1_cpu, facts.l1_nested) == ("max", "svm")
    assert not facts.qemu.accel_kvm_tried
    assert facts.qemu.accel_kvm_error == "not tried: tcg requested"


@needs_qemu
@pytest.mark.qemu
def test_kvm_qemu_that_never_answers_is_bounded_and_reaped(tmp_path, monkeypatch):
    real = probe.resolve_qemu()
    # Plays real QEMU for the schema, but hangs for the KVM start.
    wrapper = _fake_binary(tmp_path, "qemu-kvm-hangs",
                           f'case "$*" in *"-accel kvm"*) exec sleep 60;; esac\n'
                           f'exec {real} "$@"')
    monkeypatch.setattr(probe, "KVM_START_TIMEOUT_S", 0.5)
    facts = probe.probe(qemu_binary=wrapper)
    if not (facts.kvm.device_ok and facts.kvm.create_vm_ok):
        pytest.skip(f"/dev/kvm {facts.kvm.reason}: the KVM start is not attempted")
    assert facts.accel == "tcg"
    assert facts.accel_reason.endswith("QEMU -accel kvm fails: QMP did not answer within 0.5s")


def test_unknown_accel_is_a_usage_error():
    with pytest.raises(UsageError, match="--accel hvf"):
        probe.probe("hvf")


# --------------------------------------------------------------------------------------
# QEMU binary resolution and failures


def test_missing_qemu_binary_argument(tmp_path):
    with pytest.raises(SetupError, match=r"^QEMU not found: .*nope \(given\)"):
        probe.probe(qemu_binary=str(tmp_path / "nope"))


def test_missing_qemu_binary_env(tmp_path, monkeypatch):
    monkeypatch.setenv(probe.QEMU_ENV, str(tmp_path / "nope"))
    with pytest.raises(SetupError, match=r"\$NESTVIRT_QEMU"):
        probe.probe()


def test_missing_qemu_binary_on_path(tmp_path, monkeypatch):
    monkeypatch.delenv(probe.QEMU_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SetupError, match=r"qemu-system-x86_64 \(PATH\)"):
        probe.probe()


def test_binary_resolution_order(tmp_path, monkeypatch):
    arg = _fake_binary(tmp_path, "from-arg", "exit 0")
    env = _fake_binary(tmp_path, "from-env", "exit 0")
    on_path = _fake_binary(tmp_path, probe.QEMU_DEFAULT, "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(probe.QEMU_ENV, raising=False)
    assert probe.resolve_qemu() == on_path
    monkeypatch.setenv(probe.QEMU_ENV, env)
    assert probe.resolve_qemu() == env
    assert probe.resolve_qemu(arg) == arg


def test_binary_that_is_not_qemu_reports_its_error_line(tmp_path):
    fake = _fake_binary(tmp_path, "not-qemu",
                        'echo "not-qemu: warning: ignore me" >&2\n'
                        'echo "not-qemu: error: unsupported machine" >&2\nexit 1')
    with pytest.raises(SetupError, match=r"cannot report its QMP schema: unsupported machine$"):
        probe.probe("tcg", qemu_binary=fake)


def test_binary_that_never_answers_times_out_and_is_reaped(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "SCHEMA_TIMEOUT_S", 0.3)
    hang = _fake_binary(tmp_path, "hangs", "exec sleep 60")
    t0 = time.monotonic()
    with pytest.raises(StepTimeout, match="did not answer QMP within 0.3s"):
        probe.probe("tcg", qemu_binary=hang)
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------
# recorded hosts


def test_fixtures_are_present():
    assert {p.name for p in FIXTURES} >= {
        "tcg-debian12.json", "intel-kvm-evmcs.json", "amd-kvm.json"}


# Fields added after these records were made; they read back as their defaults.
_ADDED_HOST = {"qemus": [], "qemu_pin": ""}
_ADDED_QEMU = {"name": "", "origin": "", "module_dir": "", "firmware_dirs": [],
               "machine_types": [], "default_machine": "", "verified": "", "warnings": []}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_round_trips_exactly(path):
    # The fixtures predate the inventory: an old record still reads, the new fields default.
    data = _load(path)
    facts = HostFacts.from_json(data)
    want = {k: v for k, v in data.items() if not k.startswith("_")}
    want = {**want, **_ADDED_HOST, "qemu": {**want["qemu"], **_ADDED_QEMU}}
    assert facts.to_json() == want
    assert HostFacts.from_json(json.loads(json.dumps(facts.to_json()))) == facts


def test_a_record_missing_a_required_field_still_fails_loudly():
    data = _load(FIXTURES[0])
    del data["qemu"]["version"]
    with pytest.raises(ValueError, match="missing keys"):
        HostFacts.from_json(data)
    data = _load(FIXTURES[0])
    data["qemu"]["no_such_field"] = 1
    with pytest.raises(ValueError, match="unknown keys"):
        HostFacts.from_json(data)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_accel_matches_the_decision_logic(path):
    f = HostFacts.from_json(_load(path))
    got = decide_accel("auto", f.kvm, f.qemu, has_vmx=f.cpu_flags_host_has_vmx,
                       has_svm=f.cpu_flags_host_has_svm)
    assert got == (f.accel, f.accel_reason)


def test_hand_written_fixtures_say_so():
    for name in ("intel-kvm-evmcs.json", "amd-kvm.json"):
        assert "illustrative" in _load(HOSTS / name)["_note"].lower()


def test_from_json_rejects_stale_records():
    data = _load(HOSTS / "tcg-debian12.json")
    with pytest.raises(ValueError, match="unknown keys \\['surprise'\\]"):
        HostFacts.from_json({**data, "surprise": 1})
    qemu = {k: v for k, v in data["qemu"].items() if k != "hv_props"}
    with pytest.raises(ValueError, match="QemuFacts: missing keys \\['hv_props'\\]"):
        HostFacts.from_json({**data, "qemu": qemu})


def test_intel_fixture():
    f = _fixture("intel-kvm-evmcs.json")
    assert (f.accel, f.vendor, f.l1_cpu, f.l1_nested) == ("kvm", "intel", "host,+vmx", "vmx")
    assert (f.kvm.module, f.kvm.nested_param) == ("kvm_intel", "Y")
    assert all(f.kvm.caps.values())
    assert f.qemu.multifd_compression == {"none", "zlib", "zstd", "qpl", "uadk", "qatzip"}
    assert not f.qemu.legacy_compress
    assert "hv-evmcs" in f.qemu.hv_props
    assert f.kvm.hv_cpuid and all(len(e) == 6 for e in f.kvm.hv_cpuid)


def test_amd_fixture():
    f = _fixture("amd-kvm.json")
    assert (f.accel, f.vendor, f.l1_cpu, f.l1_nested) == ("kvm", "amd", "host,+svm", "svm")
    assert (f.kvm.module, f.kvm.nested_param) == ("kvm_amd", "1")
    assert not f.kvm.caps["hyperv_enlightened_vmcs"]
    assert f.kvm.caps["nested_state"] and f.kvm.caps["exception_payload"]
    assert f.qemu.version_tuple[:2] == (8, 2) and f.qemu.legacy_compress


def test_decide_accel_on_recorded_hosts():
    tcg = _fixture("tcg-debian12.json")
    intel = _fixture("intel-kvm-evmcs.json")
    flags = {"has_vmx": True, "has_svm": False}
    assert decide_accel("kvm", intel.kvm, intel.qemu, **flags)[0] == "kvm"
    assert decide_accel("tcg", intel.kvm, intel.qemu, **flags) == ("tcg", "tcg: requested")
    with pytest.raises(UsageError, match="QEMU -accel kvm fails: failed to set MSR 0x10a"):
        decide_accel("kvm", tcg.kvm, tcg.qemu, **flags)

    no_dev = dataclasses.replace(intel.kvm, device_ok=False, create_vm_ok=False,
                                 reason="unavailable: open /dev/kvm: ENOENT (No such file)")
    assert decide_accel("auto", no_dev, intel.qemu, **flags)[1] == (
        "tcg: /dev/kvm unavailable: open /dev/kvm: ENOENT (No such file)")
    no_vm = dataclasses.replace(intel.kvm, create_vm_ok=False,
                                reason="unavailable: KVM_CREATE_VM fails: EPERM (nope)")
    assert decide_accel("auto", no_vm, intel.qemu, **flags)[1] == (
        "tcg: /dev/kvm opens but KVM_CREATE_VM fails: EPERM (nope)")
    with pytest.raises(UsageError, match="neither vmx nor svm"):
        decide_accel("kvm", intel.kvm, intel.qemu, has_vmx=False, has_svm=False)


def test_render_table_tcg_host():
    rows = _rows(render_table(_fixture("tcg-debian12.json")))
    assert rows["accel"] == "tcg"
    assert rows["why"].startswith("tcg: ") and "failed to set MSR 0x10a" in rows["why"]
    assert rows["L1 gets"] == "-cpu max (nested svm)"
    assert rows["qemu -accel kvm"] == "fails: failed to set MSR 0x10a to 0x69"
    assert rows["multifd compression"] == "none, zlib, zstd"
    assert rows["legacy compress"] == "present"
    assert rows["command query-migrationthreads"] == "no"
    assert rows["command calc-dirty-rate"] == "yes"
    assert rows["capability dirty-limit"] == "no"
    assert rows["kvm module"] == "kvm_pvm (nested param: n/a)"


def test_render_table_intel_host():
    rows = _rows(render_table(_fixture("intel-kvm-evmcs.json")))
    assert rows["accel"] == "kvm"
    assert rows["L1 gets"] == "-cpu host,+vmx (nested vmx)"
    assert rows["kvm module"] == "kvm_intel (nested param: Y)"
    assert all(rows[f"kvm cap {c}"] == "yes" for c in kvmcaps.CAP_NAMES)
    assert rows["kvm hv cpuid"] == "13 leaves"
    assert rows["qemu -accel kvm"] == "ok"
    assert rows["multifd compression"] == "none, qatzip, qpl, uadk, zlib, zstd"
    assert rows["legacy compress"] == "absent"
    assert rows["capability dirty-limit"] == "yes"
    assert rows["command query-migrationthreads"] == "yes"
    assert rows["hv-* cpu props"].endswith("(hv-evmcs: yes)")


def test_render_table_amd_host():
    rows = _rows(render_table(_fixture("amd-kvm.json")))
    assert rows["kvm cap hyperv_enlightened_vmcs"] == "no"
    assert rows["legacy compress"] == "present"
    assert rows["L1 gets"] == "-cpu host,+svm (nested svm)"


# --------------------------------------------------------------------------------------
# /dev/kvm, /proc/cpuinfo and /sys/module readers


def test_read_kvm_never_raises(tmp_path):
    missing = kvmcaps.read_kvm(str(tmp_path / "kvm"))
    assert not missing.ok and missing.reason.startswith("unavailable: open ")
    assert "ENOENT" in missing.reason
    assert set(missing.caps) == set(kvmcaps.CAP_NAMES) and not any(missing.caps.values())
    not_kvm = kvmcaps.read_kvm("/dev/null")
    assert not not_kvm.ok and not_kvm.reason.startswith("unavailable: KVM_GET_API_VERSION")


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
def test_read_kvm_on_this_host():
    dev = kvmcaps.read_kvm()
    assert set(dev.caps) == set(kvmcaps.CAP_NAMES)
    if dev.ok:
        assert dev.api_version == kvmcaps.KVM_API_VERSION
        assert dev.reason == ("ok" if dev.create_vm_ok else dev.reason)
    if dev.hv_cpuid is not None:
        assert all(len(e) == 6 for e in dev.hv_cpuid)


def test_hv_cpuid_grows_its_buffer_on_e2big(monkeypatch):
    calls = []

    def fake_ioctl(fd, request, buf, mutate=False):
        assert request == kvmcaps.KVM_GET_SUPPORTED_HV_CPUID == 0xC008AEC1
        nent = int.from_bytes(buf[:4], "little")
        calls.append(nent)
        if nent < 20:
            raise OSError(errno.E2BIG, "Argument list too long")
        buf[:4] = (2).to_bytes(4, "little")  # the kernel writes back how many it filled
        for i, (fn, eax) in enumerate([(0x40000000, 0x4000000A), (0x4000000A, 0x101)]):
            entry = kvmcaps._KvmCpuidEntry2(function=fn, index=0, eax=eax, ebx=i)
            off = 8 + i * kvmcaps._ENTRY_SIZE
            buf[off:off + kvmcaps._ENTRY_SIZE] = bytes(entry)
        return 0

    monkeypatch.setattr(kvmcaps.fcntl, "ioctl", fake_ioctl)
    assert kvmcaps._supported_hv_cpuid(-1) == (
        (0x40000000, 0, 0x4000000A, 0, 0, 0), (0x4000000A, 0, 0x101, 1, 0, 0))
    assert calls == [16, 32]


def test_cpuinfo_first_block(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n"
        "flags\t\t: fpu vmx sse2\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")
    cpu = probe._read_cpuinfo(str(cpuinfo))
    assert (cpu.vendor, cpu.model) == ("intel", "Intel(R) Xeon(R)")
    assert "vmx" in cpu.flags and "svm" not in cpu.flags
    assert probe._read_cpuinfo(str(tmp_path / "missing")).vendor == "other"


@pytest.mark.parametrize(("modules", "nested", "expected"), [
    (["kvm", "kvm_intel"], "Y\n", ("kvm_intel", "Y")),
    (["kvm", "kvm_amd"], "1\n", ("kvm_amd", "1")),
    (["kvm", "kvm_pvm"], None, ("kvm_pvm", None)),
    (["kvm"], None, ("kvm", None)),
    ([], None, (None, None)),
])
def test_kvm_module_from_sysfs(tmp_path, modules, nested, expected):
    for m in modules:
        (tmp_path / m / "parameters").mkdir(parents=True)
        if nested is not None and m.startswith("kvm_"):
            (tmp_path / m / "parameters" / "nested").write_text(nested)
    assert probe._kvm_module(tmp_path) == expected
