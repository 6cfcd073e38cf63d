"""Integrity oracles: pure functions from observations to Check(name, ok, detail).

Each one can fail, and tests/ holds a case where it does.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.guest.kernlog import bad_lines, qemu_exit_story


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict:
        return asdict(self)


def migration_completed(status: str, error: str | None, state: str,
                        dst_said: str | None = None) -> Check:
    """The source says completed. Necessary, never sufficient: the rest judge the destination.

    dst_said is the destination's own line on a failure (a TLS authz refusal is told only
    there; the source sees a bare I/O error).
    """
    ok = status == "completed"
    detail = f"source status {status}" + (f": {error}" if error else "")
    if dst_said and not ok:
        detail += f"; destination: {dst_said}"
    return Check("migration-completed", ok, detail + f" (nested state: {state})")


def source_intact(run_state: str | None, workload: dict[str, Any] | None | bool,
                  l2: list[int] | None, error: str | None = None) -> Check:
    """After a migration that did not complete, the source still runs and verifies: its run
    state is 'running', its L1 workload's own report says ok (False: no workload runs; None:
    no report came), L2 still advances (None: no L2). error: the source stopped answering
    while this was judged."""
    if error:
        return Check("source-intact", False, f"source stopped answering: {error}")
    if run_state != "running":
        return Check("source-intact", False, f"source run state {run_state}, expected running")
    parts = ["source running"]
    if workload is not False:
        w = pattern_verified("l1-workload-pattern", workload or None, "L1 workload")
        if not w.ok:
            return Check("source-intact", False, f"on the source: {w.detail}")
        parts.append(w.detail)
    if l2 is not None:
        if len(l2) < 2 or l2[-1] <= l2[0]:
            return Check("source-intact", False, f"L2 on the source does not advance: {l2}")
        parts.append(f"L2 pass {l2[0]}..{l2[-1]}")
    return Check("source-intact", True, "; ".join(parts))


def retry_completed(status: str, error: str | None, seconds: float) -> Check:
    """The same source migrated again, to a new destination, once the fault was undone."""
    ok = status == "completed"
    detail = f"retry to a new destination: {status}" + (f": {error}" if error else "")
    return Check("retry-completed", ok, detail + f" in {seconds:.1f}s")


def dst_qemu_alive(alive: bool, run_state: str | None, expected: str, error_lines: list[str],
                   returncode: int | None = None, console_lines: list[str] | None = None) -> Check:
    """Destination QEMU still runs and is in the expected run state; else say how it ended.

    QEMU's own stderr names a refused state. Without stderr, the exit status and L1's console
    tell the rest: L1 boots with panic=-1 under -no-reboot, so a guest panic ends QEMU with 0.
    """
    if not alive:
        return Check("dst-qemu-alive", False, "destination QEMU exited: "
                     + qemu_exit_story(error_lines, returncode, console_lines or []))
    if run_state != expected:
        return Check("dst-qemu-alive", False, f"destination run state {run_state}, expected {expected}")
    return Check("dst-qemu-alive", True, f"alive, {run_state}")


def l1_ssh_on_dst(ok: bool, detail: str) -> Check:
    return Check("l1-ssh-on-dst", ok, detail)


def _reg(text: str, name: str) -> str | None:
    for tok in text.replace("\n", " ").split():
        if tok.startswith(f"{name}="):
            return tok.split("=", 1)[1]
    return None


def vcpu_motion(first: str, second: str) -> str:
    """Where a silent L1's vCPU 0 is, from two 'info registers' dumps a moment apart: its RIP
    then and now, whether it is halted, and its interrupt flag (IF, RFL bit 9). A vCPU halted
    with IF=1 that never wakes lacks an interrupt; one spinning at one RIP is stuck in a
    loop; one moving on is alive but not answering."""
    a, b = first.split("CPU#1")[0], second.split("CPU#1")[0]
    rip0, rip1 = _reg(a, "RIP"), _reg(b, "RIP")
    if rip0 is None or rip1 is None:
        return "no vCPU registers"
    try:
        if_flag = (int(_reg(b, "RFL") or "0", 16) >> 9) & 1
    except ValueError:
        if_flag = -1
    moved = "same RIP" if rip0 == rip1 else "moving"
    return (f"vCPU0 RIP {rip0} -> {rip1} ({moved}), HLT={_reg(b, 'HLT')}, IF={if_flag}, "
            f"CPL={_reg(b, 'CPL')}, CR3={_reg(b, 'CR3')}")


def pattern_verified(name: str, report: dict[str, Any] | None, what: str) -> Check:
    """A guest program's own verification report (l1work / nvmm JSON) must say ok with pages>0."""
    if report is None:
        return Check(name, False, f"no verification report from {what}")
    pages = report.get("pages", 0)
    if not report.get("ok") or not pages:
        bad = report.get("bad_pages", report.get("bad", "?"))
        first = report.get("first_bad", [])[:4]
        return Check(name, False, f"{what}: {bad} bad of {pages} pages; first: {first}")
    extra = f", pass {report['pass']}" if "pass" in report else ""
    return Check(name, True, f"{what}: {pages} pages verify{extra}")


def l2_progress(before: int | None, after: list[int]) -> Check:
    """L2 continued: first dst sample >= last src sample, and dst samples increase."""
    if before is None or len(after) < 2:
        return Check("l2-progress", False, f"not enough samples (src {before}, dst {after})")
    if after[0] < before:
        return Check("l2-progress", False, f"L2 went back: pass {before} on src, {after[0]} on dst")
    if after[-1] <= after[0]:
        return Check("l2-progress", False, f"L2 stalled on dst at pass {after[0]}")
    return Check("l2-progress", True, f"pass {before} on src -> {after[0]}..{after[-1]} on dst")


def kernel_log_clean(new_lines: list[str]) -> Check:
    """No new warning, oops or KVM complaint in L1's kernel log since migration started."""
    bad = bad_lines(new_lines)
    if bad:
        return Check("kernel-log-clean", False, f"{len(bad)} bad line(s), first: {bad[0][:200]}")
    return Check("kernel-log-clean", True, f"{len(new_lines)} new line(s), none bad")


def new_log_lines(before: str, after: str) -> list[str]:
    """Lines of `after` past the last line of `before` (dmesg is append-only while L1 lives)."""
    b = [x for x in before.splitlines() if x.strip()]
    a = [x for x in after.splitlines() if x.strip()]
    if b and a[: len(b)] == b:
        return a[len(b):]
    last = b[-1] if b else None
    if last in a:
        return a[a.index(last) + 1:]
    return a


@dataclass(frozen=True)
class RamComparison:
    src_sha256: str
    dst_sha256: str
    pages: int
    differing_pages: int
    first_differing: list[str]
    # What differs in the first differing page: "0xADDR: src 8 bytes / dst 8 bytes" for its
    # first few differing 8-byte words (a counter, a flag or a pointer reads differently).
    first_bytes: list[str] = field(default_factory=list)
    # When the first differing page differs only by one KVM wall clock record (see below):
    # "0xADDR: version A -> B, sec S -> T (+D)"; else "".
    kvm_wall_clock: str = ""


# KVM's wall clock record in guest memory (struct pvclock_wall_clock: u32 version, u32 sec,
# u32 nsec). KVM rewrites it itself whenever MSR_KVM_WALL_CLOCK_NEW is written, and QEMU
# writes that MSR on the destination when it restores L1's vCPU: so under KVM this one record
# of a paused L1 differs after an otherwise identical migration (seen in the KVM host VM in 5 of
# 5 modes: version 4 -> 6, sec +24..26). Its version stays even (odd means mid-update).
WALL_CLOCK_BYTES = 12
WALL_CLOCK_FLOOR = 1577836800  # 2020-01-01: a sec before that is no wall clock of a run of ours


def kvm_wall_clock_rewrite(a: bytes, b: bytes, base: int, now: float | None = None) -> str:
    """How a page's only difference reads as KVM's rewrite of its wall clock record, or ''.

    Every differing byte must lie inside one 4-byte-aligned record whose version is even on
    both sides and higher on the destination, whose sec is a wall time (2020 .. now + 1 day)
    no earlier on the destination, and whose nsec is below 1e9."""
    if len(a) != len(b):
        return ""
    diffs = [i for i in range(len(a)) if a[i] != b[i]]
    if not diffs or diffs[-1] - diffs[0] >= WALL_CLOCK_BYTES:
        return ""
    latest = (time.time() if now is None else now) + 86400
    for start in range(diffs[-1] // 4 * 4, -1, -4):
        if start > diffs[0] or start + WALL_CLOCK_BYTES > len(a):
            continue
        if diffs[-1] >= start + WALL_CLOCK_BYTES:
            break
        va, sa, na = struct.unpack_from("<III", a, start)
        vb, sb, nb = struct.unpack_from("<III", b, start)
        if va % 2 == 0 and vb % 2 == 0 and vb > va and \
                WALL_CLOCK_FLOOR <= sa <= sb <= latest and na < 10**9 and nb < 10**9:
            return f"{hex(base + start)}: version {va} -> {vb}, sec {sa} -> {sb} (+{sb - sa})"
    return ""


def compare_ram_dumps(src: Path, dst: Path, page: int = 4096, show: int = 8) -> RamComparison:
    """Compare two guest RAM dumps page by page (streamed); hash each whole dump too."""
    hs, hd = hashlib.sha256(), hashlib.sha256()
    diff, first, n = 0, [], 0
    words: list[str] = []
    wall = ""
    with open(src, "rb") as fs, open(dst, "rb") as fd:
        while True:
            a, b = fs.read(page * 256), fd.read(page * 256)
            if not a and not b:
                break
            hs.update(a)
            hd.update(b)
            if a != b:
                for off in range(0, max(len(a), len(b)), page):
                    if a[off:off + page] != b[off:off + page]:
                        diff += 1
                        if len(first) < show:
                            first.append(hex((n + off // page) * page))
                        if not words:
                            words = _differing_words(a[off:off + page], b[off:off + page],
                                                     (n + off // page) * page)
                        if diff == 1:  # the one page ram_identical may forgive
                            wall = kvm_wall_clock_rewrite(a[off:off + page], b[off:off + page],
                                                          (n + off // page) * page)
            n += max(len(a), len(b)) // page
    return RamComparison(hs.hexdigest(), hd.hexdigest(), n, diff, first, words, wall)


def _differing_words(a: bytes, b: bytes, base: int, show: int = 4) -> list[str]:
    out = []
    for w in range(0, max(len(a), len(b)), 8):
        x, y = a[w:w + 8], b[w:w + 8]
        if x != y:
            out.append(f"{hex(base + w)}: src {x.hex(' ')} / dst {y.hex(' ')}")
            if len(out) == show:
                break
    return out


def ram_identical(cmp: RamComparison, accel: str = "tcg") -> Check:
    """Every page the same; under KVM, one page may differ by KVM's own rewrite of its wall
    clock record (nothing else in that page), and the detail names it."""
    if accel == "kvm" and cmp.differing_pages == 1 and cmp.kvm_wall_clock:
        return Check("ram-identical", True,
                     f"{cmp.pages - 1} of {cmp.pages} pages identical; the other holds only "
                     f"KVM's wall clock record, rewritten by KVM on the destination when its "
                     f"MSR was restored: {cmp.kvm_wall_clock}")
    if cmp.differing_pages or cmp.src_sha256 != cmp.dst_sha256:
        return Check("ram-identical", False,
                     f"{cmp.differing_pages} of {cmp.pages} pages differ; first at "
                     f"{', '.join(cmp.first_differing)}"
                     + (f" ({cmp.first_bytes[0]})" if cmp.first_bytes else ""))
    return Check("ram-identical", True, f"{cmp.pages} pages identical, sha256 {cmp.src_sha256[:16]}")


def vcpu_identical(src_regs: str, dst_regs: str) -> Check:
    """'info registers' of the paused source and destination must match line for line."""
    a, b = src_regs.strip().splitlines(), dst_regs.strip().splitlines()
    if not a:
        return Check("vcpu-registers-identical", False, "no register dump from source")
    diffs = [(x, y) for x, y in zip(a, b, strict=False) if x != y]
    if len(a) != len(b):
        diffs.append((f"{len(a)} lines", f"{len(b)} lines"))
    if diffs:
        x, y = diffs[0]
        return Check("vcpu-registers-identical", False,
                     f"{len(diffs)} line(s) differ; first: src '{x.strip()[:90]}' "
                     f"dst '{y.strip()[:90]}'")
    return Check("vcpu-registers-identical", True, f"{len(a)} register lines identical")


def l2_starts_on_dst(rc: int | None, detail: str) -> Check:
    """After migrating a VM-holding L1, a fresh L2 must still run there."""
    return Check("l2-starts-on-dst", rc == 0, detail)


def l1_responsive_on_dst(error: str | None) -> Check:
    """Every guest-side step on the destination answered in time (a crashed L1 stops answering)."""
    if error:
        return Check("l1-responsive-on-dst", False, error)
    return Check("l1-responsive-on-dst", True, "every guest step answered")
