"""The HTML report: one self-contained file rendered from a results.json document.

Plots are inline SVG drawn here (no plotting library: the shapes are a strip plot with a
median and a box plot from recorded quartiles, and hand-drawn SVG keeps the page a few tens
of KB, text-searchable, and free of a heavy dependency in every CI venv). The page's small
script filters the table by verdict and records on <body> how many plots the browser laid
out with a real size, which the headless-browser test reads back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import jinja2

from harness.core.paths import TEMPLATES
from harness.vm.migration import COMPRESSION_MODES

VERDICT_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "error": "#6a1b9a",
                   "known-issue": "#ef6c00", "skip": "#757575"}
# (key in metrics.migration, title, unit) of the per-mode migration plots.
MIGRATION_PLOTS = (
    ("total_time_ms", "Migration time by compression mode", "ms"),
    ("downtime_ms", "Downtime by compression mode", "ms"),
    ("ram_pages_per_second", "Pages per second by compression mode", "pages/s"),
)


@dataclass(frozen=True)
class Point:
    value: float
    verdict: str
    label: str


# --------------------------------------------------------------------------------------------
# data from results.json


def migration_series(scenarios: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list[Point]]]:
    """metric -> compression mode -> points, from scenarios whose migration completed.

    A failed or timed-out migration's counters describe a partial transfer, so they are left
    out of the distributions (the table still shows those runs).
    """
    out: dict[str, dict[str, list[Point]]] = {k: {} for k, _, _ in MIGRATION_PLOTS}
    for s in scenarios:
        m = s.get("metrics") or {}
        if m.get("migration_status") != "completed":
            continue
        mig = m.get("migration") or {}
        mode = ((s.get("params") or {}).get("migration") or {}).get("compression") or "?"
        values = dict(mig)
        if "total_time_ms" not in values and isinstance(m.get("migration_seconds"), (int, float)):
            values["total_time_ms"] = m["migration_seconds"] * 1000.0
        for key, _, _ in MIGRATION_PLOTS:
            v = values.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key].setdefault(mode, []).append(Point(float(v), s.get("verdict", ""),
                                                           s.get("id", "")))
    order = {m: i for i, m in enumerate(COMPRESSION_MODES)}
    return {k: dict(sorted(g.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))
            for k, g in out.items()}


def exit_cost_panels(scenarios: Iterable[Mapping[str, Any]]
                     ) -> tuple[dict[str, dict[str, Mapping[str, Any]]], list[str]]:
    """("l2 cpuid", ...) -> profile label -> figure stats, and the labels figures carry.

    Reads the figures a vmexit result keeps in metrics["figures"] (quartiles, p10/p90, n per
    profile, machine, level and exit kind); a run without vmexit results gives no panels.
    """
    panels: dict[str, dict[str, Mapping[str, Any]]] = {}
    labels: list[str] = []
    for s in scenarios:
        figures = (s.get("metrics") or {}).get("figures")
        if not isinstance(figures, list):
            continue
        for f in figures:
            if not isinstance(f, Mapping) or not all(
                    isinstance(f.get(k), (int, float)) for k in ("median", "q1", "q3")):
                continue
            panel = f"{f.get('level', '?')} {f.get('instruction') or f.get('kind', '?')}"
            name = str(f.get("profile", "?")) + ("" if f.get("machine", "src") == "src"
                                                  else f" ({f.get('machine')})")
            group = panels.setdefault(panel, {})
            k, n = name, 2
            while k in group:  # the same profile from a repeated run: keep both boxes
                k, n = f"{name} #{n}", n + 1
            group[k] = f
            if f.get("label") and f["label"] not in labels:
                labels.append(str(f["label"]))
    return panels, labels


# --------------------------------------------------------------------------------------------
# SVG


def nice_ticks(hi: float, count: int = 5) -> list[float]:
    """0 and round steps up to at least ``hi`` (1, 2, 2.5, 5 x 10^n)."""
    if hi <= 0 or not math.isfinite(hi):
        return [0.0, 1.0]
    raw = hi / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def fmt(v: float) -> str:
    """Short axis/label text: 1.2M, 35k, 812, 3.5, 0.04."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


_W, _H, _L, _R, _T, _B = 560, 280, 64, 16, 36, 58


def _frame(plot_id: str, title: str, unit: str, top_value: float,
           columns: int) -> tuple[list[str], Callable[[float], float], float]:
    """The plot's opening SVG, title, unit and grid up to a nice tick over top_value; with the
    value-to-y scale and the width of one of `columns` category bands."""
    ticks = nice_ticks(top_value)
    top = ticks[-1] or 1.0

    def y(v: float) -> float:
        return _T + (_H - _T - _B) * (1 - v / top)

    out = [f'<svg class="plot" id="{escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" '
           f'viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
           f'aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>",
           f'<text x="{_W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
           f'<text x="12" y="{_T + (_H - _T - _B) / 2}" class="u" text-anchor="middle" '
           f'transform="rotate(-90 12 {_T + (_H - _T - _B) / 2})">{escape(unit)}</text>']
    for t in ticks:
        yy = y(t)
        out.append(f'<line x1="{_L}" x2="{_W - _R}" y1="{yy:.1f}" y2="{yy:.1f}" class="g"/>')
        out.append(f'<text x="{_L - 6}" y="{yy + 4:.1f}" text-anchor="end" class="a">{fmt(t)}</text>')
    return out, y, (_W - _L - _R) / max(1, columns)


def _category_labels(names: Sequence[str], x0: float, band: float, counts: Sequence[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        cx = x0 + band * (i + 0.5)
        out.append(f'<text x="{cx:.1f}" y="{_H - _B + 16}" text-anchor="middle" class="a">'
                   f"{escape(name)}</text>")
        out.append(f'<text x="{cx:.1f}" y="{_H - _B + 30}" text-anchor="middle" class="n">'
                   f"{escape(counts[i])}</text>")
    return out


def strip_plot(plot_id: str, title: str, unit: str, groups: Mapping[str, Sequence[Point]]) -> str:
    """One column of points per group, coloured by verdict, with the median as a bar."""
    values = [p.value for g in groups.values() for p in g]
    names = list(groups)
    out, y, band = _frame(plot_id, title, unit, max(values) if values else 1.0, len(names))
    for i, name in enumerate(names):
        pts = groups[name]
        cx = _L + band * (i + 0.5)
        half = min(band * 0.32, 40)
        for j, p in enumerate(pts):
            # Deterministic jitter: same file, same picture.
            dx = ((j * 0.618) % 1 - 0.5) * 2 * half * 0.8
            colour = VERDICT_COLOURS.get(p.verdict, "#455a64")
            out.append(f'<circle cx="{cx + dx:.1f}" cy="{y(p.value):.1f}" r="4" fill="{colour}" '
                       f'fill-opacity="0.75"><title>{escape(p.label)}: {fmt(p.value)} {escape(unit)}'
                       f"</title></circle>")
        if pts:
            med = median([p.value for p in pts])
            out.append(f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{y(med):.1f}" '
                       f'y2="{y(med):.1f}" class="m"><title>median {fmt(med)} {escape(unit)}'
                       f"</title></line>")
            out.append(f'<text x="{cx + half + 3:.1f}" y="{y(med) + 4:.1f}" class="n">{fmt(med)}</text>')
    out += _category_labels(names, _L, band, [f"n={len(groups[n])}" for n in names])
    out.append("</svg>")
    return "\n".join(out)


def box_plot(plot_id: str, title: str, unit: str, boxes: Mapping[str, Mapping[str, Any]]) -> str:
    """One box per entry from recorded stats: q1..q3 box, median bar, p10..p90 whiskers."""
    def lo_hi(f: Mapping[str, Any]) -> tuple[float, float]:
        lo = f.get("p10", f.get("min", f["q1"]))
        hi = f.get("p90", f.get("max", f["q3"]))
        return float(lo), float(hi)

    top_value = max((lo_hi(f)[1] for f in boxes.values()), default=1.0)
    names = list(boxes)
    out, y, band = _frame(plot_id, title, unit, top_value, len(names))
    for i, name in enumerate(names):
        f = boxes[name]
        cx = _L + band * (i + 0.5)
        half = min(band * 0.25, 36)
        lo, hi = lo_hi(f)
        q1, q3, med = float(f["q1"]), float(f["q3"]), float(f["median"])
        tip = (f"{name}: median {fmt(med)}, q1 {fmt(q1)}, q3 {fmt(q3)}, p10 {fmt(lo)}, "
               f"p90 {fmt(hi)}, n={f.get('n', '?')}")
        out.append(f"<g><title>{escape(tip)}</title>")
        out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" class="w"/>')
        for v in (lo, hi):
            out.append(f'<line x1="{cx - half / 2:.1f}" x2="{cx + half / 2:.1f}" y1="{y(v):.1f}" '
                       f'y2="{y(v):.1f}" class="w"/>')
        out.append(f'<rect x="{cx - half:.1f}" y="{y(q3):.1f}" width="{2 * half:.1f}" '
                   f'height="{max(1.0, y(q1) - y(q3)):.1f}" class="b"/>')
        out.append(f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{y(med):.1f}" '
                   f'y2="{y(med):.1f}" class="m"/>')
        out.append(f'<text x="{cx + half + 3:.1f}" y="{y(med) + 4:.1f}" class="n">{fmt(med)}</text>')
        out.append("</g>")
    out += _category_labels(names, _L, band, [f"n={boxes[n].get('n', '?')}" for n in names])
    out.append("</svg>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# the page


def render_html(doc: Mapping[str, Any], base_dir: Path | None = None) -> str:
    """The report page for one results.json document; links are relative to ``base_dir``."""
    scenarios = list(doc.get("scenarios") or [])
    series = migration_series(scenarios)
    migration_plots = [strip_plot(f"plot-{key}", title, unit, series[key])
                       for key, title, unit in MIGRATION_PLOTS if series[key]]
    panels, exit_labels = exit_cost_panels(scenarios)
    exit_plots = [box_plot(f"plot-exit-{i}", f"Exit cost per profile: {panel}",
                           "TSC cycles per exit", boxes)
                  for i, (panel, boxes) in enumerate(panels.items())]
    counts: dict[str, int] = {}
    for s in scenarios:
        counts[s.get("verdict", "?")] = counts.get(s.get("verdict", "?"), 0) + 1
    rows = [_row(s, base_dir) for s in scenarios]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined)
    host = doc.get("host") or {}
    run = doc.get("run") or {}
    matrix = doc.get("matrix") or {}
    return env.get_template("report.html.j2").render(
        title=f"nestvirt: {matrix.get('name') or 'run'}",
        counts=sorted(counts.items()), colours=VERDICT_COLOURS, rows=rows,
        failures=[r for r in rows if r["verdict"] in ("fail", "error", "known-issue")],
        migration_plots=migration_plots, exit_plots=exit_plots, exit_labels=exit_labels,
        migration_left_out=sum(1 for s in scenarios if (s.get("metrics") or {}).get(
            "migration_status") not in (None, "completed")),
        pruned=doc.get("pruned") or [], repeats=doc.get("repeats") or [],
        until_fail=doc.get("until_fail"), host=_host_lines(host), run=_run_lines(run, matrix))


def qemu_versions(params: Mapping[str, Any]) -> str:
    """The QEMU versions a result ran: "10.0.2", or "7.2.22>10.0.2" from source to destination
    ("-" for a result that records none)."""
    q = params.get("qemu") or {}
    src, dst = ((q.get(side) or {}).get("version") or "" for side in ("src", "dst"))
    if not src:
        return "-"
    return src if src == dst else f"{src}>{dst}"


def _row(s: Mapping[str, Any], base_dir: Path | None) -> dict[str, Any]:
    m = s.get("metrics") or {}
    mig = m.get("migration") or {}
    art = s.get("artifacts") or {}
    link = _rel(art.get("dir"), base_dir)
    repro = _rel(art.get("repro"), base_dir)
    secs = m.get("migration_seconds")
    return {
        "id": s.get("id", ""), "verdict": s.get("verdict", ""), "reason": s.get("reason", ""),
        "mode": ((s.get("params") or {}).get("migration") or {}).get("compression", ""),
        "qemu": qemu_versions(s.get("params") or {}),
        "total": f"{(s.get('durations') or {}).get('total', 0):.1f}s",
        "migrate": f"{secs:.2f}s" if isinstance(secs, (int, float)) else "",
        "downtime": f"{mig['downtime_ms']} ms" if "downtime_ms" in mig else "",
        "pps": fmt(mig["ram_pages_per_second"]) if isinstance(
            mig.get("ram_pages_per_second"), (int, float)) else "",
        "failed": [c for c in s.get("checks") or [] if not c.get("ok")],
        "dir": link, "repro": repro,
    }


def _rel(path: str | None, base_dir: Path | None) -> str:
    if not path:
        return ""
    if base_dir is None:
        return str(path)
    try:
        return os.path.relpath(Path(path).resolve(), Path(base_dir).resolve())
    except ValueError:
        return str(path)


def _host_lines(h: Mapping[str, Any]) -> list[tuple[str, str]]:
    q = h.get("qemu") or {}
    return [(k, str(v)) for k, v in (
        ("accel", f"{h.get('accel', '?')} ({h.get('accel_reason', '')})"),
        ("host CPU", h.get("cpu_model", "?")), ("vendor / L1 nesting",
                                                 f"{h.get('vendor', '?')} / {h.get('l1_nested', '?')}"),
        ("host kernel", h.get("host_kernel", "?")),
        ("QEMU", f"{q.get('version', '?')} {q.get('binary', '')}"),
        ("QEMU inventory", ", ".join(f"{x.get('version', '?')} ({x.get('origin', '?')})"
                                     for x in h.get("qemus") or [])),
    ) if v]


def _run_lines(run: Mapping[str, Any], matrix: Mapping[str, Any]) -> list[tuple[str, str]]:
    image = run.get("image") or {}
    kernel = image.get("kernel") or {}
    lines = [("matrix", f"{matrix.get('name', '')} ({matrix.get('source', '')})" if matrix else ""),
             ("started", run.get("started", "")), ("seconds", run.get("seconds", "")),
             ("parallel", run.get("jobs", "")), ("attempts per variant", run.get("repeat", "")),
             ("L1 kernel", kernel.get("release", "")), ("initramfs", image.get("initramfs", "")),
             ("out", run.get("out", ""))]
    return [(k, str(v)) for k, v in lines if v not in ("", None)]
