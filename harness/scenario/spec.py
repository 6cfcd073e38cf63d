"""A scenario as data (ScenarioSpec) and a variant of it (a spec with its axes fixed), with the
one JSON form of a variant that workers, repro bundles and the avocado runner all read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from harness.core.errors import UsageError
from harness.host.enlightenments import Profile, qemu_cpu_suffix
from harness.scenario.faults import FAULTS
from harness.vm.migration import MigrationMode

STATES = ("plain", "bare", "nested")
L2_PAYLOADS = ("pagecount", "spinloop")
NO_PROFILE = Profile(name="none")
# Under an accel without nested state (TCG), live nested migrations whose stop would land in
# guest mode are cancelled and tried again this many times (scenario/engine.py).
GUEST_MODE_RETRIES = 5
# Sizes that reach L1's shell as numbers on a command line: they must be ints, never text
# (a variant file is input, and "64; reboot" would otherwise run in L1).
NUMBERS = ("mem_mib", "smp", "l1_mib", "l1_threads", "l1_rate_mib_s", "l2_pages")


@dataclass(frozen=True)
class ScenarioSpec:
    """One scenario as data: what L1 and L2 do, how it migrates, which checks judge it."""

    name: str
    description: str
    state: str = "plain"  # plain: KVM loaded, no VM; bare: VM held, no vCPU run; nested: L2 runs
    l1_workload: bool = True
    paused: bool = False  # migrate a stopped L1 and compare RAM and registers
    checks: tuple[str, ...] = ()
    mem_mib: int = 512
    smp: int = 1
    l1_mib: int = 64
    l1_threads: int = 2
    l1_rate_mib_s: int = 32
    l2_pages: int = 128
    # L2's payload: pagecount (memory checked between exits) or spinloop (a register loop that
    # exits only to report, l2_iters spins apart: L1 stays in guest mode nearly always).
    l2_payload: str = "pagecount"
    l2_iters: int = 5_000_000
    inject: str | None = None  # a deliberate fault (scenario/faults.py): proves the checks can fail
    profile: str | None = None  # an enlightenment profile this scenario is about (else the run's)
    # Needs KVM nested state to migrate (L2 in guest mode at the stop): skips without it.
    needs_nested_state: bool = False

    def __post_init__(self) -> None:
        assert self.state in STATES, self.state
        assert self.l2_payload in L2_PAYLOADS, self.l2_payload
        assert self.inject is None or self.inject in FAULTS, self.inject
        for name in NUMBERS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TypeError(f"{name} must be a non-negative integer, not {v!r}")
        for name in ("l1_workload", "paused"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, not {getattr(self, name)!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ScenarioSpec:
        """Inverse of to_json; TypeError on an unknown field, AssertionError on a bad value."""
        fields = dict(d)
        fields["checks"] = tuple(fields.get("checks", ()))
        return cls(**fields)


@dataclass(frozen=True)
class QemuPlan:
    """Which QEMU binaries run a variant and with which machine type, decided when it was
    planned (scenario/binaries.py); the engine starts exactly these."""

    src: str  # binary paths, as the inventory has them (HostFacts.qemus)
    dst: str
    machine: str  # a versioned type both have: the newest common one (pc-q35-7.2)
    src_version: str
    dst_version: str
    src_name: str = ""
    dst_name: str = ""
    pinned: bool = False  # named by the user (--qemu, --src-qemu, matrix axes): never swapped
    why: str = ""  # how the binaries were chosen, in a line
    # L1 RAM beyond the spec's, on both sides: 8 KiB when a mode was moved to a QEMU before 9.0
    # under TCG, whose lost-write bug lives in the word-aligned dirty-sync path (binaries.py).
    ram_extra_kib: int = 0

    @property
    def cross_version(self) -> bool:
        return self.src != self.dst

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QemuPlan:
        return cls(**d)


@dataclass(frozen=True)
class Variant:
    """A scenario with its axes fixed: migration mode, L1's enlightenment profile, the QEMU
    binaries of both sides (None: the run's own binary on both, its newest machine type).

    dst_profile differs from profile only to prove the pre-migration guard (None: same).
    guest_mode_retries: how often a live nested migration under TCG whose stop would land in
    guest mode is cancelled and tried again (0: never; the refusal is then reported as QEMU
    gives it).
    """

    spec: ScenarioSpec
    mode: MigrationMode
    profile: Profile = NO_PROFILE
    dst_profile: Profile | None = None
    qemu: QemuPlan | None = None
    guest_mode_retries: int = GUEST_MODE_RETRIES

    @property
    def id(self) -> str:
        vid = f"{self.spec.name}/{self.mode.compression}"
        if self.profile.names or self.profile.name != "none":
            vid += f"/{self.profile.name}"
        if self.mode.tls != "none":
            vid += f"+tls={self.mode.tls}"
        return vid + (f"+inject-{self.spec.inject}" if self.spec.inject else "")

    def params(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "migration": self.mode.to_json(),
                "profile": {"name": self.profile.name, "cpu_suffix": qemu_cpu_suffix(self.profile),
                            "notes": list(self.profile.notes)},
                "guest_mode_retries": self.guest_mode_retries}

    def to_json(self) -> dict[str, Any]:
        """Everything that makes the variant what it is; from_json gives it back."""
        return {"id": self.id, "spec": self.spec.to_json(), "mode": self.mode.to_json(),
                "profile": self.profile.to_json(),
                "dst_profile": self.dst_profile.to_json() if self.dst_profile else None,
                "qemu": self.qemu.to_json() if self.qemu else None,
                "guest_mode_retries": self.guest_mode_retries}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Variant:
        """Inverse of to_json; UsageError when a field is unknown or a value is invalid."""
        try:
            spec = ScenarioSpec.from_json(d["spec"])
            mode = MigrationMode.from_json(d["mode"])
            profile = Profile.from_json(d["profile"])
            dst = Profile.from_json(d["dst_profile"]) if d.get("dst_profile") else None
            qemu = QemuPlan.from_json(d["qemu"]) if d.get("qemu") else None
            retries = int(d.get("guest_mode_retries", GUEST_MODE_RETRIES))
        except (KeyError, TypeError, ValueError, AssertionError) as e:
            raise UsageError(f"variant file: {type(e).__name__}: {e}") from e
        return cls(spec, mode, profile, dst, qemu, retries)
