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
NO_PROFILE = Profile(name="none")


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
    inject: str | None = None  # a deliberate fault (scenario/faults.py): proves the checks can fail
    profile: str | None = None  # an enlightenment profile this scenario is about (else the run's)

    def __post_init__(self) -> None:
        assert self.state in STATES, self.state
        assert self.inject is None or self.inject in FAULTS, self.inject

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ScenarioSpec:
        """Inverse of to_json; TypeError on an unknown field, AssertionError on a bad value."""
        fields = dict(d)
        fields["checks"] = tuple(fields.get("checks", ()))
        return cls(**fields)


@dataclass(frozen=True)
class Variant:
    """A scenario with its axes fixed: migration mode and L1's enlightenment profile.

    dst_profile differs from profile only to prove the pre-migration guard (None: same).
    """

    spec: ScenarioSpec
    mode: MigrationMode
    profile: Profile = NO_PROFILE
    dst_profile: Profile | None = None

    @property
    def id(self) -> str:
        vid = f"{self.spec.name}/{self.mode.compression}"
        if self.profile.names or self.profile.name != "none":
            vid += f"/{self.profile.name}"
        return vid + (f"+inject-{self.spec.inject}" if self.spec.inject else "")

    def params(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "migration": self.mode.to_json(),
                "profile": {"name": self.profile.name, "cpu_suffix": qemu_cpu_suffix(self.profile),
                            "notes": list(self.profile.notes)}}

    def to_json(self) -> dict[str, Any]:
        """Everything that makes the variant what it is; from_json gives it back."""
        return {"id": self.id, "spec": self.spec.to_json(), "mode": self.mode.to_json(),
                "profile": self.profile.to_json(),
                "dst_profile": self.dst_profile.to_json() if self.dst_profile else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Variant:
        """Inverse of to_json; UsageError when a field is unknown or a value is invalid."""
        try:
            spec = ScenarioSpec.from_json(d["spec"])
            mode = MigrationMode.from_json(d["mode"])
            profile = Profile.from_json(d["profile"])
            dst = Profile.from_json(d["dst_profile"]) if d.get("dst_profile") else None
        except (KeyError, TypeError, AssertionError) as e:
            raise UsageError(f"variant file: {type(e).__name__}: {e}") from e
        return cls(spec, mode, profile, dst)
