"""Migration modes (compression on the wire) and one bounded src -> dst migration over QMP."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from harness.core.errors import StepTimeout, UsageError
from harness.vm.machine import Machine, QmpCommandError

COMPRESSION_MODES = ("none", "multifd-zlib", "multifd-zstd", "compress", "xbzrle")
TERMINAL = {"completed", "failed", "cancelled"}

# Parameters worth reading back into the result: those the modes set, plus the limits.
RECORDED_PARAMS = (
    "multifd-channels", "multifd-compression", "multifd-zlib-level", "multifd-zstd-level",
    "compress-threads", "decompress-threads", "compress-level", "compress-wait-thread",
    "xbzrle-cache-size", "max-bandwidth", "downtime-limit",
    # QEMU 9.0+: how zero pages are found (a machine type's compat default: pc-q35-7.2 on 10.0
    # gives "legacy", pc-q35-10.0 "multifd"); left as the machine type says.
    "zero-page-detection",
)
# Thread names of migration, as -name ...,debug-threads=on shows them: 7.2 live_migration,
# multifdsend_N, multifdrecv_N, compress, decompress; 10.0 mig/src/main, mig/src/send_N,
# mig/dst/recv_N (query-migrationthreads is absent in 7.2 and deprecated in 9.2).
MIGRATION_THREAD = re.compile(r"^(live_migration|mig/|multifd|compress$|decompress$)")
THREAD_SAMPLE_S = 0.02


class QemuSchema(Protocol):
    """What the probe learnt of a QEMU binary's migration schema (see probe.QemuFacts)."""

    migration_capabilities: frozenset[str]
    migration_parameters: frozenset[str]
    multifd_compression: frozenset[str]
    legacy_compress: bool


@dataclass(frozen=True)
class MigrationMode:
    """How to migrate: compression mode and its knobs, mapped onto QEMU's names."""

    compression: str = "none"
    channels: int = 2
    threads: int = 2
    decompress_threads: int = 2
    level: int | None = None
    wait_thread: bool = True
    xbzrle_cache_mib: int = 64
    transport: str = "tcp"
    max_bandwidth_mib: int = 0  # 0: effectively unlimited on loopback
    downtime_limit_ms: int | None = None  # None: QEMU's own default (300 ms)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSION_MODES:
            raise UsageError(f"unknown compression mode '{self.compression}' "
                             f"(choose from {', '.join(COMPRESSION_MODES)})")
        if self.transport not in ("tcp", "unix"):
            raise UsageError(f"unknown transport '{self.transport}' (tcp or unix)")
        if self.channels < 1 or self.threads < 1 or self.decompress_threads < 1:
            raise UsageError("--channels and --threads must be at least 1")
        if self.max_bandwidth_mib < 0:
            raise UsageError(f"--max-bandwidth-mib {self.max_bandwidth_mib} is negative (0: unthrottled)")
        if self.downtime_limit_ms is not None and not 1 <= self.downtime_limit_ms <= 2_000_000:
            # QEMU refuses downtime-limit past 2000 s; saying so here beats its QMP error later.
            raise UsageError(f"--downtime-limit-ms {self.downtime_limit_ms} is not in 1..2000000")
        top = {"multifd-zlib": 9, "multifd-zstd": 20, "compress": 9}.get(self.compression)
        if self.level is not None and (top is None or not 0 <= self.level <= top):
            raise UsageError(f"--level {self.level} is not valid for {self.compression}"
                             + (f" (0..{top})" if top is not None else " (no level)"))

    @property
    def codec(self) -> str | None:
        return self.compression.split("-", 1)[1] if self.compression.startswith("multifd-") else None

    def capabilities(self) -> dict[str, bool]:
        caps = {"events": True}
        if self.codec:
            caps["multifd"] = True
        elif self.compression == "compress":
            caps["compress"] = True
        elif self.compression == "xbzrle":
            caps["xbzrle"] = True
        return caps

    def parameters(self, side: str) -> dict[str, Any]:
        """migrate-set-parameters arguments for 'src' or 'dst' (both get the same set)."""
        bw = (self.max_bandwidth_mib or 64 * 1024) * 1024 * 1024
        params: dict[str, Any] = {"max-bandwidth": bw}
        if self.downtime_limit_ms is not None:
            # The source decides when to stop the guest; the destination just keeps it in sync.
            params["downtime-limit"] = self.downtime_limit_ms
        if self.codec:
            params["multifd-channels"] = self.channels
            params["multifd-compression"] = self.codec
            if self.level is not None:
                params[f"multifd-{self.codec}-level"] = self.level
        elif self.compression == "compress":
            params["compress-threads"] = self.threads
            params["decompress-threads"] = self.decompress_threads
            params["compress-wait-thread"] = self.wait_thread
            if self.level is not None:
                params["compress-level"] = self.level
        elif self.compression == "xbzrle":
            params["xbzrle-cache-size"] = self.xbzrle_cache_mib * 1024 * 1024
        return params

    def unsupported_reason(self, qemu: QemuSchema) -> str | None:
        """Why this QEMU cannot run the mode (a skip reason), or None; read from the schema."""
        if self.compression == "compress" and not qemu.legacy_compress:
            return "legacy compress is absent from this QEMU's schema (deprecated 8.2, removed 9.1)"
        for cap in self.capabilities():
            if cap not in qemu.migration_capabilities:
                return f"this QEMU's migration capabilities lack '{cap}'"
        if self.codec and self.codec not in qemu.multifd_compression:
            return (f"this QEMU's multifd-compression offers "
                    f"{', '.join(sorted(qemu.multifd_compression))}, not {self.codec}")
        return None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MigrationMode:
        """Inverse of to_json; TypeError on an unknown field, UsageError on a bad value."""
        return cls(**d)


@dataclass
class MigrationOutcome:
    """What happened, as the source and the destination each saw it."""

    status: str  # completed | failed | cancelled | timeout
    error: str | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    dst_status: str | None = None
    dst_error: str | None = None
    switchover: str | None = None  # with before_switchover: "continued" or "cancelled"
    threads: dict[str, list[str]] = field(default_factory=dict)  # side -> migration threads seen

    def to_json(self) -> dict:
        return asdict(self)


def configure(m: Machine, mode: MigrationMode, side: str,
              extra_caps: Mapping[str, bool] | None = None) -> dict:
    """Set capabilities and parameters on one side and read them back for the record."""
    caps = {**mode.capabilities(), **(extra_caps or {})}
    m.qmp("migrate-set-capabilities",
          capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    m.qmp("migrate-set-parameters", **mode.parameters(side))
    got_caps = {c["capability"]: c["state"] for c in m.qmp("query-migrate-capabilities")}
    got_params = m.qmp("query-migrate-parameters")
    for k, v in caps.items():
        if got_caps.get(k) != v:
            raise QmpCommandError("migrate-set-capabilities", f"{k} reads back {got_caps.get(k)}")
    return {"capabilities": {k: v for k, v in got_caps.items() if v},
            "parameters": {k: got_params[k] for k in RECORDED_PARAMS if k in got_params}}


def migrate(src: Machine, dst: Machine, mode: MigrationMode, uri: str,
            timeout: float = 120.0, on_started: Callable[[], None] | None = None,
            before_switchover: Callable[[], bool] | None = None) -> MigrationOutcome:
    """Run one migration to a terminal state (or timeout), then see whether dst took it.

    on_started runs right after the source was told to migrate (where a fault can act).
    before_switchover: the source pauses before switchover (pause-before-switchover, with its
    vCPUs stopped) and this decides: True continues, False cancels (the source runs on, the
    destination's load fails). The migration threads both sides show are sampled throughout.
    """
    out = MigrationOutcome(status="setup")
    src_caps = {"pause-before-switchover": True} if before_switchover else None
    out.settings = {"dst": configure(dst, mode, "dst"),
                    "src": configure(src, mode, "src", extra_caps=src_caps)}
    dst.qmp("migrate-incoming", uri=uri)
    sampler = _ThreadSampler({"src": src, "dst": dst})
    t0 = time.monotonic()
    src.qmp("migrate", uri=uri)
    if on_started is not None:
        on_started()
    wanted = TERMINAL | ({"pre-switchover"} if before_switchover else set())
    try:
        ev = src.wait_qmp_event({"MIGRATION"}, timeout,
                                match=lambda e: e.get("data", {}).get("status") in wanted)
        if ev.get("data", {}).get("status") == "pre-switchover" and before_switchover:
            go = before_switchover()
            out.switchover = "continued" if go else "cancelled"
            if go:
                src.qmp("migrate-continue", state="pre-switchover")
            else:
                src.qmp("migrate_cancel")
            left = max(1.0, timeout - (time.monotonic() - t0))
            src.wait_qmp_event({"MIGRATION"}, left,
                               match=lambda e: e.get("data", {}).get("status") in TERMINAL)
    except StepTimeout as e:
        out.status, out.error = "timeout", str(e)
        try:
            src.qmp("migrate_cancel")
        except QmpCommandError:
            pass
    finally:
        out.threads = sampler.stop()
    out.seconds = round(time.monotonic() - t0, 3)
    try:
        info = src.qmp("query-migrate")
        out.stats = info
        if out.status != "timeout":
            out.status = info.get("status", "unknown")
        out.error = out.error or info.get("error-desc")
    except QmpCommandError as e:
        out.error = out.error or str(e)
    out.dst_status, out.dst_error = destination_state(dst, timeout=15.0)
    return out


class _ThreadSampler:
    """Collects the migration thread names of some QEMUs from /proc, every 20 ms, in a thread
    of its own (the QMP waits above block)."""

    def __init__(self, machines: Mapping[str, Machine]) -> None:
        self.machines = machines
        self.seen: dict[str, set[str]] = {side: set() for side in machines}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nestvirt-threads", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for side, m in self.machines.items():
                self.seen[side].update(n for n in m.thread_names() if MIGRATION_THREAD.match(n))
            self._stop.wait(THREAD_SAMPLE_S)

    def stop(self) -> dict[str, list[str]]:
        self._stop.set()
        self._thread.join(timeout=5.0)
        # multifdsend_0 and multifdsend_1 are one kind: keep every name, sorted.
        return {side: sorted(names) for side, names in self.seen.items()}


def destination_state(dst: Machine, timeout: float) -> tuple[str, str | None]:
    """Wait for dst to leave 'inmigrate'; return (run state, QEMU's own error line or None)."""
    deadline = time.monotonic() + timeout
    while True:
        if not dst.alive():
            return "exited", dst.error_summary()
        try:
            status = dst.qmp("query-status", timeout=5)["status"]
        except QmpCommandError:
            # QMP drops first when QEMU is on its way out after a failed load: let it finish.
            dst.wait_exit(5.0)
            return ("exited", dst.error_summary()) if not dst.alive() else ("unknown", None)
        if status != "inmigrate":
            return status, None
        if time.monotonic() > deadline:
            return status, f"destination still 'inmigrate' after {timeout:g}s"
        time.sleep(0.05)


def summarize_stats(info: dict) -> dict[str, Any]:
    """Flatten query-migrate into the metrics a report plots (absent keys stay absent)."""
    ram = info.get("ram", {})
    out: dict[str, Any] = {}
    for k in ("total-time", "setup-time", "downtime", "expected-downtime"):
        if k in info:
            out[k.replace("-", "_") + "_ms"] = info[k]
    for k in ("transferred", "total", "duplicate", "normal", "mbps", "pages-per-second",
              "dirty-sync-count", "multifd-bytes", "precopy-bytes", "downtime-bytes"):
        if k in ram:
            out["ram_" + k.replace("-", "_")] = ram[k]
    for group in ("compression", "xbzrle-cache"):
        if group in info:
            for k, v in info[group].items():
                out[f"{group.replace('-', '_')}_{k.replace('-', '_')}"] = v
    return out
