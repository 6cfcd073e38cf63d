"""Cross-version migration on real QEMU: the oldest and the newest binary of the inventory (7.2 and
10.0 here), both directions, on the newest machine type both have; and each result recording
the binary, version and machine type of both sides with the newer QEMU's extras."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.host.probe import QemuFacts
from harness.scenario.binaries import plan_qemu
from harness.scenario.engine import RunContext, run_variant
from harness.scenario.result import ScenarioResult
from harness.scenario.spec import Variant
from harness.scenario.suite import SCENARIOS
from harness.vm.migration import MigrationMode

from .conftest import qemu_flaked

pytestmark = pytest.mark.qemu


def pair(ctx: RunContext) -> tuple[QemuFacts, QemuFacts]:
    qemus = sorted(ctx.host.qemus or (ctx.host.qemu,), key=lambda q: q.version_tuple)
    if len(qemus) < 2 or qemus[0].version == qemus[-1].version:
        pytest.skip(f"one QEMU version here ({qemus[0].version}): cross-version needs two "
                    "(`nestvirt qemu fetch` adds 10.0 beside the system's)")
    return qemus[0], qemus[-1]


def run(ctx: RunContext, scenario: str, mode: MigrationMode, src: str, dst: str) -> ScenarioResult:
    # One live pass (tests/test_scenarios.py says why): a 7.2 source loses writes after 4+ syncs.
    spec = replace(SCENARIOS[scenario], l1_rate_mib_s=8)
    v = Variant(spec, mode, qemu=plan_qemu(mode, ctx.host, src, dst))
    for _ in range(3):
        r = run_variant(v, ctx)
        if not qemu_flaked(r, ctx.host):
            return r
    pytest.skip(f"QEMU broke the migration 3 times (reported as fail): {r.reason[:300]}")


def test_old_to_new_and_new_to_old_migrate_with_every_check(ctx: RunContext):
    old, new = pair(ctx)
    up = run(ctx, "migrate-plain", MigrationMode("none", downtime_limit_ms=5000),
             old.binary, new.binary)
    down = run(ctx, "migrate-nested", MigrationMode("multifd-zstd", downtime_limit_ms=5000),
               new.binary, old.binary)
    for r, src, dst in ((up, old, new), (down, new, old)):
        assert r.verdict == "pass", r.reason
        q = r.params["qemu"]
        machine = max(set(src.machine_types) & set(dst.machine_types),
                      key=lambda m: tuple(map(int, m.removeprefix("pc-q35-").split("."))))
        assert q["cross_version"] and q["pinned"] and q["machine"] == machine
        assert (q["src"]["version"], q["dst"]["version"]) == (src.version, dst.version)
        assert q["src"]["binary"] == src.binary and q["dst"]["machine"] == machine
        cmdline = (ctx.out / r.artifacts["dir"] / "dst-cmdline.txt").read_text()
        assert f"{machine},accel=" in cmdline and dst.binary in cmdline
    assert {c.name for c in down.checks} == set(SCENARIOS["migrate-nested"].checks)
    # The newer QEMU's extras, where present: its thread names, zero-page-detection (the
    # machine type's compat default), the dirty-limit capability.
    threads = down.metrics["migration_threads"]
    if new.version_tuple >= (9, 0, 0):
        assert "mig/src/main" in threads["src"] and any(t.startswith("mig/src/send_")
                                                        for t in threads["src"])
        assert down.params["qemu"]["src"]["has"]["zero-page-detection"]
        assert "zero-page-detection" in down.params["migration_settings"]["src"]["parameters"]
    if old.version_tuple < (9, 0, 0):
        assert any(t.startswith("multifdrecv_") for t in threads["dst"]), threads
        assert "live_migration" in up.metrics["migration_threads"]["src"]
    assert down.params["qemu"]["src"]["has"]["dirty-limit"] == (
        "dirty-limit" in new.migration_capabilities)


def test_paused_identity_passes_on_the_other_binary_too(ctx: RunContext):
    # The default binary's identity run is in test_scenarios; this is the other one, alone.
    old, new = pair(ctx)
    other = old if ctx.host.qemu.binary == new.binary else new
    r = run(ctx, "migrate-paused-identity", MigrationMode("none"), other.binary, other.binary)
    assert r.verdict == "pass", r.reason
    assert r.params["qemu"]["src"]["version"] == other.version
    assert r.metrics["l2_quiesced"]["state"] == "paused"  # nvmm left KVM_RUN before the stop
