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
from harness.hostvm.vm import run_job

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.qemu


def nestvirt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def our_qemus(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln]


@pytest.mark.parametrize("args,needle", [
    (["--hostvm-mem", "512"], "at least"),
    (["--hostvm-cpu", "max,-svm"], "SVM is turned off"),
    (["--accel", "tcg"], "drop --accel tcg"),
    (["no-such-scenario"], "unknown scenario"),
])
def test_bad_input_is_refused_before_a_host_vm_boots(args, needle, tmp_path: Path):
    cp = nestvirt("run", "--in-hostvm", *args, "--out", str(tmp_path))
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


# The host VM's own kernel under TCG has died with this line in 2 of 5 runs with the guest-mode
# scenario (README, findings): TCG's emulation, not nestvirt. Such a run is tried once more;
# twice in a row is a skip carrying the line. Any other outcome is judged.
HOST_VM_PANIC = "stack guard page was hit"


@pytest.fixture(scope="module")
def kvm_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    reason = ""
    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"hostvm-kvm{attempt}")
        cp = nestvirt("run", "--in-hostvm", *KVM_SCENARIOS, "--compression", "multifd-zstd",
                      "--out", str(out), timeout=900)
        doc = json.loads((out / "results.json").read_text())
        first = doc["scenarios"][0] if doc["scenarios"] else {}
        reason = first.get("reason", "")
        # The reason carries the panic's last lines; the BUG line that names it sits higher up
        # in the host VM's console.
        console = "".join(f.read_text(errors="replace") for f in out.glob("**/hostvm-console.log"))
        if not (first.get("id") == "hostvm" and HOST_VM_PANIC in console):
            return cp, out
        assert not our_qemus(str(out))  # the dead host VM was reaped
    pytest.skip(f"the host VM's kernel died twice under TCG: {reason[:300]}")


def test_kvm_paths_run_inside_one_host_vm(kvm_run):
    cp, out = kvm_run
    doc = json.loads((out / "results.json").read_text())
    by_name = {s["scenario"]: s for s in doc["scenarios"]}
    assert set(by_name) == set(KVM_SCENARIOS), cp.stderr[-2000:]
    # The inner probe is the run's host: real KVM, AMD, nested state, no eVMCS, a dirty ring.
    host = doc["host"]
    assert host["accel"] == "kvm" and host["kvm"]["module"] == "kvm_amd"
    caps = host["kvm"]["caps"]
    assert caps["nested_state"] and not caps["hyperv_enlightened_vmcs"] and caps["dirty_log_ring"]
    hv = doc["run"]["hostvm"]
    assert hv["accel"] == "tcg" and hv["mem_mib"] >= 2048 and hv["qemu_version"]
    for s in doc["scenarios"]:
        assert Path(s["artifacts"]["dir"]).is_dir()  # read back beside results.json
        if s["scenario"] != "migrate-bare":
            assert s["verdict"] == "pass", (s["id"], s["reason"])
    # Bare SVME under KVM ran, but failed 3 of 3 here in one of two shapes (README, findings):
    # the destination L1 silent after a completed migration, or the source's RAM save -EIO.
    # The test holds the harness to reporting one of those, with QEMU's or SSH's own words.
    bare = by_name["migrate-bare"]
    checks = {c["name"]: c for c in bare["checks"]}
    silent = checks["migration-completed"]["ok"] and not checks["l1-ssh-on-dst"]["ok"]
    ram_eio = not checks["migration-completed"]["ok"] and \
        "SaveStateEntry" in checks["migration-completed"]["detail"]
    assert bare["verdict"] == "pass" or silent or ram_eio, bare["reason"]
    gm = by_name["migrate-nested-guest-mode"]
    assert gm["params"]["migration"]["compression"] == "multifd-zstd"
    nested = {c["name"]: c for c in gm["checks"]}["kvm-nested-state"]
    assert nested["ok"] and "destination began with" in nested["detail"]
    dl = by_name["dirty-ring"]
    checks = {c["name"]: c["ok"] for c in dl["checks"]}
    assert checks["dirty-ring-rate"] and checks["vcpu-dirty-limit"]
    assert len(dl["metrics"]["dirty_rate"]["vcpu-dirty-rate"]) == 2
    assert not our_qemus(str(out))
