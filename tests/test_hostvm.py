"""The KVM host VM for real: bad input refused before (or at) boot, a killed host VM is a
verdict, and ONE host VM boot runs KVM-path scenarios with --accel kvm on real KVM code
(guest-mode nested migration through KVM nested state, bare SVME, a compressed mode, the
dirty ring), their results read back into the host's results directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness.core.errors import SetupError
from harness.hostvm import image as hv_image
from harness.hostvm.job import render_job
from harness.hostvm.prepare import prepare
from harness.hostvm.vm import FATAL_LINE, run_job

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.qemu


def nestvirt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def our_qemus(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln]


@pytest.mark.parametrize("args,needle", [
    (["run", "--hostvm-mem", "512"], "at least"),
    (["run", "--hostvm-cpu", "max,-svm"], "SVM is turned off"),
    (["run", "--accel", "tcg"], "drop --accel tcg"),
    (["run", "no-such-scenario"], "unknown scenario"),
    (["vmexit", "--accel", "tcg"], "drop --accel tcg"),
    (["vmexit", "--hostvm-mem", "512"], "at least"),
    (["selftest", "--hostvm-cpu", "max,-svm"], "SVM is turned off"),
    (["selftest", "--filter", "no_such_test"], "no such selftest"),
    (["run", "--matrix", "/nonexistent/m.yaml"], "No such file"),
    (["run", "--matrix", "{tmp}/bad-axis.yaml"], "unknown axis"),
    (["run", "--kvm-amd-typo"], "unrecognized arguments"),
    (["run", "--hostvm-kvm-amd", "sev=1"], "--hostvm-kvm-amd sev=1"),
])
def test_bad_input_is_refused_before_a_host_vm_boots(args, needle, tmp_path: Path):
    # A matrix file with a typo in an axis name (written here: a matrix file under tests/
    # would be collected as a test by the pytest plugin).
    (tmp_path / "bad-axis.yaml").write_text("nestvirt_matrix: 1\nname: bad-axis\ninclude:\n"
                                           "  - scenari: migrate-plain\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    cp = nestvirt(args[0], "--in-hostvm", *args[1:], "--out", str(tmp_path))
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in cp.stderr
    assert not list(tmp_path.glob("hostvm/*.raw"))


def test_a_cpu_without_svm_is_exit_2_and_leaves_nothing_running(tmp_path: Path):
    # An Intel model: TCG gives it no svm (qemu64, unlike it, lists svm).
    cp = nestvirt("run", "--in-hostvm", "migrate-plain", "--compression", "none",
                  "--hostvm-cpu", "Skylake-Client", "--out", str(tmp_path))
    assert cp.returncode == 2, cp.stderr
    assert "no-svm" in cp.stderr and "Traceback" not in cp.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["scenarios"][0]["verdict"] == "error"
    assert not our_qemus(str(tmp_path))


def test_an_image_that_cannot_be_built_is_a_setup_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("NESTVIRT_CACHE", str(tmp_path))
    monkeypatch.setattr(hv_image.shutil, "which", lambda name: None)
    with pytest.raises(SetupError, match="mkfs.ext4 is missing"):
        hv_image.build_image("0123", [Path(__file__)])


def test_a_host_vm_killed_mid_run_is_a_verdict_with_its_last_words(tmp_path: Path):
    p = prepare()
    killed = threading.Event()

    def kill_when_running(ev: dict[str, str]) -> None:
        if ev["event"] == "job-start" and not killed.is_set():
            for line in our_qemus(str(tmp_path)):
                os.kill(int(line.split()[0]), signal.SIGKILL)
            killed.set()

    job = render_job(["list"], trace=False).replace("exit $rc", "sleep 120; exit $rc")
    out = run_job(p.spec, {"job.sh": job}, tmp_path, deadline_s=120, results=tmp_path / "back",
                  on_event=kill_when_running)
    assert killed.is_set()
    assert out.status == "died" and "before its results were written" in out.reason
    assert out.qemu_rc is not None and out.qemu_rc < 0
    assert not our_qemus(str(tmp_path))


# The KVM paths, in one host VM boot. Each inner variant is one real migration under KVM.
KVM_SCENARIOS = ("migrate-nested-guest-mode", "migrate-bare", "dirty-ring")


# The failure shapes of TCG's nested SVM emulation under this host VM's KVM, each recorded with
# its console and results (README, "KVM host VM", findings), and not nestvirt's doing. With
# two host VM vCPUs they decided most runs; with one (the default now) only the last of them
# (twice) and migrate-bare's RAM save -EIO (once, hung) were seen, but each is still told
# apart from a real red:
# - the host VM's own kernel dies in a KVM vCPU thread with a recursive page fault
#   ("TASK stack guard page was hit", exc_page_fault faulting on its own %gs access while the
#   inner L1's FS/GS are loaded);
# - an inner L1 resets on its own (its QEMU exits 0 under -no-reboot with nothing on stderr
#   and nothing bad on its console; QMP said SHUTDOWN guest-reset, then host-qmp-quit from the
#   reset watcher once it had dumped the registers);
# - migrate-bare in one of its four shapes (bare_shape below);
# - at one vCPU, the host VM goes silent: no heartbeat for 30 s and nothing on its console,
#   not even the RCU stall its kernel prints when a CPU of two is stuck (seen in a dirty-limit
#   run and in CI on 2026-12-03: its only vCPU stuck, as CPU 0 was in that stall at two).
# A run with one of them is tried once more; twice in a row is a skip carrying both. Any other
# outcome, a new shape included, is judged.
HOST_VM_PANIC = "stack guard page was hit"
HOST_VM_SILENT = "host VM silent for "
L1_RESET = "status 0, no stderr (L1 powered off, or reset under -no-reboot)"


def l1_reset_seen(s: dict, out: Path) -> bool:
    """The scenario failed because an inner L1 reset silently: the exit story, verbatim, with
    no L1 console words after it, and no QMP SHUTDOWN other than a guest reset."""
    words = [s.get("reason") or ""] + [c.get("detail", "") for c in s.get("checks", [])
                                       if not c["ok"]]
    if not any(L1_RESET in w and f"{L1_RESET}; L1 console" not in w for w in words):
        return False
    art = Path(s.get("artifacts", {}).get("dir", "") or out)
    for log in art.glob("*-qmp.jsonl"):
        # The reset watcher quits a QEMU it has dumped: that quit is its, not the guest's.
        dumped = (art / log.name.replace("-qmp.jsonl", "-reset-registers.txt")).exists()
        allowed = {"guest-reset", "host-qmp-quit"} if dumped else {"guest-reset"}
        for line in log.read_text(errors="replace").splitlines():
            msg = json.loads(line).get("msg", {}) if line.strip() else {}
            if msg.get("event") == "SHUTDOWN" and msg.get("data", {}).get("reason") not in \
                    allowed:
                return False
    return True


def tcg_fault(doc: dict, out: Path) -> str:
    """Which recorded TCG shape this run hit ('' for none): the host VM panic or an L1 reset."""
    first = next((s for s in doc["scenarios"] if s["id"] == "hostvm"), {})
    console = "".join(f.read_text(errors="replace") for f in out.glob("**/hostvm-console.log"))
    # The reason carries the panic's last lines; the BUG line that names it sits higher up.
    if first and HOST_VM_PANIC in console:
        return f"host VM panic: {first.get('reason', '')[:200]}"
    if first and (first.get("reason") or "").startswith(HOST_VM_SILENT) \
            and not FATAL_LINE.search(console):  # a kernel's dying words: judged, not excused
        return f"host VM silent, its vCPU stuck: {first.get('reason', '')[:120]}"
    reset = [s["id"] for s in doc["scenarios"] if s["verdict"] != "pass" and l1_reset_seen(s, out)]
    if reset:
        return f"inner L1 reset in {', '.join(reset)}"
    bare = [f"{s['id']}: {bare_shape(s['checks'])}" for s in doc["scenarios"]
            if s.get("scenario") == "migrate-bare" and s["verdict"] != "pass"
            and s.get("checks") and bare_shape(s["checks"])]
    return f"migrate-bare in a recorded shape ({', '.join(bare)})" if bare else ""


# One run, two places: migrate-plain here under TCG, the KVM paths in one host VM boot (the
# matrix's in_hostvm axis; dirty-ring's 2-vCPU L1 there through the KVM-aware host budget).
MIXED_MATRIX = ("nestvirt_matrix: 1\nname: kvm-mixed\ninclude:\n"
                "  - scenario: migrate-plain\n    compression: none\n"
                f"  - scenario: [{', '.join(KVM_SCENARIOS)}]\n"
                "    compression: multifd-zstd\n    in_hostvm: true\n")


@pytest.fixture(scope="module")
def kvm_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    seen = []
    matrix = tmp_path_factory.mktemp("matrix") / "kvm-mixed.yaml"
    matrix.write_text(MIXED_MATRIX)
    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"hostvm-kvm{attempt}")
        cp = nestvirt("run", "--matrix", str(matrix), "--out", str(out), timeout=900)
        doc = json.loads((out / "results.json").read_text())
        fault = tcg_fault(doc, out)
        if not fault:
            return cp, out
        seen.append(fault)
        assert not our_qemus(str(out))  # the dead host VM or L1 was reaped
    pytest.skip(f"TCG's nested SVM failed twice in a recorded shape: {' / '.join(seen)}")


def test_the_tcg_fault_shapes_are_recognised_precisely(tmp_path: Path):
    """The fixture's excuse must not grow into 'anything': only the recorded shapes."""
    def scen(reason: str, qmp: str = "", dumped: bool = False) -> dict:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        if qmp:
            (d / "src-qmp.jsonl").write_text("".join(json.dumps({"msg": {
                "event": "SHUTDOWN", "data": {"guest": True, "reason": why}}}) + "\n"
                for why in qmp.split("+")))
        if dumped:
            (d / "src-reset-registers.txt").write_text("RIP=fffffff0\n")
        return {"id": "dirty-ring/x", "scenario": "dirty-ring", "verdict": "error",
                "reason": reason, "checks": [], "artifacts": {"dir": str(d)}}
    story = f"src QEMU exited: {L1_RESET}"
    assert tcg_fault({"scenarios": [scen(story, "guest-reset")]}, tmp_path)
    assert tcg_fault({"scenarios": [scen(story)]}, tmp_path)
    assert not tcg_fault({"scenarios": [scen(story, "guest-shutdown")]}, tmp_path)
    # The reset watcher's own quit after its dump (seen in CI, 2026-12-03) is not the guest's.
    assert tcg_fault({"scenarios": [scen(story, "guest-reset+host-qmp-quit", dumped=True)]},
                     tmp_path)
    assert not tcg_fault({"scenarios": [scen(story, "guest-reset+host-qmp-quit")]}, tmp_path)
    assert not tcg_fault({"scenarios": [scen(f"{story}; L1 console: Kernel panic - x")]},
                         tmp_path)
    assert not tcg_fault({"scenarios": [scen("src QEMU exited: killed by signal 8 (SIGFPE)")]},
                         tmp_path)
    assert not tcg_fault({"scenarios": [{**scen(story), "verdict": "pass"}]}, tmp_path)
    (tmp_path / "hostvm-console.log").write_text("BUG: TASK stack guard page was hit at 0\n")
    assert tcg_fault({"scenarios": [{"id": "hostvm", "verdict": "error", "reason": "x"}]}, tmp_path)
    (tmp_path / "hostvm-console.log").write_text("BUG: kernel NULL pointer dereference\n")
    assert not tcg_fault({"scenarios": [{"id": "hostvm", "verdict": "error", "reason": "x"}]}, tmp_path)
    silent = {"id": "hostvm", "verdict": "error",
              "reason": "host VM silent for 30s (no heartbeat): hung; host VM kernel: kvm [1236]"}
    assert not tcg_fault({"scenarios": [silent]}, tmp_path)  # the NULL dereference above
    (tmp_path / "hostvm-console.log").write_text("[1/3 0:00] migrate-nested-guest-mode ...\n")
    assert "vCPU stuck" in tcg_fault({"scenarios": [silent]}, tmp_path)
    assert not tcg_fault({"scenarios": [{**silent, "reason": "host VM QEMU exited (1)"}]},
                         tmp_path)
    silent = [{"name": "migration-completed", "ok": True, "detail": "completed"},
              {"name": "l1-ssh-on-dst", "ok": False, "detail": "no answer"}]
    bare = {"id": "migrate-bare/x", "scenario": "migrate-bare", "verdict": "fail", "reason": "x",
            "checks": silent, "artifacts": {"dir": str(tmp_path)}}
    (tmp_path / "hostvm-console.log").write_text("")
    assert "dst-silent" in tcg_fault({"scenarios": [bare]}, tmp_path)
    silent[1]["ok"] = True
    silent.append({"name": "ram-identical", "ok": False, "detail": "1 page differs"})
    assert not tcg_fault({"scenarios": [bare]}, tmp_path)


def bare_shape(checks: list[dict]) -> str:
    """Which recorded failure shape of migrate-bare under KVM in the host VM this is, or ''.

    The destination L1 silent after a completed migration; the source's RAM save -EIO, failed
    or (CI, 2026-12-03) hung with no terminal state, its own line in the timeout's detail and
    the destination failing on a section footer; or the source L1 resetting itself mid-migration
    (registers dumped, the destination's own "section footer" line)."""
    by = {c["name"]: c for c in checks}
    migrated = by["migration-completed"]
    detail = migrated["detail"]
    if migrated["ok"]:
        return "dst-silent" if not by["l1-ssh-on-dst"]["ok"] else ""
    timeout = detail.startswith("source status timeout")
    if "SaveStateEntry" in detail and not timeout:
        return "src-ram-eio"
    if timeout and "Read section footer failed" in detail \
            and "src said: qemu-system-x86_64: failed to save SaveStateEntry with id(name): 2(ram): " \
                "-5" in detail:
        return "src-ram-eio-hung"
    if f"{L1_RESET}; L1 reset itself at" in detail and "reset-registers.txt" in detail \
            and "Read section footer failed" in detail:
        return "src-reset"
    return ""


def test_the_bare_shapes_are_recognised_precisely():
    """From the CI record of 2026-12-03, and the same with one word of evidence missing."""
    reset = (f"the source QEMU exited mid-migration: QEMU exited while answering it: {L1_RESET}; "
             "L1 reset itself at CPU#0 CR2=00000000 CR3=00000000 CPL=0 HLT=0 "
             "(src-reset-registers.txt); destination: check_section_footer: Read section "
             "footer failed: -5 (nested state: bare)")

    def rec(ok: bool, detail: str, ssh: bool = False) -> list[dict]:
        return [{"name": "migration-completed", "ok": ok, "detail": detail},
                {"name": "l1-ssh-on-dst", "ok": ssh, "detail": ""}]
    assert bare_shape(rec(False, reset)) == "src-reset"
    assert bare_shape(rec(False, reset.replace("(src-reset-registers.txt)", ""))) == ""
    assert bare_shape(rec(False, reset.replace("Read section footer failed", "x"))) == ""
    assert bare_shape(rec(False, "failed to save SaveStateEntry with id(name): 2(ram): -5")) \
        == "src-ram-eio"
    said = "; src said: qemu-system-x86_64: failed to save SaveStateEntry with id(name): 2(ram): -5"
    hung = ("source status timeout: src: no terminal migration state in 240s{said}; destination: "
            "check_section_footer: Read section footer failed: -5 (nested state: bare)")
    assert bare_shape(rec(False, hung.format(said=said))) == "src-ram-eio-hung"
    assert bare_shape(rec(False, hung.format(said=""))) == ""  # the source said nothing: judged
    assert bare_shape(rec(False, hung.format(said=said).replace("Read section footer failed",
                                                                "x"))) == ""
    # Not a timeout: not the hung shape (a failed status naming the save is the first one).
    assert bare_shape(rec(False, hung.format(said=said).replace("source status timeout",
                                                                "source status failed"))) \
        == "src-ram-eio"
    assert bare_shape(rec(False, "killed by signal 8 (SIGFPE)")) == ""
    assert bare_shape(rec(True, "completed")) == "dst-silent"
    assert bare_shape(rec(True, "completed", ssh=True)) == ""


def test_kvm_paths_run_inside_one_host_vm(kvm_run):
    cp, out = kvm_run
    doc = json.loads((out / "results.json").read_text())
    ids = [s["id"] for s in doc["scenarios"]]
    # This host's combination first, then the host VM's, each under its own id.
    assert ids == ["migrate-plain/none"] + [f"{n}/multifd-zstd+hostvm" for n in KVM_SCENARIOS], \
        cp.stderr[-2000:]
    assert doc["matrix"]["in_hostvm"] == len(KVM_SCENARIOS)
    by_name = {s["scenario"]: s for s in doc["scenarios"][1:]}
    # This host is TCG; the host VM part's host is its inner probe: real KVM, AMD, nested
    # state, no eVMCS, a dirty ring.
    assert doc["host"]["accel"] == "tcg"
    assert "hostvm" not in doc["scenarios"][0]["metrics"]
    host = doc["hostvm"]["host"]
    assert host["accel"] == "kvm" and host["kvm"]["module"] == "kvm_amd"
    caps = host["kvm"]["caps"]
    assert caps["nested_state"] and not caps["hyperv_enlightened_vmcs"] and caps["dirty_log_ring"]
    hv = doc["hostvm"]
    assert hv["accel"] == "tcg" and hv["mem_mib"] >= 2048 and hv["qemu_version"]
    assert Path(hv["results"]).is_file()
    for s in doc["scenarios"]:
        assert Path(s["artifacts"]["dir"]).is_dir()  # read back beside results.json
        assert s["verdict"] == "pass", (s["id"], s["reason"])
    gm = by_name["migrate-nested-guest-mode"]
    assert gm["params"]["migration"]["compression"] == "multifd-zstd"
    nested = {c["name"]: c for c in gm["checks"]}["kvm-nested-state"]
    assert nested["ok"] and "destination began with" in nested["detail"]
    dl = by_name["dirty-ring"]
    checks = {c["name"]: c["ok"] for c in dl["checks"]}
    assert checks["dirty-ring-rate"] and checks["vcpu-dirty-limit"]
    assert len(dl["metrics"]["dirty_rate"]["vcpu-dirty-rate"]) == 2
    assert not our_qemus(str(out))
