"""The study's tables as rows (for the HTML page) and as text (the console, tables.txt): shaped
like the seed studies' (threads -> main-thread CPU, per-thread CPU range, total time, busy
ratio, pages/s; wait-thread on/off at a bandwidth limit -> used bandwidth, pages/s). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def _f(s: Mapping[str, Any], key: str, fmt: str = "{:.0f}", spread: bool = True) -> str:
    f = (s.get("figures") or {}).get(key)
    if not f:
        return "-"
    med = fmt.format(f["median"])
    if not spread or f["n"] < 2 or f["min"] == f["max"]:
        return med
    return f"{med} [{fmt.format(f['min'])}-{fmt.format(f['max'])}]"


def _conv(s: Mapping[str, Any]) -> str:
    mark = "" if s["converged"] == s["runs"] else " !"
    return f"{s['converged']}/{s['runs']}{mark}"


def _label(s: Mapping[str, Any]) -> str:
    k = s["point"]["knobs"]
    parts = [k["mode"]]
    if k.get("threads") is not None:
        parts.append(f"t{k['threads']}")
    if k.get("level") is not None:
        parts.append(f"l{k['level']}" + ("(-global)" if s["point"].get("level_via") == "global" else ""))
    if k.get("bandwidth_mib"):
        parts.append(f"{k['bandwidth_mib']}MiB/s")
    return " ".join(parts)


def summary_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    head = ["qemu", "point", "conv", "total ms", "downtime ms", "setup ms", "pages/s", "run pages/s", "mbps",
            "syncs", "wire MiB", "wire MiB/s", "ratio", "src CPU-s/GiB", "dst CPU-s/GiB",
            "guest during/before"]
    rows = [[s["point"]["qemu_version"], _label(s), _conv(s), _f(s, "total_time_ms"),
             _f(s, "downtime_ms"), _f(s, "setup_time_ms"), _f(s, "pages_per_second"),
             _f(s, "payload_pages_s"), _f(s, "mbps"), _f(s, "dirty_sync_count", spread=False),
             _f({"figures": {"x": _scaled(s, "wire_bytes", 2**-20)}}, "x", "{:.1f}", False),
             _f(s, "wire_mib_s", "{:.0f}"), _f(s, "ratio", "{:.2f}"),
             _f(s, "src_cpu_s_per_gib", "{:.2f}", False), _f(s, "dst_cpu_s_per_gib", "{:.2f}", False),
             _f(s, "guest_during_vs_before", "{:.2f}")] for s in summaries]
    return ("Per point: median [min-max] over the converged runs (pages/s: QEMU's, its last iteration's "
            "rate; run pages/s: pages sent with content over the whole migration)", head, rows)


def _scaled(s: Mapping[str, Any], key: str, k: float) -> dict[str, float] | None:
    f = (s.get("figures") or {}).get(key)
    return None if not f else {**f, "median": f["median"] * k, "min": f["min"] * k,
                               "max": f["max"] * k}


def threads_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    """The lockless-multithread study's shape: per mode and thread count."""
    head = ["qemu", "mode", "threads", "main-thread CPU s", "per-thread CPU s (min-max)",
            "dst per-thread CPU s", "total ms", "busy ratio", "QEMU busy-rate", "pages/s", "run pages/s"]
    rows = []
    for s in sorted(summaries, key=lambda s: (s["point"]["qemu_version"], s["point"]["knobs"]["mode"],
                                              s["point"]["knobs"].get("threads") or 0)):
        k = s["point"]["knobs"]
        if k.get("threads") is None:
            continue
        fig = s.get("figures") or {}
        rng = (f"{fig['src_worker_min_s']['median']:.3f}-{fig['src_worker_max_s']['median']:.3f}"
               if "src_worker_min_s" in fig else "-")
        drng = (f"{fig['dst_worker_min_s']['median']:.3f}-{fig['dst_worker_max_s']['median']:.3f}"
                if "dst_worker_min_s" in fig else "-")
        rows.append([k["qemu"], _label(s).split(" t")[0], str(k["threads"]),
                     _f(s, "src_migthread_cpu_s", "{:.3f}"), rng, drng, _f(s, "total_time_ms"),
                     _f(s, "src_worker_busy", "{:.2f}", False), _f(s, "compress_busy_rate", "{:.2f}", False),
                     _f(s, "pages_per_second"), _f(s, "payload_pages_s")])
    return ("Threads/channels: CPU of the migration thread and of each worker, time, busy ratio "
            "(worker CPU / (threads x total time))", head, rows)


def wait_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    head = ["qemu", "threads", "bandwidth limit", "wait-thread", "used MiB/s (wire)", "pages/s",
            "run pages/s", "busy", "busy-rate", "total ms", "ratio"]
    rows = []
    for s in sorted(summaries, key=lambda s: (s["point"]["qemu_version"],
                                              s["point"]["knobs"].get("threads") or 0,
                                              s["point"]["knobs"]["bandwidth_mib"],
                                              s["point"]["knobs"]["mode"])):
        k = s["point"]["knobs"]
        if k["mode"] not in ("compress", "compress-nowait"):
            continue
        wait = "on" if k["mode"] == "compress" else "off"
        if not s.get("figures") and s.get("figures_not_converged"):
            # Never converged: what it did until the bound is the finding (e.g. the wire full).
            s = {**s, "figures": s["figures_not_converged"]}
            wait += f" (0/{s['runs']} converged: until cancelled)"
        rows.append([k["qemu"], str(k["threads"]), f"{k['bandwidth_mib']} MiB/s" if k["bandwidth_mib"]
                     else "none", wait,
                     _f(s, "wire_mib_s"), _f(s, "pages_per_second"), _f(s, "payload_pages_s"),
                     _f(s, "compress_busy"),
                     _f(s, "compress_busy_rate", "{:.2f}"), _f(s, "total_time_ms"), _f(s, "ratio", "{:.2f}")])
    return ("Legacy compress: wait-thread on/off -> used bandwidth, pages/s", head, rows)


def cpu_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    kinds = ("main", "vcpu", "mig-main", "mig-send", "compress", "mig-recv", "decompress")
    head = (["qemu", "point"] + [f"src {k}" for k in kinds[:5]]
            + [f"dst {k}" for k in ("main", "mig-recv", "decompress")])
    rows = []
    for s in summaries:
        fig = s.get("figures") or {}

        def cell(side: str, kind: str, fig: dict = fig) -> str:
            f = fig.get(f"{side}_{kind}_cpu_s")
            n = fig.get(f"{side}_{kind}_n")
            if not f:
                return "-"
            return f"{f['median']:.3f}" + (f" ({n['median']:.0f})" if n and n["median"] > 1 else "")

        rows.append([s["point"]["qemu_version"], _label(s)] + [cell("src", k) for k in kinds[:5]]
                    + [cell("dst", k) for k in ("main", "mig-recv", "decompress")])
    return ("CPU seconds per QEMU thread kind during the migration (median; (n) threads of that kind)",
            head, rows)


def xbzrle_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    head = ["qemu", "point", "cache-miss-rate", "overflow", "encoding-rate", "xbzrle pages", "ratio"]
    rows = [[s["point"]["qemu_version"], _label(s), _f(s, "xbzrle_cache_miss_rate", "{:.2f}"),
             _f(s, "xbzrle_overflow"), _f(s, "xbzrle_encoding_rate", "{:.2f}"), _f(s, "xbzrle_pages"),
             _f(s, "ratio", "{:.2f}")]
            for s in summaries if s["point"]["knobs"]["mode"] == "xbzrle"]
    return ("xbzrle cache", head, rows)


def knob_table(checks: Sequence[Mapping[str, Any]]) -> Table:
    head = ["knob", "where", "took effect", "detail"]
    rows = [[c["knob"], str(c["where"]), "yes" if c["took_effect"] else "NO", c["detail"]] for c in checks]
    return ("Did every knob take effect (measured, not read back)", head, rows)


def convergence_table(summaries: Sequence[Mapping[str, Any]], bound_s: float) -> Table:
    head = ["qemu", "point", "converged", "what happened"]
    rows = []
    for s in summaries:
        if s["converged"] == s["runs"] and not s["guest_broken"]:
            continue
        what = ", ".join(sorted(set(s["not_converged"]))) or "-"
        if s["errors"]:
            what += f"; error: {s['errors'][0]}"
        if s["guest_broken"]:
            what += f"; L1 workload failed its verify after {s['guest_broken']} run(s)"
        rows.append([s["point"]["qemu_version"], _label(s), _conv(s), what])
    return (f"Points that did not converge within {bound_s:g} s (cancelled there) or did not complete",
            head, rows)


def dirty_rate_table(chains: Sequence[Mapping[str, Any]]) -> Table:
    head = ["qemu", "workload", "before migration MiB/s", "during migration MiB/s", "that migration took"]
    rows = []
    for c in chains:
        warm = next((r for r in c["runs"] if r.get("repeat", 0) < 0), None) or {}
        during = warm.get("dirty_rate")
        took = (warm.get("stats") or {}).get("total_time_ms")

        def v(d: Mapping[str, Any] | None) -> str:
            if not d:
                return "-"
            return str(d.get("dirty_rate_mib_s", d.get("error", "-")))

        rows.append([c["qemu"], c["workload"], v(c.get("dirty_rate_before")), v(during),
                     f"{took / 1000:.1f} s" if isinstance(took, (int, float)) else "-"])
    return ("calc-dirty-rate (page-sampling, 1 s) before and during migration (the chain's warm-up run; "
            "a migration shorter than 1 s leaves the rest of the window with the source stopped)",
            head, rows)


def render_text(table: Table) -> str:
    title, head, rows = table
    if not rows:
        return f"{title}\n  (none)\n"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [title, "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "  " + "  ".join("-" * w for w in widths)]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines) + "\n"


def all_tables(study: Mapping[str, Any]) -> list[Table]:
    s = study["points"]
    return [summary_table(s), threads_table(s), wait_table(s), cpu_table(s), xbzrle_table(s),
            knob_table(study["knob_checks"]), convergence_table(s, study["bound_s"]),
            dirty_rate_table(study["chains"])]
