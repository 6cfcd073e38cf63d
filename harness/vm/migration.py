"""Migration modes (compression and encryption on the wire) and one bounded src -> dst
migration over QMP: it ends in a terminal state, a timeout, or a stall the harness cancels."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from harness.core.errors import StepTimeout, UsageError
from harness.vm.machine import Machine, QmpCommandError
from harness.vm.tls import TLS_MODES, TlsCredentials

COMPRESSION_MODES = ("none", "multifd-zlib", "multifd-zstd", "compress", "xbzrle")
TERMINAL = {"completed", "failed", "cancelled"}
# Outcomes the source never reported because it could not: it died, or stopped answering.
SOURCE_EXITED = "source-exited"
SOURCE_HUNG = "source-hung"
# How long one question to a migrating source may take before it counts as hung.
QUERY_TIMEOUT_S = 10.0

# Parameters worth reading back into the result: those the modes set, plus the limits.
RECORDED_PARAMS = (
    "multifd-channels", "multifd-compression", "multifd-zlib-level", "multifd-zstd-level",
    "compress-threads", "decompress-threads", "compress-level", "compress-wait-thread",
    "xbzrle-cache-size", "max-bandwidth", "downtime-limit", "avail-switchover-bandwidth",
    # QEMU 9.0+: how zero pages are found (a machine type's compat default: pc-q35-7.2 on 10.0
    # gives "legacy", pc-q35-10.0 "multifd"); left as the machine type says.
    "zero-page-detection", "tls-creds", "tls-hostname", "tls-authz",
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
    """How to migrate: compression mode and its knobs, mapped onto QEMU's names, and whether
    the stream is encrypted (tls: none, x509 or psk; credentials are made per run)."""

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
    # QEMU 9.1+: the bandwidth QEMU assumes for the switchover decision (0: what it measured).
    avail_switchover_bandwidth_mib: int = 0
    tls: str = "none"
    # QEMU's auto-converge: throttle the guest's vCPUs when it out-dirties the stream (a CPU
    # bound mode in the one-vCPU host VM shares its CPU with them).
    auto_converge: bool = False

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise UsageError(f"unknown TLS mode '{self.tls}' (choose from {', '.join(TLS_MODES)})")
        if self.compression not in COMPRESSION_MODES:
            raise UsageError(f"unknown compression mode '{self.compression}' "
                             f"(choose from {', '.join(COMPRESSION_MODES)})")
        if self.transport not in ("tcp", "unix"):
            raise UsageError(f"unknown transport '{self.transport}' (tcp or unix)")
        if self.channels < 1 or self.threads < 1 or self.decompress_threads < 1:
            raise UsageError("--channels and --threads must be at least 1")
        if self.xbzrle_cache_mib < 1 or self.xbzrle_cache_mib & (self.xbzrle_cache_mib - 1):
            # QEMU's rule (migration/options.c): a power of two no less than the target page.
            raise UsageError(f"--xbzrle-cache-mib {self.xbzrle_cache_mib}: must be a power of "
                             "two (1, 2, 4, ... MiB)")
        if self.max_bandwidth_mib < 0 or self.avail_switchover_bandwidth_mib < 0:
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
        if self.auto_converge:
            caps["auto-converge"] = True
        return caps

    def parameters(self, side: str) -> dict[str, Any]:
        """migrate-set-parameters arguments for 'src' or 'dst' (both get the same set)."""
        bw = (self.max_bandwidth_mib or 64 * 1024) * 1024 * 1024
        params: dict[str, Any] = {"max-bandwidth": bw}
        if self.downtime_limit_ms is not None:
            # The source decides when to stop the guest; the destination just keeps it in sync.
            params["downtime-limit"] = self.downtime_limit_ms
        if self.avail_switchover_bandwidth_mib:
            params["avail-switchover-bandwidth"] = self.avail_switchover_bandwidth_mib << 20
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
        if self.avail_switchover_bandwidth_mib and (
                "avail-switchover-bandwidth" not in qemu.migration_parameters):
            return "this QEMU's migration parameters lack 'avail-switchover-bandwidth' (9.1+)"
        need = {"x509": ("tls-creds", "tls-hostname", "tls-authz"), "psk": ("tls-creds",)}
        for param in need.get(self.tls, ()):
            if param not in qemu.migration_parameters:
                return f"this QEMU's migration parameters lack '{param}' (needed for TLS {self.tls})"
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

    status: str  # completed | failed | cancelled | timeout | stalled | source-exited | source-hung
    error: str | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    dst_status: str | None = None
    dst_error: str | None = None
    switchover: str | None = None  # with before_switchover: "continued" or "cancelled"
    threads: dict[str, list[str]] = field(default_factory=dict)  # side -> migration threads seen
    uri: str = ""
    dst_lines: list[str] = field(default_factory=list)  # what dst's stderr gained meanwhile
    cancel_ms: float | None = None  # stalled: migrate_cancel until the source said cancelled

    @property
    def dst_said(self) -> str | None:
        """The destination's own line about this migration (only it says why authz refused)."""
        return telling_line(self.dst_lines)

    def to_json(self) -> dict:
        return asdict(self)


def configure(m: Machine, mode: MigrationMode, side: str,
              extra_caps: Mapping[str, bool] | None = None,
              extra_params: Mapping[str, Any] | None = None) -> dict:
    """Set capabilities and parameters (and extra ones: TLS) on one side; read them back."""
    caps = {**mode.capabilities(), **(extra_caps or {})}
    m.qmp("migrate-set-capabilities",
          capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    m.qmp("migrate-set-parameters", **mode.parameters(side), **(extra_params or {}))
    got_caps = {c["capability"]: c["state"] for c in m.qmp("query-migrate-capabilities")}
    got_params = m.qmp("query-migrate-parameters")
    for k, v in caps.items():
        if got_caps.get(k) != v:
            raise QmpCommandError("migrate-set-capabilities", f"{k} reads back {got_caps.get(k)}")
    return {"capabilities": {k: v for k, v in got_caps.items() if v},
            "parameters": {k: got_params[k] for k in RECORDED_PARAMS if k in got_params}}


def migrate(src: Machine, dst: Machine, mode: MigrationMode, uri: str,
            timeout: float = 120.0, on_started: Callable[[], None] | None = None,
            before_switchover: Callable[[], bool] | None = None, *,
            tls: TlsCredentials | None = None,
            stall_timeout: float | None = None,
            dst_uri: str | None = None,
            extra_caps: Mapping[str, bool] | None = None,
            thread_names: bool = True) -> MigrationOutcome:
    """Run one migration to a terminal state (or timeout, or stall), then see whether dst took it.

    A uri with port 0 ("tcp:ADDR:0") lets the destination's kernel pick the port (no race).
    With tls, the destination was started with tls.dst_args(); the source's client
    credentials are added here. With stall_timeout, a migration whose byte count has not moved
    for that long is cancelled (TCP alone would retry for ~15 min on a dead link).
    ``dst_uri``: where the destination listens when the stream passes something in between (a
    counting relay, vm/wire.py; the source then sends to ``uri``; default: both ``uri``).
    ``extra_caps`` are set on both sides besides the mode's (e.g. another mode's turned off on
    a QEMU that migrated before). ``thread_names`` False: a caller that samples the threads
    itself (vm/threadcpu.py) spares this function's own 20 ms name sampler.
    on_started runs right after the source was told to migrate (where a fault can act).
    before_switchover: the source pauses before switchover (pause-before-switchover, with its
    vCPUs stopped) and this decides: True continues, False cancels (the source runs on, the
    destination's load fails). The migration threads both sides show are sampled throughout.
    """
    out = MigrationOutcome(status="setup")
    src_caps = {**(extra_caps or {}),
                **({"pause-before-switchover": True} if before_switchover else {})}
    src_params: dict[str, Any] = {}
    if tls is not None:
        obj = tls.src_object()
        src.qmp("object-add", **obj)
        src_params = tls.src_params(obj["id"])
    out.settings = {"dst": configure(dst, mode, "dst", extra_caps=extra_caps,
                                     extra_params=tls.dst_params() if tls else None),
                    "src": configure(src, mode, "src", extra_caps=src_caps,
                                     extra_params=src_params)}
    dst_seen = len(dst.error_lines())
    dst.qmp("migrate-incoming", uri=dst_uri or uri)
    out.uri = listening_uri(dst, dst_uri or uri)
    if dst_uri is None:
        uri = out.uri
    # A source that was a destination before (a study's ping-pong) holds that migration's
    # events: "completed" among them would end this wait before it began.
    for ev in src.events_seen:
        if ev.get("event") in ("MIGRATION", "MIGRATION_PASS"):
            ev["_consumed"] = True
    sampler = _ThreadSampler({"src": src, "dst": dst}) if thread_names else None
    t0 = time.monotonic()
    src.qmp("migrate", uri=uri)
    if on_started is not None:
        on_started()
    wanted = TERMINAL | ({"pre-switchover"} if before_switchover else set())
    try:
        reached, why, ms = _wait_end(src, t0 + timeout, timeout, stall_timeout, wanted)
        if reached == "pre-switchover" and before_switchover:
            go = before_switchover()
            out.switchover = "continued" if go else "cancelled"
            if go:
                src.qmp("migrate-continue", state="pre-switchover")
            else:
                src.qmp("migrate_cancel")
            left = max(1.0, timeout - (time.monotonic() - t0))
            reached, why, ms = _wait_end(src, time.monotonic() + left, left, stall_timeout,
                                         TERMINAL)
        if reached in ("timeout", "stalled", SOURCE_EXITED, SOURCE_HUNG):
            out.status, out.error, out.cancel_ms = reached, why, ms
    finally:
        out.threads = sampler.stop() if sampler is not None else {}
    out.seconds = round(time.monotonic() - t0, 3)
    try:
        if out.status in (SOURCE_EXITED, SOURCE_HUNG):
            raise QmpCommandError("query-migrate", "not asked: " + out.status)
        info = src.qmp("query-migrate")
        deadline = time.monotonic() + 2.0
        while (info.get("status") == "completed" and not info.get("total-time")
               and time.monotonic() < deadline):
            # QEMU 7.2 sends 'completed' before it fills in total-time and downtime (0 until
            # then, seen under load): ask again, briefly.
            time.sleep(0.05)
            info = src.qmp("query-migrate")
        out.stats = info
        if out.status not in ("timeout", "stalled"):
            out.status = info.get("status", "unknown")
        out.error = out.error or info.get("error-desc")
    except QmpCommandError as e:
        out.error = out.error or str(e)
    if out.status == "completed":
        out.dst_status, out.dst_error = destination_state(dst, timeout=15.0)
    elif out.status == "stalled":
        # Nothing moved: the way to the destination is dead or it hangs. Asking it over QMP
        # would hang as well; whether its process still lives is known without asking.
        out.dst_status = "not asked (stalled)" if dst.alive() else "exited"
    else:
        # A refused handshake is told on the destination's stderr within ~0.2 s; waiting
        # for it to leave 'inmigrate' would be waiting for nothing.
        _wait_new_lines(dst, dst_seen, 2.0)
        state, why = destination_state(dst, timeout=0.0, ask_timeout=2.0)
        out.dst_status, out.dst_error = state, None if state == "inmigrate" else why
    if out.status != "stalled":
        out.dst_lines = dst.error_lines()[dst_seen:]
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


def listening_uri(dst: Machine, uri: str) -> str:
    """The uri with the port the destination really listens on (for "tcp:ADDR:0")."""
    if not (uri.startswith("tcp:") and uri.endswith(":0")):
        return uri
    for sa in dst.qmp("query-migrate").get("socket-address", []):
        if sa.get("type") == "inet" and sa.get("port") not in (None, "0"):
            return f"{uri[:-2]}:{sa['port']}"
    raise QmpCommandError("query-migrate", f"destination reports no listening port for {uri}")


def progress_key(info: Mapping[str, Any]) -> tuple:
    """What must change while a migration makes progress: status and bytes sent."""
    ram = info.get("ram", {})
    return (info.get("status"), ram.get("transferred"), ram.get("multifd-bytes"),
            ram.get("dirty-sync-count"))


def _wait_end(src: Machine, deadline: float, timeout: float, stall_timeout: float | None,
              wanted: set[str]) -> tuple[str, str | None, float | None]:
    """(status, None, None) once the source reported a status among `wanted`; else (status,
    why, cancel ms) after the harness cancelled it: "timeout" past the deadline, "stalled"
    when its byte count stood still for stall_timeout."""
    last_key: tuple | None = None
    last_move = time.monotonic()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _cancel(src)
            # The source's own line when it printed one (a RAM save -EIO that left it hung
            # without a terminal state): a timeout alone does not say why.
            said = src.failure_lines()[-1:]
            return "timeout", f"src: no terminal migration state in {timeout:g}s" + \
                (f"; src said: {said[0]}" if said else ""), None
        try:
            ev = src.wait_qmp_event({"MIGRATION"}, min(left, 0.5),
                                    match=lambda e: e.get("data", {}).get("status") in wanted)
            return ev["data"]["status"], None, None
        except StepTimeout:
            if not src.alive():
                return SOURCE_EXITED, f"the source QEMU exited mid-migration: {src.exit_story()}", None
        if stall_timeout is None:
            continue
        try:
            info = src.qmp("query-migrate", timeout=min(stall_timeout, QUERY_TIMEOUT_S))
        except QmpCommandError as e:
            # A source that cannot say how far it got makes no progress either; asking again
            # (or cancelling) would wait on it once more.
            if src.wait_exit(1.0) is not None:
                return SOURCE_EXITED, f"the source QEMU exited mid-migration: {e.desc}", None
            return SOURCE_HUNG, f"no progress: the source QEMU does not answer ({e.desc})", None
        key, now = progress_key(info), time.monotonic()
        if key != last_key:
            last_key, last_move = key, now
        elif now - last_move >= stall_timeout:
            sent = info.get("ram", {}).get("transferred", 0)
            ms, final = _cancel(src)
            return ("stalled", f"no progress for {stall_timeout:g}s ({info.get('status')}, "
                    f"{sent} bytes sent): migrate_cancel -> {final} in {ms:.0f} ms", ms)


def _cancel(src: Machine) -> tuple[float, str]:
    """migrate_cancel, then wait (bounded) for the source to say so; (ms taken, final status)."""
    t0 = time.monotonic()
    try:
        src.qmp("migrate_cancel")
        ev = src.wait_qmp_event({"MIGRATION"}, 10.0,
                                match=lambda e: e.get("data", {}).get("status") in TERMINAL)
        final = ev["data"]["status"]
    except (QmpCommandError, StepTimeout) as e:
        final = f"unknown ({e})"
    return (time.monotonic() - t0) * 1000, final


def _wait_new_lines(dst: Machine, seen: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dst.alive() and len(dst.error_lines()) <= seen and time.monotonic() < deadline:
        time.sleep(0.05)


_GENERIC_LOAD_LINES = ("error while loading state", "load of migration failed")


def telling_line(lines: list[str]) -> str | None:
    """The line that says most: the first naming TLS or authz, else the first that is not
    QEMU's generic follow-up ("error while loading state ...", "load of migration failed"),
    which says the cause (a RAM size mismatch); else the last. No prefix."""
    if not lines:
        return None
    cause = [x for x in lines if not any(g in x for g in _GENERIC_LOAD_LINES)]
    pick = next((x for x in lines if "TLS" in x or "authz" in x),
                cause[0] if cause else lines[-1])
    return pick.split(": ", 1)[1] if pick.startswith("qemu-system") and ": " in pick else pick


def destination_state(dst: Machine, timeout: float,
                      ask_timeout: float = 5.0) -> tuple[str, str | None]:
    """Wait for dst to leave 'inmigrate'; return (run state, QEMU's own error line or None).
    ask_timeout bounds each question (and the wait for an exit once QMP dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        if not dst.alive():
            return "exited", dst.error_summary()
        try:
            status = dst.qmp("query-status", timeout=ask_timeout)["status"]
        except QmpCommandError:
            # QMP drops first when QEMU is on its way out after a failed load: let it finish.
            dst.wait_exit(ask_timeout)
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
