"""The QEMU inventory: choosing binaries and machine types (pure, on recorded facts), and the real
thing: discovery, the per-binary cache, verification by starting a binary, fetch's bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.host.probe import HostFacts, q35_machine_types
from harness.matrix.files import expand_matrix, parse_matrix
from harness.qemu import inventory as inv
from harness.qemu.fetch import fetched
from harness.qemu.verify import verify
from harness.scenario.binaries import lacks, plan_qemu
from harness.vm.migration import MigrationMode

REPO = Path(__file__).resolve().parent.parent
HOSTS = Path(__file__).parent / "data" / "hosts"


def _q35(*versions: str) -> tuple[str, ...]:
    return tuple(f"pc-q35-{v}" for v in versions)


def two_binaries() -> HostFacts:
    """The recorded TCG host with a QEMU 10.0 beside its 7.2 (facts as the probe reads them:
    10.0 lacks legacy compress and has machine types up to 10.0)."""
    h = HostFacts.from_json(json.loads((HOSTS / "tcg-debian12.json").read_text()))
    old = replace(h.qemu, name="7.2.22", origin="PATH", verified="ok",
                  machine_types=_q35("2.4", "2.9", "2.10", "7.1", "7.2"),
                  default_machine="pc-q35-7.2")
    new = replace(old, binary="/cache/qemu/debian-10.0.2/root/usr/bin/qemu-system-x86_64",
                  version="10.0.2", version_tuple=(10, 0, 2), name="10.0.2", origin="fetched",
                  migration_capabilities=old.migration_capabilities - {"compress", "block"}
                  | {"dirty-limit", "mapped-ram"},
                  legacy_compress=False, module_dir="/cache/qemu/debian-10.0.2/root/mods",
                  machine_types=_q35("2.4", "2.9", "2.10", "7.1", "7.2", "9.2", "10.0"),
                  default_machine="pc-q35-10.0")
    return replace(h, qemu=new, qemus=(new, old), qemu_pin="")


# --------------------------------------------------------------------------------------------
# choosing (pure)


def test_select_by_name_version_prefix_newest_oldest_and_path():
    h = two_binaries()
    assert inv.select(h.qemus, "7.2").version == "7.2.22"
    assert inv.select(h.qemus, "10.0.2").version == "10.0.2"
    assert inv.select(h.qemus, "10").version == "10.0.2"
    assert inv.select(h.qemus, "newest").version == "10.0.2"
    assert inv.select(h.qemus, "oldest").version == "7.2.22"
    assert inv.select(h.qemus, "/usr/bin/qemu-system-x86_64").version == "7.2.22"
    assert inv.newest(h.qemus).version == "10.0.2"


def test_an_unknown_name_or_a_binary_that_failed_verification_is_refused():
    h = two_binaries()
    with pytest.raises(UsageError, match=r"--qemu 8\.2: no such QEMU here \(known: 10\.0\.2 "):
        inv.select(h.qemus, "8.2")
    broken = (replace(h.qemus[0], verified="machine none: failed to initialize module: x.so"),
              h.qemus[1])
    with pytest.raises(UsageError, match="fails its verification: machine none: failed"):
        inv.select(broken, "10.0")
    assert inv.newest(broken).version == "7.2.22"  # the default skips a broken binary


def test_machine_types_sort_as_numbers_and_the_newest_common_one_is_chosen():
    types, alias = q35_machine_types([{"name": "pc-q35-2.9"}, {"name": "pc-q35-2.10"},
                                      {"name": "pc-q35-7.2", "alias": "q35"}, {"name": "pc-i440fx-7.2"},
                                      {"name": "none"}])
    assert types == _q35("2.9", "2.10", "7.2") and alias == "pc-q35-7.2"
    old, new = two_binaries().qemus[1], two_binaries().qemus[0]
    assert inv.common_machine(old, new) == "pc-q35-7.2"
    assert inv.common_machine(replace(old, machine_types=_q35("2.9", "2.10")),
                              replace(new, machine_types=_q35("2.10", "10.0"))) == "pc-q35-2.10"
    assert inv.common_machine(replace(old, machine_types=_q35("7.2")),
                              replace(new, machine_types=_q35("10.0"))) is None


def test_default_is_the_newest_and_a_mode_it_lacks_runs_on_the_newest_that_has_it():
    h = two_binaries()
    zstd = plan_qemu(MigrationMode("multifd-zstd"), h)
    assert (zstd.src_version, zstd.dst_version, zstd.machine) == ("10.0.2", "10.0.2", "pc-q35-10.0")
    assert not zstd.pinned and not zstd.cross_version
    comp = plan_qemu(MigrationMode("compress"), h)
    assert (comp.src_version, comp.dst_version, comp.machine) == ("7.2.22", "7.2.22", "pc-q35-7.2")
    assert "compress is not in 10.0.2" in comp.why and "runs on 7.2.22" in comp.why
    old = h.qemus[1]
    assert lacks(MigrationMode("compress"), comp, old, old) is None
    # Moved to a QEMU before 9.0 under TCG for its mode, not for its lost-write bug: L1 RAM
    # off the dirty bitmap's word. Under KVM, or on the newest binary, RAM stays as specified.
    assert comp.ram_extra_kib == 8 and "lost-write" in comp.why
    assert zstd.ram_extra_kib == 0
    assert plan_qemu(MigrationMode("compress"), replace(h, accel="kvm")).ram_extra_kib == 0


def test_a_pinned_binary_is_never_swapped_and_its_skip_says_so():
    h = replace(two_binaries(), qemu_pin="--qemu 10.0")
    plan = plan_qemu(MigrationMode("compress"), h)
    assert plan.pinned and plan.src_version == "10.0.2"
    named_old = plan_qemu(MigrationMode("compress"), h, "7.2")
    assert named_old.src_version == "7.2.22" and named_old.ram_extra_kib == 0  # as it is
    why = lacks(MigrationMode("compress"), plan, h.qemu, h.qemu)
    assert why and "legacy compress is absent" in why and "not swapped" in why


def test_a_cross_version_pair_gets_the_newest_common_machine_and_needs_the_mode_on_both():
    h = two_binaries()
    up = plan_qemu(MigrationMode("none"), h, "7.2", "10.0")
    down = plan_qemu(MigrationMode("none"), h, "10.0", "7.2")
    assert (up.src_version, up.dst_version, up.machine) == ("7.2.22", "10.0.2", "pc-q35-7.2")
    assert (down.src_version, down.dst_version, down.machine) == ("10.0.2", "7.2.22", "pc-q35-7.2")
    assert up.pinned and up.cross_version
    comp = plan_qemu(MigrationMode("compress"), h, "7.2", "10.0")
    why = lacks(MigrationMode("compress"), comp, h.qemus[1], h.qemus[0])
    assert why and "the destination QEMU 10.0.2" in why
    # --dst-qemu alone: the source stays on the run's binary.
    only_dst = plan_qemu(MigrationMode("none"), h, None, "7.2")
    assert (only_dst.src_version, only_dst.dst_version) == ("10.0.2", "7.2.22")


def test_a_pair_without_a_common_machine_type_is_bad_input():
    h = two_binaries()
    odd = replace(h.qemus[1], machine_types=_q35("6.0"))
    h = replace(h, qemus=(h.qemus[0], odd))
    with pytest.raises(UsageError, match=r"no machine type in common \(10\.0\.2 has pc-q35-2\.4"):
        plan_qemu(MigrationMode("none"), h, "10.0", "7.2")
    with pytest.raises(UsageError, match="--dst-qemu 9.1: no such QEMU"):
        plan_qemu(MigrationMode("none"), h, None, "9.1")


def test_matrix_axes_name_binaries_ids_carry_them_and_impossible_pairs_are_pruned():
    h = two_binaries()
    doc = {"nestvirt_matrix": 1, "include": [
        {"scenario": "migrate-plain", "qemu": ["7.2", "10.0"], "dst_qemu": ["7.2", "10.0"],
         "compression": ["none", "compress"]},
        {"scenario": "migrate-plain", "qemu": "8.2", "compression": "none"},
        {"scenario": "migrate-nested", "compression": ["compress", "multifd-zstd"]}]}
    plan = expand_matrix(parse_matrix(doc, "inline"), h)
    ids = {p.id: p.variant for p in plan.variants}
    up = ids["migrate-plain/none+qemu=7.2+dst_qemu=10.0"].qemu
    assert up is not None and up.machine == "pc-q35-7.2" and up.dst_version == "10.0.2"
    assert "migrate-plain/compress+qemu=7.2+dst_qemu=7.2" in ids
    pruned = {p.id: p.reason for p in plan.pruned}
    assert "destination QEMU 10.0.2" in pruned["migrate-plain/compress+qemu=7.2+dst_qemu=10.0"]
    assert "no such QEMU here" in pruned["migrate-plain/none+qemu=8.2"]
    # No axis: the newest binary, and compress on the newest that has it.
    assert ids["migrate-nested/multifd-zstd"].qemu.src_version == "10.0.2"
    assert ids["migrate-nested/compress"].qemu.src_version == "7.2.22"


def test_a_version_written_as_a_yaml_number_is_bad_input():
    doc = {"nestvirt_matrix": 1, "include": [{"scenario": "migrate-plain", "qemu": 7.2}]}
    with pytest.raises(UsageError, match=r"qemu=7\.2: expected a string \(quote it: '7\.2'\)"):
        parse_matrix(doc, "inline")


def test_config_file_entries_and_their_bad_input(tmp_path: Path):
    good = tmp_path / "qemu.yaml"
    good.write_text("qemu:\n  - name: mytree\n    binary: /src/q/qemu-system-x86_64\n"
                    "    module_dir: /src/q\n    firmware_dirs: [/src/q/pc-bios]\n")
    (entry,) = inv.read_config(good)
    assert (entry.name, entry.module_dir, entry.firmware_dirs) == ("mytree", "/src/q",
                                                                   ("/src/q/pc-bios",))
    assert entry.origin == f"config:{good}"
    assert inv.read_config(tmp_path / "absent.yaml") == []
    for text, needle in (("qemu: 3\n", "expected 'qemu:'"),
                         ("qemu:\n  - name: x\n", "needs 'binary: PATH'"),
                         ("qemu:\n  - binary: /q\n    modules: /m\n", "unknown key 'modules'"),
                         ("qemu:\n  - binary: /q\n    name: newest\n", "cannot name a binary")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UsageError, match=needle):
            inv.read_config(bad)


# --------------------------------------------------------------------------------------------
# the real inventory


def nestvirt(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def fetched_10() -> inv.QemuInstall:
    for f in fetched():
        if f.binary and "10." in f.package_version:
            return inv.QemuInstall(f.binary, "fetched", "", f.module_dir, f.firmware_dirs)
    pytest.skip("no QEMU 10 fetched here (`nestvirt qemu fetch`, run by `make setup`, gets it; "
                "without network or apt it cannot)")


@pytest.mark.qemu
def test_the_inventory_probes_each_binary_once_and_caches_it(tmp_path: Path, monkeypatch):
    # A binary of its own (a wrapper of the system QEMU, from the config file), so the test
    # controls its mtime and sees the cache follow it.
    wrapper = tmp_path / "qemu-wrapped"
    wrapper.write_text("#!/bin/sh\nexec qemu-system-x86_64 \"$@\"\n")
    wrapper.chmod(0o755)
    config = tmp_path / "qemu.yaml"
    config.write_text(f"qemu:\n  - name: wrapped\n    binary: {wrapper}\n")
    monkeypatch.setenv(inv.CONFIG_ENV, str(config))
    monkeypatch.setenv("NESTVIRT_CACHE", str(tmp_path / "cache"))
    found = inv.load_inventory()
    wrapped = inv.select(found.qemus, "wrapped")
    assert wrapped.origin == f"config:{config}" and wrapped.verified == "ok"
    assert wrapped.machine_types[-1] == wrapped.default_machine and wrapped.legacy_compress in (
        True, False)
    cached = sorted((tmp_path / "cache" / "qemu-probe").glob("*.json"))
    assert cached, "nothing cached"
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = inv.load_inventory()
    assert inv.select(again.qemus, "wrapped") == wrapped
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # read, not probed again
    os.utime(wrapper, ns=(1, 1))  # the binary changed: probed again, under a new key
    inv.load_inventory()
    assert len(list((tmp_path / "cache" / "qemu-probe").glob("*.json"))) == len(cached) + 1


@pytest.mark.qemu
def test_verification_passes_a_sound_install_and_catches_a_foreign_module_dir(tmp_path: Path):
    system = verify("/usr/bin/qemu-system-x86_64") if Path("/usr/bin/qemu-system-x86_64").exists() \
        else None
    if system is not None:
        assert system.ok, system.problems
        assert system.device_types > 100
    q10 = fetched_10()
    good = verify(q10.binary, module_dir=q10.module_dir, firmware_dirs=q10.firmware_dirs,
                  expect_version="10.0.2")
    assert good.ok, good.problems
    # Its own module dir emptied: 10.0 falls back to its compiled-in one (the system's 7.2
    # modules here) and aborts when every module loads. Booting L1 would not have shown it.
    empty = tmp_path / "modules"
    empty.mkdir()
    foreign = verify(q10.binary, module_dir=str(empty), firmware_dirs=q10.firmware_dirs)
    assert not foreign.ok
    assert "failed to initialize module" in foreign.summary or "undefined symbol" in foreign.summary
    if system is not None:
        # And the other way: 10.0's module dir leaked into a 7.2 process.
        leaked = verify("/usr/bin/qemu-system-x86_64", module_dir=q10.module_dir)
        assert not leaked.ok and "module" in leaked.summary
    notqemu = verify("/bin/true")
    assert not notqemu.ok and "no QMP greeting" in notqemu.summary


@pytest.mark.qemu
def test_qemu_list_json_shows_every_binary_and_the_default():
    cp = nestvirt("qemu", "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    binaries = {q["binary"]: q for q in doc["qemus"]}
    assert doc["default"] in binaries
    newest = max(doc["qemus"], key=lambda q: q["version_tuple"])
    assert doc["default"] == newest["binary"] or os.environ.get("NESTVIRT_QEMU")
    for q in doc["qemus"]:
        assert q["machine_types"] and q["verified"] and "migration_capabilities" in q
    table = nestvirt("qemu")
    assert table.returncode == 0 and "* the default" in table.stdout


@pytest.mark.parametrize("args,needle", [
    (["run", "--qemu", "no-such-qemu"], "--qemu no-such-qemu: no such QEMU here"),
    (["run", "--qemu", "/bin/true"], "not a QEMU"),
    (["run", "--qemu", "/nonexistent/qemu"], "--qemu /nonexistent/qemu: no such file"),
    (["run", "--dst-qemu", "0.1"], "--dst-qemu 0.1: no such QEMU here"),
    (["run", "--guest-mode-retries", "-1"], "--guest-mode-retries must be 0 or more"),
    (["qemu", "fetch", "--qemu", "7.2"], "takes no --qemu"),
])
@pytest.mark.qemu
def test_bad_qemu_input_is_one_line_and_exit_2(args, needle):
    cp = nestvirt(*args)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr + cp.stdout


def test_fetch_without_network_or_apt_is_one_line_and_exit_2(tmp_path: Path):
    # Port 9 on loopback refuses at once: apt-get update fails as it does with no network.
    offline = nestvirt("qemu", "fetch", env={"NESTVIRT_CACHE": str(tmp_path / "a"),
                                             "NESTVIRT_QEMU_MIRROR": "http://127.0.0.1:9/debian"})
    assert offline.returncode == 2, offline.stderr
    (line,) = offline.stderr.strip().splitlines()
    assert "cannot read bookworm-backports from http://127.0.0.1:9/debian (no network?)" in line
    assert not list((tmp_path / "a" / "qemu").glob("debian-*")), "a half fetch was left behind"
    no_apt = nestvirt("qemu", "fetch", env={"NESTVIRT_CACHE": str(tmp_path / "b"),
                                            "PATH": str(tmp_path / "empty-path")})
    assert no_apt.returncode == 2, no_apt.stderr
    (line,) = no_apt.stderr.strip().splitlines()
    assert "apt-get not found" in line and "--qemu PATH" in line


def test_the_probe_cache_key_reads_a_directory_by_its_mtime_not_its_size(tmp_path: Path):
    # The host VM's image holds a module dir with the same mtime in another size of directory:
    # the probe made here must still be found there (else every QEMU is probed again, 6 s).
    binary, mods = tmp_path / "qemu", tmp_path / "mods"
    binary.write_bytes(b"\x7fELF")
    mods.mkdir()
    install = inv.QemuInstall(str(binary), "PATH", module_dir=str(mods))
    before = inv._cache_key(install)
    st, bst = mods.stat(), binary.stat()
    for i in range(300):  # enough entries to grow the directory past one block
        (mods / f"module-{i:04d}-with-a-long-name.so").write_bytes(b"")
    os.utime(mods, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mods.stat().st_size != st.st_size
    assert inv._cache_key(install) == before
    os.utime(mods, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # its entries changed
    assert inv._cache_key(install) != before
    os.utime(mods, ns=(st.st_atime_ns, st.st_mtime_ns))
    binary.write_bytes(b"\x7fELF rebuilt")  # a file's size still counts, its mtime kept
    os.utime(binary, ns=(bst.st_atime_ns, bst.st_mtime_ns))
    assert inv._cache_key(install) != before
