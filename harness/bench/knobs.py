"""Whether every knob of a sweep took effect: a value QEMU reads back is not proof (7.2 reads
back the multifd levels it ignores). Points that differ in one knob only are compared on what
that knob must change; identical rows are flagged, not presented as a finding. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness.bench.stats import median_of

# Below this relative difference two medians are "the same" (the study's data is the same
# pattern run after run: a real level change moves the ratio by several percent).
SAME = 0.01
# A level that changes what compressing costs moves the workers' CPU per GiB by this factor at
# least (zlib 9 vs 1: about 4x here; the same level run twice: within 1.3x).
CPU_MOVED = 1.5
# A bandwidth limit is in force when the stream stays below it by this margin.
LIMIT_SLACK = 1.15


@dataclass(frozen=True)
class KnobCheck:
    knob: str  # threads | level | wait_thread | bandwidth
    where: str  # the other knobs of the group, in a line
    values: tuple[Any, ...]
    observed: tuple[Any, ...]  # what the knob should change, per value
    took_effect: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _group_key(knobs: Mapping[str, Any], varied: str) -> tuple:
    return tuple(sorted((k, v) for k, v in knobs.items() if k != varied))


def _where(key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in key if v not in (None, 0) or k == "bandwidth_mib")


def _rel(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    return (hi - lo) / hi if hi else 0.0


def _groups(summaries: Sequence[Mapping[str, Any]], varied: str,
            modes: tuple[str, ...] | None = None) -> dict[tuple, list[Mapping[str, Any]]]:
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for s in summaries:
        knobs = dict(s["point"]["knobs"])
        if varied == "wait_thread":
            if knobs["mode"] not in ("compress", "compress-nowait"):
                continue
            knobs["wait_thread"] = knobs["mode"] == "compress"
            knobs["mode"] = "compress(wait on/off)"
        elif modes and knobs["mode"] not in modes:
            continue
        if knobs.get(varied) is None and varied != "wait_thread":
            continue
        out.setdefault(_group_key(knobs, varied), []).append(s)
    return {k: sorted(v, key=lambda s: _value(s, varied)) for k, v in out.items() if len(v) > 1}


def _value(s: Mapping[str, Any], varied: str) -> Any:
    k = s["point"]["knobs"]
    return (k["mode"] == "compress") if varied == "wait_thread" else (k.get(varied) or 0)


def check_threads(summaries: Sequence[Mapping[str, Any]]) -> list[KnobCheck]:
    """Each point with a threads/channels knob ran that many worker threads on the source
    (multifdsend_N / mig/src/send_N / compress), counted from /proc."""
    out = []
    for s in summaries:
        want = s["point"]["knobs"].get("threads")
        if want is None:
            continue
        seen = median_of(s, "src_workers")
        if seen is None:
            continue
        ok = int(seen) == int(want)
        out.append(KnobCheck(
            "threads", s["id"], (want,), (int(seen),), ok,
            f"{int(seen)} worker thread(s) seen on the source for threads={want}" if ok else
            f"threads={want} but the source ran {int(seen)} worker thread(s): the knob did not "
            "take effect"))
    return out


def check_level(summaries: Sequence[Mapping[str, Any]]) -> list[KnobCheck]:
    """Levels of one mode must move the compression ratio (payload / bytes on the wire) or what
    compressing costs (the source workers' CPU per GiB). On pages that are either random or one
    repeated word (l1work --entropy) every level finds the same redundancy, so the ratio alone
    can stay put while a higher level takes several times the CPU."""
    out = []
    for key, group in _groups(summaries, "level").items():
        ratios = [median_of(s, "ratio") for s in group]
        cpus = [median_of(s, "src_worker_cpu_s_per_gib") for s in group]
        values = tuple(_value(s, "level") for s in group)
        if any(r is None for r in ratios):
            continue
        spread = _rel(max(ratios), min(ratios))  # type: ignore[type-var]
        cpu_x = (max(cpus) / min(cpus) if all(c for c in cpus) else None)  # type: ignore[type-var]
        ok = spread >= SAME or (cpu_x is not None and cpu_x >= CPU_MOVED)
        vias = sorted({s["point"].get("level_via") or "qmp" for s in group})
        how = f" (set via {'/'.join(vias)})"
        seen = (f"ratio {', '.join(f'{r:.3f}' for r in ratios)}"  # type: ignore[str-format]
                + (f", worker CPU-s/GiB {', '.join(f'{c:.2f}' for c in cpus)}" if cpu_x else ""))  # type: ignore[str-format]
        out.append(KnobCheck(
            "level", _where(key), values, tuple(round(r, 3) for r in ratios), ok,  # type: ignore[arg-type]
            (f"levels {values} took effect: {seen}{how}" if ok else
             f"levels {values} leave the compression ratio and its CPU cost unchanged ({seen}){how}: "
             "the level did not take effect"
             + (" - QEMU before 9.0 ignores multifd levels set over QMP; -global "
                "migration.multifd-<codec>-level=N works (--level-via global)" if "qmp" in vias else ""))))
    return out


def check_wait_thread(summaries: Sequence[Mapping[str, Any]]) -> list[KnobCheck]:
    """compress-wait-thread off must send pages uncompressed when every thread is busy: the
    busy count (and the bytes on the wire) change. When the threads were never busy either
    way, there was nothing for the knob to decide: said so, still flagged."""
    out = []
    for key, group in _groups(summaries, "wait_thread").items():
        busy = [median_of(s, "compress_busy") or 0.0 for s in group]
        wire = [median_of(s, "wire_bytes") for s in group]
        values = tuple("on" if _value(s, "wait_thread") else "off" for s in group)
        conv = [f"{s['converged']}/{s['runs']}" for s in group]
        moved = len(set(conv)) > 1 or any(b != busy[0] for b in busy) or (
            all(w is not None for w in wire) and _rel(max(wire), min(wire)) >= SAME)  # type: ignore[type-var]
        if len(set(conv)) > 1:
            detail = f"wait-thread {values}: converged {', '.join(conv)}"
        elif moved:
            detail = f"wait-thread {values}: busy {busy}, wire bytes {wire}"
        elif not any(busy):
            detail = (f"wait-thread {values} leave busy (0) and the bytes on the wire unchanged: the "
                      "compression threads were never all busy, so there was nothing to decide")
        else:
            detail = f"wait-thread {values} leave busy {busy} and the wire bytes unchanged"
        out.append(KnobCheck("wait_thread", _where(key), values, tuple(busy), moved, detail))
    return out


def check_bandwidth(summaries: Sequence[Mapping[str, Any]]) -> list[KnobCheck]:
    """A max-bandwidth limit keeps the stream on the wire at or below it."""
    out = []
    for s in summaries:
        limit = s["point"]["knobs"].get("bandwidth_mib")
        used = median_of(s, "wire_mib_s")
        if not limit or used is None:
            continue
        ok = used <= limit * LIMIT_SLACK
        out.append(KnobCheck("bandwidth", s["id"], (limit,), (round(used, 1),), ok,
                             f"{used:.1f} MiB/s on the wire under a {limit} MiB/s limit"
                             + ("" if ok else ": the limit did not take effect")))
    return out


def check_xbzrle(summaries: Sequence[Mapping[str, Any]]) -> list[KnobCheck]:
    """xbzrle must encode pages from its cache; none encoded means the mode changed nothing
    (a migration that converged before any page was sent twice, or deltas that never fit)."""
    out = []
    for s in summaries:
        if s["point"]["knobs"]["mode"] != "xbzrle":
            continue
        pages = median_of(s, "xbzrle_pages")
        if pages is None:
            continue
        ok = pages > 0
        overflow = median_of(s, "xbzrle_overflow") or 0
        out.append(KnobCheck(
            "xbzrle", s["id"], (s["point"]["knobs"].get("xbzrle_cache_mib"),), (pages,), ok,
            f"{pages:.0f} page(s) sent as xbzrle deltas (median), {overflow:.0f} overflow(s)" if ok else
            f"no page was sent as an xbzrle delta ({overflow:.0f} overflows): the migration ended before "
            "dirty pages were sent a second time from the cache, so this point is plain precopy"))
    return out


def check_all(summaries: Sequence[Mapping[str, Any]]) -> list[KnobCheck]:
    return (check_threads(summaries) + check_level(summaries) + check_wait_thread(summaries)
            + check_bandwidth(summaries) + check_xbzrle(summaries))
