"""What a compression study measures: its axes, how they expand into points (each on every
QEMU binary of the inventory that offers its mode), what is pruned and why, the --quick
preset, and the randomized order of the repeated runs. Pure: no QEMU is started here."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.core.errors import UsageError
from harness.host.probe import QemuFacts
from harness.vm.migration import MigrationMode

SCENARIO = "bench-compression"
PATTERNS = ("seq", "random", "hot")
STUDY_MODES = ("none", "multifd-zlib", "multifd-zstd", "compress", "compress-nowait", "xbzrle")
# QEMU before 9.0 accepts multifd-zlib-level / multifd-zstd-level over QMP, reads them back and
# compresses at the default anyway (FACTS 2026-12); `-global migration.multifd-X-level=N` on the
# source's command line is applied.
QMP_LEVEL_APPLIED = (9, 0, 0)
LEVEL_VIA = ("auto", "qmp", "global", "both")  # both: a point each way (shows the QMP one ignored)
TCG_LABEL = ("emulated (TCG): every figure is of QEMU emulating the guest CPU on this host, "
             "not of a hardware-accelerated guest")


@dataclass(frozen=True)
class Workload:
    """The L1 workload of a point (guests/l1/l1work.c): what it dirties, how fast, how
    compressible (``entropy``: pages compress about that many times), in which order."""

    mib: int = 64
    rate_mib_s: int = 32
    threads: int = 2
    entropy: int = 2
    pattern: str = "seq"
    hot_pct: int = 10

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise UsageError(f"--pattern {self.pattern}: choose from {', '.join(PATTERNS)}")
        if not 1 <= self.entropy <= 512:
            raise UsageError(f"--entropy {self.entropy}: 1 (incompressible) .. 512")
        if self.mib < 1 or self.rate_mib_s < 1 or self.threads < 1 or not 1 <= self.hot_pct <= 100:
            raise UsageError("workload size, rate and threads must be at least 1, --hot-pct 1..100")

    @property
    def key(self) -> str:
        pat = f"hot{self.hot_pct}" if self.pattern == "hot" else self.pattern
        return f"{self.mib}M@{self.rate_mib_s}x{self.threads}-e{self.entropy}-{pat}"

    def l1work_args(self) -> str:
        return (f"--mib {self.mib} --threads {self.threads} --rate-mib-s {self.rate_mib_s} "
                f"--entropy {self.entropy} --pattern {self.pattern} --hot-pct {self.hot_pct}")


@dataclass(frozen=True)
class Point:
    """One point of the study: a migration mode with its knobs, a workload, a QEMU binary."""

    mode: MigrationMode
    workload: Workload
    qemu: str  # the binary's path (the inventory's key)
    qemu_label: str
    qemu_version: str
    level_via: str = "qmp"  # how a multifd level reaches QEMU: "qmp" or "global" (-global)

    @property
    def study_mode(self) -> str:
        m = self.mode
        if m.compression == "compress":
            return "compress" if m.wait_thread else "compress-nowait"
        return m.compression

    @property
    def threads(self) -> int | None:
        """The parallelism knob of the mode: multifd channels or compress threads (None: none)."""
        if self.mode.codec:
            return self.mode.channels
        if self.mode.compression == "compress":
            return self.mode.threads
        return None

    @property
    def knobs(self) -> dict[str, Any]:
        """The values that tell points apart (what the knob check groups by)."""
        m = self.mode
        return {"qemu": self.qemu_version, "mode": self.study_mode, "threads": self.threads,
                "level": m.level, "bandwidth_mib": m.max_bandwidth_mib,
                "switchover_bw_mib": m.avail_switchover_bandwidth_mib,
                "xbzrle_cache_mib": m.xbzrle_cache_mib if m.compression == "xbzrle" else None,
                "level_via": self.level_via if m.level is not None and m.codec else None,
                "workload": self.workload.key}

    @property
    def id(self) -> str:
        k = self.knobs
        parts = [self.qemu_version, k["mode"]]
        if k["threads"] is not None:
            parts.append(f"t{k['threads']}")
        if k["level"] is not None:
            parts.append(f"l{k['level']}" + ("g" if self.level_via == "global" else ""))
        if k["bandwidth_mib"]:
            parts.append(f"bw{k['bandwidth_mib']}")
        if k["switchover_bw_mib"]:
            parts.append(f"sw{k['switchover_bw_mib']}")
        if k["xbzrle_cache_mib"] is not None:
            parts.append(f"c{k['xbzrle_cache_mib']}")
        parts.append(self.workload.key)
        return "/".join(map(str, parts))

    def global_args(self) -> tuple[str, ...]:
        """Source command-line arguments that carry this point's level (level_via "global")."""
        if self.level_via != "global" or self.mode.level is None or not self.mode.codec:
            return ()
        return ("-global", f"migration.multifd-{self.mode.codec}-level={self.mode.level}")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode.to_json(), "workload": asdict(self.workload),
                "qemu": self.qemu, "qemu_label": self.qemu_label, "qemu_version": self.qemu_version,
                "level_via": self.level_via, "knobs": self.knobs, "study_mode": self.study_mode}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Point:
        return cls(MigrationMode.from_json(d["mode"]), Workload(**d["workload"]), d["qemu"],
                   d["qemu_label"], d["qemu_version"], d.get("level_via", "qmp"))


@dataclass(frozen=True)
class Axes:
    """The sweep: every combination of these, on every binary that has the mode."""

    modes: tuple[str, ...] = STUDY_MODES
    threads: tuple[int, ...] = (1, 2, 4)
    levels: tuple[int | None, ...] = (None,)  # None: QEMU's default level
    bandwidth_mib: tuple[int, ...] = (0,)  # 0: unthrottled
    switchover_bw_mib: tuple[int, ...] = (0,)
    workloads: tuple[Workload, ...] = (Workload(),)
    xbzrle_cache_mib: int = 64
    decompress_threads: int = 2
    downtime_limit_ms: int | None = None
    level_via: str = "auto"
    repeat: int = 3

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in STUDY_MODES]
        if bad:
            raise UsageError(f"--modes {','.join(bad)}: choose from {', '.join(STUDY_MODES)}")
        if self.level_via not in LEVEL_VIA:
            raise UsageError(f"--level-via {self.level_via}: choose from {', '.join(LEVEL_VIA)}")
        if self.repeat < 1 or any(t < 1 for t in self.threads):
            raise UsageError("--repeat and --threads must be at least 1")
        if any(b < 0 for b in (*self.bandwidth_mib, *self.switchover_bw_mib)):
            raise UsageError("bandwidth limits are MiB/s, 0 or more")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["workloads"] = [asdict(w) for w in self.workloads]
        return d


# The --quick preset: every mode at 1 and 2 threads where it has threads, one workload that
# compresses 2x, unthrottled, 3 repeats; on 2 cores under TCG a few minutes per binary.
QUICK = Axes(modes=STUDY_MODES, threads=(1, 2), workloads=(Workload(mib=64, rate_mib_s=16),),
             repeat=3)


@dataclass(frozen=True)
class Pruned:
    id: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason}


@dataclass
class Plan:
    points: list[Point] = field(default_factory=list)
    pruned: list[Pruned] = field(default_factory=list)
    axes: Axes = field(default_factory=Axes)


def _mode(study_mode: str, threads: int, level: int | None, bw: int, sw: int,
          axes: Axes) -> MigrationMode:
    comp = "compress" if study_mode.startswith("compress") else study_mode
    return MigrationMode(compression=comp, channels=threads, threads=threads,
                         decompress_threads=axes.decompress_threads, level=level,
                         wait_thread=study_mode != "compress-nowait",
                         xbzrle_cache_mib=axes.xbzrle_cache_mib, max_bandwidth_mib=bw,
                         avail_switchover_bandwidth_mib=sw,
                         downtime_limit_ms=axes.downtime_limit_ms)


def _vias(mode: MigrationMode, q: QemuFacts, level_via: str) -> tuple[str, ...]:
    if not mode.codec or mode.level is None:
        return ("qmp",)
    if level_via == "both":
        return ("qmp", "global")
    if level_via == "auto":
        return ("global",) if q.version_tuple < QMP_LEVEL_APPLIED else ("qmp",)
    return (level_via,)


def expand(axes: Axes, qemus: Sequence[QemuFacts]) -> Plan:
    """Every point of the sweep on every binary that has its mode; the rest pruned with why.

    Modes without a parallelism knob (none, xbzrle) take one point, not one per thread count;
    modes without a level take no level. A level on a binary before 9.0 goes by -global when
    ``level_via`` is auto (the QMP one would be ignored) and is said so in the point's id."""
    plan = Plan(axes=axes)
    seen: set[str] = set()
    for q in qemus:
        for sm in axes.modes:
            has_threads = sm not in ("none", "xbzrle")
            has_level = sm.startswith(("multifd-", "compress"))
            for t in axes.threads if has_threads else (axes.threads[0],):
                for lv in axes.levels if has_level else (None,):
                    for bw in axes.bandwidth_mib:
                        for sw in axes.switchover_bw_mib:
                            for w in axes.workloads:
                                try:
                                    mode = _mode(sm, t, lv, bw, sw, axes)
                                except UsageError as e:
                                    plan.pruned.append(Pruned(f"{q.version}/{sm}/l{lv}", str(e)))
                                    continue
                                for via in _vias(mode, q, axes.level_via):
                                    p = Point(mode, w, q.binary, q.label, q.version, via)
                                    if p.id in seen:
                                        continue
                                    seen.add(p.id)
                                    why = mode.unsupported_reason(q)
                                    if why:
                                        plan.pruned.append(Pruned(p.id, f"{why} (QEMU {q.label})"))
                                    else:
                                        plan.points.append(p)
    return plan


@dataclass(frozen=True)
class Chain:
    """The runs that share one booted L1: one binary, one workload, points in random order.
    Each migration's destination becomes the next one's source (ping-pong), so the study boots
    once per chain, not once per run."""

    qemu: str
    workload: Workload
    runs: tuple[tuple[Point, int], ...]  # (point, repeat index)


def chains(plan: Plan, seed: int) -> list[Chain]:
    """The repeated runs in a randomized order, grouped by (binary, workload): the order of
    chains and of the runs in each is shuffled with ``seed`` (recorded, so it can be replayed)."""
    rng = random.Random(seed)
    groups: dict[tuple[str, Workload], list[tuple[Point, int]]] = {}
    for p in plan.points:
        for r in range(plan.axes.repeat):
            groups.setdefault((p.qemu, p.workload), []).append((p, r))
    out = []
    for (qemu, w), runs in groups.items():
        rng.shuffle(runs)
        out.append(Chain(qemu, w, tuple(runs)))
    rng.shuffle(out)
    return out


def with_repeat(axes: Axes, repeat: int | None) -> Axes:
    return axes if repeat is None else replace(axes, repeat=repeat)
