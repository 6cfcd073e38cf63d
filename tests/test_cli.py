"""The command line: bad input is one line + exit 2; a real run writes results.json; Ctrl-C reaps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import interrupt_when_booted

REPO = Path(__file__).resolve().parent.parent


def nestvirt(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such-scenario"], "unknown scenario"),
    (["run", "--compression", "lz4"], "unknown compression mode"),
    (["run", "--kernel", "/nonexistent/vmlinuz"], "does not exist"),
    (["run", "migrate-plain", "--out", "/proc/nestvirt-out"], "not writable"),
    (["run", "--level", "30", "--compression", "multifd-zlib"], "--level 30"),
    (["run", "migrate-plain", "--downtime-limit-ms", "-5"], "--downtime-limit-ms -5"),
    (["run", "migrate-plain", "--max-bandwidth-mib", "-1"], "--max-bandwidth-mib -1"),
    (["frobnicate"], "invalid choice"),
    (["run", "--accel", "warp"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    cp = nestvirt(*args)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr + cp.stdout


def test_no_qemu_binary_is_exit_2(tmp_path: Path):
    cp = nestvirt("run", "migrate-plain", "--out", str(tmp_path),
                  env={"NESTVIRT_QEMU": "/nonexistent/qemu-system-x86_64"})
    assert cp.returncode == 2 and "Traceback" not in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr


def test_kernel_without_kvm_modules_is_exit_2(tmp_path: Path):
    boot = tmp_path / "boot"
    mods = tmp_path / "lib/modules/9.9.9-nokvm/kernel/drivers/net"
    boot.mkdir()
    mods.mkdir(parents=True)
    # A bzImage as far as its header goes ("HdrS" at 0x202): the module tree is what is wrong.
    (boot / "vmlinuz-9.9.9-nokvm").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    (mods / "dummy.ko").write_bytes(b"\0depends=\0")
    cp = nestvirt("run", "migrate-plain", "--kernel", str(boot / "vmlinuz-9.9.9-nokvm"),
                  "--out", str(tmp_path / "out"))
    assert cp.returncode == 2, cp.stderr
    assert "no kvm module" in cp.stderr and "Traceback" not in cp.stderr


def test_list_json():
    cp = nestvirt("list", "--json")
    doc = json.loads(cp.stdout)
    assert "migrate-nested" in doc["scenarios"] and "multifd-zstd" in doc["compression"]


@pytest.mark.qemu
def test_run_writes_results_json_and_exit_0(tmp_path: Path):
    for attempt in range(3):
        out = tmp_path / f"attempt{attempt}"
        # The 5 s downtime-limit keeps the migration to one live pass (tests/test_scenarios.py).
        # --auto-converge rides along: QEMU itself must read it back on both sides.
        cp = nestvirt("run", "migrate-bare", "--compression", "multifd-zstd", "--out", str(out),
                      "--downtime-limit-ms", "5000", "--auto-converge", timeout=300)
        doc = json.loads((out / "results.json").read_text())
        assert doc["host"]["accel"] in ("tcg", "kvm") and doc["host"]["qemu"]["version"]
        (sc,) = doc["scenarios"]
        assert set(sc) >= {"id", "scenario", "verdict", "reason", "params", "durations", "metrics",
                           "checks", "artifacts"}
        assert cp.returncode == (0 if sc["verdict"] in ("pass", "known-issue") else 1), cp.stderr
        # Only a failure the shipped signatures pin on QEMU (ci/known-issues.json) earns a retry.
        if sc["verdict"] != "known-issue":
            break
    else:
        pytest.skip(f"QEMU broke this run 3 times, reported as known issue: {sc['reason'][:200]}")
    assert sc["verdict"] == "pass", sc["reason"]
    assert {"boot_src", "migrate", "verify", "total"} <= set(sc["durations"])
    assert sc["params"]["migration_settings"]["src"]["parameters"]["downtime-limit"] == 5000
    for side in ("src", "dst"):
        assert sc["params"]["migration_settings"][side]["capabilities"]["auto-converge"] is True
    assert sc["params"]["migration"]["auto_converge"] is True
    assert all({"name", "ok", "detail"} == set(c) for c in sc["checks"])
    assert "migrate-bare/multifd-zstd" in cp.stdout and "PASS" in cp.stdout
    assert (out / "junit.xml").read_text().count("<testcase") == 1


@pytest.mark.qemu
def test_ctrl_c_reaps_qemu_and_keeps_results(tmp_path: Path):
    p = subprocess.Popen([sys.executable, "-m", "harness", "run", "migrate-plain", "migrate-nested",
                          "--compression", "none", "--out", str(tmp_path)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupt_when_booted(p, tmp_path, l1s=1, timeout=60)
