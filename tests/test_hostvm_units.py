"""The host VM's pieces on their own: image keying, the init and job scripts, argument
pass-through, result read-back, the nested-trace evidence (with cases where it must fail)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.hostvm import evidence
from harness.hostvm.files import with_parents_links
from harness.hostvm.image import selection_key, stage_files
from harness.hostvm.initramfs import render_init
from harness.hostvm.job import INNER_OUT, render_job
from harness.hostvm.run import (
    inner_args,
    inner_path,
    inner_refused,
    matrix_bound,
    variant_count,
)
from harness.hostvm.vm import (
    MIN_MEM_MIB,
    HostVmSpec,
    Outcome,
    check_spec,
    make_exchange,
    parse_event,
    qemu_argv,
    read_results,
)


def test_selection_key_follows_size_mtime_and_link_target(tmp_path: Path):
    a = tmp_path / "a"
    a.write_text("one")
    link = tmp_path / "l"
    link.symlink_to("a")
    k0 = selection_key([a, link])
    assert selection_key([a, link]) == k0
    os.utime(a, ns=(1, 2))
    k1 = selection_key([a, link])
    assert k1 != k0
    a.write_text("three")
    os.utime(a, ns=(1, 2))
    assert selection_key([a, link]) != k1  # same mtime, other size
    link.unlink()
    link.symlink_to("b")
    assert selection_key([a, link]) != k1


def test_staging_keeps_host_paths_through_symlinked_dirs(tmp_path: Path):
    real = tmp_path / "usr" / "lib"
    real.mkdir(parents=True)
    (real / "libx.so").write_text("x")
    (tmp_path / "lib").symlink_to("usr/lib")
    chosen = with_parents_links([tmp_path / "lib" / "libx.so"])
    assert tmp_path / "lib" in chosen and real / "libx.so" in chosen
    stage = tmp_path / "stage"
    n, size = stage_files(sorted(chosen), stage)
    inside = stage / str(tmp_path).lstrip("/")
    assert (inside / "lib").is_symlink() and (inside / "lib" / "libx.so").read_text() == "x"
    assert n == 2 and size == 1


def test_init_loads_kvm_amd_with_nesting_and_reads_only_the_job_blocks():
    text = render_init(["irqbypass", "kvm", "kvm_amd", "virtio_blk"], beat_s=3)
    assert "for m in irqbypass kvm kvm_amd virtio_blk; do" in text
    assert 'args="nested=1 $(sed' in text and "nestvirt.kvm_amd=" in text and "sleep 3" in text
    assert "nestvirt.job_blocks" in text and "count=${blocks:-0}" in text
    assert "fail no-svm" in text and "poweroff -f" in text


def test_job_runs_this_interpreter_with_quoted_args_and_puts_mtimes_back():
    job = render_job(["run", "--accel", "kvm", "--out", INNER_OUT, "x; reboot"],
                     mtimes={"/a b": 1_700_000_000_123_456_789})
    assert "'x; reboot'" in job
    assert "/usr/bin/touch -m -h -d @1700000000.123456789 '/a b'" in job
    assert "kvm_nested_vmenter" in job and "trace_pipe" in job and "echo global >" in job
    assert "export NESTVIRT_RESET_REGISTERS=1" in job
    assert "trace_pipe" not in render_job(["doctor"], trace=False)


def test_inner_args_drop_the_outer_options():
    got = inner_args(["migrate-nested", "--in-hostvm", "--out", "/r", "--hostvm-mem=4096",
                      "--accel", "kvm", "--compression", "none", "--repeat", "3"])
    assert got == ["migrate-nested", "--compression", "none", "--repeat", "3"]
    assert inner_path(f"{INNER_OUT}/migrate-nested_none", Path("/h/inner")) == \
        "/h/inner/migrate-nested_none"


def test_the_deadline_grows_with_the_variants():
    assert variant_count(["migrate-nested", "--compression", "none"]) == 1
    assert variant_count(["migrate-nested", "--compression", "none", "--repeat", "10"]) == 10
    assert variant_count(["a", "b"]) == 10 and variant_count([]) == 11
    from harness.hostvm.run import BOOT_BOUND_S, SCENARIO_BOUND_S, VARIANT_BOUND_S, run_bound

    assert run_bound(["migrate-nested", "--compression", "none"]) == \
        BOOT_BOUND_S + VARIANT_BOUND_S
    # a long scenario gets its own bound, once per mode and repeat
    assert run_bound(["dirty-limit", "migrate-plain", "--compression=none", "--repeat", "2"]) \
        == BOOT_BOUND_S + 2 * (SCENARIO_BOUND_S["dirty-limit"] + VARIANT_BOUND_S)


def test_inner_args_drop_what_the_outer_selftest_resolved():
    got = inner_args(["--in-hostvm", "--filter", "state_test", "--selftests=/x", "--on", "l1",
                      "--hostvm-smp", "2", "--timeout", "30"],
                     drop_valued=("--selftests", "--filter", "--timeout"))
    assert got == ["--on", "l1"]


def test_hardware_labels_become_emulated_in_the_host_vm():
    from harness.hostvm.run import HOSTVM_LABEL, label_emulated

    tcg = "emulated (TCG): x"
    doc = {"label": None, "figures": [{"label": None, "cycles": 5}, {"label": tcg}],
           "savings": [{"label": ""}], "other": {"deep": [{"label": None}]}}
    assert label_emulated(doc) == 4
    assert doc["label"] == HOSTVM_LABEL and doc["figures"][0]["label"] == HOSTVM_LABEL
    assert doc["figures"][1]["label"] == tcg  # a label that says something stays
    assert doc["savings"][0]["label"] == HOSTVM_LABEL
    assert label_emulated({"cycles": 1}) == 0


def _spec(tmp_path: Path, **kw) -> HostVmSpec:
    from harness.guest.kernel import Kernel
    from harness.hostvm.image import RootImage

    k = Kernel(tmp_path / "vmlinuz", tmp_path, "6.1", "test")
    return HostVmSpec(qemu="q", qemu_version="10.0.2", module_dir="", firmware_dirs=(),
                      kernel=k, initramfs=tmp_path / "i", image=RootImage(tmp_path, "k", 1, 1),
                      **kw)


def test_bad_host_vm_shapes_are_refused(tmp_path: Path):
    check_spec(_spec(tmp_path))
    with pytest.raises(UsageError, match="at least"):
        check_spec(_spec(tmp_path, mem_mib=MIN_MEM_MIB - 1))
    with pytest.raises(UsageError, match="SVM is turned off"):
        check_spec(_spec(tmp_path, cpu="max,-svm"))
    with pytest.raises(UsageError, match="one of single, multi"):
        check_spec(_spec(tmp_path, tcg_thread="many"))
    check_spec(_spec(tmp_path, kvm_amd=("vls=0", "vgif=0")))
    for bad in ("vls", "vls=no", "sev=1", "npt=0;reboot"):
        with pytest.raises(UsageError, match="--hostvm-kvm-amd"):
            check_spec(_spec(tmp_path, kvm_amd=(bad,)))


def test_tcg_threading_and_npt_reach_the_outer_qemu(tmp_path: Path):
    argv = qemu_argv(_spec(tmp_path), tmp_path, tmp_path / "x", 1)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert "nestvirt.kvm_amd" not in argv[argv.index("-append") + 1]
    argv = qemu_argv(_spec(tmp_path, tcg_thread="single", npt=False), tmp_path, tmp_path / "x", 1)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert argv[argv.index("-append") + 1].endswith(" nestvirt.kvm_amd=npt=0")
    assert _spec(tmp_path, npt=False).to_json()["npt"] is False
    argv = qemu_argv(_spec(tmp_path, npt=False, kvm_amd=("vls=0", "vgif=0")), tmp_path,
                     tmp_path / "x", 1)
    assert argv[argv.index("-append") + 1].endswith(" nestvirt.kvm_amd=npt=0,vls=0,vgif=0")


def test_an_inner_command_that_did_not_run_is_an_error_with_its_line():
    """Seen: selftest --in-hostvm's inner run exited 2 (a program missing in the image) after
    writing an empty results.json, and the outer run said "no scenarios", exit 0."""
    console = ["[1/12] cpuid_test ...", "nestvirt: error: program not found: dmesg",
               "[   17.25] reboot: Power down"]
    r = inner_refused(Outcome("ok", job_rc=2), "selftest", console)
    assert r.verdict == "error"
    assert r.reason == "the inner selftest exited 2: nestvirt: error: program not found: dmesg"
    assert "without an error line" in inner_refused(Outcome("ok", job_rc=130), "run", []).reason


def test_exchange_round_trip_and_escapes_refused(tmp_path: Path):
    disk = tmp_path / "x.raw"
    blocks = make_exchange(disk, {"job.sh": "echo hi\n"})
    assert 1 <= blocks <= 20 and disk.stat().st_size > blocks * 512
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("./run/results.json", b"{}"), ("../evil", b"x"), ("/abs", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    disk.write_bytes(buf.getvalue() + b"\0" * 4096)
    got = read_results(disk, tmp_path / "back")
    assert got == ["run/results.json"]
    assert not (tmp_path / "evil").exists() and (tmp_path / "back/run/results.json").exists()


def test_events_parse():
    assert parse_event("NESTVIRT-HOSTVM kvm svm=yes nested=1") == \
        {"event": "kvm", "svm": "yes", "nested": "1"}
    assert parse_event("[ 1.0] kernel line") is None


def _transcript(pid: int, cmd: str = "qmp_capabilities") -> list[str]:
    """A QMP transcript as Machine writes it: the "connected" record with the pid, then traffic
    (one command naming "connected" in its text, which is not a record of it)."""
    return [json.dumps({"t": 0.1, "dir": "connected", "msg": {"argv": ["qemu"], "pid": pid}}),
            json.dumps({"t": 0.2, "dir": "->", "msg": {"execute": cmd, "arguments": {
                "note": "connected"}}})]


def _roles(*qemus: tuple[str, int]) -> dict[int, tuple[str, str]]:
    return evidence.qemu_roles((path, _transcript(pid)) for path, pid in qemus)


PIDS = _roles(("/results/run/migrate-nested_none/src-qmp.jsonl", 100),
              ("/results/run/migrate-nested_none/dst-qmp.jsonl", 200),
              ("/results/run/migrate-nested_none/probe-qmp.jsonl", 300))
VDIR = "/results/run/migrate-nested_none"


def _ev(tgid: int, ts: float, enter: bool) -> str:
    name = "kvm_nested_vmenter: rip: 0x1" if enter else "kvm_nested_vmexit_inject: reason: io"
    return f"  CPU 0/KVM-{tgid + 1}    (  {tgid}) [000] .....   {ts:.6f}: {name}"


def test_qemus_are_known_by_their_transcripts_pid():
    assert PIDS == {100: ("/results/run/migrate-nested_none", "src"),
                    200: ("/results/run/migrate-nested_none", "dst")}
    # A relaunched destination adds a record: both pids are its; a torn line is skipped.
    lines = [*_transcript(200), "{\"dir\": \"connected\", torn", *_transcript(201)]
    assert evidence.qemu_roles([("/r/v/dst-qmp.jsonl", lines)]) == {200: ("/r/v", "dst"),
                                                                   201: ("/r/v", "dst")}


def test_trace_says_the_stop_caught_guest_mode_and_l2_ran_on():
    trace = [_ev(100, 1.0, True), _ev(100, 1.1, False), _ev(100, 1.2, True),  # stop in L2
             _ev(200, 2.0, True), _ev(200, 2.1, False)]
    s = evidence.by_variant(trace, PIDS)[VDIR]
    assert s["src"]["ended_in_guest_mode"] and not s["dst"]["began_in_guest_mode"]
    c = evidence.nested_state_check(s)
    assert c.ok and "stopped in guest mode" in c.detail and "began with a VMRUN" in c.detail
    outside = [_ev(100, 1.0, True), _ev(100, 1.1, False), _ev(200, 2.0, True)]
    c = evidence.nested_state_check(evidence.by_variant(outside, PIDS)[VDIR])
    assert c.ok and "in L1" in c.detail


def test_each_repeat_gets_its_own_trace():
    # --repeat nests RUN/<variant>_<i>/<variant>/: the same last part for every repeat. Each
    # repeat's result must get its own QEMUs' events, not one repeat's for all.
    pids = _roles(*((f"/results/run/migrate-nested_none_{i}/migrate-nested_none/{role}-qmp.jsonl",
                     p) for i, p, role in ((1, 100, "src"), (1, 200, "dst"), (2, 300, "src"),
                                           (2, 400, "dst"))))
    trace = [_ev(100, 1.0, True), _ev(200, 2.0, False), _ev(200, 2.1, True),  # 1: guest mode
             _ev(300, 3.0, True), _ev(300, 3.1, False), _ev(400, 4.0, True)]  # 2: in L1
    got = evidence.by_variant(trace, pids)
    one, two = (got[f"/results/run/migrate-nested_none_{i}/migrate-nested_none"] for i in (1, 2))
    assert one["src"]["ended_in_guest_mode"] and one["dst"]["began_in_guest_mode"]
    assert not two["src"]["ended_in_guest_mode"] and not two["dst"]["began_in_guest_mode"]


def test_trace_check_fails_when_l2_did_not_run_on_or_there_is_no_trace():
    dead = [_ev(100, 1.0, True), _ev(100, 1.1, False)]
    c = evidence.nested_state_check(evidence.by_variant(dead, PIDS)[VDIR])
    assert not c.ok and "destination none" in c.detail
    assert not evidence.nested_state_check(None).ok
    assert not evidence.nested_state_check(evidence.by_variant([], PIDS).get("x")).ok


def test_dirty_limit_judgements_can_fail():
    from harness.bench import dirtylimit as dl

    lines = ["10.0 0", "11.0 1048576", "12.0 3145728", "junk", "13.0 3145728"]
    assert dl.rate_between(lines, 10.0, 12.0) == 1.5
    assert dl.rate_between(lines, 12.5, 12.9) is None
    ring = {"mode": "dirty-ring", "dirty-rate": 9,
            "vcpu-dirty-rate": [{"id": 0, "dirty-rate": 5}, {"id": 1, "dirty-rate": 4}]}
    assert dl.dirty_ring_check(ring, 2).ok
    assert not dl.dirty_ring_check({**ring, "mode": "page-sampling"}, 2).ok
    assert not dl.dirty_ring_check(ring, 4).ok  # one rate per vCPU or it fails
    assert dl.vcpu_limit_check({"before": 100.0, "limited": 10.0}, ring, 3).ok
    assert not dl.vcpu_limit_check({"before": 100.0, "limited": 90.0}, ring, 3).ok
    assert not dl.vcpu_limit_check({"before": None, "limited": 1.0}, ring, 3).ok
    g = {k: {"before": 9.0, "during": 3.0, "after": 9.0} for k in ("write_mib_s", "read_mib_s")}
    rows = [{"policy": p, "guest": g} for p in (dl.BASELINE, *dl.POLICIES)]
    assert dl.progress_check(rows).ok
    assert not dl.progress_check(rows[:1]).ok
    assert not dl.progress_check([{**rows[0], "guest": {**g, "read_mib_s": {
        "before": 9.0, "during": None, "after": 9.0}}}, rows[1]]).ok
    assert not dl.progress_check([{**rows[0], "guest": {**g, "write_mib_s": {
        "before": 9.0, "during": 0.0, "after": 9.0}}}, rows[1]]).ok
    assert not dl.progress_check([{"policy": "dirty-limit"}, *rows[1:]]).ok
    base = {"policy": dl.BASELINE, "status": "timeout", "converged": False, "seconds": 40}
    assert dl.outruns_check(base).ok
    assert not dl.outruns_check({**base, "status": "completed", "converged": True}).ok
    assert not dl.outruns_check({**base, "status": "source-died"}).ok


def test_a_dirty_limit_row_is_excused_only_by_qemus_own_dead_band():
    from harness.bench import dirtylimit as dl

    # The row of 2026-12-03 in the host VM: quota 2, QEMU read vCPU 0 at 19, slept none.
    row = {"policy": "dirty-limit", "status": "timeout", "converged": False, "seconds": 150.8,
           "cap_mib_s": 6, "vcpu_dirty_limit_mb_s": 2,
           "throttle": {"dirty_limit_throttle_time_per_round_us_max": 0},
           "limit_after_cancel": [{"cpu-index": 0, "limit-rate": 2, "current-rate": 19},
                                  {"cpu-index": 1, "limit-rate": 2, "current-rate": 3}]}
    c = dl.dead_band_check(row, 13.4)
    assert c is not None and c.ok and c.name == "dirty-limit-in-dead-band"
    assert "[19, 3]" in c.detail and "below 27 MB/s" in c.detail
    # Each deliberately broken case falls back to migration-completed (which fails the row):
    above = [{"cpu-index": 0, "limit-rate": 2, "current-rate": 40}]
    for broken in ({**row, "limit_after_cancel": above},       # a rate QEMU should have slept
                   {**row, "throttle": {"dirty_limit_throttle_time_per_round_us_max": 800}},
                   {**row, "throttle": {}},                     # no reading of its sleep
                   {**row, "limit_after_cancel": []},           # no reading of its rates
                   {**row, "cap_mib_s": 40},                    # a cap dirty limit could beat
                   {**row, "converged": True, "status": "completed"}):
        assert dl.dead_band_check(broken, 13.4) is None, broken


def test_guest_rates_read_both_columns_in_three_windows():
    from harness.bench import dirtylimit as dl

    mib = 2**20
    # writes at 4 MiB/s, then 1 during [10, 14], then 4 again; reads at 8 throughout
    lines, w, r = [], 0, 0
    for i in range(0, 201):
        t = i / 10
        lines.append(f"{t:.1f} {w} {r}")
        w += (mib // 10) if 10 <= t < 14 else (4 * mib // 10)
        r += 8 * mib // 10
    g = dl.guest_rates(lines, 10.0, 14.0, span=4)
    assert g["write_mib_s"] == {"before": 4.0, "during": 1.0, "after": 4.0}
    assert g["read_mib_s"] == {"before": 8.0, "during": 8.0, "after": 8.0}
    two = [" ".join(ln.split()[:2]) for ln in lines]  # no readers: no read column
    assert dl.guest_rates(two, 10.0, 14.0)["read_mib_s"]["during"] is None


def test_throttle_seen_keeps_the_most_after_the_last_migrate_only():
    import json

    from harness.bench import dirtylimit as dl

    def rec(d, msg):
        return json.dumps({"t": 1.0, "dir": d, "msg": msg})

    old = [rec("->", {"execute": "migrate"}),
           rec("<-", {"return": {"status": "active", "cpu-throttle-percentage": 99}})]
    new = [rec("->", {"execute": "migrate", "arguments": {}}),
           rec("<-", {"return": {"status": "active"}}),
           rec("<-", {"return": {"status": "active", "cpu-throttle-percentage": 20}}),
           "{broken", rec("<-", {"return": {}}),
           rec("<-", {"return": {"status": "active", "cpu-throttle-percentage": 40}}),
           rec("<-", {"return": {"status": "completed"}})]
    seen = dl.throttle_seen(old + new)
    assert seen == {"cpu_throttle_percentage_max": 40, "replies": 4}
    ac = {"policy": "auto-converge", "throttle": seen}
    assert dl.throttle_check(ac).ok
    assert not dl.throttle_check({**ac, "throttle": {"replies": 4}}).ok
    dl_row = {"policy": "dirty-limit", "throttle": dl.throttle_seen([
        rec("->", {"execute": "migrate"}),
        rec("<-", {"return": {"status": "active", "dirty-limit-throttle-time-per-round": 0,
                              "dirty-limit-ring-full-time": 0}})])}
    assert dl_row["throttle"]["dirty_limit_in_service_replies"] == 1
    assert dl.throttle_check(dl_row).ok  # reported: in service
    dl_row["throttle"] = dl.throttle_seen([rec("->", {"execute": "migrate"}),
                                           rec("<-", {"return": {"status": "active"}})])
    assert not dl.throttle_check(dl_row).ok  # never in service


def test_comparison_plan_keeps_the_cap_below_the_stream_and_the_limit_below_the_cap():
    from harness.bench import dirtylimit as dl

    assert dl.comparison_plan(40.0, 2) == (20, 5)
    assert dl.comparison_plan(12.0, 2) == (6, dl.LIMIT_FLOOR_MB)
    assert dl.comparison_plan(1.0, 2) == (dl.CAP_FLOOR_MIB, dl.LIMIT_FLOOR_MB)
    assert dl.comparison_plan(1000.0, 2)[0] == dl.CAP_CEIL_MIB
    cap, limit = dl.comparison_plan(23.0, 2)
    assert cap < 23.0 and limit * 2 < cap
    assert dl.without_nesting("host,+svm") == "host,-svm,-vmx"
    assert dl.without_nesting("max,vmx=on,+x2apic") == "max,+x2apic,-svm,-vmx"


def test_old_images_are_pruned(tmp_path: Path):
    from harness.hostvm.image import prune

    for i in range(4):
        (tmp_path / f"root-{i}.ext4").write_text("x")
        (tmp_path / f"root-{i}.files").write_text("1 1")
        os.utime(tmp_path / f"root-{i}.ext4", (i, i))
    gone = prune(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == ["root-0.ext4", "root-1.ext4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root-2.ext4", "root-2.files",
                                                           "root-3.ext4", "root-3.files"]


def test_a_matrix_run_is_bounded_by_its_files_combinations():
    from harness.matrix.files import combinations, load_matrix

    m = load_matrix(Path(__file__).resolve().parent.parent / "ci" / "hostvm-kvm.yaml")
    assert combinations(m) == 4  # 2 scenarios x 1 mode, then 1 x 1, then dirty-ring (none)
    assert matrix_bound(4) < matrix_bound(5) < matrix_bound(5, repeat=2)
    assert matrix_bound(0) == matrix_bound(1)  # never shorter than one variant
