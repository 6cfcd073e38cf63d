"""The scenario catalogue (data) and how names + compression modes expand to variants."""

from __future__ import annotations

from dataclasses import replace

from harness.core.errors import UsageError
from harness.host.enlightenments import Profile, resolve_profile
from harness.scenario.spec import GUEST_MODE_RETRIES, ScenarioSpec, Variant
from harness.vm.migration import COMPRESSION_MODES, MigrationMode

_GUEST_CHECKS = ("migration-completed", "dst-qemu-alive", "l1-ssh-on-dst", "l1-responsive-on-dst",
                 "l1-workload-pattern",
                 "kernel-log-clean")

SCENARIOS: dict[str, ScenarioSpec] = {s.name: s for s in (
    ScenarioSpec(
        name="migrate-plain",
        description="L1 with KVM loaded and a dirtying workload, no VM; migrate; verify L1",
        state="plain", checks=_GUEST_CHECKS),
    ScenarioSpec(
        name="migrate-nested",
        description="L2 page counter running in L1's KVM during migration; verify L1 and L2",
        state="nested", checks=(*_GUEST_CHECKS, "l2-progress", "l2-memory-pattern")),
    ScenarioSpec(
        name="migrate-bare",
        description="L1's KVM holds a VM with no vCPU run (bare VMXON/SVME); a new L2 runs on dst",
        state="bare", checks=(*_GUEST_CHECKS, "l2-starts-on-dst")),
    ScenarioSpec(
        name="migrate-nested-evmcs",
        description="L2 running with L1's KVM using the enlightened VMCS (KVM + VMX hosts only)",
        state="nested", profile="evmcs-linux",
        checks=(*_GUEST_CHECKS, "l2-progress", "l2-memory-pattern", "l1-sees-enlightenments",
                "l1-uses-evmcs", "evmcs-log-clean")),
    ScenarioSpec(
        name="migrate-nested-guest-mode",
        description="L2 spinning without exits, so the stop catches L1 in guest mode: migrates "
                    "only with KVM nested state (skips under TCG)",
        state="nested", l2_payload="spinloop", needs_nested_state=True,
        # L1 busy elsewhere is L1 outside guest mode: in the KVM host VM, at l1work's default
        # 32 MiB/s, L1 spent 80% of its time out of L2 (KVM's tracepoints); 8 MiB/s leaves L2
        # more of it, and longer spins between reports mean fewer exits.
        l1_rate_mib_s=8, l2_iters=50_000_000,
        checks=(*_GUEST_CHECKS, "l2-progress")),
    ScenarioSpec(
        name="migrate-paused-identity",
        description="Pause L2 (nvmm leaves KVM_RUN), stop L1, migrate, compare guest RAM and "
                    "vCPU registers src/dst",
        state="nested", paused=True,
        checks=("migration-completed", "dst-qemu-alive", "ram-identical",
                "vcpu-registers-identical")),
    ScenarioSpec(
        name="vmexit",
        description="Cycles per nested exit (L2 CPUID/VMCALL/PIO, L1 CPUID) per enlightenment "
                    "profile, and after migrating L1",
        state="nested", l1_workload=False,
        checks=("vmexit-loop", "l1-sees-enlightenments", "l1-uses-evmcs", "evmcs-log-clean",
                "migration-completed", "dst-qemu-alive", "l2-cpuid-not-slower-after-migration")),
)}

SCENARIOS["dirty-limit"] = ScenarioSpec(
    name="dirty-limit",
    description="the dirty-limit capability (set-vcpu-dirty-limit on every vCPU) against "
                "auto-converge, one guest (a writer and a reader vCPU, no nested SVM) dirtying "
                "faster than the stream, at the same cap below the stream measured first; KVM "
                "only (the KVM host VM)",
    state="plain", smp=2, mem_mib=256,
    checks=("stream-measured", "dirty-ring-rate", "workload-outruns-stream",
            "migration-completed-dirty-limit",  # or, not converged, this:
            "dirty-limit-in-dead-band",
            "throttle-engaged-dirty-limit", "migration-completed-auto-converge",
            "throttle-engaged-auto-converge", "guest-progress-measured",
            "l1-workload-pattern"))

SCENARIOS["dirty-ring"] = ScenarioSpec(
    name="dirty-ring",
    description="KVM dirty ring (-accel kvm,dirty-ring-size): calc-dirty-rate in dirty-ring "
                "mode per vCPU, then set-vcpu-dirty-limit restraining the guest; no migration; "
                "KVM only (the KVM host VM)",
    state="plain", smp=2, mem_mib=256, checks=("dirty-ring-rate", "vcpu-dirty-limit"))

# Scenarios measured with one migration mode unless --compression names another (the mode is
# not what they are about, and each extra mode would repeat the whole measurement).
SINGLE_MODE = {"vmexit": "multifd-zstd", "dirty-limit": "none", "dirty-ring": "none"}

# The default smoke suite: plain and nested for every mode, plus one identity run.
SMOKE = (("migrate-plain", None), ("migrate-nested", None), ("migrate-paused-identity", "none"))


def expand(names: list[str], compression: str | None, knobs: dict,
           inject: str | None = None, guest_mode_retries: int = GUEST_MODE_RETRIES) -> list[Variant]:
    """Scenario names (empty: the smoke suite) x modes -> variants; UsageError on bad names."""
    for n in names:
        if n not in SCENARIOS:
            raise UsageError(f"unknown scenario '{n}' (see 'nestvirt list')")
    if compression is not None and compression not in COMPRESSION_MODES:
        raise UsageError(f"unknown compression mode '{compression}' "
                         f"(choose from {', '.join(COMPRESSION_MODES)})")
    wanted = [(n, SINGLE_MODE.get(n)) for n in names] if names else list(SMOKE)
    variants = []
    for name, fixed in wanted:
        modes = [compression] if compression else ([fixed] if fixed else list(COMPRESSION_MODES))
        spec = SCENARIOS[name] if inject is None else replace(SCENARIOS[name], inject=inject)
        for m in modes:
            variants.append(Variant(spec, MigrationMode(compression=m, **knobs),
                                    guest_mode_retries=guest_mode_retries))
    return variants


def apply_profile(variants: list[Variant], run_profile: Profile, *, l1_nested: str,
                  vendor: str) -> list[Variant]:
    """Give each variant the run's profile, or the one its scenario is about (resolved here)."""
    out = []
    for v in variants:
        if v.spec.profile:
            p = resolve_profile(v.spec.profile, None, l1_nested=l1_nested, vendor=vendor)
        else:
            p = run_profile
        out.append(replace(v, profile=p))
    return out
