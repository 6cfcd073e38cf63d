"""From the runs of a study to one summary per point: median and spread (min..max) of every
figure over the runs that converged, with what was measured about the knobs. Pure."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PAGE = 4096
GIB = 1 << 30
# The parallel workers of a mode on each side: what its threads/channels knob sets.
WORKERS = {"src": ("mig-send", "compress"), "dst": ("mig-recv", "decompress")}


def spread(values: Iterable[float | int | None]) -> dict[str, float] | None:
    """median, min, max and n of the numbers among ``values`` (None when there are none)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def payload_bytes(stats: Mapping[str, Any]) -> int:
    """Guest RAM bytes a run sent as page contents (not zero pages): normal pages, legacy
    compressed pages and xbzrle-encoded pages, at 4 KiB each. What an uncompressed stream
    would have carried, so payload / wire is the compression ratio."""
    pages = sum(int(stats.get(k) or 0) for k in
                ("ram_normal", "compression_pages", "xbzrle_cache_pages"))
    return pages * PAGE


def run_figures(run: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run that a point's summary takes medians of."""
    s = run.get("stats") or {}
    wire = int((run.get("wire") or {}).get("to_dst") or 0)
    # 0 is what 7.2 answers when asked between "completed" and storing it (vm/migration.py
    # asks again); QEMU's event timestamps then still give the length.
    total_ms = s.get("total_time_ms") or s.get("event_total_ms")
    if not total_ms and not run.get("converged") and run.get("seconds"):
        total_ms = run["seconds"] * 1000  # cancelled at the bound: as long as it was let run
    payload = payload_bytes(s)
    out: dict[str, Any] = {
        "total_time_ms": total_ms, "event_total_ms": s.get("event_total_ms"),
        "downtime_ms": s.get("downtime_ms"),
        "setup_time_ms": s.get("setup_time_ms"), "pages_per_second": s.get("ram_pages_per_second"),
        "mbps": s.get("ram_mbps"), "dirty_sync_count": s.get("ram_dirty_sync_count"),
        "qemu_transferred": s.get("ram_transferred"),
        "wire_bytes": wire or None, "payload_bytes": payload or None,
        "wire_mib_s": (wire / 2**20 / (total_ms / 1000)) if wire and total_ms else None,
        # QEMU's pages-per-second is the last iteration's rate; this one is the whole run's.
        "payload_pages_s": (payload / PAGE / (total_ms / 1000)) if payload and total_ms else None,
        "ratio": (payload / wire) if wire and payload else None,
        "compress_busy": s.get("compression_busy"), "compress_busy_rate": s.get("compression_busy_rate"),
        "compress_rate": s.get("compression_compression_rate"),
        "xbzrle_cache_miss_rate": s.get("xbzrle_cache_cache_miss_rate"),
        "xbzrle_overflow": s.get("xbzrle_cache_overflow"),
        "xbzrle_encoding_rate": s.get("xbzrle_cache_encoding_rate"),
        "xbzrle_pages": s.get("xbzrle_cache_pages"),
        "guest_during_vs_before": (run.get("guest") or {}).get("during_vs_before"),
        "sampler_share": (run.get("sampler") or {}).get("share"),
        "relay_cpu_s": (run.get("sampler") or {}).get("relay_cpu_s"),
    }
    cpu = run.get("cpu") or {}
    for side in ("src", "dst"):
        kinds = cpu.get(side) or {}
        total = sum(k.get("total_s", 0.0) for k in kinds.values())
        out[f"{side}_cpu_s"] = total
        out[f"{side}_cpu_s_per_gib"] = total / (payload / GIB) if payload else None
        for kind, d in kinds.items():
            out[f"{side}_{kind}_cpu_s"] = d.get("total_s")
            out[f"{side}_{kind}_n"] = d.get("n")
        workers = [t for t in (run.get("threads") or {}).get(side, [])
                   if t.get("kind") in WORKERS[side]]
        out[f"{side}_workers"] = len(workers)
        if workers:
            cpus = [t["cpu_s"] for t in workers]
            out[f"{side}_worker_min_s"], out[f"{side}_worker_max_s"] = min(cpus), max(cpus)
            if payload:
                # What a level costs: the workers' CPU per GiB they compressed (CPU time, so a
                # loaded host moves it far less than it moves wall time).
                out[f"{side}_worker_cpu_s_per_gib"] = sum(cpus) / (payload / GIB)
            if total_ms:
                out[f"{side}_worker_busy"] = sum(cpus) / (len(cpus) * total_ms / 1000)
    out["src_migthread_cpu_s"] = (cpu.get("src") or {}).get("mig-main", {}).get("total_s")
    return out


def summarize_point(point: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One point's summary from its runs (warm-ups excluded by the caller): counts, and for
    every figure its spread over the converged runs whose guest verified."""
    good = [r for r in runs if r.get("converged") and (r.get("guest") or {}).get("verify_ok")]
    figs = [run_figures(r) for r in good]
    return {
        "id": point["id"], "point": dict(point), "runs": len(runs),
        "converged": sum(1 for r in runs if r.get("converged")),
        "not_converged": [r.get("status") for r in runs if not r.get("converged")],
        "errors": [r.get("error") for r in runs if r.get("status") == "error"],
        "guest_broken": sum(1 for r in runs if r.get("converged")
                            and not (r.get("guest") or {}).get("verify_ok")),
        "figures": _spreads(figs),
        # What the runs that did not converge did before they were cancelled (used bandwidth...).
        "figures_not_converged": _spreads([run_figures(r) for r in runs
                                           if not r.get("converged") and r.get("wire")]),
    }


def _spreads(figs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for f in figs for k in f})
    return {k: sp for k in keys if (sp := spread(f.get(k) for f in figs)) is not None}


def median_of(summary: Mapping[str, Any], key: str) -> float | None:
    f = (summary.get("figures") or {}).get(key)
    return f["median"] if f else None
