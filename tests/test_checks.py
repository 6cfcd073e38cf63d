"""Every integrity oracle passes a good observation and catches a broken one."""

from __future__ import annotations

from pathlib import Path

from harness.scenario import checks as ck

DATA = Path(__file__).parent / "data"


def test_migration_completed_catches_failed_status():
    assert ck.migration_completed("completed", None, "nested").ok
    bad = ck.migration_completed("failed", "Unable to write to socket", "nested")
    assert not bad.ok and "Unable to write" in bad.detail and "nested" in bad.detail


def test_dst_alive_carries_qemu_error_line():
    assert ck.dst_qemu_alive(True, "running", "running", []).ok
    dead = ck.dst_qemu_alive(False, None, "running",
                             ["qemu-system-x86_64: Failed to put registers after init: Invalid argument"])
    assert not dead.ok and "Failed to put registers" in dead.detail
    assert not ck.dst_qemu_alive(True, "paused", "running", []).ok


def test_dst_exit_without_stderr_says_how_it_ended():
    killed = ck.dst_qemu_alive(False, None, "running", [], returncode=-9)
    assert not killed.ok and "killed by signal 9" in killed.detail
    quiet = ck.dst_qemu_alive(False, None, "running", [], returncode=0, console_lines=["[ 1.0] ok"])
    assert not quiet.ok and "status 0" in quiet.detail and "console" not in quiet.detail


def test_dst_exit_after_guest_panic_carries_the_panic():
    # Recorded: L1 oopsed on stale pages after migrating; panic=-1 under -no-reboot ends QEMU
    # with status 0 and nothing on stderr, so the console is the only witness.
    console = [x for x in (DATA / "consoles" / "dst-panic-after-4-syncs.log").read_text().splitlines()
               if not x.startswith("#")]
    dead = ck.dst_qemu_alive(False, None, "running", [], returncode=0, console_lines=console)
    assert not dead.ok and "Kernel panic - not syncing" in dead.detail
    assert "BUG: unable to handle page fault" in dead.detail
    log = ck.kernel_log_clean(console)
    assert not log.ok and "BUG: unable to handle page fault" in log.detail


def test_pattern_verified():
    good = {"seq": 1, "ok": True, "pages": 128, "pass": 9, "bad": 0, "first_bad": []}
    assert ck.pattern_verified("l2-memory-pattern", good, "L2").ok
    bad = dict(good, ok=False, bad=1, first_bad=[{"page": 3, "expected": 9, "found": 94}])
    c = ck.pattern_verified("l2-memory-pattern", bad, "L2")
    assert not c.ok and "page" in c.detail
    assert not ck.pattern_verified("x", None, "L2").ok
    # A report claiming ok over zero pages verifies nothing.
    assert not ck.pattern_verified("x", dict(good, pages=0), "L2").ok


def test_l2_progress():
    assert ck.l2_progress(10, [11, 13, 15]).ok
    assert not ck.l2_progress(10, [12, 12, 12]).ok  # stalled
    assert not ck.l2_progress(10, [3, 5, 7]).ok  # went back
    assert not ck.l2_progress(None, [1, 2]).ok
    assert not ck.l2_progress(10, [11]).ok


def test_kernel_log_clean():
    clean = ["[ 5.1] virtio_net virtio0 eth0: renamed", "[ 6.0] clocksource: tsc unstable"]
    assert ck.kernel_log_clean(clean).ok
    for bad in ("[ 7.0] WARNING: CPU: 0 PID: 1 at arch/x86/kvm/x86.c:10 kvm_arch_vcpu_ioctl",
                "[ 7.0] BUG: unable to handle page fault for address: 0000",
                "[ 7.0] kvm: vcpu 0: unhandled exit reason 0x400",
                "[ 7.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks",
                "[ 8.1] list_add corruption. next->prev should be prev (ff3d), but was ff3e.",
                "[ 8.1] kernel BUG at lib/list_debug.c:27!",
                "[ 8.2] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"):
        assert not ck.kernel_log_clean([*clean, bad]).ok, bad


def test_new_log_lines():
    before = "a\nb\nc\n"
    assert ck.new_log_lines(before, "a\nb\nc\nd\ne\n") == ["d", "e"]
    # A ring buffer that wrapped: anchor on the last line seen before.
    assert ck.new_log_lines(before, "b\nc\nd\n") == ["d"]
    assert ck.new_log_lines("", "x\n") == ["x"]


def test_ram_compare_finds_the_flipped_page(tmp_path: Path):
    a = bytes(range(256)) * 16 * 64  # 64 pages
    b = bytearray(a)
    b[4096 * 37 + 5] ^= 0xFF
    (tmp_path / "s").write_bytes(a)
    (tmp_path / "d").write_bytes(bytes(b))
    (tmp_path / "same").write_bytes(a)
    same = ck.compare_ram_dumps(tmp_path / "s", tmp_path / "same")
    assert ck.ram_identical(same).ok and same.pages == 64
    diff = ck.compare_ram_dumps(tmp_path / "s", tmp_path / "d")
    c = ck.ram_identical(diff)
    assert not c.ok and diff.differing_pages == 1 and diff.first_differing == [hex(37 * 4096)]
    word = 4096 * 37
    assert diff.first_bytes == [f"{hex(word)}: src {a[word:word + 8].hex(' ')} / dst "
                                f"{bytes(b[word:word + 8]).hex(' ')}"]
    assert diff.first_bytes[0] in c.detail and "fa" in diff.first_bytes[0]  # 0x05 ^ 0xff


def test_only_kvms_wall_clock_rewrite_is_forgiven_and_only_under_kvm(tmp_path: Path):
    """The record seen in the KVM host VM (paused identity, 5 of 5 modes, 2026-12-03):
    src 04 00 00 00 03 0f 11 6b / dst 06 00 00 00 1b 0f 11 6b at a page start."""
    now = 1796280605
    src_rec = bytes.fromhex("04000000 030f116b") + (123456789).to_bytes(4, "little")
    dst_rec = bytes.fromhex("06000000 1b0f116b") + (987654321).to_bytes(4, "little")
    page = 4096 * 9

    def dumps(dst_rec: bytes, also: int | None = None) -> ck.RamComparison:
        a = bytearray(bytes(range(256)) * 16 * 16)
        b = bytearray(a)
        a[page + 64:page + 76] = src_rec
        b[page + 64:page + 76] = dst_rec
        if also is not None:
            b[also] ^= 0x01
        (tmp_path / "s").write_bytes(bytes(a))
        (tmp_path / "d").write_bytes(bytes(b))
        return ck.compare_ram_dumps(tmp_path / "s", tmp_path / "d")

    got = dumps(dst_rec)
    assert got.kvm_wall_clock == (f"{hex(page + 64)}: version 4 -> 6, sec 1796280067 -> "
                                  f"1796280091 (+24)")
    c = ck.ram_identical(got, "kvm")
    assert c.ok and "KVM's wall clock record" in c.detail and "+24" in c.detail
    assert not ck.ram_identical(got, "tcg").ok  # no KVM, no KVM write to forgive
    # One more byte of the same page, or another page, is no longer only the record.
    assert not ck.ram_identical(dumps(dst_rec, also=page + 100), "kvm").ok
    assert not ck.ram_identical(dumps(dst_rec, also=4096 * 3), "kvm").ok
    # A record mid-update (odd version), a version going back, a sec going back, a sec that is
    # no wall time, an nsec out of range: each not KVM's finished rewrite.
    for bad in ("05000000 1b0f116b", "02000000 1b0f116b", "06000000 020f116b",
                "06000000 1b000000"):
        assert not ck.kvm_wall_clock_rewrite(
            src_rec, bytes.fromhex(bad) + dst_rec[8:], 0, now), bad
    assert not ck.kvm_wall_clock_rewrite(
        src_rec, dst_rec[:8] + (10**9).to_bytes(4, "little"), 0, now)
    assert ck.kvm_wall_clock_rewrite(src_rec, dst_rec, 0, now)

def test_vcpu_identical():
    regs = "RAX=0000000000000001 RBX=0\nRIP=ffffffff81000000 RFL=00000246\nEFER=0000000000001d01\n"
    assert ck.vcpu_identical(regs, regs).ok
    c = ck.vcpu_identical(regs, regs.replace("RIP=ffffffff81000000", "RIP=ffffffff81000010"))
    assert not c.ok and "RIP" in c.detail
    assert not ck.vcpu_identical(regs, regs + "extra\n").ok
    assert not ck.vcpu_identical("", "").ok


def test_l2_starts_on_dst():
    assert ck.l2_starts_on_dst(0, "2 reports").ok
    assert not ck.l2_starts_on_dst(1, "KVM_RUN failed").ok


def test_l1_responsive_on_dst():
    assert ck.l1_responsive_on_dst(None).ok
    assert not ck.l1_responsive_on_dst("L1 command timed out after 25s").ok


def test_kernel_log_clean_names_the_first_bad_line():
    oops = ["[ 8.17] list_add corruption. next->prev should be prev", "[ 8.18] kernel BUG at x",
            "[ 8.19] Call Trace:"]
    c = ck.kernel_log_clean(oops)
    assert not c.ok and "list_add corruption" in c.detail and "3 bad line(s)" in c.detail


def test_migration_completed_names_the_destinations_own_line_on_failure():
    bad = ck.migration_completed("failed", "Cannot write to TLS channel: Input/output error",
                                 "plain", "TLS x509 authz check for O=nestvirt,CN=rogue is denied")
    assert not bad.ok and "; destination: TLS x509 authz check for O=nestvirt,CN=rogue" in bad.detail
    # A completed migration is not blamed on a line the destination printed anyway.
    assert "destination" not in ck.migration_completed("completed", None, "plain", "warning").detail


def test_source_intact_catches_a_stopped_source_a_broken_pattern_and_a_stalled_l2():
    ok = {"ok": True, "pages": 16384}
    assert ck.source_intact("running", ok, [10, 12, 15]).ok
    assert ck.source_intact("running", False, None).ok  # nothing to verify but the run state
    assert "run state paused" in ck.source_intact("paused", ok, None).detail
    bad = ck.source_intact("running", {"ok": False, "pages": 16384, "bad_pages": 3}, None)
    assert not bad.ok and "3 bad of 16384" in bad.detail
    assert not ck.source_intact("running", None, None).ok  # the workload gave no report
    assert "does not advance" in ck.source_intact("running", ok, [7, 7, 7]).detail
    assert not ck.source_intact(None, None, None, error="SSH dropped").ok


def test_retry_completed_catches_a_failed_retry():
    assert ck.retry_completed("completed", None, 1.2).ok
    bad = ck.retry_completed("failed", "Connection refused", 0.1)
    assert not bad.ok and "Connection refused" in bad.detail


def test_vcpu_motion_tells_halted_from_spinning_from_moving():
    def regs(rip: str, rfl: str, hlt: int) -> str:
        return (f"CPU#0\nRAX=0 RBX=0\nRIP={rip} RFL={rfl} [---Z-P-] CPL=0 II=0 A20=1 SMM=0 "
                f"HLT={hlt}\nCR0=80050033 CR2=0 CR3=000000000abc0000 CR4=0\nCPU#1\nRIP=dead")
    halted = ck.vcpu_motion(regs("ffffffff81000000", "00000246", 1),
                            regs("ffffffff81000000", "00000246", 1))
    assert "same RIP" in halted and "HLT=1" in halted and "IF=1" in halted
    spin = ck.vcpu_motion(regs("ffffffff81000000", "00000046", 0),
                          regs("ffffffff81000000", "00000046", 0))
    assert "same RIP" in spin and "HLT=0" in spin and "IF=0" in spin and "CR3=000000000abc0000" in spin
    moving = ck.vcpu_motion(regs("ffffffff81000000", "00000246", 0),
                            regs("ffffffff81000010", "00000246", 0))
    assert "(moving)" in moving and "dead" not in moving  # vCPU 1's lines are not vCPU 0's
    assert ck.vcpu_motion("", "") == "no vCPU registers"
