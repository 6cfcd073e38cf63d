"""The study's HTML page: its tables and plots drawn with matplotlib (inline SVG, so the page
stays one self-contained file): wire throughput and pages/s against threads per mode, CPU per
thread kind, migration time against CPU across modes. The page records on <body> how many
plots the browser laid out, which the headless-Chromium test reads back."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from harness.bench.tables import all_tables
from harness.core.paths import TEMPLATES


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    # Drop the XML prologue and DOCTYPE: the <svg> element goes inline into the page.
    return text[text.index("<svg"):]


def _series(points: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[tuple[int, float, float, float]]]:
    """(qemu mode) -> [(threads, median, min, max)] for the modes that have threads."""
    out: dict[str, list[tuple[int, float, float, float]]] = {}
    for s in points:
        k = s["point"]["knobs"]
        f = (s.get("figures") or {}).get(key)
        if k.get("threads") is None or not f or k.get("level") is not None or k.get("bandwidth_mib"):
            continue
        out.setdefault(f"{k['qemu']} {k['mode']}", []).append((k["threads"], f["median"], f["min"], f["max"]))
    return {name: sorted(v) for name, v in sorted(out.items())}


def plots(study: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(id, inline SVG) of every plot the study's data allows."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the figures are only written out
    import matplotlib.pyplot as plt

    points = study["points"]
    label = " (TCG: emulated)" if study.get("accel") != "kvm" else ""
    out: list[tuple[str, str]] = []
    for pid, key, title, unit in (
            ("throughput", "wire_mib_s", "Throughput on the wire vs threads", "MiB/s"),
            ("pps", "payload_pages_s", "Pages per second (whole run) vs threads", "pages/s")):
        series = _series(points, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name, pts in series.items():
            xs = [p[0] for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        marker="o", capsize=3, label=name)
        ax.set_xlabel("threads / channels")
        ax.set_ylabel(unit)
        ax.set_title(title + label)
        ax.set_xticks(sorted({x for pts in series.values() for x, *_ in pts}))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        out.append((pid, _svg(fig)))
        plt.close(fig)
    kinds = ("main", "vcpu", "mig-main", "mig-send", "compress", "mig-recv", "decompress")
    rows = [(f"{s['point']['qemu_version']} {s['id'].split('/', 1)[1].rsplit('/', 1)[0]}",
             [((s.get("figures") or {}).get(f"{side}_{k}_cpu_s") or {}).get("median", 0.0)
              for side, k in [("src", k) for k in kinds[:5]] + [("dst", k) for k in kinds[5:]]])
            for s in points if s.get("figures")]
    if rows:
        fig, ax = plt.subplots(figsize=(7.2, 0.32 * len(rows) + 1.6))
        left = [0.0] * len(rows)
        names = [f"src {k}" for k in kinds[:5]] + [f"dst {k}" for k in kinds[5:]]
        for i, name in enumerate(names):
            vals = [r[1][i] for r in rows]
            ax.barh([r[0] for r in rows], vals, left=left, label=name)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set_xlabel("CPU seconds during the migration (median)")
        ax.set_title("CPU per QEMU thread kind" + label)
        ax.legend(fontsize=7, ncol=4, loc="lower right")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        out.append(("cpu", _svg(fig)))
        plt.close(fig)
    pts = [(s, (s.get("figures") or {})) for s in points]
    pts = [(s, f) for s, f in pts if "total_time_ms" in f and "src_cpu_s" in f]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for mode in sorted({s["point"]["knobs"]["mode"] for s, _ in pts}):
            sel = [(s, f) for s, f in pts if s["point"]["knobs"]["mode"] == mode]
            ax.scatter([f["src_cpu_s"]["median"] + f.get("dst_cpu_s", {}).get("median", 0.0) for _, f in sel],
                       [f["total_time_ms"]["median"] / 1000 for _, f in sel], label=mode)
            for s, f in sel:
                ax.annotate(s["point"]["qemu_version"].split(".")[0] + (f" t{s['point']['knobs']['threads']}"
                            if s["point"]["knobs"].get("threads") else ""),
                            (f["src_cpu_s"]["median"] + f.get("dst_cpu_s", {}).get("median", 0.0),
                             f["total_time_ms"]["median"] / 1000), fontsize=6)
        ax.set_xlabel("CPU seconds, source + destination QEMU (median)")
        ax.set_ylabel("migration time s (median)")
        ax.set_title("Time vs CPU across modes" + label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        out.append(("time-cpu", _svg(fig)))
        plt.close(fig)
    return out


def render_html(study: Mapping[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined)
    return env.get_template("bench.html.j2").render(
        study=study, tables=all_tables(study), plots=plots(study))
